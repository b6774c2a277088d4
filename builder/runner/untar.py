"""A file-level copy unpacked into a scratch directory that no member can leave.

A capture may come from a compromised host (docs/design.md, safety rule 8), and its
`files-pN.tar.gz` is unpacked while the restore builds its images — before the plan and
the prompt, on the rescue system or on an administrator's machine. So nothing here trusts
a name seen earlier: every member is placed through directory descriptors opened one
component at a time with O_NOFOLLOW on the tree as it really is, and created with O_EXCL
(a name that already exists — a second member of the same name — is refused, so a symlink
can never be written through, nor a directory swapped for one). What this gives, whatever
the order of members:

- no path runs through a symlink, `..` or an absolute name; a symlink is made, never
  followed (its target is the captured text, meaningful only on the restored disk);
- a hard link only to a regular file an earlier member made inside the tree;
- device nodes and FIFOs only where the file system kept them (ext), made with mknod and
  never opened; on a FAT copy (which cannot hold links or nodes) any of them is refused;
- sizes bounded: every member's bytes, every reference's size and their sum fit the
  captured partition; the member count fits its inodes; an extended header larger than
  tarbounds.COPY_EXTENDED_HEADER_MAX_BYTES is refused before tarfile parses it.

tarfile's extraction filters would cover part of this but do not exist in the rescue
kit's Python (Debian 12's 3.11.2), and `extractall` writes through a symlink planted by an
earlier member: this module uses tarfile only to read headers and member data.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .errors import MbrescueError
from .filecopy import Reference, reference_of, xattrs_of
from .manifest import FileCopyRecord, Manifest
from .tarbounds import CopyTarInfo

COPY_BLOCK_BYTES = 1 << 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NODE_TYPES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
              tarfile.FIFOTYPE: stat.S_IFIFO}


def open_archive(stream: IO[bytes]) -> tarfile.TarFile:
    """A gzip'd tar read sequentially (no seeks back), with bounded headers."""
    try:
        return tarfile.open(fileobj=stream, mode="r|gz", tarinfo=CopyTarInfo)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise MbrescueError(f"not a gzip'd tar ({exc})") from None


def member_parts(info: tarfile.TarInfo, what: str = "member") -> tuple[str, ...]:
    """A member's name (or a hard link's target) as plain components, or refused."""
    name = info.linkname if what == "link" else info.name
    parts = tuple(name.split("/"))
    # tarfile drops a directory's trailing slash; a name of our writer never has "//".
    if (not name or "\0" in name or name.startswith("/")
            or any(part in ("", ".", "..") for part in parts)):
        raise MbrescueError(f"unsafe {what} name {name[:80]!r}")
    return parts


@dataclass
class Limits:
    """What the unpack may cost: bytes (member data plus references' sizes) and members."""

    bytes_left: int
    members_left: int
    region_span: tuple[int, int]  # references must point into the partition's own bytes

    def take(self, name: str, size: int) -> None:
        self.bytes_left -= size
        self.members_left -= 1
        if self.bytes_left < 0:
            raise MbrescueError(f"/{name}: the files add up to more than the partition holds")
        if self.members_left < 0:
            raise MbrescueError("more members than the file system has inodes")


@dataclass
class Unpacked:
    # Referenced files, made empty: (path in the tree, reference, mtime to set once filled).
    references: list[tuple[Path, Reference, float]] = field(default_factory=list)
    # Extended attributes the scratch file system refused: (name in the tree, key, value).
    pending: list[tuple[str, str, bytes]] = field(default_factory=list)


def judge(info: tarfile.TarInfo, limits: Limits, region_bytes: int, allow_links: bool
          ) -> tuple[tuple[str, ...], Reference | None]:
    """What every member must pass before it is placed (or counted): a plain name, its
    cost within the limits, a reference into its own partition, no link on FAT."""
    parts = member_parts(info)
    name = "/".join(parts)
    reference = reference_of(info, region_bytes)
    limits.take(name, reference.size if reference is not None else max(info.size, 0))
    if reference is not None:
        low, high = limits.region_span
        if any(offset < low or offset + length > high for _, offset, length in reference.extents):
            raise MbrescueError(f"/{name}: its reference points outside its partition")
    if not allow_links and not (info.isreg() or info.isdir()):
        raise MbrescueError(f"/{name}: a FAT file system holds no links or device nodes")
    return parts, reference


class Tree:
    """A directory we made, filled member by member without following a link."""

    def __init__(self, root: Path, allow_links: bool) -> None:
        self.root = root
        self.allow_links = allow_links
        self.root_fd = os.open(root, DIR_FLAGS)
        self.regular: set[tuple[str, ...]] = set()
        self.directories: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []

    def close(self) -> None:
        os.close(self.root_fd)

    @contextlib.contextmanager
    def parent(self, parts: tuple[str, ...]) -> Iterator[int]:
        """The descriptor of the directory that holds parts[-1], walked without links."""
        fds: list[int] = []
        try:
            at = self.root_fd
            for part in parts[:-1]:
                try:
                    at = os.open(part, DIR_FLAGS, dir_fd=at)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                        raise MbrescueError(f"/{'/'.join(parts)}: its folder {part!r} is not "
                                            "a directory made by the copy") from None
                    raise
                fds.append(at)
            yield at
        finally:
            for fd in fds:
                os.close(fd)

    def add(self, archive: tarfile.TarFile, info: tarfile.TarInfo, limits: Limits,
            region_bytes: int, out: Unpacked) -> None:
        parts, reference = judge(info, limits, region_bytes, self.allow_links)
        name = "/".join(parts)
        with self.parent(parts) as at:
            try:
                self._make(archive, info, parts, at)
            except FileExistsError:
                raise MbrescueError(f"/{name}: a second member of that name") from None
            if reference is not None:
                out.references.append((self.root / name, reference, info.mtime))
            if not info.isdir():
                self._attributes(info, parts, at, out)

    def _make(self, archive: tarfile.TarFile, info: tarfile.TarInfo,
              parts: tuple[str, ...], at: int) -> None:
        last = parts[-1]
        if info.isreg():
            fd = os.open(last, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=at)
            try:
                _copy_data(archive, info, fd)
                os.fchown(fd, info.uid, info.gid)
                os.fchmod(fd, info.mode & 0o7777)  # after chown, which clears set-id bits
            finally:
                os.close(fd)
            self.regular.add(parts)
        elif info.isdir():
            os.mkdir(last, 0o700, dir_fd=at)
            self.directories.append((parts, info))
        elif info.issym():
            os.symlink(info.linkname, last, dir_fd=at)
            os.chown(last, info.uid, info.gid, dir_fd=at, follow_symlinks=False)
        elif info.islnk():
            target = member_parts(info, "link")
            if target not in self.regular:
                raise MbrescueError(f"/{'/'.join(parts)}: a hard link to {info.linkname!r}, "
                                    "which is not a regular file made earlier by the copy")
            with self.parent(target) as source_at:
                st = os.stat(target[-1], dir_fd=source_at, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise MbrescueError(f"/{'/'.join(parts)}: hard link to a non-file")
                os.link(target[-1], last, src_dir_fd=source_at, dst_dir_fd=at,
                        follow_symlinks=False)
            self.regular.add(parts)
        elif info.type in NODE_TYPES:
            os.mknod(last, NODE_TYPES[info.type] | (info.mode & 0o7777),
                     os.makedev(info.devmajor, info.devminor), dir_fd=at)
            os.chown(last, info.uid, info.gid, dir_fd=at, follow_symlinks=False)
        else:
            raise MbrescueError(f"/{'/'.join(parts)}: a member of tar type {info.type!r}, "
                                "which a /boot copy never holds")

    def _attributes(self, info: tarfile.TarInfo, parts: tuple[str, ...], at: int,
                    out: Unpacked) -> None:
        """Times and extended attributes of a non-directory, set without following it."""
        if info.islnk():
            return  # the file it names carries them
        last = parts[-1]
        os.utime(last, (info.mtime, info.mtime), dir_fd=at, follow_symlinks=False)
        self._xattrs(info, "/".join(parts), f"/proc/self/fd/{at}/{last}", out)

    def _xattrs(self, info: tarfile.TarInfo, name: str, path: str, out: Unpacked) -> None:
        # os.setxattr takes no dir_fd: the parent's descriptor names the folder, and the
        # last component is not followed.
        for key, value in xattrs_of(info).items():
            try:
                os.setxattr(path, key, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
                    raise MbrescueError(f"/{name}: extended attribute {key}: "
                                        f"{exc.strerror}") from None
                out.pending.append((name, key, value))

    def finish(self, out: Unpacked) -> None:
        """Directories' owners, modes, attributes and times, deepest first (making their
        entries changed their times; a read-only mode set earlier would not matter to
        root, but the order keeps it right for anyone)."""
        for parts, info in sorted(self.directories, key=lambda item: -len(item[0])):
            with self.parent(parts) as at:
                fd = os.open(parts[-1], DIR_FLAGS, dir_fd=at)
                try:
                    os.fchown(fd, info.uid, info.gid)
                    os.fchmod(fd, info.mode & 0o7777)
                    self._xattrs(info, "/".join(parts), f"/proc/self/fd/{fd}", out)
                    os.utime(fd, (info.mtime, info.mtime))
                finally:
                    os.close(fd)


def _copy_data(archive: tarfile.TarFile, info: tarfile.TarInfo, fd: int) -> None:
    stream = archive.extractfile(info)
    if stream is None:
        raise MbrescueError(f"/{info.name}: no data")
    left = info.size
    while left > 0:
        block = stream.read(min(COPY_BLOCK_BYTES, left))
        if not block:
            raise MbrescueError(f"/{info.name}: the archive ends inside this file")
        view = memoryview(block)
        while view:
            view = view[os.write(fd, view):]
        left -= len(block)


def copy_limits(manifest: Manifest, copy: FileCopyRecord) -> Limits:
    """What a copy may cost when unpacked: its partition's bytes (references must point
    into them too), and its inode count (ext) or a file per sector (FAT)."""
    part = manifest.partition(copy.partition)
    sector = manifest.source.logical_sector_bytes
    low = part.start_lba * sector
    high = min((part.end_lba + 1) * sector, manifest.region.length_bytes)
    part_bytes = part.size_sectors * sector
    members = copy.fs.inode_count or part_bytes // 512
    return Limits(bytes_left=part_bytes, members_left=members, region_span=(low, high))


def check(stream: IO[bytes], *, allow_links: bool, limits: Limits, region_bytes: int) -> int:
    """The rules `unpack` enforces, judged on the names alone without making anything (a
    capture checked on the controller, before a build publishes it); returns the number of
    members. `unpack` still checks everything on the real tree."""
    kinds: dict[tuple[str, ...], str] = {(): "dir"}
    with open_archive(stream) as archive:
        try:
            for info in archive:
                parts, _ = judge(info, limits, region_bytes, allow_links)
                name = "/".join(parts)
                for depth in range(1, len(parts)):
                    if kinds.get(parts[:depth]) != "dir":
                        raise MbrescueError(f"/{name}: its folder {parts[depth - 1]!r} is not "
                                            "a directory made by the copy")
                if parts in kinds:
                    raise MbrescueError(f"/{name}: a second member of that name")
                if info.islnk() and kinds.get(member_parts(info, "link")) != "file":
                    raise MbrescueError(f"/{name}: a hard link to {info.linkname!r}, which is "
                                        "not a regular file made earlier by the copy")
                if not (info.isreg() or info.isdir() or info.issym() or info.islnk()
                        or info.type in NODE_TYPES):
                    raise MbrescueError(f"/{name}: a member of tar type {info.type!r}, which a "
                                        "/boot copy never holds")
                kinds[parts] = ("dir" if info.isdir() else
                                "file" if info.isreg() or info.islnk() else "other")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise MbrescueError(f"the archive is damaged ({exc})") from None
    return len(kinds) - 1


def unpack(stream: IO[bytes], into: Path, *, allow_links: bool, limits: Limits,
           region_bytes: int) -> Unpacked:
    """Every member of the gzip'd tar in `stream` placed under `into` (which must exist and
    be empty); references are made empty (the caller fills them from the region)."""
    out = Unpacked()
    tree = Tree(into, allow_links)
    try:
        with open_archive(stream) as archive:
            try:
                for info in archive:
                    tree.add(archive, info, limits, region_bytes, out)
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                raise MbrescueError(f"the archive is damaged ({exc})") from None
        tree.finish(out)
    finally:
        tree.close()
    return out
