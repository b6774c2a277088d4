"""A deterministic `newc` cpio writer for initramfs archives.

Entries are sorted by path with every parent directory emitted before its
contents, owned by 0:0, timestamped from `SOURCE_DATE_EPOCH` (0 if unset), and
numbered by position, so the same input gives the same bytes. The kernel's
format is documented in Documentation/driver-api/early-userspace/buffer-format.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

TRAILER = "TRAILER!!!"


def source_date_epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


@dataclass(frozen=True)
class Entry:
    path: str  # inside the archive, no leading slash
    mode: int  # full st_mode including the file type
    data: bytes = b""  # file contents or symlink target
    source: Path | None = None  # read at write time instead of data (large files)
    rdev_major: int = 0
    rdev_minor: int = 0


class Tree:
    """The files of an archive, collected in any order and written sorted."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _parents(self, path: str) -> None:
        parent = PurePosixPath(path).parent
        while str(parent) not in (".", "/", ""):
            key = str(parent)
            if key not in self.entries:
                self.entries[key] = Entry(key, stat.S_IFDIR | 0o755)
            parent = parent.parent

    def _add(self, entry: Entry) -> None:
        path = entry.path.strip("/")
        self._parents(path)
        self.entries[path] = Entry(
            path, entry.mode, entry.data, entry.source, entry.rdev_major, entry.rdev_minor
        )

    def directory(self, path: str, mode: int = 0o755) -> None:
        self._add(Entry(path, stat.S_IFDIR | mode))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(Entry(path, stat.S_IFREG | mode, data=data))

    def file_from(self, path: str, source: Path, mode: int | None = None) -> None:
        if mode is None:
            mode = 0o755 if os.access(source, os.X_OK) else 0o644
        self._add(Entry(path, stat.S_IFREG | mode, source=source))

    def symlink(self, path: str, target: str) -> None:
        self._add(Entry(path, stat.S_IFLNK | 0o777, data=target.encode()))

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(Entry(path, stat.S_IFCHR | mode, rdev_major=major, rdev_minor=minor))

    def copy_tree(self, source: Path, dest: str = "") -> None:
        """Add a host directory's contents (files, dirs, symlinks) under dest."""
        for root, dirs, files in os.walk(source):
            dirs.sort()
            rel_root = Path(root).relative_to(source)
            for name in dirs + sorted(files):
                host = Path(root) / name
                inside = (
                    str(PurePosixPath(dest) / rel_root / name).lstrip("./")
                    if dest
                    else str(rel_root / name)
                )
                inside = inside.removeprefix("./")
                if host.is_symlink():
                    self.symlink(inside, os.readlink(host))
                elif host.is_dir():
                    self.directory(inside, stat.S_IMODE(host.stat().st_mode))
                else:
                    self.file_from(inside, host, stat.S_IMODE(host.stat().st_mode))

    def sorted_entries(self) -> list[Entry]:
        # Sorting by path components puts each directory right before its contents.
        return [self.entries[key] for key in sorted(self.entries, key=lambda p: p.split("/"))]


def _header(ino: int, entry: Entry, size: int, name: bytes, mtime: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino,
        entry.mode,
        0,
        0,
        nlink,
        mtime,
        size,
        0,
        0,
        entry.rdev_major,
        entry.rdev_minor,
        len(name) + 1,
        0,
    )
    return b"070701" + b"".join(b"%08X" % value for value in fields)


def _pad4(stream: BinaryIO, written: int) -> int:
    pad = (-written) % 4
    stream.write(b"\0" * pad)
    return pad


def write(tree_entries: Iterable[Entry], stream: BinaryIO) -> int:
    """Write the archive; return its length in bytes."""
    mtime = source_date_epoch()
    total = 0
    ino = 0
    for ino, entry in enumerate(tree_entries, start=1):
        name = entry.path.encode()
        size = entry.source.stat().st_size if entry.source is not None else len(entry.data)
        head = _header(ino, entry, size, name, mtime) + name + b"\0"
        stream.write(head)
        total += len(head)
        total += _pad4(stream, total)
        if entry.source is not None:
            with open(entry.source, "rb") as src:
                while chunk := src.read(1 << 20):
                    stream.write(chunk)
        else:
            stream.write(entry.data)
        total += size
        total += _pad4(stream, total)
    trailer = _header(ino + 1, Entry(TRAILER, 0), 0, TRAILER.encode(), 0) + TRAILER.encode() + b"\0"
    stream.write(trailer)
    total += len(trailer)
    total += _pad4(stream, total)
    return total


def write_tree(tree: Tree, stream: BinaryIO) -> int:
    return write(tree.sorted_entries(), stream)
