"""The capture's manifest, parsed once into checked, frozen records.

Everything a restore writes besides the region itself is steered by the manifest: the
EBRs of logical partitions, swap headers, where a GPT moves, which partition may shrink.
So it is parsed here, in one function, and every field is checked before anything is
planned: types, ranges (every LBA inside the source disk, the region inside the disk,
the chunk list consistent with the region's length) and cross-field consistency (swap
records name a partition with the same extent, the boot chain's partitions exist and
end where the region ends). A bad field fails here with its name; the rest of the code
takes `Manifest` and never indexes the raw JSON. `check_tables` then holds the manifest
against the partition table stored in the region itself, once the region's checksum
has been verified: a manifest that disagrees with the captured table is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import gpt, mbr
from .errors import MbrescueError
from .outputs import check_hostname

SECTOR_SIZES = (512, 1024, 2048, 4096)
SWAP_PAGE_SIZES = (4096, 8192, 16384, 65536)
# Far above any disk made so far (2**64 bytes), low enough that products stay exact.
MAX_DISK_BYTES = 1 << 64
MAX_PARTITIONS = 256
# A region chunk's gzip member: deflate's stored blocks add 5 bytes per 64 KiB, the gzip
# frame 18; anything much larger than the raw chunk was not written by capture.
CHUNK_OVERHEAD_BYTES = 4096
SHA256_RE = re.compile(r"[0-9a-f]{64}")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
HEX_RE = re.compile(r"(?:[0-9a-f]{2})*")
# A machine's MAC address as capture writes it (and GRUB's $net_default_mac spells it).
MAC_RE = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
MAX_MACS = 64
# A BLS entry's title, file name or initrd path: printable (it reaches the console), bounded.
BLS_TEXT_RE = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
MAX_INITRDS = 16


class _Fields:
    """Typed access to one JSON object of the manifest; a wrong field names itself."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise _bad(where, f"expected an object, found {_kind(data)}")
        self.data = data
        self.where = where

    def _get(self, name: str, optional: bool) -> Any:
        if name not in self.data:
            if optional:
                return None
            raise _bad(self._name(name), "missing")
        return self.data[name]

    def _name(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def integer(self, name: str, low: int = 0, high: int = MAX_DISK_BYTES) -> int:
        value = self._get(name, False)
        # bool is an int subclass in Python; true is no sector number.
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(self._name(name), f"expected an integer, found {_kind(value)}")
        if not low <= value <= high:
            raise _bad(self._name(name), f"{value} is outside {low}..{high}")
        return value

    def opt_int(self, name: str, low: int = 0, high: int = MAX_DISK_BYTES) -> int | None:
        if self.data.get(name) is None:
            return None
        return self.integer(name, low, high)

    def text(self, name: str, pattern: re.Pattern[str] | None = None,
            choices: tuple[str, ...] = ()) -> str:
        value = self._get(name, False)
        if not isinstance(value, str):
            raise _bad(self._name(name), f"expected a string, found {_kind(value)}")
        if choices and value not in choices:
            raise _bad(self._name(name), f"{value[:40]!r} is not one of {', '.join(choices)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise _bad(self._name(name), f"{value[:40]!r} is not well-formed")
        return value

    def opt_str(self, name: str, pattern: re.Pattern[str] | None = None) -> str | None:
        if self.data.get(name) is None:
            return None
        return self.text(name, pattern)

    def flag(self, name: str) -> bool:
        value = self._get(name, True)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise _bad(self._name(name), f"expected true or false, found {_kind(value)}")
        return value

    def items(self, name: str, optional: bool = False) -> list[Any]:
        value = self._get(name, optional)
        if value is None and optional:
            return []
        if not isinstance(value, list):
            raise _bad(self._name(name), f"expected a list, found {_kind(value)}")
        return value

    def obj(self, name: str) -> _Fields:
        return _Fields(self._get(name, False), self._name(name))

    def opt_obj(self, name: str) -> _Fields | None:
        if self.data.get(name) is None:
            return None
        return self.obj(name)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), "?")


def _bad(field_name: str, problem: str) -> MbrescueError:
    return MbrescueError(f"the manifest's field {field_name} is invalid: {problem}")


@dataclass(frozen=True)
class SourceDisk:
    path: str
    kind: str
    size_bytes: int
    logical_sector_bytes: int
    physical_sector_bytes: int
    model: str | None
    serial: str | None
    wwn: str | None

    @property
    def size_sectors(self) -> int:
        return self.size_bytes // self.logical_sector_bytes


@dataclass(frozen=True)
class FsRecord:
    type: str
    label: str | None
    uuid: str | None


@dataclass(frozen=True)
class PartitionRecord:
    number: int
    start_lba: int
    size_sectors: int
    type: str  # MBR "0x83" or a GPT type GUID
    type_name: str
    bootable: bool
    is_extended: bool
    is_logical: bool
    table_lba: int | None  # the MBR/EBR sector holding an msdos entry
    guid: str | None
    name: str | None
    fs: FsRecord | None

    @property
    def end_lba(self) -> int:
        return self.start_lba + self.size_sectors - 1


@dataclass(frozen=True)
class RegionRecord:
    length_bytes: int
    end_lba: int
    sha256: str
    chunk_bytes: int
    chunks: tuple[int, ...]  # compressed size of each gzip member
    chunk_sha256: tuple[str, ...]

    @property
    def compressed_bytes(self) -> int:
        return sum(self.chunks)

    def raw_chunk_bytes(self, index: int) -> int:
        """What chunk `index` must inflate to: `chunk_bytes`, the last one the rest."""
        return min(self.chunk_bytes, self.length_bytes - index * self.chunk_bytes)


@dataclass(frozen=True)
class SwapRecord:
    partition: int
    start_lba: int
    size_sectors: int
    label: str | None
    uuid: str
    page_bytes: int


@dataclass(frozen=True)
class EbrRecord:
    lba: int
    sector: bytes  # the EBR verbatim


@dataclass(frozen=True)
class TailRecord:
    """GPT disks: the backup entries and header (the disk's last sectors), verbatim."""

    member: str
    offset_bytes: int
    length_bytes: int
    sha256: str


@dataclass(frozen=True)
class BootFilesRecord:
    member: str | None
    sha256: str | None
    file_count: int
    mountpoint: str | None
    reason: str | None


@dataclass(frozen=True)
class FileEntry:
    """One file of the captured /boot, as `check` compares it (path relative to /boot)."""

    path: str
    type: str  # "file", "symlink", "dir" or "special"
    size: int
    mode: int  # permission bits (and setuid/setgid/sticky)
    uid: int
    gid: int
    mtime: int
    sha256: str | None  # regular files
    target: str | None  # symlinks


@dataclass(frozen=True)
class KernelRecord:
    file: str  # vmlinuz-<version>, at /boot's top level
    version: str
    modules: bool | None  # /lib/modules/<version> existed; None: not captured on the live host
    # The BLS entry that names it (runner/bootfiles.py), None for a kernel no entry names.
    title: str | None = None
    entry: str | None = None  # loader/entries/<id>.conf
    initrd: tuple[str, ...] = ()


@dataclass(frozen=True)
class GapRecord:
    start_lba: int
    end_lba: int
    sha256: str


@dataclass(frozen=True)
class RawPartitionRecord:
    """A boot-chain partition without a file system (BIOS boot: GRUB's core image)."""

    partition: int
    sha256: str


@dataclass(frozen=True)
class FingerprintRecord:
    gap: GapRecord | None  # None: no sectors between the table and the first partition
    raw_partitions: tuple[RawPartitionRecord, ...]
    files: tuple[FileEntry, ...] | None  # None: /boot was not read as files (files_reason)
    files_reason: str | None
    kernels: tuple[KernelRecord, ...]
    live_host: bool  # captured on the running system whose /boot this is


@dataclass(frozen=True)
class FileSystemParams:
    """What it takes to make a boot-chain file system again (runner/filecopy.py)."""

    type: str  # ext2 | ext3 | ext4 | xfs | vfat
    uuid: str | None  # ext, xfs
    label: str | None
    block_bytes: int | None  # ext, xfs
    inode_bytes: int | None  # ext, xfs
    inode_count: int | None  # ext
    features: tuple[str, ...]  # ext: as dumpe2fs names them; xfs: filecopy.xfs_params
    fat_bits: int | None  # vfat: 12, 16 or 32
    sector_bytes: int | None  # vfat, xfs
    volume_id: str | None  # vfat, 8 hex digits
    used_bytes: int  # what the files take (4 KiB blocks), for the size check


@dataclass(frozen=True)
class FileCopyRecord:
    """A file-level copy of one boot-chain file system: a tar member and its parameters."""

    partition: int
    member: str
    sha256: str
    file_count: int
    fs: FileSystemParams
    # How many of its regular files are references into the region (runner/filecopy.py).
    referenced_files: int = 0


@dataclass(frozen=True)
class BootLoaderRecord:
    """How the boot loader was installed, for the disk (partition None: sector 0 and what it
    loads) or one boot-chain partition; found from the bytes (runner/bootloader.py)."""

    partition: int | None
    method: str  # one of METHODS
    evidence: tuple[str, ...]
    loader_paths: tuple[str, ...]  # uefi: EFI/<dir>/<name>.efi on the ESP
    core_lba: int | None  # the first sector of GRUB's core image, stage1.5 or stage2
    core_sectors: int | None
    core_partition: int | None  # the partition holding those sectors (None: the gap)


@dataclass(frozen=True)
class Manifest:
    hostname: str
    created: str
    tool_version: str
    source: SourceDisk
    table: str  # "msdos" or "gpt"
    disk_id: str
    partitions: tuple[PartitionRecord, ...]
    boot_partition: int
    boot_chain: tuple[int, ...]
    boot_fs: FsRecord | None
    frozen: bool
    region: RegionRecord
    ebrs: tuple[EbrRecord, ...]
    gpt_tail: TailRecord | None
    swap: tuple[SwapRecord, ...]
    boot_files: BootFilesRecord
    raw: dict[str, Any]  # the JSON as read, for `inspect --json` only
    # Optional (captures made before `check` existed have neither): what `check` compares.
    mbr_boot_code_sha256: str | None = None  # layout.mbr.boot_code_sha256: bytes 0..439
    fingerprint: FingerprintRecord | None = None
    # Optional (captures before the file-level path have none): runner/filecopy.py.
    file_copies: tuple[FileCopyRecord, ...] = ()
    # Optional (captures before it have none: None): how the boot loader was installed.
    boot_loader: tuple[BootLoaderRecord, ...] | None = None
    # Optional: the host's NICs (picks its network-boot menu); none for an image-file source.
    macs: tuple[str, ...] = ()

    def partition(self, number: int) -> PartitionRecord:
        for part in self.partitions:
            if part.number == number:
                return part
        raise MbrescueError(f"the capture has no partition {number}")

    @property
    def swap_numbers(self) -> set[int]:
        return {record.partition for record in self.swap}


# --- parsing ---------------------------------------------------------------------------


def parse_manifest(data: Any) -> Manifest:
    """The manifest's JSON value, checked field by field and across fields."""
    top = _Fields(data, "")
    source = _source(top.obj("source"))
    disk_sectors = source.size_sectors
    layout = top.obj("layout")
    table = layout.text("table", choices=("msdos", "gpt"))
    partitions = tuple(
        _partition(_Fields(item, f"layout.partitions[{index}]"), disk_sectors, table)
        for index, item in enumerate(layout.items("partitions"))
    )
    if len(partitions) > MAX_PARTITIONS:
        raise _bad("layout.partitions", f"{len(partitions)} partitions")
    numbers = [p.number for p in partitions]
    if len(set(numbers)) != len(numbers):
        raise _bad("layout.partitions", "a partition number appears twice")
    by_number = {p.number: p for p in partitions}

    region = _region(top.obj("region"), source)
    boot_partition = top.integer("boot_partition", 1, 1 << 16)
    if boot_partition not in by_number:
        raise _bad("boot_partition", f"partition {boot_partition} is not in the layout")
    boot_chain = tuple(int(n) if isinstance(n, int) and not isinstance(n, bool) else -1
                       for n in top.items("boot_chain"))
    if not boot_chain or any(n not in by_number or by_number[n].is_extended for n in boot_chain):
        raise _bad("boot_chain", f"{list(boot_chain)} names a partition the layout lacks")
    if boot_partition not in boot_chain:
        raise _bad("boot_chain", f"does not hold the boot partition {boot_partition}")
    chain_end = max(by_number[n].end_lba + 1 for n in boot_chain)
    if region.end_lba != chain_end:
        raise _bad("region.end_lba", f"{region.end_lba}, but the boot chain ends at sector "
                                     f"{chain_end}")
    swaps = tuple(
        _swap(_Fields(item, f"swap[{index}]"), by_number)
        for index, item in enumerate(top.items("swap", optional=True))
    )
    if len({s.partition for s in swaps}) != len(swaps):
        raise _bad("swap", "a partition appears twice")
    ebrs = tuple(
        _ebr(_Fields(item, f"ebrs[{index}]"), source)
        for index, item in enumerate(top.items("ebrs", optional=True))
    )
    if len({e.lba for e in ebrs}) != len(ebrs):
        raise _bad("ebrs", "an EBR sector appears twice")
    if ebrs and table != "msdos":
        raise _bad("ebrs", "EBRs on a GPT disk")
    tail_fields = top.opt_obj("gpt_tail")
    gpt_tail = _tail(tail_fields, source) if tail_fields is not None else None
    if (gpt_tail is None) != (table != "gpt"):
        raise _bad("gpt_tail", "a GPT disk needs its backup table, an msdos disk has none")
    boot_fs_fields = top.opt_obj("boot_fs")
    return Manifest(
        hostname=_hostname(top),
        created=top.text("created"),
        tool_version=top.text("tool_version"),
        source=source,
        table=table,
        disk_id=layout.text("disk_id"),
        partitions=partitions,
        boot_partition=boot_partition,
        boot_chain=boot_chain,
        boot_fs=_fs(boot_fs_fields) if boot_fs_fields is not None else None,
        frozen=top.flag("frozen"),
        region=region,
        ebrs=ebrs,
        gpt_tail=gpt_tail,
        swap=swaps,
        boot_files=_boot_files(top.obj("boot_files")),
        raw=data,
        mbr_boot_code_sha256=_boot_code_sha256(layout),
        fingerprint=_fingerprint(top.opt_obj("fingerprint"), source, by_number),
        file_copies=_file_copies(top, boot_chain),
        boot_loader=_boot_loader(top, source, boot_chain, by_number),
        macs=_macs(top),
    )


def _macs(top: _Fields) -> tuple[str, ...]:
    items = top.items("macs", optional=True)
    if len(items) > MAX_MACS:
        raise _bad("macs", f"{len(items)} addresses")
    for index, mac in enumerate(items):
        if not isinstance(mac, str) or not MAC_RE.fullmatch(mac):
            shown = repr(mac[:40]) if isinstance(mac, str) else _kind(mac)
            raise _bad(f"macs[{index}]", f"{shown} is not a MAC address like 52:54:00:12:34:56")
        # A multicast or all-zero address is no machine's: no firmware boots with it.
        if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
            raise _bad(f"macs[{index}]", f"{mac} is not a machine's MAC address")
    macs = tuple(items)
    if len(set(macs)) != len(macs):
        raise _bad("macs", "an address appears twice")
    return macs


def _hostname(fields: _Fields) -> str:
    name = fields.text("hostname")
    try:
        return check_hostname(name)
    except MbrescueError as exc:
        raise _bad("hostname", str(exc)) from None


def _source(fields: _Fields) -> SourceDisk:
    sector = fields.integer("logical_sector_bytes", 512, 4096)
    if sector not in SECTOR_SIZES:
        raise _bad("source.logical_sector_bytes", f"{sector} is not a sector size")
    size = fields.integer("size_bytes", sector, MAX_DISK_BYTES)
    if size % sector:
        raise _bad("source.size_bytes", f"{size} is not a whole number of {sector}-byte sectors")
    return SourceDisk(
        path=fields.text("path"),
        kind=fields.text("kind"),
        size_bytes=size,
        logical_sector_bytes=sector,
        physical_sector_bytes=fields.integer("physical_sector_bytes", 512, 1 << 20),
        model=fields.opt_str("model"),
        serial=fields.opt_str("serial"),
        wwn=fields.opt_str("wwn"),
    )


def _fs(fields: _Fields) -> FsRecord:
    return FsRecord(type=fields.text("type"), label=fields.opt_str("label"),
                    uuid=fields.opt_str("uuid"))


def _partition(fields: _Fields, disk_sectors: int, table: str) -> PartitionRecord:
    start = fields.integer("start_lba", 1, disk_sectors - 1)
    size = fields.integer("size_sectors", 1, disk_sectors - start)
    end = fields.integer("end_lba", 0, disk_sectors)
    if end != start + size - 1:
        raise _bad(f"{fields.where}.end_lba", f"{end}, but start {start} + size {size} - 1 is "
                                              f"{start + size - 1}")
    fs_fields = fields.opt_obj("fs")
    return PartitionRecord(
        number=fields.integer("number", 1, 1 << 16),
        start_lba=start,
        size_sectors=size,
        type=fields.text("type"),
        type_name=fields.opt_str("type_name") or "",
        bootable=fields.flag("bootable"),
        is_extended=fields.flag("is_extended"),
        is_logical=fields.flag("is_logical"),
        table_lba=fields.opt_int("table_lba", 0, disk_sectors - 1),
        guid=fields.opt_str("guid"),
        name=fields.opt_str("name"),
        fs=_fs(fs_fields) if fs_fields is not None else None,
    )


def _region(fields: _Fields, source: SourceDisk) -> RegionRecord:
    sector = source.logical_sector_bytes
    length = fields.integer("length_bytes", sector, source.size_bytes)
    end_lba = fields.integer("end_lba", 1, source.size_sectors)
    if length != end_lba * sector:
        raise _bad("region.length_bytes", f"{length}, but end_lba {end_lba} x {sector} bytes "
                                          f"is {end_lba * sector}")
    chunk_bytes = fields.integer("chunk_bytes", 4096, 64 << 20)
    count = -(-length // chunk_bytes)
    chunks = fields.items("chunks")
    digests = fields.items("chunk_sha256")
    if len(chunks) != count or len(digests) != count:
        raise _bad("region.chunks", f"{len(chunks)} chunks and {len(digests)} checksums, a "
                                    f"{length}-byte region has {count}")
    limit = chunk_bytes + CHUNK_OVERHEAD_BYTES
    for index, size in enumerate(chunks):
        if not isinstance(size, int) or isinstance(size, bool) or not 18 <= size <= limit:
            raise _bad(f"region.chunks[{index}]", f"{size!r} is not a member size")
    for index, digest in enumerate(digests):
        if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
            raise _bad(f"region.chunk_sha256[{index}]", "not a SHA-256")
    return RegionRecord(
        length_bytes=length,
        end_lba=end_lba,
        sha256=fields.text("sha256", SHA256_RE),
        chunk_bytes=chunk_bytes,
        chunks=tuple(chunks),
        chunk_sha256=tuple(digests),
    )


def _swap(fields: _Fields, partitions: dict[int, PartitionRecord]) -> SwapRecord:
    number = fields.integer("partition", 1, 1 << 16)
    part = partitions.get(number)
    start = fields.integer("start_lba", 1)
    size = fields.integer("size_sectors", 1)
    if part is None or part.is_extended:
        raise _bad(f"{fields.where}.partition", f"partition {number} is not in the layout")
    if (start, size) != (part.start_lba, part.size_sectors):
        raise _bad(f"{fields.where}.start_lba",
                   f"swap at sectors {start}+{size}, but partition {number} is at "
                   f"{part.start_lba}+{part.size_sectors}")
    label = fields.opt_str("label")
    if label is not None and len(label.encode()) > 16:
        raise _bad(f"{fields.where}.label", "longer than the 16 bytes a swap label holds")
    page = fields.opt_int("page_bytes", 4096, 65536) or 4096
    if page not in SWAP_PAGE_SIZES:
        raise _bad(f"{fields.where}.page_bytes", f"{page} is not a page size")
    return SwapRecord(partition=number, start_lba=start, size_sectors=size, label=label,
                      uuid=fields.text("uuid", UUID_RE), page_bytes=page)


def _ebr(fields: _Fields, source: SourceDisk) -> EbrRecord:
    lba = fields.integer("lba", 1, source.size_sectors - 1)
    raw = fields.text("hex", HEX_RE)
    if len(raw) != 2 * source.logical_sector_bytes and len(raw) != 1024:
        raise _bad(f"{fields.where}.hex", f"{len(raw) // 2} bytes, not one sector")
    return EbrRecord(lba=lba, sector=bytes.fromhex(raw))


def _tail(fields: _Fields, source: SourceDisk) -> TailRecord:
    sector = source.logical_sector_bytes
    length = fields.integer("length_bytes", 2 * sector, 1 << 24)
    offset = fields.integer("offset_bytes", 0, source.size_bytes)
    if length % sector or offset + length != source.size_bytes:
        raise _bad("gpt_tail.offset_bytes", f"{offset}+{length} is not the disk's last sectors")
    return TailRecord(member=fields.text("member"), offset_bytes=offset, length_bytes=length,
                      sha256=fields.text("sha256", SHA256_RE))


def _boot_files(fields: _Fields) -> BootFilesRecord:
    member = fields.opt_str("member")
    digest = fields.opt_str("sha256", SHA256_RE)
    if member is not None and digest is None:
        raise _bad("boot_files.sha256", "missing for the archive")
    return BootFilesRecord(
        member=member,
        sha256=digest,
        file_count=fields.opt_int("file_count", 0, 1 << 32) or 0,
        mountpoint=fields.opt_str("mountpoint"),
        reason=fields.opt_str("reason"),
    )


FS_TYPES = ("ext2", "ext3", "ext4", "xfs", "vfat")
EXT_FEATURE_RE = re.compile(r"\^?[a-z0-9_]{1,40}")
MEMBER_RE = re.compile(r"files-p[0-9]{1,5}\.tar\.gz")
VOLUME_ID_RE = re.compile(r"[0-9A-F]{8}")


def _file_copies(top: _Fields, boot_chain: tuple[int, ...]) -> tuple[FileCopyRecord, ...]:
    records = []
    for index, item in enumerate(top.items("file_copies", optional=True)):
        fields = _Fields(item, f"file_copies[{index}]")
        partition = fields.integer("partition", 1, 1 << 16)
        if partition not in boot_chain:
            raise _bad(fields._name("partition"), f"{partition} is not in the boot chain")
        fs = fields.obj("fs")
        kind = fs.text("type", choices=FS_TYPES)
        features = tuple(str(f) for f in fs.items("features", optional=True))
        for feature in features:
            if not EXT_FEATURE_RE.fullmatch(feature):
                raise _bad(fs._name("features"), f"{feature[:40]!r} is not well-formed")
        ext, fat = kind not in ("vfat", "xfs"), kind == "vfat"
        params = FileSystemParams(
            type=kind,
            uuid=fs.text("uuid", UUID_RE) if not fat else None,
            label=fs.opt_str("label"),
            block_bytes=fs.integer("block_bytes", 512, 65536) if not fat else None,
            inode_bytes=fs.integer("inode_bytes", 128, 4096) if not fat else None,
            inode_count=fs.integer("inode_count", 16, 1 << 32) if ext else None,
            features=features,
            fat_bits=fs.integer("fat_bits", 12, 32) if fat else None,
            sector_bytes=fs.integer("sector_bytes", 512, 32768) if not ext else None,
            volume_id=fs.text("volume_id", VOLUME_ID_RE) if fat else None,
            used_bytes=fs.integer("used_bytes"),
        )
        if params.label is not None and len(params.label) > 16:
            raise _bad(fs._name("label"), "longer than 16 characters")
        records.append(FileCopyRecord(
            partition=partition,
            member=fields.text("member", MEMBER_RE),
            sha256=fields.text("sha256", SHA256_RE),
            file_count=fields.integer("file_count", 0, 1 << 32),
            fs=params,
            referenced_files=fields.opt_int("referenced_files", 0, 1 << 32) or 0,
        ))
    if len({r.partition for r in records}) != len(records):
        raise _bad("file_copies", "a partition appears twice")
    return tuple(records)


# How a boot loader was installed (runner/bootloader.py finds it from the bytes).
GRUB2_EMBEDDED_GAP = "grub2-embedded-gap"
GRUB2_BIOS_BOOT_PARTITION = "grub2-bios-boot-partition"
GRUB2_BLOCKLIST = "grub2-blocklist"
GRUB_LEGACY_STAGE1_5 = "grub-legacy-stage1.5"
GRUB_LEGACY_BLOCKLIST = "grub-legacy-blocklist"
EXTLINUX_VBR = "extlinux-vbr"
UEFI = "uefi"
NONE = "none"
UNKNOWN = "unknown"
METHODS = (GRUB2_EMBEDDED_GAP, GRUB2_BIOS_BOOT_PARTITION, GRUB2_BLOCKLIST, GRUB_LEGACY_STAGE1_5,
           GRUB_LEGACY_BLOCKLIST, EXTLINUX_VBR, UEFI, NONE, UNKNOWN)
MAX_LOADER_PATHS = 64
MAX_EVIDENCE = 16
MAX_EVIDENCE_CHARS = 1000
MAX_LOADER_PATH_CHARS = 255


def _boot_loader(top: _Fields, source: SourceDisk, boot_chain: tuple[int, ...],
                 partitions: dict[int, PartitionRecord]) -> tuple[BootLoaderRecord, ...] | None:
    if top.data.get("boot_loader") is None:
        return None
    records = []
    listed = top.items("boot_loader")
    if len(listed) > 1 + len(boot_chain):
        raise _bad("boot_loader", f"{len(listed)} records for a boot chain of {len(boot_chain)}")
    for index, item in enumerate(listed):
        fields = _Fields(item, f"boot_loader[{index}]")
        partition = fields.opt_int("partition", 1, 1 << 16)
        if partition is not None and partition not in boot_chain:
            raise _bad(fields._name("partition"), f"{partition} is not in the boot chain")
        method = fields.text("method", choices=METHODS)
        evidence = fields.items("evidence", optional=True)
        if len(evidence) > MAX_EVIDENCE or not all(
                isinstance(line, str) and len(line) <= MAX_EVIDENCE_CHARS for line in evidence):
            raise _bad(fields._name("evidence"), f"not a list of at most {MAX_EVIDENCE} lines")
        paths = fields.items("loader_paths", optional=True)
        if len(paths) > MAX_LOADER_PATHS:
            raise _bad(fields._name("loader_paths"), f"{len(paths)} paths")
        for path in paths:
            parts = path.split("/") if isinstance(path, str) else [""]
            if (not isinstance(path, str) or len(path) > MAX_LOADER_PATH_CHARS or "\0" in path or ".." in parts
                    or "" in parts):
                raise _bad(fields._name("loader_paths"),
                           f"{str(path)[:40]!r} is not a relative path on the ESP")
        if paths and method != UEFI:
            raise _bad(fields._name("loader_paths"), f"loader paths for method {method}")
        core_partition = fields.opt_int("core_partition", 1, 1 << 16)
        if core_partition is not None and core_partition not in partitions:
            raise _bad(fields._name("core_partition"),
                       f"partition {core_partition} is not in the layout")
        records.append(BootLoaderRecord(
            partition=partition,
            method=method,
            evidence=tuple(evidence),
            loader_paths=tuple(paths),
            core_lba=fields.opt_int("core_lba", 1, source.size_sectors - 1),
            core_sectors=fields.opt_int("core_sectors", 1, 1 << 24),
            core_partition=core_partition,
        ))
    if len({r.partition for r in records}) != len(records):
        raise _bad("boot_loader", "the disk or a partition appears twice")
    return tuple(records)


FILE_TYPES = ("file", "symlink", "dir", "special")
MAX_FILES = 1 << 20
MAX_PATH_CHARS = 4096


def _boot_code_sha256(layout: _Fields) -> str | None:
    mbr_fields = layout.opt_obj("mbr")
    return mbr_fields.opt_str("boot_code_sha256", SHA256_RE) if mbr_fields is not None else None


def _fingerprint(fields: _Fields | None, source: SourceDisk,
                 partitions: dict[int, PartitionRecord]) -> FingerprintRecord | None:
    if fields is None:
        return None
    gap_fields = fields.opt_obj("gap")
    gap = None
    if gap_fields is not None:
        start = gap_fields.integer("start_lba", 1, source.size_sectors - 1)
        end = gap_fields.integer("end_lba", start, source.size_sectors - 1)
        gap = GapRecord(start, end, gap_fields.text("sha256", SHA256_RE))
    raw_partitions = []
    for index, item in enumerate(fields.items("raw_partitions", optional=True)):
        raw = _Fields(item, f"fingerprint.raw_partitions[{index}]")
        number = raw.integer("partition", 1, 1 << 16)
        if number not in partitions:
            raise _bad(f"{raw.where}.partition", f"partition {number} is not in the layout")
        raw_partitions.append(RawPartitionRecord(number, raw.text("sha256", SHA256_RE)))
    files = None
    if fields.data.get("files") is not None:
        listed = fields.items("files")
        if len(listed) > MAX_FILES:
            raise _bad("fingerprint.files", f"{len(listed)} entries")
        files = tuple(_file_entry(_Fields(item, f"fingerprint.files[{index}]"))
                      for index, item in enumerate(listed))
        if len({entry.path for entry in files}) != len(files):
            raise _bad("fingerprint.files", "a path appears twice")
    kernels = []
    for index, item in enumerate(fields.items("kernels", optional=True)):
        kernel = _Fields(item, f"fingerprint.kernels[{index}]")
        modules = None if kernel.data.get("modules") is None else kernel.flag("modules")
        listed = kernel.items("initrd", optional=True)
        if len(listed) > MAX_INITRDS:
            raise _bad(f"{kernel.where}.initrd", f"{len(listed)} entries")
        initrd = tuple(_Fields({"initrd": item}, kernel.where).text("initrd", BLS_TEXT_RE)
                       for item in listed)
        kernels.append(KernelRecord(kernel.text("file"), kernel.text("version"), modules,
                                    title=kernel.opt_str("title", BLS_TEXT_RE),
                                    entry=kernel.opt_str("entry", BLS_TEXT_RE), initrd=initrd))
    return FingerprintRecord(gap=gap, raw_partitions=tuple(raw_partitions), files=files,
                             files_reason=fields.opt_str("files_reason"),
                             kernels=tuple(kernels), live_host=fields.flag("live_host"))


def _file_entry(fields: _Fields) -> FileEntry:
    path = fields.text("path")
    parts = path.split("/")
    if (not path or len(path) > MAX_PATH_CHARS or "\0" in path or path.startswith("/")
            or ".." in parts or "" in parts):
        raise _bad(f"{fields.where}.path", f"{path[:40]!r} is not a relative path inside /boot")
    kind = fields.text("type", choices=FILE_TYPES)
    digest = fields.opt_str("sha256", SHA256_RE)
    if kind == "file" and digest is None:
        raise _bad(f"{fields.where}.sha256", "missing for a regular file")
    target = fields.opt_str("target")
    if kind == "symlink" and target is None:
        raise _bad(f"{fields.where}.target", "missing for a symlink")
    return FileEntry(path=path, type=kind, size=fields.integer("size"),
                     mode=fields.integer("mode", 0, 0o7777), uid=fields.integer("uid", 0, 1 << 32),
                     gid=fields.integer("gid", 0, 1 << 32),
                     mtime=fields.integer("mtime", -(1 << 40), 1 << 40), sha256=digest,
                     target=target)


# --- the manifest against the captured table -------------------------------------------


def check_tables(manifest: Manifest, read_region: Callable[[int, int], bytes]) -> None:
    """Hold the manifest's partitions, swap records and EBRs against the partition table
    stored in the (verified) region; raise naming the first disagreement.

    `read_region(offset, length)` reads the captured region's raw bytes.
    """
    sector = manifest.source.logical_sector_bytes
    if manifest.table == "gpt":
        _check_gpt(manifest, read_region, sector)
    else:
        _check_msdos(manifest, read_region, sector)


def _disagree(what: str) -> MbrescueError:
    return MbrescueError(f"the manifest disagrees with the partition table in the region: {what}")


def _check_gpt(manifest: Manifest, read_region: Callable[[int, int], bytes], sector: int) -> None:
    header = gpt.parse_header(read_region(sector, sector))
    total = header.entries_total_bytes
    if (header.entries_lba * sector + total) > manifest.region.length_bytes:
        raise _disagree("the GPT entries lie outside the region")
    entries = {e.number: e for e in gpt.parse_entries(
        read_region(header.entries_lba * sector, total), header.entry_count, header.entry_bytes)}
    for part in manifest.partitions:
        entry = entries.get(part.number)
        if entry is None or (entry.first_lba, entry.last_lba) != (part.start_lba, part.end_lba):
            raise _disagree(f"partition {part.number} at sectors {part.start_lba}..{part.end_lba}"
                            f" is not in the captured GPT")
        if entry.type_guid != part.type.lower():
            raise _disagree(f"partition {part.number}'s type {part.type}")
    if set(entries) != {p.number for p in manifest.partitions}:
        raise _disagree("the captured GPT has partitions the manifest lacks")


def _check_msdos(manifest: Manifest, read_region: Callable[[int, int], bytes],
                 sector: int) -> None:
    table = mbr.parse_mbr(read_region(0, 512))
    expected = {p.number: p for p in manifest.partitions}
    seen: set[int] = set()
    extended: PartitionRecord | None = None
    for entry in table.entries:
        if entry.is_empty:
            continue
        number = entry.index + 1
        part = expected.get(number)
        if part is None or part.is_logical or (part.start_lba, part.size_sectors) != (
                entry.start_lba, entry.size_sectors):
            raise _disagree(f"primary partition {number} (sectors {entry.start_lba}"
                            f"+{entry.size_sectors}) is not so in the manifest")
        seen.add(number)
        if entry.is_extended:
            extended = part
    by_lba = {record.lba: record.sector[:512] for record in manifest.ebrs}
    region_sectors = manifest.region.length_bytes // sector
    for lba, data in by_lba.items():
        # An EBR inside the region is covered by the region's checksum: it must agree.
        if lba < region_sectors and read_region(lba * sector, 512) != data:
            raise _disagree(f"the EBR at sector {lba} differs from the region's bytes there")
    if extended is not None and by_lba:
        number = 5
        ebr_lba: int | None = extended.start_lba
        visited: set[int] = set()
        while ebr_lba is not None and ebr_lba in by_lba and ebr_lba not in visited:
            visited.add(ebr_lba)
            ebr = mbr.parse_mbr(by_lba[ebr_lba])
            link: int | None = None
            for entry in ebr.entries:
                if entry.is_empty:
                    continue
                if entry.is_extended:
                    link = extended.start_lba + entry.start_lba
                    continue
                part = expected.get(number)
                start = ebr_lba + entry.start_lba
                if part is None or not part.is_logical or (
                        part.start_lba, part.size_sectors) != (start, entry.size_sectors):
                    raise _disagree(f"logical partition {number} (sectors {start}"
                                    f"+{entry.size_sectors}) is not so in the manifest")
                seen.add(number)
                number += 1
            ebr_lba = link
    missing = set(expected) - seen
    if missing and (by_lba or extended is None):
        raise _disagree(f"partition(s) {sorted(missing)} are in no captured table")
    for record in manifest.swap:
        part = expected[record.partition]
        if part.is_logical and not by_lba:
            continue
        if record.partition not in seen:
            raise _disagree(f"swap partition {record.partition} is in no captured table")
