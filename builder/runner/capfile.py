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
import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .errors import MbrescueError

FORMAT = "mbrescue-capture"
# 2: manifest.sha256 seals the manifest; GNU headers (members over 8 GiB).
FORMAT_VERSION = 2
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
    """An opened capture file: the manifest plus where each member's bytes are."""

    def __init__(self, path: str, manifest: dict, members: dict[str, Member]) -> None:
        self.path = path
        self.manifest = manifest
        self.members = members

    @classmethod
    def open(cls, path: str) -> Capture:
        if not os.path.exists(path):
            raise MbrescueError(f"{path}: no such file")
        if os.path.isdir(path):
            raise MbrescueError(f"{path} is a directory, not a capture file")
        members: dict[str, Member] = {}
        try:
            with tarfile.open(path, "r:") as archive:
                for info in archive:
                    if info.isfile():
                        members[info.name] = Member(info.name, info.offset_data, info.size)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise MbrescueError(f"{path} is not a capture file ({exc})") from exc
        if MANIFEST_MEMBER not in members or REGION_MEMBER not in members:
            raise MbrescueError(f"{path} is not a capture file (no manifest or region)")
        if MANIFEST_SEAL_MEMBER not in members:
            raise MbrescueError(
                f"{path}: the manifest has no seal ({MANIFEST_SEAL_MEMBER}); a capture made "
                f"before format version {FORMAT_VERSION} must be taken again"
            )
        if members[MANIFEST_MEMBER].size > MANIFEST_MAX_BYTES:
            raise MbrescueError(f"{path}: the manifest is {members[MANIFEST_MEMBER].size} "
                                f"bytes, more than a capture's manifest can be")
        with open(path, "rb") as stream:
            stream.seek(members[MANIFEST_MEMBER].offset)
            raw = stream.read(members[MANIFEST_MEMBER].size)
            stream.seek(members[MANIFEST_SEAL_MEMBER].offset)
            seal = stream.read(min(members[MANIFEST_SEAL_MEMBER].size, 128))
        if len(raw) != members[MANIFEST_MEMBER].size:
            raise MbrescueError(f"{path} is truncated (manifest)")
        if seal.strip() != hashlib.sha256(raw).hexdigest().encode():
            raise MbrescueError(
                f"{path}: checksum mismatch in {MANIFEST_MEMBER} (the manifest was changed or "
                "damaged after the capture); nothing written"
            )
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise MbrescueError(f"{path}: the manifest is not valid JSON") from exc
        if manifest.get("format") != FORMAT:
            raise MbrescueError(f"{path} is not a capture file (format {manifest.get('format')!r})")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise MbrescueError(
                f"{path}: capture format version {manifest.get('format_version')} "
                f"is not supported (this mbrescue reads {FORMAT_VERSION})"
            )
        return cls(path, manifest, members)

    @property
    def region(self) -> dict:
        return self.manifest["region"]

    def read_member(self, name: str) -> bytes:
        member = self.members.get(name)
        if member is None:
            raise MbrescueError(f"{self.path}: the capture has no {name}")
        with open(self.path, "rb") as stream:
            stream.seek(member.offset)
            data = stream.read(member.size)
        if len(data) != member.size:
            raise MbrescueError(f"{self.path} is truncated ({name})")
        return data

    def compressed_chunks(self) -> Iterator[bytes]:
        """The region's gzip members, one per chunk, as recorded in the manifest."""
        member = self.members[REGION_MEMBER]
        sizes = self.region["chunks"]
        if sum(sizes) != member.size or len(sizes) != len(self.region.get("chunk_sha256", ())):
            raise MbrescueError(f"{self.path}: region chunk list does not match its member")
        with open(self.path, "rb") as stream:
            stream.seek(member.offset)
            for size in sizes:
                data = stream.read(size)
                if len(data) != size:
                    raise MbrescueError(f"{self.path} is truncated (region)")
                yield data

    def region_chunks(self) -> Iterator[bytes]:
        """The raw region, chunk by chunk (each `chunk_bytes` long, the last shorter)."""
        for index, packed in enumerate(self.compressed_chunks()):
            yield self.unpack(index, packed)

    def unpack(self, index: int, packed: bytes) -> bytes:
        """One region chunk's raw bytes from its gzip member; a damaged member names itself."""
        try:
            unpacker = zlib.decompressobj(GZIP_WBITS)
            raw = unpacker.decompress(packed)
            if not unpacker.eof or unpacker.unused_data:
                raise zlib.error("member not complete")
        except zlib.error as exc:
            raise MbrescueError(f"{self.path}: region chunk {index} is corrupt ({exc})") from exc
        return raw

    def verify(self) -> None:
        """Check every recorded checksum; raise naming the first that differs.

        Nothing may be written to a disk before this passes: a failed unpack can
        leave a full-length but corrupt file. Each gzip member has its own
        SHA-256 (so a damaged capture names the chunk), and the raw region has one.
        """
        expected = self.region["chunk_sha256"]
        raw_digest = hashlib.sha256()
        length = 0
        for index, packed in enumerate(self.compressed_chunks()):
            if hashlib.sha256(packed).hexdigest() != expected[index]:
                raise MbrescueError(f"{self.path}: checksum mismatch in region chunk {index}")
            raw = self.unpack(index, packed)
            raw_digest.update(raw)
            length += len(raw)
        if length != self.region["length_bytes"]:
            raise MbrescueError(
                f"{self.path}: region is {length} bytes, the manifest says {self.region['length_bytes']}"
            )
        if raw_digest.hexdigest() != self.region["sha256"]:
            raise MbrescueError(f"{self.path}: checksum mismatch in the region")
        self.verify_members()

    def verify_members(self) -> None:
        """The GPT tail's and the /boot archive's checksums."""
        for entry in (self.manifest.get("gpt_tail"), self.manifest.get("boot_files")):
            if entry and entry.get("member"):
                data = self.read_member(entry["member"])
                if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise MbrescueError(f"{self.path}: checksum mismatch in {entry['member']}")
