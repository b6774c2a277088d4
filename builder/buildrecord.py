"""The build record: which Debian package and version each signed boot file on the ISO is.

`mbrescue build` writes `/mbrescue/build.json` into the ISO: for shim (`BOOTX64.EFI`),
Debian's signed GRUB (`grubx64.efi`) and the signed kernel (`vmlinuz`), the package, its
version, the file's path inside the package and the SHA-256 of the bytes written. `mbrescue
verify` reads the files back (from the ISO 9660 tree and, for the EFI pair, from inside the
El Torito FAT image the firmware boots from a CD) and requires each to match the record;
where this machine's download cache holds that package version, the file must also be the
very one the package ships, so the record's versions are proven, not merely stated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pycdlib
import pycdlib.pycdlibexception

from . import __version__
from .debs import cache_dir, sha256_file
from .errors import MbrescueError
from .grub import GrubImages
from .kit import SHIM_FILE, SHIM_PACKAGE, SIGNED_GRUB_DIR, SIGNED_GRUB_PACKAGE
from .run import run

RECORD_PATH = "/mbrescue/build.json"
RECORD_ISO_PATH = "/MBRESCUE/BUILD.JSN;1"
RECORD_FORMAT = "mbrescue-build-record"
MAX_RECORD_BYTES = 64 * 1024
# ISO path -> the path of the same file inside the El Torito FAT image (None: not there).
SIGNED_FILES = {
    "/EFI/BOOT/BOOTX64.EFI": "::EFI/BOOT/BOOTX64.EFI",
    "/EFI/BOOT/grubx64.efi": "::EFI/BOOT/grubx64.efi",
    "/mbrescue/vmlinuz": None,
}


def signed_files(
    kernel: Path, kernel_package: str, kernel_version: str, grub: GrubImages
) -> dict[str, tuple[str, str, str, Path]]:
    """What `make_record` takes, for this build's GRUB images and kernel."""
    return {
        "/EFI/BOOT/BOOTX64.EFI": (SHIM_PACKAGE, grub.efi_packages[SHIM_PACKAGE],
                                  str(SHIM_FILE), grub.efi_shim),
        # gcdx64: the image for removable media (see kit.EfiLoaders), as grubx64.efi.
        "/EFI/BOOT/grubx64.efi": (SIGNED_GRUB_PACKAGE, grub.efi_packages[SIGNED_GRUB_PACKAGE],
                                  str(SIGNED_GRUB_DIR / "gcdx64.efi.signed"), grub.efi_grub),
        "/mbrescue/vmlinuz": (kernel_package, kernel_version, f"boot/{kernel.name}", kernel),
    }


def make_record(files: dict[str, tuple[str, str, str, Path]]) -> bytes:
    """The record's bytes: `files` maps ISO path -> (package, version, path in package,
    the local file written to the ISO). Sorted, no time: the same inputs give the same bytes."""
    missing = set(SIGNED_FILES) - set(files)
    if missing:
        raise MbrescueError(f"the build record lacks {', '.join(sorted(missing))}")
    record = {
        "format": RECORD_FORMAT,
        "mbrescue": __version__,
        "files": {
            iso_path: {
                "package": package,
                "version": version,
                "file": in_package,
                "sha256": sha256_file(local),
            }
            for iso_path, (package, version, in_package, local) in sorted(files.items())
        },
    }
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()


class _CacheUnreadable(Exception):
    """This user cannot read (or make) the download cache: the comparison is skipped."""


def _cached_file(package: str, version: str, in_package: str) -> Path | None:
    """The package's own copy of the file, if this machine's download cache extracted it.
    Raises _CacheUnreadable when this user cannot look (e.g. not root: $HOME's cache is
    /nonexistent's, or root's cache is root's only)."""
    try:
        for root in sorted((cache_dir() / "extracted").glob(f"{package}_{version}_*")):
            candidate = root / in_package
            if candidate.is_file() and os.access(candidate, os.R_OK):
                return candidate
            if candidate.exists():
                raise _CacheUnreadable(f"{candidate}: not readable by this user")
    except OSError as exc:
        raise _CacheUnreadable(f"{exc.filename or 'the download cache'}: {exc.strerror}"
                               ) from exc
    return None


def _parse(data: bytes) -> dict[str, dict[str, str]]:
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise MbrescueError(f"{RECORD_PATH} is not JSON") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise MbrescueError(f"{RECORD_PATH} is not an mbrescue build record")
    files = record.get("files")
    if not isinstance(files, dict):
        raise MbrescueError(f"{RECORD_PATH} names no files")
    for iso_path in SIGNED_FILES:
        entry = files.get(iso_path)
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(key), str) and entry[key]
            for key in ("package", "version", "file", "sha256")
        ):
            raise MbrescueError(f"{RECORD_PATH} has no complete entry for {iso_path}")
    return files


def check_record(iso: pycdlib.PyCdlib, work: Path) -> str:
    """Each signed file on the ISO (and in its FAT image) against the build record, and the
    record against the download cache's package where it is there. Raises MbrescueError."""
    try:
        with iso.open_file_from_iso(rr_path=RECORD_PATH) as stream:
            data = stream.read(MAX_RECORD_BYTES + 1)
    except pycdlib.pycdlibexception.PyCdlibException:
        raise MbrescueError(f"no build record ({RECORD_PATH})") from None
    if len(data) > MAX_RECORD_BYTES:
        raise MbrescueError(f"{RECORD_PATH} is larger than a build record")
    files = _parse(data)
    fat = work / "record-efi.img"
    iso.get_file_from_iso(str(fat), rr_path="/boot/grub/efi.img")
    found = []
    for iso_path, fat_path in SIGNED_FILES.items():
        entry = files[iso_path]
        name = iso_path.rsplit("/", 1)[1]
        local = work / f"record-{name}"
        iso.get_file_from_iso(str(local), rr_path=iso_path)
        if sha256_file(local) != entry["sha256"]:
            raise MbrescueError(
                f"{iso_path} is not the file the build recorded ({entry['package']} "
                f"{entry['version']})"
            )
        if fat_path is not None:
            inner = work / f"record-fat-{name}"
            run(["mcopy", "-n", "-i", fat, fat_path, inner], env={"MTOOLS_SKIP_CHECK": "1"})
            if sha256_file(inner) != entry["sha256"]:
                raise MbrescueError(
                    f"{fat_path.removeprefix('::')} in the EFI image differs from {iso_path} and the build record"
                )
        try:
            cached = _cached_file(entry["package"], entry["version"], entry["file"])
        except _CacheUnreadable as exc:  # e.g. not root: skipped, and said so
            proof = f"download cache not readable ({exc}), so not compared"
        else:
            if cached is None:
                proof = "not in this machine's download cache, so not compared"
            elif sha256_file(cached) == entry["sha256"]:
                proof = "identical to the package's file"
            else:
                raise MbrescueError(
                    f"{iso_path} is not the {entry['file']} of {entry['package']} "
                    f"{entry['version']} (the download cache holds that package)"
                )
        found.append(f"{name}: {entry['package']} {entry['version']} ({proof})")
    return "; ".join(found)
