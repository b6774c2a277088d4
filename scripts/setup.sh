#!/usr/bin/env bash
# Install what mbrescue needs on Debian 12, idempotently and quietly when nothing is missing:
# the Debian packages (apt-get) and the project virtualenv .venv (pip, editable install).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  qemu-system-x86 qemu-utils ovmf
  grub-common grub2-common grub-pc-bin grub-efi-amd64-bin
  mtools dosfstools e2fsprogs fdisk gdisk util-linux mount
  xorriso busybox-static zstd cpio kmod udev python3-venv
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then echo "setup: run as root to install Debian packages" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# apt lists are needed to download the rescue kit's packages (apt-get download)
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then
  apt-get update -q >/dev/null
fi

stamp=.venv/.installed
if [ ! -x .venv/bin/mbrescue ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: creating the virtualenv .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
