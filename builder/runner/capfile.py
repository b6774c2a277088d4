"""The capture file: one self-describing file per host, readable with the standard library.

Layout: an uncompressed POSIX (ustar) tar, so `tar tvf` shows it, holding in order

- `region.img.gz` — the boot region (sector 0 to the end of the boot chain) as a
  multi-member gzip, one member per `chunk_bytes` of raw data: `zcat` gives the raw
  region, and the chunk list in the manifest lets a reader stream it without
  scanning. gzip, not zstd, because the runner decodes it with `zlib`, which even
  `python3.11-minimal` carries, and because the region is mostly kernels and
  initrds that are compressed already, so a stronger codec buys little;
- `gpt-tail.bin` — GPT disks only: the backup entry array and header (the disk's
  last 33 sectors), kept verbatim;
- `boot.tar.gz` — a file-level archive of the mounted `/boot`, independent of the
  disk's geometry (absent, with `boot_files.reason`, when `/boot` was not readable);
- `manifest.json` — because it records the checksums of everything before it;
- `manifest.sha256` — last: the SHA-256 of `manifest.json`'s bytes, so a damaged manifest
  (which steers every write: EBRs, swap headers, GPT moves) is refused before it is read.

Member headers use the GNU tar format, whose base-256 size field holds members over
8 GiB (ustar's octal field stops there) and which is still one 512-byte header.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from . import untar
from .errors import MbrescueError
from .manifest import Manifest, RegionRecord, check_tables, parse_manifest
from .tarbounds import BoundedTarInfo

FORMAT = "mbrescue-capture"
# 2: manifest.sha256 seals the manifest; GNU headers (members over 8 GiB).
# 3: a file-level copy's regular files may be references into the region (filecopy.py):
#    a reader of version 2 would restore them empty, so it must refuse the capture.
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
REGION_MEMBER = "region.img.gz"
GPT_TAIL_MEMBER = "gpt-tail.bin"
BOOT_FILES_MEMBER = "boot.tar.gz"
MANIFEST_MEMBER = "manifest.json"
MANIFEST_SEAL_MEMBER = "manifest.sha256"
# A manifest is a few hundred KiB at most (one line per 1 MiB chunk); more is not ours.
MANIFEST_MAX_BYTES = 64 << 20
CHUNK_BYTES = 1 << 20
# gzip framing (wbits 16+15) so the member is a standard .gz file.
GZIP_WBITS = 31


class TarWriter:
    """Writes tar members whose size is known only after streaming their data."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    @contextlib.contextmanager
    def member(self, name: str, mtime: int) -> Iterator[BinaryIO]:
        header_at = self.out.tell()
        self.out.write(bytes(tarfile.BLOCKSIZE))
        start = self.out.tell()
        yield self.out
        size = self.out.tell() - start
        self.out.write(bytes((-size) % tarfile.BLOCKSIZE))
        end = self.out.tell()
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o600, mtime
        header = info.tobuf(format=tarfile.GNU_FORMAT)
        # The reserved block must hold the header: short names, no extension records.
        assert len(header) == tarfile.BLOCKSIZE, name
        self.out.seek(header_at)
        self.out.write(header)
        self.out.seek(end)

    def add_bytes(self, name: str, data: bytes, mtime: int) -> None:
        with self.member(name, mtime) as stream:
            stream.write(data)

    def close(self) -> None:
        self.out.write(bytes(2 * tarfile.BLOCKSIZE))


def write_manifest(tar: TarWriter, manifest: dict, mtime: int) -> bytes:
    """The manifest and, after it, its seal; returns the manifest's bytes."""
    raw = json.dumps(manifest, indent=1).encode() + b"\n"
    tar.add_bytes(MANIFEST_MEMBER, raw, mtime)
    tar.add_bytes(MANIFEST_SEAL_MEMBER, hashlib.sha256(raw).hexdigest().encode() + b"\n", mtime)
    return raw


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # of the data inside the capture file
    size: int


class Capture:
    """An opened capture file: the checked manifest plus where each member's bytes are.

    The file is opened once and every read goes through that one descriptor, from the
    verification to the last byte written: the bytes verified are the bytes written,
    even if the path is replaced meanwhile.
    """

    def __init__(self, path: str, fd: int, manifest: Manifest,
                 members: dict[str, Member], base: int = 0, size: int | None = None) -> None:
        self.path = path
        self.fd = fd
        self.manifest = manifest
        self.members = members  # offsets are of the file that fd reads
        # Where the capture lies in that file: all of it, or its member of a rescue medium's
        # payload cpio (the rescue system reads it from the medium in place).
        self.base = base
        self.size = os.fstat(fd).st_size - base if size is None else size
        self.manifest_sha256 = ""
        self._chunk_offsets: list[int] | None = None

    @classmethod
    def open(cls, path: str) -> Capture:
        if not os.path.exists(path):
            raise MbrescueError(f"{path}: no such file")
        if os.path.isdir(path):
            inside = sorted(name for name in os.listdir(path) if name.endswith(".mbrescue"))
            example = os.path.join(path, inside[0] if inside else "HOST.mbrescue")
            raise MbrescueError(f"{path} is a directory, not a capture file",
                                hint=f"give a capture file, e.g. {example}")
        try:
            # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, forever.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise MbrescueError(f"cannot read {path}: {exc.strerror}") from exc
        os.set_blocking(fd, True)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise MbrescueError(f"{path} is not a regular file, so not a capture file")
            base, size = 0, os.fstat(fd).st_size
            if os.pread(fd, 6, 0) in NEWC_MAGIC:
                base, size = newc_member(fd, 0, size, PAYLOAD_CAPTURE_MEMBER)
            members = _members(path, fd, base, size)
            manifest = _read_manifest(path, fd, members)
            _check_members(path, manifest, members)
        except BaseException:
            os.close(fd)
            raise
        capture = cls(path, fd, manifest, members, base, size)
        # What the seal says: a build records it, the rescue system compares (one hash of a
        # small member instead of a pass over the whole capture).
        capture.manifest_sha256 = hashlib.sha256(capture.read_member(MANIFEST_MEMBER)).hexdigest()
        return capture

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def region(self) -> RegionRecord:
        return self.manifest.region

    def pread(self, length: int, offset: int) -> bytes:
        """Exactly `length` bytes of the capture file at `offset`."""
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise MbrescueError(f"{self.path} is truncated")
        return data

    def read_member(self, name: str) -> bytes:
        """A small member whole (the GPT tail: its size was checked against the manifest)."""
        member = self.members.get(name)
        if member is None:
            raise MbrescueError(f"{self.path}: the capture has no {name}")
        return self.pread(member.size, member.offset)

    def member_sha256(self, name: str) -> str:
        """A member's SHA-256, read in slices (the /boot archive can be large)."""
        member = self.members[name]
        digest = hashlib.sha256()
        for at in range(0, member.size, CHUNK_BYTES):
            digest.update(self.pread(min(CHUNK_BYTES, member.size - at), member.offset + at))
        return digest.hexdigest()

    def file_sha256(self) -> str:
        """The whole capture file's SHA-256, read through the same descriptor."""
        digest = hashlib.sha256()
        for at in range(0, self.size, CHUNK_BYTES * 8):
            digest.update(self.pread(min(CHUNK_BYTES * 8, self.size - at), self.base + at))
        return digest.hexdigest()

    def compressed_chunks(self) -> Iterator[bytes]:
        """The region's gzip members, one per chunk, as recorded in the manifest."""
        offset = self.members[REGION_MEMBER].offset
        for size in self.region.chunks:
            yield self.pread(size, offset)
            offset += size

    def region_chunks(self) -> Iterator[bytes]:
        """The raw region, chunk by chunk (each `chunk_bytes` long, the last shorter), each
        checked against its recorded SHA-256 first: a plan is made from checked bytes only."""
        for index, packed in enumerate(self.compressed_chunks()):
            yield self.unpack(index, self._checked(index, packed))

    def _checked(self, index: int, packed: bytes) -> bytes:
        if hashlib.sha256(packed).hexdigest() != self.region.chunk_sha256[index]:
            raise MbrescueError(f"{self.path}: checksum mismatch in region chunk {index}")
        return packed

    def unpack(self, index: int, packed: bytes) -> bytes:
        """One region chunk's raw bytes from its gzip member; a damaged member names itself.

        Inflating stops one byte past the chunk's size: a member that would inflate to
        more (a hostile "zip bomb") is refused without the memory it asks for.
        """
        want = self.region.raw_chunk_bytes(index)
        try:
            unpacker = zlib.decompressobj(GZIP_WBITS)
            raw = unpacker.decompress(packed, want + 1)
            if len(raw) > want or unpacker.unconsumed_tail:
                raise zlib.error(f"inflates to more than its {want} bytes")
            if not unpacker.eof or unpacker.unused_data:
                raise zlib.error("member not complete")
        except zlib.error as exc:
            raise MbrescueError(f"{self.path}: region chunk {index} is corrupt ({exc})") from exc
        if len(raw) != want:
            raise MbrescueError(
                f"{self.path}: region chunk {index} inflates to {len(raw)} bytes, not {want}"
            )
        return raw

    def verify(self) -> None:
        """Check every recorded checksum, then the manifest against the region's own table;
        raise naming the first that differs.

        Nothing may be written to a disk before this passes: a failed unpack can
        leave a full-length but corrupt file. Each gzip member has its own
        SHA-256 (so a damaged capture names the chunk), and the raw region has one.
        """
        raw_digest = hashlib.sha256()
        head = bytearray()
        for raw in self.region_chunks():
            raw_digest.update(raw)
            if len(head) < HEAD_BYTES:
                head += raw[: HEAD_BYTES - len(head)]
        if raw_digest.hexdigest() != self.region.sha256:
            raise MbrescueError(f"{self.path}: checksum mismatch in the region")
        self.verify_members()
        self.check_tables(bytes(head))

    def check_head(self) -> None:
        """The manifest against the region's own tables, from checked chunks only: what a
        plan needs, without the pass over the whole region that `verify` makes."""
        self.check_tables(self.read_region(0, min(HEAD_BYTES, self.region.length_bytes)))

    def check_tables(self, head: bytes) -> None:
        """The manifest against the partition table in the region's first bytes (`head`,
        from a verified region); a disagreement is refused before anything is planned."""

        def read_region(offset: int, length: int) -> bytes:
            if offset + length <= len(head):
                return head[offset : offset + length]
            if offset + length > self.region.length_bytes:
                raise MbrescueError(f"{self.path}: the region does not hold bytes {offset}"
                                    f"..{offset + length - 1}")
            return self.read_region(offset, length)

        try:
            check_tables(self.manifest, read_region)
        except MbrescueError as exc:
            raise MbrescueError(f"{self.path}: {exc}") from None

    def read_region(self, offset: int, length: int) -> bytes:
        """Raw region bytes at any offset (inflates the chunks that hold them, each checked
        against its SHA-256)."""
        size = self.region.chunk_bytes
        first, last = offset // size, (offset + length - 1) // size
        raw = b"".join(self.region_chunk(index) for index in range(first, last + 1))
        start = offset - first * size
        return raw[start : start + length]

    def region_chunk(self, index: int) -> bytes:
        """One raw region chunk, its gzip member checked against its SHA-256 first."""
        sizes = self.region.chunks
        if not 0 <= index < len(sizes):
            raise MbrescueError(f"{self.path}: the region has no chunk {index}")
        if self._chunk_offsets is None:
            at, offsets = self.members[REGION_MEMBER].offset, []
            for size in sizes:
                offsets.append(at)
                at += size
            self._chunk_offsets = offsets
        packed = self.pread(sizes[index], self._chunk_offsets[index])
        return self.unpack(index, self._checked(index, packed))

    def verify_members(self) -> None:
        """The GPT tail's, the /boot archive's and every file-level copy's checksums."""
        manifest = self.manifest
        for member, digest in (
            (manifest.gpt_tail.member, manifest.gpt_tail.sha256)
            if manifest.gpt_tail else (None, None),
            (manifest.boot_files.member, manifest.boot_files.sha256),
        ):
            if member is None:
                continue
            if member not in self.members:
                raise MbrescueError(f"{self.path}: the capture has no {member}")
            if self.member_sha256(member) != digest:
                raise MbrescueError(f"{self.path}: checksum mismatch in {member}")
        self.verify_copies()

    def verify_copies(self) -> None:
        """Every file-level copy's checksum, then its members against the rules the unpack
        enforces (runner/untar.py): a hostile copy is refused wherever a capture is read,
        not only when a restore unpacks it. Small: most files are references."""
        for copy in self.manifest.file_copies:
            member = self.members.get(copy.member)
            if member is None:
                raise MbrescueError(f"{self.path}: the capture has no {copy.member}")
            if self.member_sha256(copy.member) != copy.sha256:
                raise MbrescueError(f"{self.path}: checksum mismatch in {copy.member} (its "
                                    "file-level copy)")
            stream = io.BufferedReader(Window(self.fd, member.offset, member.size))
            try:
                untar.check(stream, allow_links=copy.fs.type != "vfat",
                            limits=untar.copy_limits(self.manifest, copy),
                            region_bytes=self.region.length_bytes)
            except MbrescueError as exc:
                raise MbrescueError(f"{self.path}: {copy.member}: {exc}") from None


# The MBR, a GPT header and a 128-entry array (34 sectors of 4096 bytes at most).
HEAD_BYTES = 34 * 4096


class Window(io.RawIOBase):
    """A read-only view of `length` bytes of fd at `base` (one member inside a bigger file)."""

    def __init__(self, fd: int, base: int, length: int) -> None:
        self.fd, self.base, self.length, self.at = fd, base, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        start = {os.SEEK_SET: 0, os.SEEK_CUR: self.at, os.SEEK_END: self.length}[whence]
        self.at = max(start + offset, 0)
        return self.at

    def tell(self) -> int:
        return self.at

    def readinto(self, buffer: Any) -> int:
        want = max(min(len(buffer), self.length - self.at), 0)
        data = os.pread(self.fd, want, self.base + self.at) if want else b""
        buffer[: len(data)] = data
        self.at += len(data)
        return len(data)


# A rescue medium's payload: the newc cpio GRUB may load, holding the capture by this name.
NEWC_MAGIC = (b"070701", b"070702")
PAYLOAD_CAPTURE_MEMBER = "mbrescue/capture.mbrescue"
NEWC_HEADER_BYTES = 110
NEWC_MAX_NAME_BYTES = 4096


def newc_member(fd: int, base: int, length: int, wanted: str) -> tuple[int, int]:
    """(offset, size) of one member of a newc cpio lying at base..base+length of fd."""
    at = 0
    while at + NEWC_HEADER_BYTES <= length:
        header = os.pread(fd, NEWC_HEADER_BYTES, base + at)
        if header[:6] not in NEWC_MAGIC:
            raise MbrescueError(f"the payload is not a cpio archive (at byte {at})")
        try:
            size, name_bytes = int(header[54:62], 16), int(header[94:102], 16)
        except ValueError:
            raise MbrescueError(f"the payload has a bad cpio header at byte {at}") from None
        if not 1 <= name_bytes <= NEWC_MAX_NAME_BYTES:
            raise MbrescueError(f"the payload has a bad cpio header at byte {at}")
        name = os.pread(fd, name_bytes, base + at + NEWC_HEADER_BYTES).rstrip(b"\0")
        data_at = at + NEWC_HEADER_BYTES + name_bytes
        data_at += -data_at % 4
        if name == b"TRAILER!!!":
            break
        if data_at + size > length:
            raise MbrescueError(f"the payload is cut short ({name.decode(errors='replace')})")
        if name.decode(errors="replace") == wanted:
            return base + data_at, size
        at = data_at + size
        at += -at % 4
    raise MbrescueError(f"the payload holds no capture ({wanted})")


def _members(path: str, fd: int, base: int = 0, size: int | None = None) -> dict[str, Member]:
    """The capture's tar members (offsets in fd's file) in fd's base..base+size."""
    members: dict[str, Member] = {}
    size = os.fstat(fd).st_size - base if size is None else size
    try:
        stream = io.BufferedReader(Window(fd, base, size))
        with tarfile.open(fileobj=stream, mode="r:", tarinfo=BoundedTarInfo) as archive:
            for info in archive:
                if info.isfile():
                    if info.name in members:
                        raise MbrescueError(f"{path}: the capture holds {info.name} twice")
                    members[info.name] = Member(info.name, base + info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise MbrescueError(f"{path} is not a capture file ({exc})") from exc
    except MbrescueError as exc:
        raise MbrescueError(f"{path}: {exc}") from None
    if MANIFEST_MEMBER not in members or REGION_MEMBER not in members:
        raise MbrescueError(f"{path} is not a capture file (no manifest or region)")
    for member in members.values():
        if member.offset + member.size > base + size:
            raise MbrescueError(f"{path} is truncated ({member.name})")
    return members


def _read_manifest(path: str, fd: int, members: dict[str, Member]) -> Manifest:
    if MANIFEST_SEAL_MEMBER not in members:
        raise MbrescueError(
            f"{path}: the manifest has no seal ({MANIFEST_SEAL_MEMBER}); a capture made "
            f"before format version 2 must be taken again"
        )
    manifest_member = members[MANIFEST_MEMBER]
    if manifest_member.size > MANIFEST_MAX_BYTES:
        raise MbrescueError(f"{path}: the manifest is {manifest_member.size} bytes, more than a "
                            "capture's manifest can be")
    raw = os.pread(fd, manifest_member.size, manifest_member.offset)
    seal_member = members[MANIFEST_SEAL_MEMBER]
    seal = os.pread(fd, min(seal_member.size, 128), seal_member.offset)
    if seal.strip() != hashlib.sha256(raw).hexdigest().encode():
        raise MbrescueError(
            f"{path}: checksum mismatch in {MANIFEST_MEMBER} (the manifest was changed or "
            "damaged after the capture); nothing written"
        )
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MbrescueError(f"{path}: the manifest is not valid JSON") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise MbrescueError(f"{path} is not a capture file (format {found!r})")
    if data.get("format_version") not in READ_VERSIONS:
        raise MbrescueError(
            f"{path}: capture format version {data.get('format_version')!r} "
            f"is not supported (this mbrescue reads {', '.join(map(str, READ_VERSIONS))})"
        )
    try:
        return parse_manifest(data)
    except MbrescueError as exc:
        raise MbrescueError(f"{path}: {exc}") from None


def _check_members(path: str, manifest: Manifest, members: dict[str, Member]) -> None:
    """Member sizes against the manifest, before any member is read."""
    if members[REGION_MEMBER].size != manifest.region.compressed_bytes:
        raise MbrescueError(
            f"{path}: the region member is {members[REGION_MEMBER].size} bytes, the manifest's "
            f"chunk list says {manifest.region.compressed_bytes}"
        )
    tail = manifest.gpt_tail
    if tail is not None:
        member = members.get(tail.member)
        if member is None or member.size != tail.length_bytes:
            raise MbrescueError(f"{path}: the GPT tail member does not match the manifest")
    archive = manifest.boot_files.member
    if archive is not None and archive not in members:
        raise MbrescueError(f"{path}: the capture has no {archive}")
