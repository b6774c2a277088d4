"""The rescue ISO: structure (pycdlib, xorriso, sgdisk), reproducibility, and QEMU boots.

The ISO is built once per module from Debian's kernel and a tiny busybox initramfs whose
/init prints a marker, the kernel command line and the payload's marker, then powers off.
QEMU boots it four ways (BIOS/UEFI x CD/USB), once more from USB with the El Torito EFI
entry wiped (so only the GPT's ESP can boot UEFI), and once with a "healthy" local disk
holding the captured /boot UUID, where the default entry must boot the local disk.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pycdlib
import pytest

from builder import cpio, debs, grub, iso
from builder.run import output, run
from builder.vm import Disk, Vm, VmConfig

EPOCH = "1700000000"
BOOT_FS_UUID = "5b0c4c8e-3f0a-4e57-9c1e-2a4d5e6f7a8b"
MEDIUM_ID = "0123456789abcdef"
INIT_MARKER = "MBRESCUE-TEST-INIT"
PAYLOAD_MARKER = "MBRESCUE-TEST-PAYLOAD"
LOCAL_MARKER = "MBRESCUE-TEST-LOCAL-DISK"

INIT_SCRIPT = f"""#!/bin/sh
/bin/busybox mkdir -p /proc /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
for tty in /dev/ttyS0 /dev/console; do
  echo "{INIT_MARKER} cmdline: $(/bin/busybox cat /proc/cmdline)" > $tty
  echo "{INIT_MARKER} payload: $(/bin/busybox cat /payload-marker)" > $tty
done
/bin/busybox poweroff -f
"""


def _cpio(tree: cpio.Tree, path: Path) -> Path:
    with open(path, "wb") as stream:
        cpio.write_tree(tree, stream)
    return path


def build_iso(work: Path, out: Path, *, local_timeout_s: int = 10,
              restore_timeout_s: int = 5) -> iso.IsoReport:
    _, kernel_root = debs.fetch_extracted(debs.kernel_package())
    kernel = next((kernel_root / "boot").glob("vmlinuz-*"))
    _, busybox_root = debs.fetch_extracted("busybox-static")
    base = cpio.Tree()
    base.file_from("bin/busybox", busybox_root / "bin" / "busybox", 0o755)
    base.symlink("bin/sh", "busybox")
    base.file("init", INIT_SCRIPT.encode(), 0o755)
    payload = cpio.Tree()
    payload.file("payload-marker", f"{PAYLOAD_MARKER}\n".encode())
    payload.file("mbrescue/capture.mbrescue", b"not a real capture\n" * 100, 0o600)
    images = grub.make_grub_images(work / "grub", medium_id=MEDIUM_ID)
    cfg = grub.render_grub_cfg(host="testhost", captured_at="2023-11-14 22:13 UTC",
                               region_size="259 MiB", boot_fs_uuid=BOOT_FS_UUID,
                               medium_id=MEDIUM_ID, local_timeout_s=local_timeout_s,
                               restore_timeout_s=restore_timeout_s)
    return iso.write_iso(out, grub=images, kernel=kernel,
                         base_initrd=_cpio(base, work / "base.img"),
                         payload=_cpio(payload, work / "payload.img"), grub_cfg=cfg,
                         volume_label="testhost", medium_id=MEDIUM_ID)


@pytest.fixture(scope="module")
def epoch() -> Iterator[None]:
    saved = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    yield
    if saved is None:
        del os.environ["SOURCE_DATE_EPOCH"]
    else:
        os.environ["SOURCE_DATE_EPOCH"] = saved


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, epoch: None) -> iso.IsoReport:
    work = tmp_path_factory.mktemp("iso")
    # Short menu timeouts: the QEMU tests wait for them in real time.
    return build_iso(work, work / "out" / "testhost.iso", local_timeout_s=2, restore_timeout_s=1)
