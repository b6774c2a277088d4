"""The MBR (msdos) partition table: sector 0, its four entries and the EBR chain.

Sector 0 is read and written as a whole 512 bytes: the boot code (GRUB's stage 1
jumps into the post-MBR gap), the disk signature that `root=PARTUUID=` and
Windows use, the four entries and the 0x55AA signature belong together. The
encoders change one entry and keep every other byte as it was, because restore
may only shrink a swap partition that runs past a smaller disk's end.

Logical partitions live in a linked list of EBRs inside an extended partition:
an EBR's first entry is relative to that EBR, its link entry is relative to the
start of the outermost extended partition (the rule Linux and fdisk follow).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .errors import MbrescueError

SECTOR_BYTES = 512
ENTRIES_OFFSET = 0x1BE
ENTRY_BYTES = 16
DISK_SIGNATURE_OFFSET = 0x1B8
BOOT_SIGNATURE = b"\x55\xaa"
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
PROTECTIVE_TYPE = 0xEE
# No real disk has this many logical partitions; a longer chain is a loop or garbage.
MAX_LOGICAL = 256


@dataclass
class Chs:
    cylinder: int
    head: int
    sector: int


@dataclass
class MbrEntry:
    index: int  # 0..3, the slot inside its sector
    status: int
    type: int
    start_lba: int  # as stored: relative for EBR entries
    size_sectors: int
    chs_start_raw: bytes
    chs_end_raw: bytes

    @property
    def bootable(self) -> bool:
        return self.status == 0x80

    @property
    def is_empty(self) -> bool:
        return self.type == 0 or self.size_sectors == 0

    @property
    def is_extended(self) -> bool:
        return self.type in EXTENDED_TYPES

    @property
    def chs_start(self) -> Chs:
        return decode_chs(self.chs_start_raw)

    @property
    def chs_end(self) -> Chs:
        return decode_chs(self.chs_end_raw)


@dataclass
class Mbr:
    boot_code: bytes  # bytes 0..0x1B7 (440)
    disk_signature: int  # 0x1B8, little-endian
    reserved: bytes  # 0x1BC..0x1BD, usually zero ("copy protected" 0x5A5A otherwise)
    entries: list[MbrEntry]
    has_boot_signature: bool

    @property
    def is_protective(self) -> bool:
        return any(entry.type == PROTECTIVE_TYPE for entry in self.entries)

    @property
    def entries_plausible(self) -> bool:
        """Every status byte is 0x00 or 0x80: a boot sector of a file system fails this."""
        return all(entry.status in (0x00, 0x80) for entry in self.entries)


@dataclass
class LogicalPartition:
    number: int  # 5, 6, ... as Linux numbers them
    ebr_lba: int  # absolute LBA of the EBR that describes it
    slot: int  # its entry index inside that EBR
    start_lba: int  # absolute
    entry: MbrEntry  # as stored in the EBR (start relative to ebr_lba)


def decode_chs(raw: bytes) -> Chs:
    """CHS as packed in an entry: head, then sector (bits 0-5) with cylinder bits 8-9, cylinder."""
    head, sector_byte, cylinder_low = raw[0], raw[1], raw[2]
    return Chs(
        cylinder=((sector_byte & 0xC0) << 2) | cylinder_low,
        head=head,
        sector=sector_byte & 0x3F,
    )


def encode_chs(cylinder: int, head: int, sector: int) -> bytes:
    if not (0 <= cylinder <= 1023 and 0 <= head <= 255 and 0 <= sector <= 63):
        raise MbrescueError(f"CHS value out of range: {cylinder}/{head}/{sector}")
    return bytes([head, ((cylinder >> 2) & 0xC0) | sector, cylinder & 0xFF])


def chs_from_lba(lba: int, heads: int = 255, sectors_per_track: int = 63) -> bytes:
    """CHS for an LBA under the usual 255/63 geometry; past cylinder 1023 the fdisk cap."""
    cylinder, rest = divmod(lba, heads * sectors_per_track)
    if cylinder > 1023:
        return encode_chs(1023, heads - 1, sectors_per_track)
    head, sector = divmod(rest, sectors_per_track)
    return encode_chs(cylinder, head, sector + 1)


def parse_entry(raw: bytes, index: int) -> MbrEntry:
    status, chs_start, part_type, chs_end, start_lba, size = struct.unpack("<B3sB3sII", raw)
    return MbrEntry(index, status, part_type, start_lba, size, chs_start, chs_end)


def encode_entry(
    status: int,
    part_type: int,
    start_lba: int,
    size_sectors: int,
    chs_start: bytes | None = None,
    chs_end: bytes | None = None,
) -> bytes:
    """A 16-byte entry; CHS computed with 255/63 geometry unless given raw."""
    if not (0 <= start_lba <= 0xFFFFFFFF and 0 <= size_sectors <= 0xFFFFFFFF):
        raise MbrescueError(f"MBR entry out of range: start {start_lba}, size {size_sectors}")
    if chs_start is None:
        chs_start = chs_from_lba(start_lba) if size_sectors else b"\0\0\0"
    if chs_end is None:
        chs_end = chs_from_lba(start_lba + size_sectors - 1) if size_sectors else b"\0\0\0"
    return struct.pack("<B3sB3sII", status, chs_start, part_type, chs_end, start_lba, size_sectors)


def parse_mbr(sector: bytes) -> Mbr:
    if len(sector) < SECTOR_BYTES:
        raise MbrescueError(f"an MBR is 512 bytes, got {len(sector)}")
    entries = [
        parse_entry(
            sector[ENTRIES_OFFSET + i * ENTRY_BYTES : ENTRIES_OFFSET + (i + 1) * ENTRY_BYTES], i
        )
        for i in range(4)
    ]
    return Mbr(
        boot_code=bytes(sector[:DISK_SIGNATURE_OFFSET]),
        disk_signature=struct.unpack_from("<I", sector, DISK_SIGNATURE_OFFSET)[0],
        reserved=bytes(sector[0x1BC:0x1BE]),
        entries=entries,
        has_boot_signature=sector[510:512] == BOOT_SIGNATURE,
    )


def resize_entry(
    sector: bytes, index: int, size_sectors: int, heads: int = 255, sectors_per_track: int = 63
) -> bytes:
    """The same MBR/EBR sector with entry `index` given a new size.

    Only that entry's size and end-CHS fields change (end CHS recomputed with the given
    geometry, so BIOS-era readers agree with the LBA); all other bytes stay identical.
    """
    if not 0 <= index <= 3:
        raise MbrescueError(f"MBR entry index must be 0..3, not {index}")
    if len(sector) < SECTOR_BYTES or sector[510:512] != BOOT_SIGNATURE:
        raise MbrescueError("not an MBR/EBR sector (no 0x55AA signature)")
    offset = ENTRIES_OFFSET + index * ENTRY_BYTES
    entry = parse_entry(sector[offset : offset + ENTRY_BYTES], index)
    if entry.is_empty:
        raise MbrescueError(f"MBR entry {index} is empty; nothing to resize")
    if size_sectors <= 0:
        raise MbrescueError(f"a partition needs at least one sector, not {size_sectors}")
    chs_end = chs_from_lba(entry.start_lba + size_sectors - 1, heads, sectors_per_track)
    new_entry = encode_entry(
        entry.status, entry.type, entry.start_lba, size_sectors, entry.chs_start_raw, chs_end
    )
    return bytes(sector[:offset]) + new_entry + bytes(sector[offset + ENTRY_BYTES :])


def walk_ebr_chain(
    read_sector: Callable[[int], bytes], extended_start_lba: int, extended_size_sectors: int
) -> list[LogicalPartition]:
    """Follow the EBR chain of one primary extended partition; numbers start at 5.

    Like Linux, an EBR without 0x55AA ends the chain (an extended partition with no
    logicals often has a zeroed first EBR); a link that leaves the extended partition
    or comes back to an EBR already seen is an error.
    """
    extended_end_lba = extended_start_lba + extended_size_sectors  # exclusive
    logicals: list[LogicalPartition] = []
    seen: set[int] = set()
    ebr_lba = extended_start_lba
    number = 5
    while True:
        if ebr_lba in seen:
            raise MbrescueError(f"the EBR chain loops back to sector {ebr_lba}")
        if len(seen) >= MAX_LOGICAL:
            raise MbrescueError(f"the EBR chain is longer than {MAX_LOGICAL} links")
        if not extended_start_lba <= ebr_lba < extended_end_lba:
            raise MbrescueError(
                f"an EBR link points to sector {ebr_lba}, outside the extended partition "
                f"({extended_start_lba}..{extended_end_lba - 1})"
            )
        seen.add(ebr_lba)
        ebr = parse_mbr(read_sector(ebr_lba))
        if not ebr.has_boot_signature:
            break
        next_lba: int | None = None
        for entry in ebr.entries:
            if entry.is_empty:
                continue
            if entry.is_extended:
                if next_lba is None:
                    next_lba = extended_start_lba + entry.start_lba
                continue
            logicals.append(
                LogicalPartition(number, ebr_lba, entry.index, ebr_lba + entry.start_lba, entry)
            )
            number += 1
        if next_lba is None:
            break
        ebr_lba = next_lba
    return logicals
