"""`make demo`: the whole job on a built-in example host disk.

Fixture A is the original story's disk (msdos label, ext3 `/boot` at sector 63,
swap `SWAP-sda2` right after it, GRUB's core image in sectors 1..62), built once
with the real `grub-install`. The demo captures it, builds its rescue ISO and
proves the ISO in QEMU: boot, restore onto a blank disk, boot the restored disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "out"


def step(title: str, *args: str | os.PathLike[str]) -> None:
    words = [os.fspath(arg) for arg in args]
    command = [sys.executable, "-m", "builder.cli", *words]
    print(f"\n== {title}\n$ mbrescue {' '.join(words)}", flush=True)
    started = time.monotonic()
    result = subprocess.run(command, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        print(f"demo: '{title}' failed (exit {result.returncode})", file=sys.stderr)
        sys.exit(result.returncode)
    print(f"   ({time.monotonic() - started:.1f} s)", flush=True)


def main() -> None:
    from .fixtures import ensure_fixture

    OUT.mkdir(exist_ok=True)
    print(
        "== example host disk: fixture A (built once with the real grub-install, then cached)",
        flush=True,
    )
    started = time.monotonic()
    disk = ensure_fixture("A").path
    print(f"   {disk} ({time.monotonic() - started:.1f} s)")
    capture = OUT / "demo-host.mbrescue"
    iso = OUT / "demo-host-rescue.iso"
    step(
        "capture the boot region (MBR + gap + /boot) and layout",
        "capture",
        disk,
        "-o",
        capture,
        "--hostname",
        "demo-host",
    )
    step("inspect the capture", "inspect", capture)
    step("build the rescue ISO (BIOS + UEFI, CD + USB)", "build", capture, "-o", iso)
    step("verify the ISO, then boot it in QEMU and restore a blank disk", "verify", "--boot", iso)
    print(f"\ndemo: done. The rescue ISO is {iso}")
    print(f"      write it to a USB stick:  .venv/bin/mbrescue burn {iso} /dev/sdX")


if __name__ == "__main__":
    main()
