"""The `newc` cpio format of initramfs archives: a deterministic writer and a guarded reader.

Entries are sorted by path with every parent directory emitted before its
contents, owned by 0:0, timestamped from `SOURCE_DATE_EPOCH` (0 if unset), and
numbered by position, so the same input gives the same bytes. The kernel's
format is documented in Documentation/driver-api/early-userspace/buffer-format.

The reader (`iter_newc`) takes archives from outside (a payload inside an ISO someone
handed over): any bytes give members or MbrescueError, names are bounded, and a member's
claimed size is held against the stream's real length before anyone reads it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import MbrescueError

TRAILER = "TRAILER!!!"
MAGIC = b"070701"
HEADER_BYTES = 110  # the magic and 13 fields of 8 hex digits
# The kernel refuses names longer than PATH_MAX; a longer one is not an initramfs.
MAX_NAME_BYTES = 4096


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


# --- reading ------------------------------------------------------------------------------------


def _fields(header: bytes, position: int) -> list[int]:
    fields = []
    for index in range(13):
        text = header[6 + 8 * index : 14 + 8 * index]
        # int(..., 16) also takes "+1", " 1" and "1_0": only eight plain hex digits are newc.
        if len(text) != 8 or text.strip(b"0123456789abcdefABCDEF"):
            raise MbrescueError(f"cpio header at byte {position}: field {index} is not hex")
        fields.append(int(text, 16))
    return fields


def iter_newc(stream: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """(name, mode, size) of each member of a newc cpio, positioned at the member's data.

    The caller may read the data or not; the next step seeks past it either way. Every
    header up to the trailer must be sound, and every member must lie inside the stream.
    """
    position = stream.tell()
    end = stream.seek(0, os.SEEK_END)
    while True:
        stream.seek(position)
        header = stream.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[:6] != MAGIC:
            raise MbrescueError(f"no cpio header at byte {position}")
        fields = _fields(header, position)
        mode, size, name_bytes = fields[1], fields[6], fields[11]
        if not 1 <= name_bytes <= MAX_NAME_BYTES:
            raise MbrescueError(f"cpio header at byte {position}: name of {name_bytes} bytes")
        raw_name = stream.read(name_bytes)
        if len(raw_name) != name_bytes or raw_name[-1:] != b"\0":
            raise MbrescueError(f"cpio member at byte {position}: its name is cut or unterminated")
        name = raw_name[:-1].decode(errors="replace")
        data_at = position + HEADER_BYTES + name_bytes
        data_at += (-data_at) % 4
        if name == TRAILER:
            return
        if data_at + size > end:
            raise MbrescueError(
                f"cpio member {name!r} claims {size} bytes; the archive ends {end - data_at} "
                "bytes after its header"
            )
        stream.seek(data_at)
        yield name, mode, size
        position = data_at + size
        position += (-position) % 4
