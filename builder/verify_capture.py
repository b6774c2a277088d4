"""`mbrescue verify CAPTURE`: a whole check of one capture file, on its own.

What a restore checks before its first write, done here without a disk: the manifest's seal
and the members' sizes against it (Capture.open), every region chunk's SHA-256 and the
region's, the GPT tail and the /boot archive, the manifest against the region's own tables
(Capture.verify); then what that does not cover — every file-level copy
(`files-pN.tar.gz`) against the digest the manifest gives it, and the bounds: every member
lies inside the file, no two overlap. Only the Capture's public reads are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .runner.capfile import Capture
from .runner.errors import MbrescueError

ISO_MAGIC_OFFSET = 0x8001  # "CD001" of the primary volume descriptor at sector 16
ISO_MAGIC = b"CD001"


@dataclass(frozen=True)
class CaptureVerdict:
    chunks: int
    copies: int
    members: int
    region_bytes: int
    host: str = ""
    manifest_sha256: str = ""


def is_iso(path: Path) -> bool:
    """An ISO 9660 image (what `verify` took before captures), by its volume descriptor."""
    try:
        with open(path, "rb") as stream:
            stream.seek(ISO_MAGIC_OFFSET)
            return stream.read(len(ISO_MAGIC)) == ISO_MAGIC
    except OSError:
        return False


def _check_bounds(capture: Capture) -> None:
    end = capture.base + capture.size
    spans = sorted((m.offset, m.offset + m.size, m.name) for m in capture.members.values())
    previous_end, previous = capture.base, ""
    for lo, hi, name in spans:
        if lo < capture.base or hi > end:
            raise MbrescueError(f"member {name} lies outside the file")
        if lo < previous_end and previous:
            raise MbrescueError(f"members {previous} and {name} overlap")
        previous_end, previous = hi, name


def verify_capture(path: Path) -> CaptureVerdict:
    """Every check; raises MbrescueError("PATH is damaged: …") at the first that fails."""
    try:
        with Capture.open(str(path)) as capture:
            _check_bounds(capture)
            capture.verify()  # every chunk, the tables, every member and file-level copy
            copies = len(capture.manifest.file_copies)
            return CaptureVerdict(len(capture.region.chunks), copies, len(capture.members),
                                  capture.region.length_bytes, capture.manifest.hostname,
                                  capture.manifest_sha256)  # fmt: skip
    except MbrescueError as exc:
        reason = str(exc).removeprefix(f"{path}: ").removeprefix(f"{path} ")
        raise MbrescueError(f"{path} is damaged: {reason}") from None
    except OSError as exc:
        raise MbrescueError(f"{path} could not be read: {exc.strerror or exc}") from None


def verdict_line(path: Path, verdict: CaptureVerdict) -> str:
    return (f"mbrescue: {path} is good: seal, {verdict.chunks} region chunks and the region's "
            f"SHA-256, the tables, {verdict.copies} file-level "
            f"cop{'y' if verdict.copies == 1 else 'ies'}, {verdict.members} members in bounds")
