"""Read a disk's whole layout: identity, partition table, partitions and what they hold.

`read_layout` is the one entry point for capture, inspect and restore. It
decides the table type (a protective 0xEE entry means GPT), reads the MBR with
its EBR chain or both GPT copies, and probes every partition's superblock. The
result converts to and from plain JSON for the capture manifest.

Bad input ends in one clear line: a source shorter than one sector, no
partition table, a GPT with both copies corrupt. A GPT whose primary is corrupt
but whose backup is sound is read from the backup, and the layout says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from .disk import DiskInfo, disk_info, read_at
from .errors import MbrescueError
from .gpt import Gpt, read_gpt
from .mbr import Mbr, parse_mbr, walk_ebr_chain
from .probe import FsInfo, probe

MBR_TYPE_NAMES = {
    0x01: "FAT12",
    0x04: "FAT16 <32M",
    0x05: "Extended",
    0x06: "FAT16",
    0x07: "HPFS/NTFS/exFAT",
    0x0B: "W95 FAT32",
    0x0C: "W95 FAT32 (LBA)",
    0x0E: "W95 FAT16 (LBA)",
    0x0F: "W95 Extended (LBA)",
    0x27: "Hidden NTFS WinRE",
    0x82: "Linux swap",
    0x83: "Linux",
    0x85: "Linux extended",
    0x8E: "Linux LVM",
    0xA5: "FreeBSD",
    0xA6: "OpenBSD",
    0xA9: "NetBSD",
    0xEE: "GPT",
    0xEF: "EFI System",
    0xFD: "Linux RAID",
}

GPT_TYPE_NAMES = {
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux home",
    "3b8f8425-20e0-4f3b-907f-1a25a76f98e8": "Linux server data",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery environment",
    "024dee41-33e7-11d3-9d69-0008c781f39f": "MBR partition scheme",
    "516e7cba-6ecf-11d6-8ff8-00022d09712b": "FreeBSD ZFS",
    "6a898cc3-1dd2-11b2-99a6-080020736631": "Solaris /usr & Apple ZFS",
    "48465300-0000-11aa-aa11-00306543ecac": "Apple HFS/HFS+",
}


@dataclass
class Partition:
    number: int
    start_lba: int
    size_sectors: int
    end_lba: int  # inclusive, as sfdisk and sgdisk print it
    type: str  # MBR "0x83", GPT type GUID
    type_name: str
    bootable: bool  # MBR 0x80 status; GPT legacy-BIOS-bootable attribute
    name: str | None = None  # GPT partition name
    guid: str | None = None  # GPT unique partition GUID
    is_extended: bool = False
    is_logical: bool = False
    fs: FsInfo | None = None
    attributes: int | None = None  # GPT attribute bits
    # Where the entry lives, so restore can change it: the MBR/EBR sector and slot (MBR only).
    table_lba: int | None = None
    table_slot: int | None = None


@dataclass
class GptInfo:
    primary_valid: bool
    backup_valid: bool
    used: str  # "primary" or "backup"
    disk_guid: str
    revision: int
    header_bytes: int
    first_usable_lba: int
    last_usable_lba: int
    alternate_lba: int  # of the header used
    entries_lba: int  # of the header used
    entry_count: int
    entry_bytes: int
    entries_crc32: int
    backup_lba: int  # where the backup header is (or was looked for)
    backup_entries_lba: int | None
    primary_problem: str | None = None
    backup_problem: str | None = None


@dataclass
class MbrSlot:
    index: int
    status: int
    type: int
    start_lba: int
    size_sectors: int
    chs_start: list[int]  # [cylinder, head, sector]
    chs_end: list[int]


@dataclass
class MbrSummary:
    disk_signature: str  # "0x1234abcd"
    has_boot_signature: bool
    protective: bool
    boot_code_empty: bool
    boot_code_sha256: str  # of bytes 0..439, to tell GRUB's stage 1 from others
    entries: list[MbrSlot]


@dataclass
class Layout:
    disk: DiskInfo
    table: str  # "msdos" or "gpt"
    disk_id: str  # MBR signature "0xXXXXXXXX" or the GPT disk GUID
    partitions: list[Partition]
    gpt: GptInfo | None
    mbr: MbrSummary
    warnings: list[str] = field(default_factory=list)

    @property
    def sector_bytes(self) -> int:
        return self.disk.logical_sector_bytes

    def partition(self, number: int) -> Partition:
        for candidate in self.partitions:
            if candidate.number == number:
                return candidate
        raise MbrescueError(f"{self.disk.path} has no partition {number}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layout:
        if not isinstance(data, dict):
            raise MbrescueError(
                f"the layout in the manifest is malformed (an object expected, not "
                f"{type(data).__name__})"
            )
        try:
            gpt = data.get("gpt")
            mbr = data["mbr"]
            return cls(
                disk=DiskInfo(**data["disk"]),
                table=data["table"],
                disk_id=data["disk_id"],
                partitions=[_partition_from_json(item) for item in data["partitions"]],
                gpt=GptInfo(**gpt) if gpt is not None else None,
                mbr=MbrSummary(
                    **{key: value for key, value in mbr.items() if key != "entries"},
                    entries=[MbrSlot(**slot) for slot in mbr["entries"]],
                ),
                warnings=list(data.get("warnings", [])),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise MbrescueError(f"the layout in the manifest is malformed ({exc})") from None


def _partition_from_json(item: dict[str, Any]) -> Partition:
    fs = item.get("fs")
    fields = {key: value for key, value in item.items() if key != "fs"}
    return Partition(**fields, fs=FsInfo(**fs) if fs is not None else None)


def _mbr_summary(mbr: Mbr) -> MbrSummary:
    slots = []
    for entry in mbr.entries:
        start, end = entry.chs_start, entry.chs_end
        slots.append(
            MbrSlot(
                index=entry.index,
                status=entry.status,
                type=entry.type,
                start_lba=entry.start_lba,
                size_sectors=entry.size_sectors,
                chs_start=[start.cylinder, start.head, start.sector],
                chs_end=[end.cylinder, end.head, end.sector],
            )
        )
    return MbrSummary(
        disk_signature=f"0x{mbr.disk_signature:08x}",
        has_boot_signature=mbr.has_boot_signature,
        protective=mbr.is_protective,
        boot_code_empty=not any(mbr.boot_code),
        boot_code_sha256=hashlib.sha256(mbr.boot_code).hexdigest(),
        entries=slots,
    )


def _msdos_partitions(
    fd: int, mbr: Mbr, sector_bytes: int, disk_sectors: int
) -> tuple[list[Partition], list[str]]:
    partitions: list[Partition] = []
    warnings: list[str] = []

    def read_sector(lba: int) -> bytes:
        if lba >= disk_sectors:
            raise MbrescueError(f"an EBR link points to sector {lba}, past the disk's end")
        return read_at(fd, lba * sector_bytes, sector_bytes)[:512]

    for entry in mbr.entries:
        if entry.is_empty:
            continue
        partitions.append(
            Partition(
                number=entry.index + 1,
                start_lba=entry.start_lba,
                size_sectors=entry.size_sectors,
                end_lba=entry.start_lba + entry.size_sectors - 1,
                type=f"0x{entry.type:02x}",
                type_name=MBR_TYPE_NAMES.get(entry.type, "Unknown"),
                bootable=entry.bootable,
                is_extended=entry.is_extended,
                table_lba=0,
                table_slot=entry.index,
            )
        )
        if entry.is_extended:
            for logical in walk_ebr_chain(read_sector, entry.start_lba, entry.size_sectors):
                size = logical.entry.size_sectors
                partitions.append(
                    Partition(
                        number=logical.number,
                        start_lba=logical.start_lba,
                        size_sectors=size,
                        end_lba=logical.start_lba + size - 1,
                        type=f"0x{logical.entry.type:02x}",
                        type_name=MBR_TYPE_NAMES.get(logical.entry.type, "Unknown"),
                        bootable=logical.entry.bootable,
                        is_logical=True,
                        table_lba=logical.ebr_lba,
                        table_slot=logical.slot,
                    )
                )
                if logical.start_lba + size > entry.start_lba + entry.size_sectors:
                    warnings.append(
                        f"logical partition {logical.number} runs past its extended partition"
                    )
    return partitions, warnings


def _gpt_partitions(gpt: Gpt) -> list[Partition]:
    return [
        Partition(
            number=entry.number,
            start_lba=entry.first_lba,
            size_sectors=entry.size_sectors,
            end_lba=entry.last_lba,
            type=entry.type_guid,
            type_name=GPT_TYPE_NAMES.get(entry.type_guid, "Unknown"),
            bootable=entry.legacy_bios_bootable,
            name=entry.name or None,
            guid=entry.unique_guid,
            attributes=entry.attributes,
        )
        for entry in gpt.entries
    ]


def _gpt_info(gpt: Gpt) -> GptInfo:
    header = gpt.header
    return GptInfo(
        primary_valid=gpt.primary_valid,
        backup_valid=gpt.backup_valid,
        used=gpt.used,
        disk_guid=header.disk_guid,
        revision=header.revision,
        header_bytes=header.header_bytes,
        first_usable_lba=header.first_usable_lba,
        last_usable_lba=header.last_usable_lba,
        alternate_lba=header.alternate_lba,
        entries_lba=header.entries_lba,
        entry_count=header.entry_count,
        entry_bytes=header.entry_bytes,
        entries_crc32=header.entries_crc32,
        backup_lba=gpt.backup_lba,
        backup_entries_lba=gpt.backup.entries_lba if gpt.backup is not None else None,
        primary_problem=gpt.primary_problem,
        backup_problem=gpt.backup_problem,
    )


def read_layout(path: str, sector_bytes: int | None = None) -> Layout:
    """The partition table and file systems of a block device or image file."""
    info = disk_info(path, sector_bytes)
    sector = info.logical_sector_bytes
    if info.size_bytes < sector:
        raise MbrescueError(f"{path} is shorter than one sector ({info.size_bytes} bytes)")
    disk_sectors = info.size_bytes // sector
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MbrescueError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        return _read_layout_fd(fd, info, disk_sectors)
    finally:
        os.close(fd)


def _read_layout_fd(fd: int, info: DiskInfo, disk_sectors: int) -> Layout:
    path, sector = info.path, info.logical_sector_bytes
    mbr = parse_mbr(read_at(fd, 0, 512))
    if not mbr.has_boot_signature:
        raise MbrescueError(f"{path}: no partition table (no 0x55AA signature in sector 0)")
    if not mbr.entries_plausible:
        raise MbrescueError(f"{path}: no partition table (sector 0 holds no valid MBR entries)")
    if all(entry.is_empty for entry in mbr.entries):
        raise MbrescueError(f"{path}: no partition table (all four MBR entries are empty)")
    warnings: list[str] = []
    gpt_info: GptInfo | None = None
    if mbr.is_protective:
        if disk_sectors < 3:
            raise MbrescueError(f"{path}: too small to hold the GPT its MBR announces")
        try:
            gpt = read_gpt(lambda offset, length: read_at(fd, offset, length), disk_sectors, sector)
        except MbrescueError as exc:
            raise MbrescueError(f"{path}: {exc}", exc.hint) from None
        table, disk_id = "gpt", gpt.header.disk_guid
        partitions = _gpt_partitions(gpt)
        gpt_info = _gpt_info(gpt)
        warnings.extend(gpt.warnings)
    else:
        table, disk_id = "msdos", f"0x{mbr.disk_signature:08x}"
        partitions, more = _msdos_partitions(fd, mbr, sector, disk_sectors)
        warnings.extend(more)
    for partition in partitions:
        if partition.end_lba >= disk_sectors:
            warnings.append(
                f"partition {partition.number} ends at sector {partition.end_lba}, "
                f"past the disk's last sector {disk_sectors - 1}"
            )
        # Nothing to probe in an extended container, past the end, or in an entry whose
        # end comes before its start (read_gpt has warned about that one already).
        if (
            partition.is_extended
            or partition.start_lba >= disk_sectors
            or partition.size_sectors <= 0
        ):
            continue
        partition.fs = probe(fd, partition.start_lba * sector, partition.size_sectors * sector)
    return Layout(
        disk=info,
        table=table,
        disk_id=disk_id,
        partitions=partitions,
        gpt=gpt_info,
        mbr=_mbr_summary(mbr),
        warnings=warnings,
    )
