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
from dataclasses import dataclass
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
# Boot Loader Specification entries, as RHEL 8+ and Fedora list their kernels (relative to
# the /boot mount); Red Hat's GRUB reads them with its `blscfg` command.
BLS_DIR = "loader/entries"
BLS_SUFFIX = ".conf"
# An entry is a few hundred bytes; a bigger one (a hostile capture's) is not read. Its text
# reaches the console, so each value is bounded and kept printable.
BLS_MAX_BYTES = 64 << 10
BLS_MAX_ENTRIES = 256
BLS_VALUE_CHARS = 256


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


@dataclass(frozen=True)
class BlsEntry:
    """One BLS entry: the keys a kernel list needs (`options` is the boot loader's)."""

    name: str  # the entry's file, relative to /boot: loader/entries/<id>.conf
    title: str | None
    version: str | None
    linux: str | None  # the kernel, relative to the entry's file system: /vmlinuz-<version>
    initrd: tuple[str, ...]


def _printable(value: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in value[:BLS_VALUE_CHARS])


def parse_bls_entry(name: str, text: str) -> BlsEntry:
    """A BLS entry's text: `key value` lines (space or tab), `#` comments; the first
    `title`, `version` and `linux` count, every `initrd` line adds its paths."""
    values: dict[str, str] = {}
    initrd: list[str] = []
    for line in text[:BLS_MAX_BYTES].splitlines():
        words = line.split(None, 1)
        if len(words) < 2 or words[0].startswith("#"):
            continue
        key, value = words[0], words[1].strip()
        if key == "initrd":
            initrd.extend(_printable(path) for path in value.split())
        elif key in ("title", "version", "linux"):
            values.setdefault(key, _printable(value))
    return BlsEntry(name=name, title=values.get("title"), version=values.get("version"),
                    linux=values.get("linux"), initrd=tuple(initrd[:16]))


def is_bls_entry(path: str) -> bool:
    folder, _, file_name = path.rpartition("/")
    return folder == BLS_DIR and file_name.endswith(BLS_SUFFIX)


def bls_from_tar(stream: BinaryIO) -> list[BlsEntry]:
    """The BLS entries of an uncompressed tar of /boot (the capture's spool)."""
    found = []
    with tarfile.open(fileobj=stream, mode="r:", tarinfo=BoundedTarInfo) as archive:
        for info in archive:
            if not (info.isreg() and is_bls_entry(info.name)) or info.size > BLS_MAX_BYTES:
                continue
            member = archive.extractfile(info)
            assert member is not None
            found.append(parse_bls_entry(info.name, member.read().decode("utf-8", "replace")))
            if len(found) >= BLS_MAX_ENTRIES:
                break
    return sorted(found, key=lambda entry: entry.name)


def bls_from_mount(mountpoint: str) -> list[BlsEntry]:
    """The BLS entries of a mounted /boot (what `check` would compare live)."""
    folder = os.path.join(mountpoint, BLS_DIR)
    try:
        names = sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for file_name in names[:BLS_MAX_ENTRIES]:
        path = os.path.join(folder, file_name)
        if not file_name.endswith(BLS_SUFFIX) or not os.path.isfile(path) \
                or os.path.islink(path):
            continue
        with open(path, "rb") as stream:
            text = stream.read(BLS_MAX_BYTES).decode("utf-8", "replace")
        found.append(parse_bls_entry(f"{BLS_DIR}/{file_name}", text))
    return found


def kernels(entries: Iterable[dict[str, Any]], live_host: bool,
            modules_dir: str = MODULES_DIR,
            bls: Iterable[BlsEntry] = ()) -> list[dict[str, Any]]:
    """The kernels at /boot's top level and those BLS entries name; on the live host,
    whether their modules exist. A kernel an entry names carries the entry's title, file
    and initrds (the first entry, when several name it)."""
    found: dict[str, dict[str, Any]] = {}

    def record(path: str, version: str) -> dict[str, Any]:
        modules = os.path.isdir(os.path.join(modules_dir, version)) if live_host else None
        return {"file": path, "version": version, "modules": modules, "title": None,
                "entry": None, "initrd": []}

    for entry in entries:
        path = entry["path"]
        if "/" in path or not path.startswith(KERNEL_PREFIX) or entry["type"] != "file":
            continue
        version = path[len(KERNEL_PREFIX):]
        if not version:
            continue
        found[path] = record(path, version)
    for bls_entry in bls:
        if bls_entry.linux is None:
            continue
        path = bls_entry.linux.lstrip("/")
        if not path or "\0" in path:
            continue
        kernel = found.get(path)
        if kernel is None:
            base = path.rpartition("/")[2]
            version = bls_entry.version or base.removeprefix(KERNEL_PREFIX)
            if not version or "/" in version:
                continue
            kernel = found[path] = record(path, version)
        if kernel["entry"] is None:
            kernel.update(title=bls_entry.title, entry=bls_entry.name,
                          initrd=list(bls_entry.initrd))
    return list(found.values())


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
    bls: list[BlsEntry] = []
    if files_spool_fd is not None:
        with open(files_spool_fd, "rb", closefd=False) as stream:
            stream.seek(0)
            files = list_from_tar(stream)
            stream.seek(0)
            bls = bls_from_tar(stream)
    return {
        "gap": gap_record(region_fd, sector, table_end_lba(layout), starts),
        "raw_partitions": raw_partitions,
        "files": files,
        "files_reason": None if files is not None else files_reason,
        "kernels": kernels(files or [], live_host, bls=bls),
        "live_host": live_host,
    }
