"""What `check` compares beyond the partition table: /boot's files, kernels, the gap.

Standard library only: capture records this on the protected host and `check` reads it
back there. Both sides walk /boot the same way the capture's file archive does
(`os.walk`, files and symlinks of each directory, no directories of their own), so the
recorded list describes exactly what the archive holds. Capture builds the list from
its spooled, uncompressed tar after the thaw, so the list is the frozen snapshot's and
hashing it costs the freeze nothing; `check` builds it from the live mount.

A /boot that was not mounted at capture has no such list, but its file-level copy
(runner/filecopy.py) holds the same facts: `list_from_copy` reads them from it (a
reference member gives its size and SHA-256 in its PAX records). The copy's walk also
stores a symlink to a directory, which the archive's walk leaves out, so a live list held
against a copy is walked the copy's way (`list_live(..., dir_links=True)`).

The gap matters because on an msdos disk GRUB's core image lives in the sectors
between the MBR and the first partition: a `grub-install` rewrites them, and the
partition table and file systems look the same afterwards. A GPT disk's first sectors
are the GPT itself (header and entry array, compared entry by entry elsewhere, and its
CRCs change with any entry), so its gap starts after the primary entry array; its BIOS
boot partition, which holds no file system, is hashed whole for the same reason as the
msdos gap.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import tarfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, BinaryIO

from .errors import MbrescueError
from .filecopy import REF_SHA256, REF_SIZE, SHA256_HEX
from .layout import Layout, Partition
from .tarbounds import BoundedTarInfo

READ_BYTES = 1 << 20
# Beyond this a gap or raw partition is not hashed (no real layout comes near it).
MAX_HASHED_BYTES = 64 << 20
# GRUB rewrites its environment block at boot (`save_default`, `recordfail`, boot
# counting): a changed grubenv is no reason to capture again, and a restore of the old
# one is harmless. Paths are relative to the /boot mount.
VOLATILE_PATTERNS = ("grub/grubenv", "grub2/grubenv", "efi/EFI/*/grubenv", "EFI/*/grubenv")
KERNEL_PREFIX = "vmlinuz-"
MODULES_DIR = "/lib/modules"


def is_volatile(path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in VOLATILE_PATTERNS)


def _type_name(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    return "special"


def _entry(path: str, kind: str, size: int, mode: int, uid: int, gid: int, mtime: int,
           sha256: str | None, target: str | None) -> dict[str, Any]:
    return {"path": path, "type": kind, "size": size, "mode": mode, "uid": uid, "gid": gid,
            "mtime": mtime, "sha256": sha256, "target": target}


def _sha256_stream(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while piece := stream.read(READ_BYTES):
        digest.update(piece)
    return digest.hexdigest()


def list_from_tar(stream: BinaryIO) -> list[dict[str, Any]]:
    """The per-file list of an uncompressed tar of /boot (the capture's spool).

    A hard link is stored once with its data and then as a link member: it is listed
    as the file it is, with the first copy's size and hash, as `check` sees it live.
    """
    with tarfile.open(fileobj=stream, mode="r:", tarinfo=BoundedTarInfo) as archive:
        return _list_members(archive, references=False)


def list_from_copy(stream: BinaryIO) -> list[dict[str, Any]]:
    """The per-file list of a file-level copy (a gzip'd PAX tar, already checked by
    Capture.verify_copies), as list_from_tar gives it: its directories left out, a
    reference listed with the size and SHA-256 it stands for."""
    with tarfile.open(fileobj=stream, mode="r:gz", tarinfo=BoundedTarInfo) as archive:
        return [entry for entry in _list_members(archive, references=True)
                if entry["type"] != "dir"]


def _reference(info: tarfile.TarInfo) -> tuple[int, str] | None:
    if REF_SHA256 not in info.pax_headers:
        return None
    size, digest = info.pax_headers.get(REF_SIZE, ""), info.pax_headers[REF_SHA256]
    if not size.isdigit() or not SHA256_HEX.fullmatch(digest):
        raise MbrescueError(f"/{info.name}: its reference into the region is not well-formed")
    return int(size), digest


def _list_members(archive: tarfile.TarFile, references: bool) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    by_name: dict[str, dict[str, Any]] = {}
    for info in archive:
        mode = stat.S_IMODE(info.mode)
        if info.isreg():
            reference = _reference(info) if references else None
            if reference is not None:
                size, digest = reference
            else:
                member = archive.extractfile(info)
                assert member is not None
                size, digest = info.size, _sha256_stream(member)
            entry = _entry(info.name, "file", size, mode, info.uid, info.gid,
                           int(info.mtime), digest, None)
        elif info.islnk():
            first = by_name.get(info.linkname)
            if first is None:
                raise MbrescueError(f"the /boot archive links {info.name} to a missing file")
            entry = _entry(info.name, "file", first["size"], mode, info.uid, info.gid,
                           int(info.mtime), first["sha256"], None)
        elif info.issym():
            entry = _entry(info.name, "symlink", len(os.fsencode(info.linkname)), mode,
                           info.uid, info.gid, int(info.mtime), None, info.linkname)
        else:
            entry = _entry(info.name, "dir" if info.isdir() else "special", 0, mode,
                           info.uid, info.gid, int(info.mtime), None, None)
        by_name[info.name] = entry
        entries.append(entry)
    return entries


def walk_names(mountpoint: str, dir_links: bool = False) -> list[str]:
    """Paths (relative to the mount) in the order and selection of the capture's archive;
    with dir_links, also each symlink to a directory, as the file-level copy holds them."""
    names = []
    for root, dirs, files in os.walk(mountpoint):
        dirs.sort()
        links = [name for name in dirs if os.path.islink(os.path.join(root, name))]
        for name in sorted(files + links if dir_links else files):
            names.append(os.path.relpath(os.path.join(root, name), mountpoint))
    return names


def _live_entry(mountpoint: str, relative: str) -> dict[str, Any]:
    path = os.path.join(mountpoint, relative)
    try:
        st = os.lstat(path)
        kind = _type_name(st.st_mode)
        sha256 = target = None
        size = st.st_size
        if kind == "file":
            with open(path, "rb") as stream:
                sha256 = hashlib.file_digest(stream, "sha256").hexdigest()
        elif kind == "symlink":
            target = os.readlink(path)
        else:
            size = 0
    except FileNotFoundError:  # removed between the walk and now: gone, as the walk will say
        return {"path": relative, "type": "gone"}
    except OSError as exc:
        raise MbrescueError(f"cannot read {path}: {exc.strerror}") from exc
    return _entry(relative, kind, size, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                  int(st.st_mtime), sha256, target)


def list_live(mountpoint: str, workers: int | None = None,
              dir_links: bool = False) -> list[dict[str, Any]]:
    """The per-file list of a mounted /boot as it is now (files hashed on all cores;
    hashlib lets go of the GIL while it hashes); dir_links: see walk_names."""
    names = walk_names(mountpoint, dir_links)
    with ThreadPoolExecutor(workers or max(os.cpu_count() or 1, 1)) as pool:
        entries = list(pool.map(lambda name: _live_entry(mountpoint, name), names))
    return [entry for entry in entries if entry["type"] != "gone"]


def kernels(entries: Iterable[dict[str, Any]], live_host: bool,
            modules_dir: str = MODULES_DIR) -> list[dict[str, Any]]:
    """The kernels at /boot's top level; on the live host, whether their modules exist."""
    found = []
    for entry in entries:
        path = entry["path"]
        if "/" in path or not path.startswith(KERNEL_PREFIX) or entry["type"] != "file":
            continue
        version = path[len(KERNEL_PREFIX):]
        if not version:
            continue
        modules = os.path.isdir(os.path.join(modules_dir, version)) if live_host else None
        found.append({"file": path, "version": version, "modules": modules})
    return found


def hash_range(fd: int, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    at = offset
    while at < offset + length:
        piece = os.pread(fd, min(READ_BYTES, offset + length - at), at)
        if not piece:
            raise MbrescueError(f"short read at byte {at} of the source")
        digest.update(piece)
        at += len(piece)
    return digest.hexdigest()


def gap_sectors(table_end_lba: int, starts: Iterable[int]) -> tuple[int, int] | None:
    """(first, last) sector of the gap between the table (which ends before
    table_end_lba) and the first partition, or None if there is none."""
    first = table_end_lba
    last = min(starts, default=first) - 1
    if last < first or (last - first + 1) * 4096 > MAX_HASHED_BYTES:
        return None
    return first, last


def table_end_lba(layout: Layout) -> int:
    """The first sector after the MBR, or after a GPT's primary header and entry array."""
    if layout.gpt is None:
        return 1
    entries_bytes = layout.gpt.entry_count * layout.gpt.entry_bytes
    return 2 + -(-entries_bytes // layout.disk.logical_sector_bytes)


def gap_record(fd: int, sector: int, table_end: int,
               starts: Iterable[int]) -> dict[str, Any] | None:
    span = gap_sectors(table_end, starts)
    if span is None:
        return None
    first, last = span
    return {"start_lba": first, "end_lba": last,
            "sha256": hash_range(fd, first * sector, (last - first + 1) * sector)}


def fingerprint(layout: Layout, chain: list[Partition], region_fd: int,
                files_spool_fd: int | None, files_reason: str | None,
                live_host: bool) -> dict[str, Any]:
    """The manifest's `fingerprint`: what `check` holds a live disk against.

    region_fd reads the region as captured (the spool, or the source itself) from
    byte 0; files_spool_fd holds the uncompressed tar of /boot, or is None (then
    files_reason says why).
    """
    sector = layout.disk.logical_sector_bytes
    starts = [p.start_lba for p in layout.partitions if not p.is_extended]
    raw_partitions = [
        {"partition": p.number,
         "sha256": hash_range(region_fd, p.start_lba * sector, p.size_sectors * sector)}
        for p in chain
        if p.fs is None and p.size_sectors * sector <= MAX_HASHED_BYTES
    ]
    files = None
    if files_spool_fd is not None:
        with open(files_spool_fd, "rb", closefd=False) as stream:
            stream.seek(0)
            files = list_from_tar(stream)
    return {
        "gap": gap_record(region_fd, sector, table_end_lba(layout), starts),
        "raw_partitions": raw_partitions,
        "files": files,
        "files_reason": None if files is not None else files_reason,
        "kernels": kernels(files or [], live_host),
        "live_host": live_host,
    }
