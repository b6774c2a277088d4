"""The rescue system itself in QEMU: the kit's kernel with the base and payload initramfs.

Each test boots the kernel directly (`-kernel`/`-initrd`, the two initramfs members
concatenated as GRUB hands them over) on the serial console, with blank virtio disks, and
talks to the runner there as an administrator would: reads the plan, picks a disk by
number, types `yes` (or not). Afterwards the host checks what reached the disk images:
the region byte for byte where the restore went, SHA-256 unchanged everywhere else, and
the restored disk boots to its fixture's marker. The base initramfs, the captures and the
payloads are made once per module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.build import OVERLAYS_DIR, RUNNER_DIR
from builder.fixtures import Fixture, boot_to_marker
from builder.initramfs import make_base_initramfs, make_payload_initramfs, runner_command
from builder.kit import ensure_kit
from builder.log import human_bytes
from builder.runner.capfile import Capture
from builder.vm import Disk, Vm, VmConfig

from .conftest import mbrescue, sha256_of

MiB = 1 << 20
SECTOR = 512
# TCG on a shared 2-core machine: generous, explicit bounds.
PROMPT_TIMEOUT_S = 300.0
COMPLETE_TIMEOUT_S = 300.0
STEP_TIMEOUT_S = 60.0
MARKER_TIMEOUT_S = 300.0
MEMORY_MIB = 1024
# The device name must be followed by the rest of the prompt: output arrives in pieces.
PROMPT = r"Type yes to write (/dev/\w+) \("
COMPLETE = r"mbrescue: restore complete"
UNATTENDED_OPTIONS = b'{"unattended_allowed": true}'


@dataclass(frozen=True)
class Rescue:
    """What one boot of the rescue system needs: the kernel and one initrd file."""

    kernel: Path
    initrd: Path
    capture: Path
    manifest: dict


@pytest.fixture(scope="module")
def rescue(fixtures, tmp_path_factory) -> Callable[..., Rescue]:
    """rescue(name, unattended=False): the rescue system for fixture `name`'s capture.

    The capture is made by the CLI as a user would; the base initramfs comes from its
    cache (built once per kit and runner); each payload is made once per module.
    """
    kit = ensure_kit()
    base = make_base_initramfs(kit, RUNNER_DIR, OVERLAYS_DIR)
    folder = tmp_path_factory.mktemp("rescue-boot")
    captures: dict[str, Path] = {}
    made: dict[tuple[str, bool], Rescue] = {}

    def get(name: str, unattended: bool = False) -> Rescue:
        if name not in captures:
            out = folder / f"{name}.mbrescue"
            result = mbrescue("capture", fixtures[name].path, "-o", out, "--hostname",
                              f"host-{name.lower()}")
            assert result.returncode == 0, result.stderr
            captures[name] = out
        if (name, unattended) not in made:
            extra = {"options.json": UNATTENDED_OPTIONS} if unattended else None
            tag = f"{name}-{'unattended' if unattended else 'default'}"
            payload = make_payload_initramfs(captures[name], folder / f"payload-{tag}.img",
                                             extra=extra)
            initrd = folder / f"initrd-{tag}.img"
            # Base first, payload second: the kernel unpacks both, as from GRUB's two files.
            initrd.write_bytes(base.read_bytes() + payload.read_bytes())
            manifest = Capture.open(str(captures[name])).manifest.raw
            made[name, unattended] = Rescue(kit.kernel, initrd, captures[name], manifest)
        return made[name, unattended]

    return get


@pytest.fixture(scope="module")
def other_host_iso(fixtures, tmp_path_factory) -> Path:
    """A real rescue ISO of another host (fixture B as `otherhost`), made by the CLI: the
    stick an administrator may have left in the machine."""
    folder = tmp_path_factory.mktemp("other-host")
    capture = folder / "otherhost.mbrescue"
    result = mbrescue("capture", fixtures["B"].path, "-o", capture, "--hostname", "otherhost")
    assert result.returncode == 0, result.stderr
    result = mbrescue("build", capture, "-o", folder / "otherhost.iso")
    assert result.returncode == 0, result.stderr
    return folder / "otherhost.iso"


def blank_disk(path: Path, size_bytes: int) -> Path:
    with open(path, "wb") as stream:
        stream.truncate(size_bytes)
    return path


def rescue_vm(system: Rescue, disks: list[Disk], log: Path, append: str = "") -> Vm:
    config = VmConfig(kernel=system.kernel, initrd=system.initrd,
                      append=f"console=ttyS0 {append}".strip(), disks=disks,
                      memory_mib=MEMORY_MIB)
    return Vm(config, log)


def region_bytes(fx: Fixture) -> int:
    return fx.region_end_sectors * SECTOR


def assert_region_restored(fx: Fixture, target: Path) -> None:
    # Fixture A-D on a same-size or larger msdos/GPT target: the region is written as
    # captured (a GPT's backup lies beyond the region), so it equals the source's.
    assert sha256_of(target, region_bytes(fx)) == sha256_of(fx.path, region_bytes(fx))


def disk_listing(output: str) -> dict[str, int]:
    """serial -> number in the runner's `Disks that can take the region:` list."""
    listed = {}
    for number, serial in re.findall(r"^\s*(\d+)\) /dev/\w+: .*?, serial (\S+),", output,
                                     flags=re.MULTILINE):
        listed[serial] = int(number)
    return listed


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["A", "D"])
def test_restores_a_blank_disk_that_then_boots(fixtures, rescue, tmp_path, name):
    """One blank disk: the plan names it, its size, the region and the swap to recreate;
    `yes` on the serial console; `restore complete`; the disk boots to the marker."""
    fx = fixtures[name]
    system = rescue(name)
    size = fx.path.stat().st_size
    target = blank_disk(tmp_path / "blank.img", size)
    with rescue_vm(system, [Disk(target, serial=f"BLANK{name}")], tmp_path / "serial.log") as vm:
        vm.expect(rf"Target /dev/vda: [^\r\n]*serial BLANK{name}, "
                  rf"{re.escape(human_bytes(size))} \({size} bytes, 512-byte sectors\)",
                  PROMPT_TIMEOUT_S)
        region = system.manifest["region"]["length_bytes"]
        assert region == region_bytes(fx)
        vm.expect(rf"Will write: the boot region, {region} bytes", STEP_TIMEOUT_S)
        vm.expect(rf"Will recreate: swap partition {fx.swap_partition}: "
                  rf"label {re.escape(fx.swap_label)}, UUID {fx.swap_uuid}", STEP_TIMEOUT_S)
        assert vm.expect(PROMPT, STEP_TIMEOUT_S).group(1) == "/dev/vda"
        vm.send("yes\r")
        vm.expect(rf"mbrescue: wrote {region} bytes in [\d.]+ s .*verified", COMPLETE_TIMEOUT_S)
        vm.expect(COMPLETE, STEP_TIMEOUT_S)
    assert "Traceback" not in vm.output and "mbrescue: error:" not in vm.output
    assert_region_restored(fx, target)
    boot_to_marker(target, fx, timeout=MARKER_TIMEOUT_S)


@pytest.mark.qemu
def test_asks_which_disk_and_never_offers_the_medium(fixtures, rescue, other_host_iso,
                                                     tmp_path):
    """Five disks: the one named by `mbrescue.medium=` (its serial) is refused and never
    written; so is another host's real rescue stick on USB, which no switch names; the two
    blank fixed disks of different sizes are offered by number, then a blank USB disk of the
    captured size, marked removable; the one picked is restored, the others are untouched."""
    fx = fixtures["A"]
    size = fx.path.stat().st_size
    medium = blank_disk(tmp_path / "medium.img", size)
    with open(medium, "r+b") as stream:
        stream.write(b"MEDIUM" * 100)  # not blank: any write would show in its hash
    one = blank_disk(tmp_path / "one.img", size)
    two = blank_disk(tmp_path / "two.img", size + 32 * MiB)
    stick = tmp_path / "otherhost-stick.img"
    stick.write_bytes(other_host_iso.read_bytes())
    usb_blank = blank_disk(tmp_path / "usb-blank.img", size)
    before = {path: sha256_of(path) for path in (medium, one, two, stick, usb_blank)}
    disks = [Disk(medium, serial="MEDIUMDISK"), Disk(one, serial="TARGETONE"),
             Disk(two, serial="TARGETTWO"), Disk(stick, interface="usb", serial="OTHERSTICK"),
             Disk(usb_blank, interface="usb", serial="USBBLANK")]
    with rescue_vm(rescue("A"), disks, tmp_path / "serial.log", "mbrescue.medium=MEDIUMDISK") as vm:
        vm.expect(r"not offered: /dev/vda: it is the medium the rescue system booted from",
                  PROMPT_TIMEOUT_S)
        listing = vm.expect(r"(?s)Disks that can take the region:(.*?)Restore onto which disk\? "
                            r"Type its number \(1\.\.3\)", STEP_TIMEOUT_S).group(1)
        assert re.search(r"not offered: /dev/sd[a-z]: it is an mbrescue rescue medium "
                         r"\(OTHERHOST, medium id [0-9a-f]+\)", vm.output), vm.output
        numbers = disk_listing(listing)
        # usb-storage has no SCSI serial page: the serial shown is the USB device's own.
        assert numbers == {"TARGETONE": 1, "TARGETTWO": 2, "USBBLANK": 3}, listing
        assert re.search(r"3\) /dev/sd[a-z]: [^\r\n]*serial USBBLANK,[^\r\n]* - same size as "
                         r"the captured disk, removable \(USB\)", listing), listing
        assert "/dev/vda" not in listing and "OTHERSTICK" not in listing
        vm.send(f"{numbers['TARGETTWO']}\r")
        vm.expect(r"Target /dev/vdc: [^\r\n]*serial TARGETTWO", STEP_TIMEOUT_S)
        assert vm.expect(PROMPT, STEP_TIMEOUT_S).group(1) == "/dev/vdc"
        vm.send("yes\r")
        vm.expect(COMPLETE, COMPLETE_TIMEOUT_S)
    assert "Traceback" not in vm.output and "mbrescue: error:" not in vm.output
    assert_region_restored(fx, two)
    for untouched in (medium, one, stick, usb_blank):
        assert sha256_of(untouched) == before[untouched], untouched


@pytest.mark.qemu
def test_unattended_without_opt_in_asks_and_no_drops_to_a_shell(fixtures, rescue, tmp_path):
    """`mbrescue.unattended=1` on a rescue system built without the opt-in still asks;
    answering `no` ends in `mbrescue: error:` and the busybox rescue shell (the /init
    contract), which works; the disk is unchanged."""
    fx = fixtures["A"]
    target = blank_disk(tmp_path / "blank.img", fx.path.stat().st_size)
    with open(target, "r+b") as stream:
        stream.write(b"OLD" * 1000)
    before = sha256_of(target)
    with rescue_vm(rescue("A"), [Disk(target, serial="ONLYDISK")], tmp_path / "serial.log",
                   "mbrescue.unattended=1") as vm:
        vm.expect(r"mbrescue\.unattended=1 ignored: this rescue system was built without the "
                  r"unattended opt-in", PROMPT_TIMEOUT_S)
        vm.expect(PROMPT, STEP_TIMEOUT_S)
        vm.send("no\r")
        vm.expect(r"mbrescue: error: aborted, nothing written", STEP_TIMEOUT_S)
        vm.expect(r"mbrescue: starting a rescue shell", STEP_TIMEOUT_S)
        vm.expect(r"mbrescue# ", STEP_TIMEOUT_S)
        # The shell is usable: arithmetic proves the echo came from it, not from our input.
        vm.send("echo SHELL-$((40 + 2))\r")
        vm.expect(r"SHELL-42", STEP_TIMEOUT_S)
    assert "Traceback" not in vm.output and COMPLETE not in vm.output
    assert sha256_of(target) == before


@pytest.mark.qemu
def test_target_switch_preselects_a_disk(fixtures, rescue, tmp_path):
    """`mbrescue.target=<serial>` among two disks: no number is asked, the plan is for the
    named disk. Ctrl-C at the prompt (the runner has the console as its controlling tty)
    aborts with nothing written and leads to the rescue shell; run again from there,
    answering anything but `yes` writes neither."""
    fx = fixtures["A"]
    size = fx.path.stat().st_size
    one = blank_disk(tmp_path / "one.img", size)
    two = blank_disk(tmp_path / "two.img", size + 32 * MiB)
    before = {path: sha256_of(path) for path in (one, two)}
    disks = [Disk(one, serial="TARGETONE"), Disk(two, serial="TARGETTWO")]
    with rescue_vm(rescue("A"), disks, tmp_path / "serial.log", "mbrescue.target=TARGETTWO") as vm:
        vm.expect(r"Target /dev/vdb: [^\r\n]*serial TARGETTWO", PROMPT_TIMEOUT_S)
        assert vm.expect(PROMPT, STEP_TIMEOUT_S).group(1) == "/dev/vdb"
        assert "Restore onto which disk" not in vm.output
        vm.send("\x03")
        vm.expect(r"mbrescue: error: interrupted, nothing written", STEP_TIMEOUT_S)
        vm.expect(r"the restore runner ended with exit status 130", STEP_TIMEOUT_S)
        vm.expect(r"mbrescue# ", STEP_TIMEOUT_S)
        vm.send(runner_command() + "\r")
        assert vm.expect(PROMPT, PROMPT_TIMEOUT_S).group(1) == "/dev/vdb"
        vm.send("y\r")  # not the word: an abort
        vm.expect(r"mbrescue: error: aborted, nothing written", STEP_TIMEOUT_S)
    assert {path: sha256_of(path) for path in (one, two)} == before


@pytest.mark.qemu
def test_unattended_with_opt_in_restores_without_asking(fixtures, rescue, tmp_path):
    """Built with the opt-in and booted with `mbrescue.unattended=1 mbrescue.target=FLEET01`:
    restored without a prompt. (A lone disk that is merely large enough would not be: only
    a target switch or the captured serial/WWN proves which disk it is; see test_targets.)"""
    fx = fixtures["A"]
    target = blank_disk(tmp_path / "blank.img", fx.path.stat().st_size)
    with rescue_vm(rescue("A", unattended=True), [Disk(target, serial="FLEET01")],
                   tmp_path / "serial.log", "mbrescue.unattended=1 mbrescue.target=FLEET01") as vm:
        vm.expect(r"mbrescue: unattended restore \(mbrescue\.unattended=1, allowed by the build\)",
                  PROMPT_TIMEOUT_S)
        vm.expect(COMPLETE, COMPLETE_TIMEOUT_S)
    assert "Type yes to write" not in vm.output
    assert "Traceback" not in vm.output and "mbrescue: error:" not in vm.output
    assert_region_restored(fx, target)
