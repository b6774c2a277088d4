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


@pytest.mark.qemu
def test_a_controller_still_scanning_is_named_and_enter_ends_the_wait(rescue_initrd,
                                                                      tmp_path) -> None:
    """A SAS link that is up with no disk attached behind it (QEMU's mptsas with a disk of
    SAS address 0: Linux never attaches it) is a scan that never ends: the runner names the
    controller, and Enter on the console ends the wait long before its limit."""
    target = blank(tmp_path / "target.img", 100 * 1024 * 1024)
    extra = ["-drive", f"file={target},format=raw,if=none,id=stuck",
             "-device", "mptsas1068,id=sas0", "-device", "scsi-hd,drive=stuck,bus=sas0.0"]
    config = rescue_config(rescue_initrd, [], "mbrescue.wait=300", extra)
    with Vm(config, tmp_path / "serial.log") as vm:
        try:
            vm.expect(r"still scanning: host\d+ \(mptsas\): a SAS link is up", STEP_TIMEOUT_S)
            pressed = vm.elapsed()
            vm.send("\r")
            vm.expect(r"the disk wait was ended by a key", 30)
            vm.expect(r"mbrescue: error: no disk can take the region", 30)
        except VmTimeout as exc:
            raise AssertionError(f"{str(exc).splitlines()[0]}\n{tail(vm)}") from None
        print(f"mptsas named at {pressed:.1f} s; Enter ended the wait at {vm.elapsed():.1f} s")


@pytest.mark.qemu
def test_an_empty_controller_ends_the_wait_within_the_bound(rescue_initrd, tmp_path) -> None:
    """A MegaRAID controller with no disk: once nothing scans and no device event comes for
    settle.QUIET_S, the wait ends, well inside mbrescue.wait."""
    from builder.runner.settle import QUIET_S

    bound_s = 90
    config = rescue_config(rescue_initrd, [], f"mbrescue.wait={bound_s}",
                           ["-device", "megasas-gen2,id=raid0"])
    with Vm(config, tmp_path / "serial.log") as vm:
        try:
            vm.expect(DRIVERS_LOADED, STEP_TIMEOUT_S)
            vm.expect(r"mbrescue: error: no disk can take the region", bound_s)
        except VmTimeout as exc:
            raise AssertionError(f"{str(exc).splitlines()[0]}\n{tail(vm)}") from None
        assert "reached its limit" not in vm.output, tail(vm)
        print(f"empty megasas: the wait ended at {vm.elapsed():.1f} s (quiet {QUIET_S:.0f} s, "
              f"bound {bound_s} s)")


@pytest.mark.qemu
def test_a_disk_that_appears_late_is_found(fixtures, rescue_initrd, tmp_path) -> None:
    """A disk hot-plugged onto a virtio-scsi controller after the drivers are loaded and
    /init's own wait is over is found by the runner's wait and offered."""
    fixture = fixtures["A"]
    late = blank(tmp_path / "late.img", fixture.path.stat().st_size)
    config = rescue_config(rescue_initrd, [], "mbrescue.wait=120",
                           ["-device", "virtio-scsi-pci,id=vscsi"])
    config.qmp = True
    with Vm(config, tmp_path / "serial.log") as vm:
        try:
            vm.expect(r"mbrescue: disks: ", STEP_TIMEOUT_S)
            vm.expect(r"no disk can take the region yet", STEP_TIMEOUT_S)
            vm.qmp("blockdev-add", {"driver": "raw", "node-name": "late",
                                    "file": {"driver": "file", "filename": str(late)}})
            vm.qmp("device_add", {"driver": "scsi-hd", "bus": "vscsi.0", "drive": "late",
                                  "id": "latedisk"})
            plugged = vm.elapsed()
            prompt = vm.expect(PROMPT, STEP_TIMEOUT_S)
            vm.send("no\r")
            vm.expect(r"mbrescue: error: aborted, nothing written", 60)
        except VmTimeout as exc:
            raise AssertionError(f"{str(exc).splitlines()[0]}\n{tail(vm)}") from None
        print(f"late disk plugged at {plugged:.1f} s, offered as {prompt.group(1)}")
