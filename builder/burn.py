"""`mbrescue burn`: put a rescue ISO on a USB stick (or a disk image), or on a CD.

A stick gets the ISO byte for byte (it is hybrid: BIOS and UEFI boot it as a
disk), after the same care as a restore: the device is shown, must not be
mounted or in use, must be large enough, and nothing is written without `yes`.
The written bytes are read back past the page cache and compared. A CD/DVD
drive is handed to xorriso's cdrecord emulation.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import log
from .errors import MbrescueError
from .run import require_tools, run
from .runner.disk import DiskInfo, disk_info
from .runner.targets import busy_reason

BLOCK_BYTES = 4 << 20
BLKFLSBUF = 0x1261


@dataclass(frozen=True)
class BurnOptions:
    iso: Path
    device: Path
    assume_yes: bool = False
    progress: bool | None = None


def _describe(disk: DiskInfo) -> str:
    parts = [disk.path, log.human_bytes(disk.size_bytes)]
    for label, value in (("model", disk.model), ("serial", disk.serial)):
        if value:
            parts.append(f"{label} {value}")
    return ", ".join(parts)


def _confirm(question: str, assume_yes: bool) -> None:
    if assume_yes:
        return
    print(question, end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip()
    if not sys.stdin.isatty():
        print(file=sys.stderr)  # the answer was not echoed: end the prompt's line
    if answer != "yes":
        raise MbrescueError("aborted, nothing written")


def burn(options: BurnOptions) -> str:
    iso, device = options.iso, options.device
    if not iso.is_file():
        raise MbrescueError(f"{iso}: no such ISO file")
    iso_bytes = iso.stat().st_size
    with open(iso, "rb") as stream:
        stream.seek(0x8001)
        if stream.read(5) != b"CD001":
            raise MbrescueError(f"{iso} is not an ISO 9660 image")
    if not device.exists():
        raise MbrescueError(f"{device}: no such device")
    if device.is_dir():
        raise MbrescueError(f"{device} is a directory, not a device")
    disk = disk_info(os.fspath(device))
    if disk.is_cdrom:
        require_tools("xorriso")
        _confirm(f"burn {iso} to the disc in {_describe(disk)}? Type yes: ", options.assume_yes)
        run(["xorriso", "-as", "cdrecord", "-v", f"dev={device}", "-eject", iso], capture=False)
        return f"burned {iso} to {device}"
    refusal = busy_reason(disk)
    if refusal:
        raise MbrescueError(f"refusing to write {device}: {refusal}")
    if disk.readonly:
        raise MbrescueError(f"refusing to write {device}: it is read-only")
    if disk.size_bytes < iso_bytes:
        raise MbrescueError(
            f"{device} holds {log.human_bytes(disk.size_bytes)}, the ISO needs {log.human_bytes(iso_bytes)}"
        )
    print(f"target: {_describe(disk)}", file=sys.stderr)
    print(
        f"write:  {iso} ({log.human_bytes(iso_bytes)}) from byte 0; everything on the device is lost",
        file=sys.stderr,
    )
    _confirm("Type yes to write: ", options.assume_yes)
    digest = _write(iso, device, iso_bytes, options.progress)
    _verify(device, iso_bytes, digest, disk.kind == "block")
    return f"wrote and verified {log.human_bytes(iso_bytes)} on {device}"


def _write(iso: Path, device: Path, length: int, progress_enabled: bool | None) -> str:
    digest = hashlib.sha256()
    progress = log.Progress("writing", length, progress_enabled)
    flags = os.O_WRONLY | (os.O_EXCL if device.is_block_device() else 0)
    fd = os.open(device, flags)
    try:
        with open(iso, "rb") as source:
            offset = 0
            while chunk := source.read(BLOCK_BYTES):
                digest.update(chunk)
                try:
                    written = os.pwrite(fd, chunk, offset)
                except OSError as exc:
                    raise MbrescueError(
                        f"write error at byte {offset} of {device}: {exc.strerror}"
                    ) from exc
                if written != len(chunk):
                    raise MbrescueError(f"short write at byte {offset} of {device}")
                offset += written
                progress.advance(written)
        os.fsync(fd)
    finally:
        os.close(fd)
    progress.finish()
    return digest.hexdigest()


def _verify(device: Path, length: int, expected: str, is_block: bool) -> None:
    fd = os.open(device, os.O_RDONLY)
    try:
        # Read what the device holds, not what the page cache remembers.
        if is_block:
            fcntl.ioctl(fd, BLKFLSBUF, 0)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        digest = hashlib.sha256()
        offset = 0
        while offset < length:
            chunk = os.pread(fd, min(BLOCK_BYTES, length - offset), offset)
            if not chunk:
                raise MbrescueError(f"{device} ended at byte {offset} while verifying")
            digest.update(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    if digest.hexdigest() != expected:
        raise MbrescueError(f"verification failed: {device} does not hold the ISO's bytes")
