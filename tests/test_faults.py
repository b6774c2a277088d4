"""Real faults in QEMU, with the real rescue ISO: a power cut, a failing sector, a late disk.

Fixture A's capture is built into an ISO once per module (the e2e tests' `Isos`), and the
faults are the machine's, not the code's: QEMU is killed with SIGKILL in the middle of the
write (the target throttled so the write lasts many seconds), QEMU's `blkdebug` driver
fails every write that touches one sector of the target, and a USB disk is hot-plugged
over QMP while the rescue system waits for its disks. The host then judges what reached
the images: the GRUB menu's default on the half-written disk, the ISO's hash, the target.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from builder.bootcheck import COMPLETE, PROMPT
from builder.fixtures import Fixture, boot_to_marker
from builder.initramfs import WAIT_LIMIT_S
from builder.vm import Disk, Vm, VmConfig, VmTimeout
from tests.conftest import sha256_of
from tests.test_e2e_iso import LOCAL_DEFAULT, RESTORE_DEFAULT, Isos

MiB = 1 << 20
SECTOR_BYTES = 512
MEMORY_MIB = 1024
BOOT_TIMEOUT_S = 300.0  # QEMU start to the runner's prompt, under TCG on 2 shared cores
STEP_TIMEOUT_S = 120.0
COMPLETE_TIMEOUT_S = 300.0
MARKER_TIMEOUT_S = 240.0
SCRATCH_SERIAL = "MBRESCUE-SCRATCH"
MBR_SIGNATURE = b"\x55\xaa"
# The region of fixture A is 64 MiB: at 3 MB/s the write lasts about 20 s, long enough to
# cut the power with a quarter of it on the disk.
THROTTLE_WRITE_BPS = 3_000_000
CUT_AFTER_BYTES = 16 * MiB
# The failing sector lies inside the region (past /boot's superblock, inside its data) and
# on a 4 KiB boundary, so a 512-byte or a 4096-byte search for it names the same number.
FAILING_SECTOR = 40_000
# The USB disk is plugged this long after the rescue system's drivers are loaded: well
# after the virtio disk appeared, well inside the documented wait.
LATE_DISK_DELAY_S = 8.0
LATE_SERIAL = "LATEUSB01"
EARLY_SERIAL = "EARLYSMALL"
# A whole line: serial output arrives in pieces, and the runner's reason follows the prefix.
ERROR_LINE = r"mbrescue: error: [^\r\n]+(?=\r?\n)"
# GRUB's menu on the serial console: the second entry runs the rescue system with the
# serial line as its main console, so its shell is reachable from here.
SERIAL_ENTRY = r"Restore host-a boot disk \(serial console\)"
DOWN_ARROW = "\x1b[B"
DRIVERS_LOADED = r"mbrescue: kernel \S+: \d+ disk drivers loaded"
WAIT_OVER = r"mbrescue: disks: ([^\r\n]*)(?=\r?\n)"


@pytest.fixture(scope="module")
def isos(fixtures: dict[str, Fixture], tmp_path_factory: pytest.TempPathFactory) -> Isos:
    return Isos(fixtures, tmp_path_factory.mktemp("faults"))


def _blank(path: Path, size: int) -> Path:
    with open(path, "wb") as stream:
        stream.truncate(size)
    return path


def _tail(vm: Vm, chars: int = 3000) -> str:
    return f"serial console, last {chars} characters:\n{vm.output[-chars:]}"


def _allocated_bytes(path: Path) -> int:
    """What QEMU has written into a sparse image so far (it writes zeros as data too)."""
    return os.stat(path).st_blocks * 512


def _virtio_drive(path: Path, drive_id: str, serial: str, *options: str) -> list[str]:
    """-drive/-device arguments for a virtio disk with extra -drive options (throttling,
    blkdebug), which vm.Disk does not take."""
    drive = ",".join([f"file={os.fspath(path)}", "format=raw", "if=none", f"id={drive_id}",
                      *options])
    return ["-drive", drive, "-device", f"virtio-blk-pci,drive={drive_id},serial={serial}"]


def _pick_serial_entry(vm: Vm) -> None:
    """At GRUB's menu, start the serial-console entry: /init's own lines (the disk wait)
    and the rescue shell are then on the serial line too, not only on the screen."""
    vm.expect(RESTORE_DEFAULT, BOOT_TIMEOUT_S)
    vm.expect(SERIAL_ENTRY, BOOT_TIMEOUT_S)
    vm.send(DOWN_ARROW)
    time.sleep(0.5)
    vm.send("\r")


def _expect_prompt(vm: Vm) -> None:
    """The runner's `yes` prompt; a runner that fails first fails the test at once."""
    found = vm.expect(rf"{PROMPT}|{ERROR_LINE}", BOOT_TIMEOUT_S)
    assert found.group(0).startswith(PROMPT), f"no prompt: {found.group(0)!r}\n{_tail(vm)}"


class Qmp:
    """QEMU's machine protocol on a unix socket: enough for a hot-plug."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(os.fspath(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.stream = self.sock.makefile("rwb")
        assert "QMP" in self._read(), "no QMP greeting"
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.stream.readline()
        assert line, "QMP connection closed"
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        self.stream.write(json.dumps({"execute": command, "arguments": arguments}).encode()
                          + b"\n")
        self.stream.flush()
        while True:
            reply = self._read()
            if "error" in reply:
                raise AssertionError(f"QMP {command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


# --- 1. power cut in the middle of the write -------------------------------------------------


@pytest.mark.qemu
def test_power_cut_mid_write_leaves_the_restore_as_default(isos: Isos, tmp_path: Path) -> None:
    """SIGKILL to QEMU with a quarter of the region on the target: booted again with no
    input, GRUB's probe must not find the captured /boot, so the restore is the default;
    `yes` finishes it, and the disk then boots to its marker."""
    started = time.monotonic()
    fixture = isos.fixtures["A"]
    iso = isos.iso("A")
    region_bytes = fixture.region_end_sectors * SECTOR_BYTES
    target = _blank(tmp_path / "target.img", fixture.path.stat().st_size)
    iso_disk = Disk(iso, interface="cdrom", readonly=True)

    # Boot 1: throttled target, `yes`, then the power cut.
    throttled = VmConfig(memory_mib=MEMORY_MIB, disks=[iso_disk], extra=_virtio_drive(
        target, "target", SCRATCH_SERIAL, f"throttling.bps-write={THROTTLE_WRITE_BPS}"))
    with Vm(throttled, tmp_path / "serial-1-cut.log") as vm:
        try:
            _pick_serial_entry(vm)  # so that /init's and the runner's every line is seen here
            _expect_prompt(vm)
            assert _allocated_bytes(target) == 0, "written before the yes"
            vm.send("yes\r")
            vm.expect(r"writing: ", STEP_TIMEOUT_S)
        except VmTimeout as exc:
            raise AssertionError(f"{exc}\n{_tail(vm)}") from None
        deadline = time.monotonic() + COMPLETE_TIMEOUT_S
        while _allocated_bytes(target) < CUT_AFTER_BYTES:
            assert time.monotonic() < deadline, f"the write did not progress\n{_tail(vm)}"
            assert COMPLETE not in vm.output, f"finished before the cut\n{_tail(vm)}"
            time.sleep(0.1)
        vm.kill()  # SIGKILL: what the guest had not handed to QEMU is lost, as in a power cut
        assert COMPLETE not in vm.output, "the restore finished before the power cut"
    on_disk = _allocated_bytes(target)
    with open(target, "rb") as stream:
        signed = stream.read(SECTOR_BYTES)[510:] == MBR_SIGNATURE
    print(f"power cut with {on_disk} of {region_bytes} region bytes on the target; "
          f"sector 0 {'holds the 55AA signature' if signed else 'is blank'}")
    assert 0 < on_disk < region_bytes

    # Boot 2: the same disk, no key at GRUB; its default must be the restore; finish it.
    disks = [iso_disk, Disk(target, interface="virtio", serial=SCRATCH_SERIAL)]
    with Vm(VmConfig(memory_mib=MEMORY_MIB, disks=disks), tmp_path / "serial-2.log") as vm:
        try:
            default = vm.expect(rf"{RESTORE_DEFAULT}|{LOCAL_DEFAULT}", BOOT_TIMEOUT_S)
            assert re.fullmatch(RESTORE_DEFAULT, default.group(0)), (
                "after the power cut GRUB's probe found the captured /boot UUID on the "
                f"half-written disk and the default boots it\n{_tail(vm)}"
            )
            _expect_prompt(vm)
            vm.send("yes\r")
            done = vm.expect(rf"{COMPLETE}|{ERROR_LINE}", COMPLETE_TIMEOUT_S)
        except VmTimeout as exc:
            raise AssertionError(f"{exc}\n{_tail(vm)}") from None
        assert done.group(0).startswith(COMPLETE), _tail(vm)
    assert sha256_of(target, region_bytes) == sha256_of(fixture.path, region_bytes)

    # Boot 3: the restored disk alone.
    seconds = boot_to_marker(target, fixture, timeout=MARKER_TIMEOUT_S)
    print(f"restored disk reached its marker in {seconds:.1f} s; "
          f"whole test {time.monotonic() - started:.0f} s")


# --- 2. an I/O error at a chosen sector --------------------------------------------------------


@pytest.mark.qemu
def test_io_error_names_the_sector_and_leaves_the_medium_intact(
    isos: Isos, tmp_path: Path
) -> None:
    """blkdebug fails every write touching FAILING_SECTOR: the runner's error line names
    that sector, the rescue shell starts, and the ISO (attached writable, as a USB stick
    can be) is unchanged."""
    started = time.monotonic()
    fixture = isos.fixtures["A"]
    assert FAILING_SECTOR < fixture.region_end_sectors
    medium = tmp_path / "medium.iso"
    shutil.copyfile(isos.iso("A"), medium)
    medium_sha = sha256_of(medium)
    target = _blank(tmp_path / "target.img", fixture.path.stat().st_size)
    rules = tmp_path / "blkdebug.conf"
    rules.write_text(
        "[inject-error]\n"
        'event = "write_aio"\n'
        'iotype = "write"\n'
        'errno = "5"\n'
        f'sector = "{FAILING_SECTOR}"\n'
        'once = "off"\n'
    )
    # The raw format sits on blkdebug, which sits on the image file. werror/rerror=report:
    # the guest sees the error (QEMU could also pause the VM instead).
    extra = ["-drive", f"file=blkdebug:{rules}:{target},format=raw,if=none,id=target,"
             "werror=report,rerror=report",
             "-device", f"virtio-blk-pci,drive=target,serial={SCRATCH_SERIAL}"]
    disks = [Disk(medium, interface="usb", bootindex=0)]
    config = VmConfig(memory_mib=MEMORY_MIB, disks=disks, extra=extra)
    with Vm(config, tmp_path / "serial.log") as vm:
        try:
            _pick_serial_entry(vm)
            _expect_prompt(vm)
            assert f"serial {SCRATCH_SERIAL}" in vm.output, _tail(vm)
            vm.send("yes\r")
            done = vm.expect(rf"{COMPLETE}|{ERROR_LINE}", COMPLETE_TIMEOUT_S)
            print(f"the runner said: {done.group(0)!r}")
            assert done.group(0).startswith("mbrescue: error:"), _tail(vm)
            vm.expect(r"mbrescue: starting a rescue shell", STEP_TIMEOUT_S)
            vm.expect(r"mbrescue# ", STEP_TIMEOUT_S)
            vm.send("echo SHELL-$((40 + 2))\r")
            vm.expect(r"SHELL-42", STEP_TIMEOUT_S)
        except VmTimeout as exc:
            raise AssertionError(f"{exc}\n{_tail(vm)}") from None
        error_line = done.group(0)
    assert "Traceback" not in vm.output, _tail(vm)
    assert COMPLETE not in vm.output
    assert sha256_of(medium) == medium_sha, "the rescue medium was written"
    assert re.search(rf"\bsector {FAILING_SECTOR}\b", error_line), (
        f"the error does not name sector {FAILING_SECTOR}: {error_line!r}"
    )
    print(f"I/O error test {time.monotonic() - started:.0f} s")


# --- 3. a disk that appears late --------------------------------------------------------------


@pytest.mark.qemu
def test_late_usb_disk_is_found_within_the_wait(isos: Isos, tmp_path: Path) -> None:
    """A USB disk hot-plugged LATE_DISK_DELAY_S after the drivers are loaded (the virtio
    disk long present) is found and offered as the target; `no` leaves it untouched."""
    started = time.monotonic()
    fixture = isos.fixtures["A"]
    assert LATE_DISK_DELAY_S + 2 < WAIT_LIMIT_S
    early = _blank(tmp_path / "early-small.img", 16 * MiB)  # too small: listed, not offered
    late = _blank(tmp_path / "late-usb.img", fixture.path.stat().st_size)
    sockets = Path(tempfile.mkdtemp(prefix="mbrescue-qmp-"))
    qmp_path = sockets / "qmp.sock"
    disks = [Disk(isos.iso("A"), interface="cdrom", readonly=True),
             Disk(early, interface="virtio", serial=EARLY_SERIAL)]
    extra = ["-device", "qemu-xhci,id=xhci",
             "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    config = VmConfig(memory_mib=MEMORY_MIB, disks=disks, extra=extra)
    qmp: Qmp | None = None
    try:
        with Vm(config, tmp_path / "serial.log") as vm:
            try:
                _pick_serial_entry(vm)
                # /init prints this when every driver is loaded, just before it starts
                # waiting for the disks.
                vm.expect(DRIVERS_LOADED, BOOT_TIMEOUT_S)
                loaded_at = vm.elapsed()
                qmp = Qmp(qmp_path)
                time.sleep(max(0.0, loaded_at + LATE_DISK_DELAY_S - vm.elapsed()))
                wait_over = re.search(WAIT_OVER, vm.output) is not None
                qmp.execute("blockdev-add", driver="raw", **{"node-name": "late"},
                            file={"driver": "file", "filename": os.fspath(late)})
                qmp.execute("device_add", driver="usb-storage", bus="xhci.0", drive="late",
                            serial=LATE_SERIAL, id="lateusb")
                plugged_at = vm.elapsed()
                listed = vm.expect(WAIT_OVER, BOOT_TIMEOUT_S)
                ended = "before the plug" if wait_over else f"{vm.elapsed():.1f} s"
                print(f"drivers loaded {loaded_at:.1f} s, USB disk plugged {plugged_at:.1f} s "
                      f"after QEMU start; /init's wait ended {ended} with: {listed.group(1)!r}")
                # The whole line: serial output arrives in pieces.
                target = vm.expect(rf"Target (/dev/\w+): [^\r\n]*(?=\r?\n)|{ERROR_LINE}",
                                   BOOT_TIMEOUT_S)
                print(f"the runner at {vm.elapsed():.1f} s: {target.group(0)!r}")
                # Found by the wait, not by luck because the runner started late: either
                # /init's own wait saw it, or the runner said it was looking again.
                assert re.search(r"\bsd[a-z]+\b", listed.group(1)) or (
                    "no disk can take the region yet; looking again" in vm.output
                ), f"nobody waited for the late disk: {_tail(vm)}"
                # usb-storage's `serial` is the USB device's; the runner shows that one.
                assert f"serial {LATE_SERIAL}" in target.group(0), (
                    f"the late USB disk was not offered: {target.group(0)!r}\n{_tail(vm)}"
                )
                _expect_prompt(vm)
                vm.send("no\r")
                vm.expect(r"mbrescue: error: aborted, nothing written", STEP_TIMEOUT_S)
            except VmTimeout as exc:
                raise AssertionError(f"{exc}\n{_tail(vm)}") from None
            finally:
                if qmp is not None:
                    qmp.close()
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    assert _allocated_bytes(late) == 0, "the late disk was written without a yes"
    print(f"late disk test {time.monotonic() - started:.0f} s")
