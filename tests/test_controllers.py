"""Disks behind server controllers: the rescue system restores a blank disk behind each of
QEMU's storage controllers, and the restored disk then boots behind the same controller
under SeaBIOS (which has a boot driver for each of them).

One rescue userland for the whole module (fixture A's capture in memory, started with
`-kernel/-initrd`: no firmware, no ISO reading, the fast way to the runner); each case boots
it once and the restored disk once. The wait tests boot the same userland against a disk
that appears late, a controller with nothing behind it, and a controller whose scan never
ends (a SAS disk without an address: see builder/vm.py's Disk.wwn).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from builder.fixtures import boot_to_marker
from builder.kit import ensure_kit
from builder.vm import Disk, Vm, VmConfig, VmTimeout

from .conftest import memory_initrd

MEMORY_MIB = 512
STEP_TIMEOUT_S = 240.0
MARKER_TIMEOUT_S = 240.0
PROMPT = r"Type yes to write (/dev/\w+) \("
COMPLETE = r"mbrescue: restore complete[^\r\n]*\r?\n"
FAILED = r"mbrescue: error: [^\r\n]*\r?\n"
DRIVERS_LOADED = r"mbrescue: kernel \S+: \d+ disk drivers loaded"
# Each controller kind of builder/vm.py and the kernel name its disk gets in the rescue system.
CONTROLLER_CASES = [
    ("megasas", "sd"),
    ("mptsas", "sd"),
    ("nvme", "nvme"),
    ("ahci", "sd"),
    ("virtio-scsi", "sd"),
    ("usb", "sd"),
]


@pytest.fixture(scope="module")
def rescue_initrd(fixtures, captures, tmp_path_factory) -> Path:
    """The rescue userland with fixture A's capture in memory, built once for the module."""
    return memory_initrd(captures["A"], tmp_path_factory.mktemp("controllers"))


def blank(path: Path, size_bytes: int) -> Path:
    with open(path, "wb") as stream:
        stream.truncate(size_bytes)
    return path


def rescue_config(initrd: Path, disks: list[Disk], append: str = "",
                  extra: list[str] | None = None) -> VmConfig:
    return VmConfig(kernel=ensure_kit().kernel, initrd=initrd, memory_mib=MEMORY_MIB,
                    append=f"console=ttyS0 {append}".strip(), disks=disks, extra=extra or [])


def tail(vm: Vm, chars: int = 3000) -> str:
    return vm.output[-chars:]


@pytest.mark.qemu
@pytest.mark.parametrize(("interface", "kernel_name"), CONTROLLER_CASES,
                         ids=[case[0] for case in CONTROLLER_CASES])
def test_restores_and_boots_behind_the_controller(fixtures, rescue_initrd, tmp_path,
                                                  interface, kernel_name) -> None:
    fixture = fixtures["A"]
    target = blank(tmp_path / "target.img", fixture.path.stat().st_size)
    config = rescue_config(rescue_initrd, [Disk(target, interface, serial="MBRESCUE-HW")])
    started = time.monotonic()
    with Vm(config, tmp_path / "serial.log") as vm:
        try:
            prompt = vm.expect(PROMPT, STEP_TIMEOUT_S)
            at_prompt = vm.elapsed()
            assert prompt.group(1).startswith(f"/dev/{kernel_name}"), tail(vm)
            vm.send("yes\r")
            done = vm.expect(rf"{COMPLETE}|{FAILED}", STEP_TIMEOUT_S)
        except VmTimeout as exc:
            raise AssertionError(f"{str(exc).splitlines()[0]}\n{tail(vm)}") from None
        assert done.group(0).startswith("mbrescue: restore complete"), tail(vm)
        restored = vm.elapsed()
    seconds = boot_to_marker(target, fixture, timeout=MARKER_TIMEOUT_S, interface=interface)
    print(f"{interface}: prompt at {at_prompt:.1f} s, restored at {restored:.1f} s, the "
          f"restored disk reached its marker under SeaBIOS in {seconds:.1f} s "
          f"(case {time.monotonic() - started:.0f} s)")
