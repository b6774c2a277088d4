"""`mbrescue verify --boot`: prove in QEMU that the ISO restores its host before the day it must.

For each firmware (SeaBIOS and OVMF) the ISO boots as a CD beside a blank scratch
disk of the captured size; the default menu entry starts the restore, the plan's
prompt is answered `yes` on the serial console, and `mbrescue: restore complete`
must follow. Then the scratch disk boots alone, with the firmware the captured
boot chain is for (UEFI when it holds an ESP, else BIOS), and must start its own kernel.

What counts as "started its kernel" (the scratch disk is the VM's only disk and there is
no -kernel, so whatever runs came from it):

1. the kernel's own output on the serial console: its `Linux version` banner, a printk
   line with its `[    1.234567]` timestamp, `Run /init`, or the marker the test
   fixtures' /init prints;
2. for a host whose GRUB and kernel do not use the serial console: the CPU itself,
   sampled over QMP (`info registers`) every SAMPLE_S. SeaBIOS, OVMF and GRUB run in
   real mode, 32-bit protected mode or identity-mapped long mode, all below 4 GiB; only a
   started x86-64 Linux kernel runs at its higher-half addresses (RIP from
   0xffff800000000000 up) or has user space running (CPL 3). Measured on fixture A under
   TCG: RIP below 4 GiB for 8 s (firmware, GRUB, the kernel's decompressor), then in
   0xffffffff8... for the 2 s until its /init powered off: four samples or more.

GRUB's own output proves nothing: a disk stuck at `grub rescue>` shows it too. When no
evidence comes within the timeout, the VGA screen is saved as a PNG (QMP `screendump`)
beside the kept serial log, in the ISO's folder, and the failure names both.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pycdlib

from . import log
from .errors import MbrescueError
from .run import require_tools
from .runner.capfile import Capture
from .runner.manifest import Manifest
from .runner.outputs import copy_output
from .runner.unlock import PROMPT as UNLOCK_PROMPT
from .verify import (
    CAPTURE_MEMBER,
    OPTIONS_PATH,
    PAYLOAD_PATH,
    decrypt_from_iso,
    iter_newc,
    options_encrypted,
    sha256_stream,
    small_file,
)
from .vm import Disk, Vm, VmConfig, VmTimeout

ESP_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
PROMPT = r"Type yes to write"
PASSPHRASE_PROMPT = re.escape(UNLOCK_PROMPT.rstrip())
COMPLETE = r"mbrescue: restore complete"
FAILED = r"mbrescue: error: [^\r\n]*"
# The kernel's own output (not its boot loader's): banner, timestamped printk lines, the
# start of init; the test fixtures' /init prints its marker (their kernels run `quiet`).
KERNEL_OUTPUT = (
    r"Linux version \S+|\[\s*\d+\.\d{6}\] [^\r\n]*|Run /init[^\r\n]*"
    r"|MBRESCUE-FIXTURE-\w+-BOOTED"
)
# x86-64 Linux maps itself (and runs) at the top of the address space.
KERNEL_HALF_START = 0xFFFF800000000000
SAMPLE_S = 0.5
SERIAL_GRACE_S = 20.0
RESTORE_TIMEOUT_S = 900.0
DISK_BOOT_TIMEOUT_S = 240.0
MEMORY_MIB = 1024


@dataclass(frozen=True)
class BootResult:
    firmware: str
    restored: bool
    disk_booted: bool
    seconds_to_prompt: float | None
    seconds: float
    detail: str
    screenshot: Path | None = None  # the VGA screen when it failed

    @property
    def ok(self) -> bool:
        return self.restored and self.disk_booted


@dataclass(frozen=True)
class DiskBoot:
    """Whether a disk, booted alone, started a kernel; and what showed it."""

    started_kernel: bool
    seconds: float
    evidence: str  # what showed it, or what was seen instead
    screenshot: Path | None = None


def manifest_from_iso(iso: Path, work: Path, passphrase: bytes | None = None) -> Manifest:
    """The capture's manifest, read from the payload inside the ISO (decrypted first, for
    an encrypted ISO: its passphrase is needed)."""
    image = pycdlib.PyCdlib()
    try:
        image.open(str(iso))
    except pycdlib.pycdlibexception.PyCdlibException as exc:
        raise MbrescueError(f"{iso} is not a readable ISO ({exc})") from exc
    try:
        if options_encrypted(small_file(image, OPTIONS_PATH)):
            if passphrase is None:
                raise MbrescueError(f"{iso} holds an encrypted capture: --boot needs its "
                                    "passphrase (--passphrase-file or --passphrase-env)")
            plain = decrypt_from_iso(image, work, passphrase)
            with Capture.open(str(plain)) as capture:
                return capture.manifest
        with image.open_file_from_iso(rr_path=PAYLOAD_PATH) as payload:
            for name, _mode, size in iter_newc(payload):
                if name == CAPTURE_MEMBER:
                    copy = work / "capture.mbrescue"
                    with open(copy, "wb") as out:
                        sha256_stream(payload, size, copy_to=out)
                    with Capture.open(str(copy)) as capture:
                        return capture.manifest
    finally:
        image.close()
    raise MbrescueError(f"{iso} holds no capture")


def iso_encrypted(iso: Path) -> bool:
    image = pycdlib.PyCdlib()
    image.open(str(iso))
    try:
        return options_encrypted(small_file(image, OPTIONS_PATH))
    finally:
        image.close()


def disk_firmware(manifest: Manifest) -> str:
    chain = [manifest.partition(number) for number in manifest.boot_chain]
    return "uefi" if any(part.type.lower() == ESP_GUID for part in chain) else "bios"


def kernel_cpu_state(registers: str) -> str | None:
    """The CPU state (from `info registers`) when only a started Linux kernel can be in it."""
    rip = re.search(r"\bRIP=([0-9a-f]{16})\b", registers)
    cpl = re.search(r"\bCPL=(\d)", registers)
    if rip is None:  # real or 32-bit protected mode: firmware or boot loader
        return None
    if int(rip.group(1), 16) >= KERNEL_HALF_START:
        return f"RIP={rip.group(1)} (the kernel's half of the address space)"
    if cpl is not None and cpl.group(1) == "3":
        return f"CPL=3 at RIP={rip.group(1)} (user space)"
    return None


def _save_screen(vm: Vm, png: Path | None) -> Path | None:
    if png is None or not vm.running():
        return None
    # QEMU writes the dump by name, following links: into a folder of our own, then the
    # report directory gets it as any output (a fresh private name, renamed when whole).
    private = Path(tempfile.mkdtemp(prefix="mbrescue-screen-"))
    try:
        vm.screendump(private / "screen.png")
        copy_output(private / "screen.png", png, 0o600)
        return png
    except (MbrescueError, OSError) as exc:
        log.info(f"could not save the screen to {png}: {exc}")
        return None
    finally:
        shutil.rmtree(private, ignore_errors=True)


def check_disk_boots(
    disk: Path,
    firmware: str,
    serial_log: Path,
    screenshot: Path | None = None,
    timeout_s: float = DISK_BOOT_TIMEOUT_S,
) -> DiskBoot:
    """Boot `disk` alone until it shows a started kernel (see the module's text) or time runs out.

    On failure the VGA screen is written to `screenshot` (PNG), when given and QEMU still runs.
    """
    config = VmConfig(
        firmware=firmware,
        memory_mib=MEMORY_MIB,
        disks=[Disk(disk, interface="virtio", bootindex=0)],
        qmp=True,
    )
    with Vm(config, serial_log) as vm:
        deadline = time.monotonic() + timeout_s
        while True:
            ended = not vm.running()
            if ended:
                vm.drain()  # its last words (a marker, then power-off) may still be in the pipe
            printed = vm.search(KERNEL_OUTPUT)
            if printed is not None:
                return DiskBoot(True, vm.elapsed(), f"its kernel printed {printed.group(0)!r}")
            if ended:
                return DiskBoot(
                    False,
                    vm.elapsed(),
                    f"QEMU ended (reset or power-off) after {vm.elapsed():.0f} s with no sign "
                    "of a started kernel",
                )
            try:
                state = kernel_cpu_state(vm.registers())
            except MbrescueError:
                if vm.running():
                    raise
                continue  # QEMU just ended: look at the serial output once more
            if state is not None:
                seconds = vm.elapsed()
                # Proven; a kernel with `quiet` prints later or never: wait a little to say which.
                try:
                    printed_text = repr(vm.expect(KERNEL_OUTPUT, SERIAL_GRACE_S).group(0))
                    also = f"then it printed {printed_text}"
                except VmTimeout:
                    also = "nothing of it on the serial console"
                return DiskBoot(True, seconds, f"the CPU ran the kernel: {state}; {also}")
            if time.monotonic() >= deadline:
                shot = _save_screen(vm, screenshot)
                return DiskBoot(
                    False,
                    vm.elapsed(),
                    f"no kernel started within {timeout_s:.0f} s "
                    "(neither its output on the serial console nor the CPU in a kernel)",
                    shot,
                )
            time.sleep(SAMPLE_S)


def _report_dir(iso: Path) -> Path:
    """Where a failed check's screen and serial log are kept: beside the ISO if writable."""
    for folder in (iso.resolve().parent, Path(tempfile.gettempdir())):
        if os.access(folder, os.W_OK):
            return folder
    raise MbrescueError(f"no writable folder for the verify report beside {iso}")


def _keep(serial_log: Path, screenshot: Path | None, report_dir: Path, stem: str) -> str:
    """Copy the serial log beside the screenshot; the words naming both for the failure."""
    kept_log = report_dir / f"{stem}.log"
    if serial_log.exists() and serial_log.resolve() != kept_log.resolve():
        copy_output(serial_log, kept_log, 0o600)
    where = f"serial log {kept_log}"
    if screenshot is not None:
        where = f"screen {screenshot}, {where}"
    else:
        where = f"no screen saved (QEMU had ended), {where}"
    return where


# The firmware name of the run with OVMF's Secure Boot enforced.
SECURE_BOOT = "uefi-sb"


def boot_check(
    iso: Path,
    manifest: Manifest,
    firmware: str,
    work: Path,
    log_dir: Path | None = None,
    *,
    report_dir: Path | None = None,
    disk_boot_timeout_s: float = DISK_BOOT_TIMEOUT_S,
    passphrase: bytes | None = None,
) -> BootResult:
    started = time.monotonic()
    report_dir = report_dir or _report_dir(iso)
    stem = f"{iso.stem}-verify-boot-{firmware}"
    scratch = work / f"scratch-{firmware}.img"
    with open(scratch, "wb") as blank:
        blank.truncate(manifest.source.size_bytes)
    serial_log = (log_dir or work) / f"verify-boot-{firmware}.log"
    to_prompt: float | None = None
    # What an earlier failed run kept must not stand for this one.
    for stale in (report_dir / f"{stem}.png", report_dir / f"{stem}.log"):
        stale.unlink(missing_ok=True)

    def failed(restored: bool, what: str, shot: Path | None) -> BootResult:
        where = _keep(serial_log, shot, report_dir, stem)
        return BootResult(
            firmware, restored, False, to_prompt, time.monotonic() - started,
            f"{what}; {where}", shot,
        )  # fmt: skip

    # "uefi-sb": OVMF with Secure Boot enforced and Microsoft's keys, as most servers ship:
    # the ISO must boot and restore through shim there. The restored disk then boots with
    # the firmware it was captured for, enforcement off: its own chain need not be signed.
    config = VmConfig(
        firmware="uefi" if firmware == SECURE_BOOT else firmware,
        secure_boot=firmware == SECURE_BOOT,
        memory_mib=MEMORY_MIB,
        disks=[
            Disk(iso, interface="cdrom", readonly=True, bootindex=0),
            Disk(scratch, interface="virtio"),
        ],
        qmp=True,
    )
    with Vm(config, serial_log) as vm:
        try:
            if passphrase is not None:
                vm.expect(PASSPHRASE_PROMPT, timeout=RESTORE_TIMEOUT_S)
                vm.send(passphrase.decode() + "\r")
            vm.expect(PROMPT, timeout=RESTORE_TIMEOUT_S)
            to_prompt = vm.elapsed()
            vm.send("yes\r")
            done = vm.expect(rf"{COMPLETE}|{FAILED}", timeout=RESTORE_TIMEOUT_S)
        except VmTimeout as exc:
            shot = _save_screen(vm, report_dir / f"{stem}.png")
            return failed(False, str(exc).splitlines()[0], shot)
        if not done.group(0).startswith("mbrescue: restore complete"):
            return failed(False, done.group(0), _save_screen(vm, report_dir / f"{stem}.png"))
    boot_firmware = disk_firmware(manifest)
    disk = check_disk_boots(
        scratch, boot_firmware, serial_log, report_dir / f"{stem}.png", disk_boot_timeout_s
    )
    if not disk.started_kernel:
        return failed(
            True, f"the restored disk ({boot_firmware}): {disk.evidence}", disk.screenshot
        )
    return BootResult(
        firmware,
        True,
        True,
        to_prompt,
        time.monotonic() - started,
        f"restored disk started its kernel under {boot_firmware} after {disk.seconds:.0f} s: "
        f"{disk.evidence}",
    )


def verify_boot(
    iso: Path,
    firmwares: tuple[str, ...] = ("bios", "uefi", SECURE_BOOT),
    *,
    report_dir: Path | None = None,
    disk_boot_timeout_s: float = DISK_BOOT_TIMEOUT_S,
    passphrase: bytes | None = None,
) -> list[BootResult]:
    """Restore a scratch disk from the ISO under each firmware and boot it alone.

    A failed check keeps `<iso stem>-verify-boot-<firmware>.png` (the VGA screen) and `.log`
    (the serial console) in `report_dir`, by default the ISO's folder.
    """
    require_tools("qemu-system-x86_64")
    if not iso.is_file():
        raise MbrescueError(f"{iso}: no such ISO file")
    results = []
    work = Path(tempfile.mkdtemp(prefix="mbrescue-verify-", dir="/var/tmp"))
    try:
        manifest = manifest_from_iso(iso, work, passphrase)
        encrypted = iso_encrypted(iso)
        for firmware in firmwares:
            name = "UEFI with Secure Boot enforced" if firmware == SECURE_BOOT else firmware.upper()
            log.info(f"booting {iso.name} under {name} (QEMU, no KVM: about a minute)")
            results.append(
                boot_check(
                    iso,
                    manifest,
                    firmware,
                    work,
                    report_dir=report_dir,
                    disk_boot_timeout_s=disk_boot_timeout_s,
                    passphrase=passphrase if encrypted else None,
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results
