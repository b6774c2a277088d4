"""End to end: real fixtures captured, real rescue ISOs built, restores run in QEMU.

Fixtures A-D (real GRUB installs) are captured with the CLI and each capture is built into
an ISO once per module (`SOURCE_DATE_EPOCH` set), with the real kit, base initramfs and
runner. The ISO then boots in QEMU beside a blank scratch disk of the captured size: the
menu's default must start the restore without a key press, the test answers `yes` on the
serial console, and the scratch disk must afterwards boot alone to the fixture's marker.
Also: a healthy original disk makes the menu boot it and stays unchanged, the hybrid GPT
boots UEFI from USB without the El Torito EFI record, `mbrescue build` refuses bad input
without leaving files, and `mbrescue verify --boot` passes.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder import verify
from builder.bootcheck import COMPLETE, FAILED, PROMPT, verify_boot
from builder.fixtures import Fixture, boot_to_marker
from builder.runner.capfile import REGION_MEMBER, Capture
from builder.vm import Disk, Vm, VmConfig, VmTimeout
from tests.conftest import MBRESCUE, ROOT, mbrescue, one_error_line, sha256_of

EPOCH = "1700000000"
PROMPT_TIMEOUT_S = 300.0
COMPLETE_TIMEOUT_S = 300.0
MARKER_TIMEOUT_S = 240.0
MEMORY_MIB = 1024
SCRATCH_SERIAL = "MBRESCUE-SCRATCH"
# GRUB wraps its serial output at 80 columns, so any space may become a line break.
RESTORE_DEFAULT = r"default\s+is\s+the\s+restore"
LOCAL_DEFAULT = r"default\s+is\s+to\s+boot\s+the\s+local\s+disk"

# firmware, how the ISO is attached
BOOT_WAYS = {
    "bios-cd": ("bios", "cdrom"),
    "uefi-cd": ("uefi", "cdrom"),
    "bios-usb": ("bios", "usb"),
    "uefi-usb": ("uefi", "usb"),
}
RESTORE_CASES = [
    *(("A", way) for way in BOOT_WAYS),
    *(("D", way) for way in BOOT_WAYS),
    ("B", "bios-usb"),
    ("C", "bios-cd"),
]


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no serial log)"
    return f"serial log {path}, last {chars} characters:\n{text[-chars:]}"


def _check(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"
    return result


class Isos:
    """Captures and ISOs of the fixtures, each made once, on first use."""

    def __init__(self, fixtures: dict[str, Fixture], work: Path) -> None:
        self.fixtures = fixtures
        self.work = work
        self._captures: dict[str, Path] = {}
        self._isos: dict[str, Path] = {}
        self.build_output: dict[str, str] = {}

    def capture(self, name: str) -> Path:
        if name not in self._captures:
            fixture = self.fixtures[name]
            # A sparse copy: the cached fixture image is never handed to a writer.
            source = self.work / f"host-{name.lower()}.img"
            subprocess.run(["cp", "--sparse=always", fixture.path, source], check=True)
            out = self.work / f"host-{name.lower()}.mbrescue"
            _check(mbrescue("capture", source, "-o", out, "--hostname", f"host-{name.lower()}"))
            source.unlink()
            self._captures[name] = out
        return self._captures[name]

    def iso(self, name: str) -> Path:
        if name not in self._isos:
            out = self.work / f"host-{name.lower()}.iso"
            started = time.monotonic()
            result = _check(mbrescue("build", self.capture(name), "-o", out,
                                     env={"SOURCE_DATE_EPOCH": EPOCH}))  # fmt: skip
            self.build_output[name] = result.stdout + result.stderr
            print(f"built {out.name} in {time.monotonic() - started:.1f} s")
            self._isos[name] = out
        return self._isos[name]


@pytest.fixture(scope="module")
def isos(fixtures: dict[str, Fixture], tmp_path_factory: pytest.TempPathFactory) -> Isos:
    return Isos(fixtures, tmp_path_factory.mktemp("e2e"))


def _blank(path: Path, size: int) -> Path:
    with open(path, "wb") as stream:
        stream.truncate(size)
    return path


def restore_from_iso(
    iso: Path,
    firmware: str,
    interface: str,
    scratch: Path,
    serial_log: Path,
    answer: bool = True,
) -> tuple[str, float]:
    """Boot the ISO beside scratch, wait for the prompt, answer yes: (serial text, s to prompt)."""
    disks = [
        Disk(iso, interface=interface, readonly=True, bootindex=0),
        # OVMF only connects disks in its boot order: the runner must see the scratch disk.
        Disk(scratch, interface="virtio", serial=SCRATCH_SERIAL, bootindex=1),
    ]
    config = VmConfig(firmware=firmware, memory_mib=MEMORY_MIB, disks=disks)
    try:
        with Vm(config, serial_log) as vm:
            vm.expect(RESTORE_DEFAULT, timeout=PROMPT_TIMEOUT_S)
            vm.expect(PROMPT, timeout=PROMPT_TIMEOUT_S)
            to_prompt = vm.elapsed()
            if answer:
                vm.send("yes\r")
                done = vm.expect(rf"{COMPLETE}|{FAILED}", timeout=COMPLETE_TIMEOUT_S)
                assert done.group(0).startswith(COMPLETE), _tail(serial_log)
            return vm.output, to_prompt
    except VmTimeout as exc:
        raise AssertionError(f"{str(exc).splitlines()[0]}\n{_tail(serial_log)}") from None


# --- 1. restore a blank disk, four boot ways ---------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize(("name", "way"), RESTORE_CASES, ids=[f"{n}-{w}" for n, w in RESTORE_CASES])
def test_restore_blank_disk(isos: Isos, name: str, way: str, tmp_path: Path) -> None:
    fixture = isos.fixtures[name]
    iso = isos.iso(name)
    firmware, interface = BOOT_WAYS[way]
    scratch = _blank(tmp_path / "scratch.img", fixture.path.stat().st_size)
    serial_log = tmp_path / "serial.log"
    text, to_prompt = restore_from_iso(iso, firmware, interface, scratch, serial_log)
    print(f"{name} {way}: restore prompt {to_prompt:.1f} s after QEMU start")
    # The plan names the target (the scratch disk, by its serial) and the swap to recreate.
    target = re.search(r"Target (/dev/\S+): [^\r\n]*", text)
    assert target and f"serial {SCRATCH_SERIAL}" in target.group(0), _tail(serial_log)
    swap = (
        rf"Will recreate: swap partition {fixture.swap_partition}: label {fixture.swap_label}, "
        rf"UUID {fixture.swap_uuid}"
    )
    assert re.search(swap, text), _tail(serial_log)
    # The restored disk boots alone, with the firmware its boot chain is for.
    seconds = boot_to_marker(scratch, fixture, timeout=MARKER_TIMEOUT_S)
    print(f"{name} {way}: restored disk reached its marker in {seconds:.1f} s")


# --- 2. a healthy disk is booted, not touched ---------------------------------------------------

HEALTHY_CASES = {"A": "bios-cd", "D": "uefi-cd"}


@pytest.mark.qemu
@pytest.mark.parametrize("name", list(HEALTHY_CASES))
def test_healthy_disk_boots_locally(isos: Isos, name: str, tmp_path: Path) -> None:
    fixture = isos.fixtures[name]
    iso = isos.iso(name)
    firmware, interface = BOOT_WAYS[HEALTHY_CASES[name]]
    disk = tmp_path / "original.img"
    subprocess.run(["cp", "--sparse=always", fixture.path, disk], check=True)
    before = sha256_of(disk)
    serial_log = tmp_path / "serial.log"
    disks = [
        Disk(iso, interface=interface, readonly=True, bootindex=0),
        Disk(disk, interface="virtio", bootindex=1),
    ]
    config = VmConfig(firmware=firmware, memory_mib=MEMORY_MIB, disks=disks)
    try:
        with Vm(config, serial_log) as vm:
            vm.expect(LOCAL_DEFAULT, timeout=PROMPT_TIMEOUT_S)
            vm.expect(rf"{re.escape(fixture.marker)}\r*\n", timeout=MARKER_TIMEOUT_S)
            print(f"{name}: local disk reached its marker {vm.elapsed():.1f} s after QEMU start")
            assert PROMPT not in vm.output, _tail(serial_log)
            try:
                vm.wait_exit(30)  # the fixture's /init powers off: every write is done
            except VmTimeout:
                pass
    except VmTimeout as exc:
        raise AssertionError(f"{str(exc).splitlines()[0]}\n{_tail(serial_log)}") from None
    assert sha256_of(disk) == before, "the healthy disk was changed"


# --- 3. the hybrid GPT alone boots UEFI from USB -------------------------------------------------


@pytest.mark.qemu
def test_uefi_usb_through_gpt_without_el_torito_efi(isos: Isos, tmp_path: Path) -> None:
    fixture = isos.fixtures["A"]
    copy = tmp_path / "no-efi-eltorito.iso"
    shutil.copyfile(isos.iso("A"), copy)
    # OVMF boots the El Torito EFI entry even from a disk, which would hide a broken GPT:
    # wipe the EFI section header and its entry in the copy's boot catalog.
    with open(copy, "r+b") as stream:
        assert [entry.platform for entry in verify.read_boot_catalog(stream)] == [0, 0xEF]
        stream.seek(17 * 2048 + 0x47)  # the El Torito boot record's catalog pointer
        catalog_block = struct.unpack("<I", stream.read(4))[0]
        stream.seek(catalog_block * 2048 + 64)
        stream.write(bytes(64))
    with open(copy, "rb") as stream:
        assert [entry.platform for entry in verify.read_boot_catalog(stream)] == [0]
    scratch = _blank(tmp_path / "scratch.img", fixture.path.stat().st_size)
    _, to_prompt = restore_from_iso(
        copy, "uefi", "usb", scratch, tmp_path / "serial.log", answer=False
    )
    print(f"uefi-usb through the GPT's ESP: restore prompt after {to_prompt:.1f} s")
    with open(scratch, "rb") as stream:
        assert stream.read(1 << 20) == bytes(1 << 20), "written without a yes"


# --- 4. bad input for `mbrescue build` ---------------------------------------------------------


def _assert_nothing_written(out_dir: Path) -> None:
    assert list(out_dir.iterdir()) == [], list(out_dir.iterdir())


def test_build_summary_says_what_the_written_iso_holds(isos: Isos) -> None:
    isos.iso("A")
    summary = next(
        line for line in isos.build_output["A"].splitlines() if "checked in the written file" in line
    )
    print(summary)
    for words in ("El Torito BIOS entry", "EFI/BOOT/BOOTX64.EFI", "hybrid MBR", "GPT with an ESP",
                  "payload with the checked capture",
                  "boots BIOS CD, UEFI CD, BIOS USB, UEFI USB"):  # fmt: skip
        assert words in summary, summary


def test_build_refuses_missing_capture(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = mbrescue("build", tmp_path / "nothing.mbrescue", "-o", out_dir / "x.iso")
    assert "nothing.mbrescue" in one_error_line(result)
    _assert_nothing_written(out_dir)


def test_build_refuses_corrupt_capture(isos: Isos, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.mbrescue"
    shutil.copyfile(isos.capture("A"), corrupt)
    region = Capture.open(os.fspath(corrupt)).members[REGION_MEMBER]
    with open(corrupt, "r+b") as stream:
        stream.seek(region.offset + region.size // 2)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0xFF]))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = mbrescue("build", corrupt, "-o", out_dir / "x.iso")
    one_error_line(result)
    _assert_nothing_written(out_dir)


def test_build_names_grub_package_when_grub_missing(isos: Isos, tmp_path: Path) -> None:
    # The real CLI, with builder.grub looking for the BIOS platform files where there are none.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    program = (
        "import sys; from pathlib import Path; import builder.grub as grub; "
        "grub.BIOS_DIR = Path(sys.argv[1]); from builder.cli import main; "
        "sys.argv = ['mbrescue', *sys.argv[2:]]; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, os.fspath(tmp_path / "no-grub" / "i386-pc"),
         "build", os.fspath(isos.capture("A")), "-o", os.fspath(out_dir / "x.iso")],
        cwd=ROOT, text=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=600,
        env={**os.environ, "SOURCE_DATE_EPOCH": EPOCH},
    )  # fmt: skip
    assert "grub-pc-bin" in one_error_line(result)
    _assert_nothing_written(out_dir)


def test_build_names_package_of_missing_kit_tool(isos: Isos, tmp_path: Path) -> None:
    # A PATH that holds everything of /usr/bin except zstd.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in Path("/usr/bin").iterdir():
        if tool.name != "zstd":
            (bin_dir / tool.name).symlink_to(tool)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = subprocess.run(
        [*MBRESCUE, "build", os.fspath(isos.capture("A")), "-o", os.fspath(out_dir / "x.iso")],
        cwd=ROOT, text=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=600,
        env={**os.environ, "PATH": os.fspath(bin_dir)},
    )  # fmt: skip
    line = one_error_line(result)
    assert "zstd" in line and "apt-get install zstd" in line, line
    _assert_nothing_written(out_dir)


# --- 5. verify --boot -------------------------------------------------------------------------


@pytest.mark.qemu
def test_verify_boot_passes(isos: Isos) -> None:
    started = time.monotonic()
    result = mbrescue("verify", isos.iso("A"), "--boot", timeout=2400)
    print(result.stdout)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    for firmware in ("BIOS", "UEFI", "UEFI-SB"):
        line = re.search(rf"PASS\s+boot {firmware}\s[^\n]*", result.stdout)
        assert line, result.stdout
        # The proof is the restored disk's kernel, not its boot loader's words.
        assert "started its kernel" in line.group(0), line.group(0)
    assert not list(isos.iso("A").parent.glob("*verify-boot*")), "a passing check keeps nothing"
    print(f"verify --boot took {time.monotonic() - started:.0f} s")


@pytest.mark.qemu
def test_verify_boot_fails_when_the_restored_disk_starts_no_kernel(
    isos: Isos, tmp_path: Path
) -> None:
    # A host whose GRUB runs and talks on the serial console but whose kernel is gone: the
    # restore succeeds, the restored disk shows GRUB's menu and "Booting `...'", and no kernel.
    # The old check passed this on GRUB's words.
    fixture = isos.fixtures["A"]
    source = tmp_path / "host-nokernel.img"
    subprocess.run(["cp", "--sparse=always", fixture.path, source], check=True)
    offset = 63 * 512  # fixture A's /boot starts at sector 63
    listing = subprocess.run(["debugfs", "-R", "ls -p /", f"{source}?offset={offset}"],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
    kernel = next(line.split("/")[5] for line in listing.splitlines() if "/vmlinuz-" in line)
    subprocess.run(["debugfs", "-w", "-R", f"rm /{kernel}", f"{source}?offset={offset}"],
                   check=True, capture_output=True)  # fmt: skip
    capture_file = tmp_path / "host-nokernel.mbrescue"
    _check(mbrescue("capture", source, "-o", capture_file, "--hostname", "host-nokernel"))
    iso = tmp_path / "host-nokernel.iso"
    _check(mbrescue("build", capture_file, "-o", iso, env={"SOURCE_DATE_EPOCH": EPOCH}))
    reports = tmp_path / "reports"
    reports.mkdir()
    (result,) = verify_boot(iso, ("bios",), report_dir=reports, disk_boot_timeout_s=60)
    print(result)
    assert result.restored and not result.ok, result
    shot = reports / "host-nokernel-verify-boot-bios.png"
    serial_log = reports / "host-nokernel-verify-boot-bios.log"
    assert result.screenshot == shot and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(shot) in result.detail and str(serial_log) in result.detail, result.detail
    log_text = serial_log.read_text(errors="replace")
    assert "mbrescue: restore complete" in log_text and "Booting" in log_text
