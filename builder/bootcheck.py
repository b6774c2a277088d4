"""`mbrescue verify --boot`: prove in QEMU that the ISO restores its host before the day it must.

For each firmware (SeaBIOS and OVMF) the ISO boots as a CD beside a blank scratch
disk of the captured size; the default menu entry starts the restore, the plan's
prompt is answered `yes` on the serial console, and `mbrescue: restore complete`
must follow. Then the scratch disk boots alone, with the firmware the captured
boot chain is for (UEFI when it holds an ESP, else BIOS), and must show its boot
loader's or kernel's first output on the serial console.
"""

from __future__ import annotations

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
from .verify import CAPTURE_MEMBER, PAYLOAD_PATH, iter_newc, sha256_stream
from .vm import Disk, Vm, VmConfig, VmTimeout

ESP_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
PROMPT = r"Type yes to write"
COMPLETE = r"mbrescue: restore complete"
FAILED = r"mbrescue: error: [^\r\n]*"
# What a restored disk prints first: GRUB (its menu or its messages) or a Linux kernel;
# then, if the host's kernel talks to the serial console, how far it got.
DISK_BOOTED = r"GNU GRUB|Welcome to GRUB|Booting `|Linux version|MBRESCUE-FIXTURE-\w+-BOOTED"
KERNEL_STARTED = r"Linux version [^\r\n]*|Run /init[^\r\n]*|MBRESCUE-FIXTURE-\w+-BOOTED"
KERNEL_TIMEOUT_S = 120.0
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

    @property
    def ok(self) -> bool:
        return self.restored and self.disk_booted


def manifest_from_iso(iso: Path, work: Path) -> dict:
    """The capture's manifest, read from the payload inside the ISO."""
    image = pycdlib.PyCdlib()
    try:
        image.open(str(iso))
    except pycdlib.pycdlibexception.PyCdlibException as exc:
        raise MbrescueError(f"{iso} is not a readable ISO ({exc})") from exc
    try:
        with image.open_file_from_iso(rr_path=PAYLOAD_PATH) as payload:
            for name, _mode, size in iter_newc(payload):
                if name == CAPTURE_MEMBER:
                    copy = work / "capture.mbrescue"
                    with open(copy, "wb") as out:
                        sha256_stream(payload, size, copy_to=out)
                    return Capture.open(str(copy)).manifest
    finally:
        image.close()
    raise MbrescueError(f"{iso} holds no capture")


def disk_firmware(manifest: dict) -> str:
    partitions = {p["number"]: p for p in manifest["layout"]["partitions"]}
    chain = [partitions[n] for n in manifest["boot_chain"] if n in partitions]
    return "uefi" if any((p.get("type") or "").lower() == ESP_GUID for p in chain) else "bios"


def boot_check(
    iso: Path, manifest: dict, firmware: str, work: Path, log_dir: Path | None = None
) -> BootResult:
    started = time.monotonic()
    scratch = work / f"scratch-{firmware}.img"
    with open(scratch, "wb") as blank:
        blank.truncate(manifest["source"]["size_bytes"])
    serial_log = (log_dir or work) / f"verify-boot-{firmware}.log"
    to_prompt: float | None = None
    try:
        config = VmConfig(
            firmware=firmware,
            memory_mib=MEMORY_MIB,
            disks=[
                Disk(iso, interface="cdrom", readonly=True, bootindex=0),
                Disk(scratch, interface="virtio"),
            ],
        )
        with Vm(config, serial_log) as vm:
            vm.expect(PROMPT, timeout=RESTORE_TIMEOUT_S)
            to_prompt = vm.elapsed()
            vm.send("yes\r")
            done = vm.expect(rf"{COMPLETE}|{FAILED}", timeout=RESTORE_TIMEOUT_S)
            if not done.group(0).startswith("mbrescue: restore complete"):
                return BootResult(
                    firmware, False, False, to_prompt, time.monotonic() - started, done.group(0)
                )
    except VmTimeout as exc:
        return BootResult(
            firmware, False, False, to_prompt, time.monotonic() - started, str(exc).splitlines()[0]
        )
    boot_firmware = disk_firmware(manifest)
    try:
        with Vm(
            VmConfig(
                firmware=boot_firmware, disks=[Disk(scratch, interface="virtio", bootindex=0)]
            ),
            serial_log,
        ) as vm:
            seen = repr(vm.expect(DISK_BOOTED, timeout=DISK_BOOT_TIMEOUT_S).group(0))
            try:
                seen += f", then {vm.expect(KERNEL_STARTED, timeout=KERNEL_TIMEOUT_S).group(0)!r}"
            except VmTimeout:
                seen += " (its kernel printed nothing on the serial console)"
    except VmTimeout:
        return BootResult(
            firmware,
            True,
            False,
            to_prompt,
            time.monotonic() - started,
            f"the restored disk showed no boot loader output ({boot_firmware})",
        )
    return BootResult(
        firmware,
        True,
        True,
        to_prompt,
        time.monotonic() - started,
        f"restored disk reached its boot loader under {boot_firmware}: {seen}",
    )


def verify_boot(iso: Path, firmwares: tuple[str, ...] = ("bios", "uefi")) -> list[BootResult]:
    require_tools("qemu-system-x86_64")
    if not iso.is_file():
        raise MbrescueError(f"{iso}: no such ISO file")
    results = []
    work = Path(tempfile.mkdtemp(prefix="mbrescue-verify-", dir="/var/tmp"))
    try:
        manifest = manifest_from_iso(iso, work)
        for firmware in firmwares:
            log.info(f"booting {iso.name} under {firmware.upper()} (QEMU, no KVM: about a minute)")
            results.append(boot_check(iso, manifest, firmware, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results
