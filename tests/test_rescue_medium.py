"""The rescue system reads its capture from its own medium, and can still load it into memory.

The ISO's default entries have GRUB load only the kernel and the base initrd; /init finds the
medium by its id file and reads the capture with Linux's drivers, so the prompt does not wait
for the firmware to read the capture, and the rescue system needs no RAM for it. Two boots:
a capture of over 1 GiB (incompressible /boot data) restored on a 512 MiB VM, which could not
even hold it in memory, and fixture A restored through the menu entry that loads the capture
into memory (for a machine whose drive Linux has no driver for).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from builder.bootcheck import COMPLETE, FAILED, PROMPT
from builder.fixtures import Fixture
from builder.runner.capfile import Capture
from builder.vm import Disk, Vm, VmConfig, VmTimeout
from tests.conftest import mbrescue, sh, sha256_of
from tests.test_e2e_iso import RESTORE_DEFAULT, Isos, _blank, _check

MiB = 1 << 20
SMALL_VM_MIB = 512
BIG_BOOT_MIB = 1250  # /boot, and so the region, past 1 GiB
# Random bytes, stored once (the file-level copy refers to them): the capture is as large as
# the data, so past 1 GiB too.
BIG_FILE_MIB = 1100
EPOCH = "1700000000"
FROM_MEDIUM = r"mbrescue: capture: read from this medium \((/dev/\w+)\)"
FROM_MEMORY = r"mbrescue: capture: loaded into memory by the boot loader"
# GRUB's menu on the serial console; the in-memory entry is the third.
MEMORY_ENTRY = r"capture loaded into memory"
DOWN_ARROW = "\x1b[B"
PROMPT_TIMEOUT_S = 600.0
COMPLETE_TIMEOUT_S = 1200.0


def _tail(vm: Vm, chars: int = 3000) -> str:
    return f"serial console, last {chars} characters:\n{vm.output[-chars:]}"


def _big_host_image(path: Path) -> Path:
    """msdos, one ext4 /boot of 1250 MiB holding 1100 MiB of random bytes."""
    with open(path, "wb") as image:
        image.truncate((BIG_BOOT_MIB + 2) * MiB)
    sh("sfdisk", "-q", path, input_bytes=f"label: dos\n2048,{BIG_BOOT_MIB}MiB,83,*\n".encode())
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-L", "bigboot", "-E", f"offset={2048 * 512}",
       path, f"{BIG_BOOT_MIB}M")  # fmt: skip
    mount = path.parent / "mnt"
    mount.mkdir()
    sh("mount", "-o", f"loop,offset={2048 * 512}", path, mount)
    try:
        with open(mount / "data.bin", "wb") as out:
            for _ in range(BIG_FILE_MIB):
                out.write(os.urandom(MiB))
    finally:
        sh("umount", mount)
    return path


@pytest.mark.qemu
def test_capture_past_1_gib_restores_on_a_512_mib_vm(tmp_path: Path) -> None:
    image = _big_host_image(tmp_path / "big.img")
    capture = tmp_path / "big.mbrescue"
    _check(mbrescue("capture", image, "-o", capture, "--hostname", "bighost"))
    assert capture.stat().st_size > 1024 * MiB  # incompressible: no smaller than the data
    with Capture.open(str(capture)) as opened:
        region = opened.manifest.region
    iso = tmp_path / "big.iso"
    _check(mbrescue("build", capture, "-o", iso, env={"SOURCE_DATE_EPOCH": EPOCH}))
    target = _blank(tmp_path / "target.img", image.stat().st_size)
    disks = [
        Disk(iso, interface="cdrom", readonly=True, bootindex=0),
        Disk(target, interface="virtio", serial="MBRESCUE-SCRATCH", bootindex=1),
    ]
    config = VmConfig(firmware="bios", memory_mib=SMALL_VM_MIB, disks=disks)
    with Vm(config, tmp_path / "serial.log") as vm:
        try:
            vm.expect(RESTORE_DEFAULT, timeout=PROMPT_TIMEOUT_S)
            device = vm.expect(FROM_MEDIUM, timeout=PROMPT_TIMEOUT_S).group(1)
            vm.expect(PROMPT, timeout=PROMPT_TIMEOUT_S)
            to_prompt = vm.elapsed()
            vm.send("yes\r")
            done = vm.expect(rf"{COMPLETE}|{FAILED}", timeout=COMPLETE_TIMEOUT_S)
        except VmTimeout as exc:
            raise AssertionError(f"{str(exc).splitlines()[0]}\n{_tail(vm)}") from None
        assert done.group(0).startswith(COMPLETE), _tail(vm)
        total = vm.elapsed()
    print(f"1 GiB capture ({capture.stat().st_size / MiB:.0f} MiB) on {SMALL_VM_MIB} MiB from "
          f"{device}: prompt at {to_prompt:.1f} s, restore complete at {total:.1f} s")
    assert device == "/dev/sr0"
    assert sha256_of(target, region.length_bytes) == region.sha256


@pytest.mark.qemu
def test_memory_entry_loads_the_capture_into_memory(
    fixtures: dict[str, Fixture], tmp_path: Path
) -> None:
    isos = Isos(fixtures, tmp_path)
    iso = isos.iso("A")
    target = _blank(tmp_path / "target.img", fixtures["A"].path.stat().st_size)
    disks = [
        Disk(iso, interface="cdrom", readonly=True, bootindex=0),
        Disk(target, interface="virtio", serial="MBRESCUE-SCRATCH", bootindex=1),
    ]
    with Vm(VmConfig(firmware="bios", memory_mib=SMALL_VM_MIB, disks=disks),
            tmp_path / "serial.log") as vm:  # fmt: skip
        try:
            vm.expect(RESTORE_DEFAULT, timeout=PROMPT_TIMEOUT_S)
            vm.expect(MEMORY_ENTRY, timeout=PROMPT_TIMEOUT_S)
            vm.send(DOWN_ARROW)  # the first key stops the countdown
            time.sleep(0.5)
            vm.send(DOWN_ARROW)
            time.sleep(0.5)
            vm.send("\r")
            vm.expect(FROM_MEMORY, timeout=PROMPT_TIMEOUT_S)
            vm.expect(PROMPT, timeout=PROMPT_TIMEOUT_S)
            vm.send("yes\r")
            done = vm.expect(rf"{COMPLETE}|{FAILED}", timeout=COMPLETE_TIMEOUT_S)
        except VmTimeout as exc:
            raise AssertionError(f"{str(exc).splitlines()[0]}\n{_tail(vm)}") from None
        assert done.group(0).startswith(COMPLETE), _tail(vm)
        assert not re.search(FROM_MEDIUM, vm.output)
    with Capture.open(str(isos.capture("A"))) as opened:
        region = opened.manifest.region
    assert sha256_of(target, region.length_bytes) == region.sha256
