"""The file-level copy of each boot-chain file system, read without changing it.

The region path writes captured bytes back and so needs a disk of the same sector size
that holds the region. The file-level path (runner/files_restore.py) needs instead what
this module captures: every file of the `/boot` file system and of the ESP as a tar
(owners, modes, times, symlinks), plus what it takes to make each file system again
(type, UUID, label, block and inode size, ext feature flags; FAT type, sector size,
volume id). The file systems are read with their own tools from the bytes at the
partition's offset, never mounted: `debugfs -c` (catastrophic mode: opens read-only,
never replays a journal) for ext2/3/4, `mcopy` for vfat, which this machine's kernel
cannot mount. Both take an image file or block device plus a byte offset, so a mounted
source, an unmounted disk and the capture's own spool of the frozen region all work.

For ext2/3/4 the first choice is a read-only loop device at the partition's offset,
mounted `ro,noload` (no journal replay: nothing is written to the source): the tar then
keeps hard links and extended attributes (PAX `SCHILY.xattr.*` records, as GNU tar and
bsdtar write them; `security.selinux` labels matter on RHEL-family /boot). Where that
cannot run (no loop devices), `debugfs -c -R rdump`, which keeps modes, owners and
times but writes hard links as separate files and drops extended attributes.

A file's bytes are in the region already. When the copy is read from the capture's own
spool of the frozen region (the same bytes the region member holds), a regular file whose
data the kernel maps (FIEMAP) to plain extents is stored as a reference instead: an empty
member whose PAX records give its size, its SHA-256 and where each extent lies in the
region (`MBRESCUE.extents`: `logical:region_offset:length` in bytes). Each reference is
proven at capture by reading the file through the mount beside the region's bytes at those
offsets (and zeros in its holes); a file that is not mapped that way (inline data,
unwritten or delayed extents, more than MAX_EXTENTS) or does not match is stored whole.
The file-level restore fills referenced files from the region's checked chunks and holds
each against its SHA-256 before anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import debuglog
from .errors import MbrescueError

EXT_TYPES = ("ext2", "ext3", "ext4")
# File systems read through a read-only loop mount that replays nothing (ext: `noload`,
# XFS: `norecovery`), whose copies keep hard links, owners and extended attributes. XFS
# refuses a second mount of a UUID already mounted (the frozen /boot itself, when its copy
# is read from the spool; the host's own /boot, when a restore fills a new one on it):
# `nouuid`.
MOUNTED_TYPES = (*EXT_TYPES, "xfs")
RO_OPTIONS = {"ext2": "ro,noload", "ext3": "ro,noload", "ext4": "ro,noload",
              "xfs": "ro,norecovery,nouuid"}
RW_OPTIONS = {"xfs": "nouuid,"}
COPY_TYPES = (*MOUNTED_TYPES, "vfat")
FAT_LABEL_NONE = "NO NAME"
XATTR_PREFIX = "SCHILY.xattr."
REF_EXTENTS = "MBRESCUE.extents"
REF_SIZE = "MBRESCUE.size"
REF_SHA256 = "MBRESCUE.sha256"
# A file in more pieces than MAX_EXTENTS is stored whole (and so is an empty one).
REF_MIN_BYTES = 1
MAX_EXTENTS = 1024  # its PAX record stays under tarbounds.COPY_EXTENDED_HEADER_MAX_BYTES
PIECE_BYTES = 1 << 20


def member_name(partition: int) -> str:
    return f"files-p{partition}.tar.gz"


class ToolMissing(MbrescueError):
    """A file system tool this host lacks: the copy is skipped, the capture goes on."""


def _run(argv: Sequence[str], pass_fds: Sequence[int] = ()) -> str:
    env = {"LANG": "C.UTF-8", "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    debuglog.command(argv)
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, env=env, pass_fds=tuple(pass_fds), check=False)
    except FileNotFoundError as exc:
        raise ToolMissing(f"{argv[0]} not found (Debian: e2fsprogs, mtools, dosfstools)"
                          ) from exc
    if done.returncode != 0:
        detail = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise MbrescueError(f"{argv[0]} failed: {detail[-1] if detail else done.returncode}")
    return done.stdout


# --- the parameters to make each file system again ------------------------------------


def ext_params(image: str, offset_bytes: int, pass_fds: Sequence[int] = ()) -> dict[str, Any]:
    """From `dumpe2fs -h` (e2fsprogs opens `FILE?offset=N` at that byte offset)."""
    out = _run(["dumpe2fs", "-h", f"{image}?offset={offset_bytes}"], pass_fds)
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    label = fields.get("Filesystem volume name", "")
    features = fields.get("Filesystem features", "").split()
    return {
        "type": "ext4" if {"extent", "flex_bg", "64bit"} & set(features) else
                ("ext3" if "has_journal" in features else "ext2"),
        "uuid": fields["Filesystem UUID"],
        "label": None if label in ("", "<none>") else label,
        "block_bytes": int(fields["Block size"]),
        "inode_bytes": int(fields.get("Inode size", "128")),
        "inode_count": int(fields["Inode count"]),
        "features": [f for f in features if f != "needs_recovery"],
    }


def fat_params(boot_sector: bytes) -> dict[str, Any]:
    """From the FAT boot sector (BPB): sector size, FAT type, volume id, label."""
    sector_bytes = int.from_bytes(boot_sector[11:13], "little")
    fat16_sectors = int.from_bytes(boot_sector[22:24], "little")
    fat32 = fat16_sectors == 0
    ebpb = 0x40 if fat32 else 0x24
    label = boot_sector[ebpb + 7 : ebpb + 18].decode("ascii", "replace").rstrip()
    kind = boot_sector[ebpb + 18 : ebpb + 26].decode("ascii", "replace").strip()
    bits = 32 if fat32 else (12 if kind == "FAT12" else 16)
    volume_id = int.from_bytes(boot_sector[ebpb + 3 : ebpb + 7], "little")
    return {
        "type": "vfat",
        "fat_bits": bits,
        "sector_bytes": sector_bytes,
        "volume_id": f"{volume_id:08X}",
        "label": None if label in ("", FAT_LABEL_NONE) else label,
    }


# --- the files --------------------------------------------------------------------------


# The XFS superblock (xfs_format.h, struct xfs_dsb; big-endian): the fields mkfs.xfs needs
# to make the same file system again. Feature bits: ro_compat finobt 1, rmapbt 2, reflink 4,
# inobtcount 8; incompat ftype 1, sparse inodes 2, meta_uuid 4, bigtime 8, needsrepair 16,
# nrext64 32. A bit mkfs.xfs cannot set is kept as `unknown-…` and refused at restore.
XFS_MAGIC = b"XFSB"
XFS_RO_COMPAT = {1: "finobt", 2: "rmapbt", 4: "reflink", 8: "inobtcount"}
XFS_INCOMPAT = {1: "ftype", 2: "sparse", 4: "meta_uuid", 8: "bigtime", 32: "nrext64"}
XFS_V4_FTYPE = 0x200  # features2 bit of a version 4 super block


def xfs_params(superblock: bytes) -> dict[str, Any]:
    """From the XFS primary superblock (its first 512 bytes)."""
    if len(superblock) < 256 or superblock[:4] != XFS_MAGIC:
        raise MbrescueError("not an XFS super block")
    block_bytes, = struct.unpack_from(">I", superblock, 4)
    version, sector_bytes, inode_bytes = struct.unpack_from(">HHH", superblock, 100)
    label = superblock[108:120].split(b"\0", 1)[0].decode("utf-8", "replace")
    features2, _, _, ro_compat, incompat = struct.unpack_from(">IIIII", superblock, 200)
    features = []
    if version & 0xF == 5:
        features.append("crc")
        for bits, names in ((ro_compat, XFS_RO_COMPAT), (incompat, XFS_INCOMPAT)):
            features += [name for bit, name in names.items() if bits & bit]
            unknown = bits & ~sum(names)
            if unknown:
                features.append(f"unknown_{unknown:x}")
    elif features2 & XFS_V4_FTYPE:
        features.append("ftype")
    uuid = superblock[32:48].hex()
    return {
        "type": "xfs",
        "uuid": f"{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}",
        "label": label or None,
        "block_bytes": block_bytes,
        "inode_bytes": inode_bytes,
        "sector_bytes": sector_bytes,
        "features": features,
    }


def dump_tree(image: str, offset_bytes: int, fs_type: str, into: Path,
              pass_fds: Sequence[int] = ()) -> None:
    """Every file of the file system at offset_bytes into the (empty) directory `into`."""
    if fs_type in EXT_TYPES:
        # rdump, run as root, keeps modes, owners and times (debugfs's fix_perms).
        _run(["debugfs", "-c", "-R", f"rdump / {os.fspath(into)}",
              f"{image}?offset={offset_bytes}"], pass_fds)
        shutil.rmtree(into / "lost+found", ignore_errors=True)
    elif fs_type == "vfat":
        _run(["mcopy", "-s", "-p", "-m", "-n", "-i", f"{image}@@{offset_bytes}", "::/",
              os.fspath(into) + "/"], pass_fds)
    elif fs_type == "xfs":
        raise ToolMissing("XFS is read through a read-only loop mount, which this machine "
                          "cannot make")
    else:
        raise MbrescueError(f"no file-level copy for a {fs_type} file system yet")


@contextlib.contextmanager
def loop_mounted(image: str, offset_bytes: int, fs_type: str, writable: bool = False,
                 pass_fds: Sequence[int] = ()) -> Iterator[Path]:
    """The ext or XFS file system at offset_bytes on a loop device, mounted in a temporary
    folder: read-only without journal or log replay (a read-only loop device too), or
    writable; raises MbrescueError when this machine cannot."""
    read_only = [] if writable else ["--read-only"]
    options = (f"{RW_OPTIONS.get(fs_type, '')}nodev,nosuid,noexec" if writable
               else f"{RO_OPTIONS[fs_type]},nodev,nosuid,noexec")
    with contextlib.ExitStack() as stack:
        loop = _run(["losetup", "--find", "--show", *read_only, "--offset", str(offset_bytes),
                     image], pass_fds).strip()
        stack.callback(_run, ["losetup", "--detach", loop])
        where = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="mbrescue-rw-" if writable else "mbrescue-ro-")))
        kind = fs_type if fs_type in ("ext2", "xfs") else "ext4"
        _run(["mount", "-t", kind, "-o", options, loop, os.fspath(where)])
        stack.callback(_run, ["umount", os.fspath(where)])
        yield where


@contextlib.contextmanager
def mounted_ro(image: str, offset_bytes: int, fs_type: str,
               pass_fds: Sequence[int] = ()) -> Iterator[Path | None]:
    """The ext or XFS file system at offset_bytes mounted read-only without journal or log
    replay, on a read-only loop device; None when this machine cannot (then debugfs does
    the work for ext)."""
    with contextlib.ExitStack() as stack:
        try:
            where: Path | None = stack.enter_context(
                loop_mounted(image, offset_bytes, fs_type, pass_fds=pass_fds))
        except MbrescueError:
            where = None
        yield where


def _tree_bytes(root: Path) -> int:
    total = 0
    for folder, dirs, files in os.walk(root):
        total += 4096 * (1 + len(dirs))
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                total += -(-path.stat().st_size // 4096) * 4096
    return total


# --- regular files as references into the region ------------------------------------------

# linux/fiemap.h: struct fiemap (32 bytes) and struct fiemap_extent (56 bytes).
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_MERGED = 0x1000
FIEMAP_HEADER = struct.Struct("=QQIIII")
FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")
FIEMAP_BATCH = 128


def file_extents(fd: int) -> list[tuple[int, int, int]] | None:
    """(logical, physical, length) in bytes of each extent of an open file, from FIEMAP;
    None when the kernel cannot say or any extent is not plain data at a known place."""
    extents: list[tuple[int, int, int]] = []
    start = 0
    while len(extents) <= MAX_EXTENTS:
        buf = bytearray(FIEMAP_HEADER.size + FIEMAP_BATCH * FIEMAP_EXTENT.size)
        FIEMAP_HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0,
                                FIEMAP_BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError:
            return None
        mapped = FIEMAP_HEADER.unpack_from(buf, 0)[3]
        if mapped == 0:
            return extents
        flags = 0
        for index in range(mapped):
            logical, physical, length, flags = FIEMAP_EXTENT.unpack_from(
                buf, FIEMAP_HEADER.size + index * FIEMAP_EXTENT.size)
            if flags & ~(FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_MERGED) or length == 0:
                return None  # inline, unwritten, delayed, encoded, unknown: not region bytes
            extents.append((logical, physical, length))
        if flags & FIEMAP_EXTENT_LAST:
            return extents
        start = extents[-1][0] + extents[-1][2]
    return None


def _matches(fd: int, at: int, length: int, region: tuple[int, int] | None,
             digest: Any) -> bool:
    """The file's bytes at..at+length equal the region's from region[1] (None: zeros)."""
    done = 0
    while done < length:
        size = min(PIECE_BYTES, length - done)
        data = os.pread(fd, size, at + done)
        if region is None:
            expected = bytes(size)
        else:
            expected = os.pread(region[0], size, region[1] + done)
        if data != expected:
            return False
        digest.update(data)
        done += size
    return True


def region_reference(fd: int, size: int, region_fd: int, base: int,
                     region_bytes: int) -> dict[str, str] | None:
    """The PAX records that stand for the open file's bytes (its extents, at `base` in the
    region), each extent proven against the region; None: store the file whole."""
    extents = file_extents(fd)
    if extents is None or not extents:
        return None
    digest = hashlib.sha256()
    at = 0
    parts = []
    for logical, physical, length in extents:
        if logical >= size:
            break
        length = min(length, size - logical)
        offset = base + physical
        if (logical < at or offset + length > region_bytes
                or not _matches(fd, at, logical - at, None, digest)
                or not _matches(fd, logical, length, (region_fd, offset), digest)):
            return None
        parts.append(f"{logical}:{offset}:{length}")
        at = logical + length
    if not _matches(fd, at, size - at, None, digest):
        return None
    return {REF_SIZE: str(size), REF_SHA256: digest.hexdigest(), REF_EXTENTS: " ".join(parts)}


def pack_tree(root: Path, out_path: Path,
              region: tuple[int, int] | None = None) -> tuple[int, int]:
    """The tree as a gzip'd PAX tar (owners, modes, times, symlinks); returns the number of
    files and how many of them are references.

    With `region` (the region spool's descriptor, the file system's offset in it), regular
    files whose bytes it holds become references (see the module's doc)."""
    count = referenced = 0
    region_bytes = os.fstat(region[0]).st_size if region is not None else 0
    with tarfile.open(out_path, "w:gz", format=tarfile.PAX_FORMAT, compresslevel=6) as tar:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                path = Path(folder) / name
                if path.name == "lost+found" and path.parent == root:
                    continue  # mke2fs makes its own
                info = tar.gettarinfo(path, arcname=os.fspath(path.relative_to(root)))
                info.pax_headers = {
                    XATTR_PREFIX + key: os.getxattr(path, key, follow_symlinks=False).decode(
                        "utf-8", "surrogateescape")
                    for key in os.listxattr(path, follow_symlinks=False)
                }
                if info.isreg():
                    with open(path, "rb") as stream:
                        reference = None
                        if region is not None and info.size >= REF_MIN_BYTES:
                            reference = region_reference(stream.fileno(), info.size, region[0],
                                                         region[1], region_bytes)
                        if reference is not None:
                            info.pax_headers.update(reference)
                            info.size = 0
                            tar.addfile(info)
                            referenced += 1
                        else:
                            tar.addfile(info, stream)
                else:
                    tar.addfile(info)
                count += 1
    return count, referenced


@dataclass(frozen=True)
class Reference:
    """A member stored as a reference: the file's size, SHA-256 and extents (logical
    offset, offset in the region, length; in bytes, in order, not overlapping)."""

    size: int
    sha256: str
    extents: tuple[tuple[int, int, int], ...]


SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def reference_of(info: tarfile.TarInfo, region_bytes: int) -> Reference | None:
    """The member's reference into a region of region_bytes, checked; None for a member
    stored whole."""
    if REF_EXTENTS not in info.pax_headers:
        return None
    bad = MbrescueError(f"/{info.name}: its reference into the region is not well-formed")
    if not info.isreg() or info.size != 0:
        raise bad
    try:
        size = int(info.pax_headers[REF_SIZE])
        digest = info.pax_headers[REF_SHA256]
        extents = [tuple(int(n) for n in part.split(":"))
                   for part in info.pax_headers[REF_EXTENTS].split()]
    except (KeyError, ValueError):
        raise bad from None
    if not SHA256_HEX.fullmatch(digest) or size < 0 or len(extents) > MAX_EXTENTS:
        raise bad
    at = 0
    checked = []
    for extent in extents:
        if len(extent) != 3:
            raise bad
        logical, offset, length = extent
        if (logical < at or length <= 0 or offset < 0 or offset + length > region_bytes
                or logical + length > size):
            raise bad
        checked.append((logical, offset, length))
        at = logical + length
    return Reference(size, digest, tuple(checked))


def xattrs_of(info: tarfile.TarInfo) -> dict[str, bytes]:
    """The extended attributes a member carries (written by pack_tree)."""
    return {key[len(XATTR_PREFIX):]: value.encode("utf-8", "surrogateescape")
            for key, value in info.pax_headers.items() if key.startswith(XATTR_PREFIX)}


def read_copy(image: str, partition: int, offset_bytes: int, fs_type: str, scratch: Path,
              pass_fds: Sequence[int] = (), region_fd: int | None = None
              ) -> tuple[dict[str, Any], Path]:
    """The record (without sha256) and the tar file of one file system's file-level copy.

    `region_fd`: `image` is the region (the capture's spool of it, open there), so files
    mounted from it may be stored as references into it."""
    if fs_type in EXT_TYPES:
        params = ext_params(image, offset_bytes, pass_fds)
    else:
        with open(image, "rb") as stream:
            stream.seek(offset_bytes)
            head = stream.read(512)
        params = xfs_params(head) if fs_type == "xfs" else fat_params(head)
    out = scratch / member_name(partition)
    with contextlib.ExitStack() as stack:
        tree = (stack.enter_context(mounted_ro(image, offset_bytes, fs_type, pass_fds))
                if fs_type in MOUNTED_TYPES else None)
        mounted = tree is not None
        params["read_with"] = f"{RO_OPTIONS[fs_type]} loop mount" if mounted else (
            "debugfs rdump" if fs_type in EXT_TYPES else "mtools")
        if tree is None:
            tree = scratch / f"tree-p{partition}"
            tree.mkdir()
            stack.callback(shutil.rmtree, tree)
            dump_tree(image, offset_bytes, fs_type, tree, pass_fds)
        count, referenced = pack_tree(
            tree, out, (region_fd, offset_bytes) if mounted and region_fd is not None else None)
        params["used_bytes"] = _tree_bytes(tree)
    record = {"partition": partition, "member": member_name(partition), "file_count": count,
              "referenced_files": referenced, "fs": params}
    return record, out


def read_copies(image: str, chain: Sequence[tuple[int, int, str]], scratch: Path,
                pass_fds: Sequence[int] = (), warn: Callable[[str], None] = lambda line: None,
                region_fd: int | None = None) -> list[tuple[dict[str, Any], Path]]:
    """Each (partition, offset_bytes, fs type) of the chain with a copyable file system read
    into a tar in scratch: (record without sha256, tar). `region_fd`: see read_copy.

    A host without the tools a copy needs (mtools is rare on servers) still gets its
    capture: the region path does not need the copy. `warn` is told which copy is missing.
    """
    copies = []
    for partition, offset_bytes, fs_type in chain:
        if fs_type not in COPY_TYPES:
            continue
        try:
            copies.append(read_copy(image, partition, offset_bytes, fs_type, scratch, pass_fds,
                                    region_fd))
        except ToolMissing as exc:
            warn(f"warning: no file-level copy of partition {partition} ({fs_type}): {exc}; "
                 "the region path does not need it, the file-level path will")
    return copies


def append_copies(tar: Any, copies: list[tuple[dict[str, Any], Path]],
                  mtime: int) -> list[dict[str, Any]]:
    """The copies read by read_copies as members of the capture (`tar` is a
    capfile.TarWriter), each hashed as it goes in; the manifest's `file_copies`."""
    records = []
    for record, path in copies:
        digest = hashlib.sha256()
        with open(path, "rb") as source, tar.member(record["member"], mtime) as stream:
            while block := source.read(1 << 20):
                digest.update(block)
                stream.write(block)
        record["sha256"] = digest.hexdigest()
        records.append(record)
        path.unlink()
    return records
