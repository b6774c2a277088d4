"""Find what a reused disk still says about its past, so a restore can erase it (safety rule 9).

A disk that held GPT, RAID or LVM keeps their signatures wherever the restore does not
write: an msdos region is 64 MiB at the start, the old backup GPT header sits in the last
sector, and `gdisk`/`parted` then offer to "repair" the GPT over the restored MBR, `mdadm
--assemble --scan` finds a whole-disk member at the end, `pvscan` a physical volume. The
places are the ones those tools read: GPT headers at LBA 1 and in the last sector (for 512-
and 4096-byte sectors, each with the entry array it names), md superblocks (0.90 and 1.0
near the end, 1.1 at 0, 1.2 at 4 KiB), the LVM label in one of the first four sectors.

Only what lies outside the restore's own writes is erased, and nothing inside a partition of
the new table that the restore keeps as the target has it (a data partition past the region:
its RAID member superblock belongs to it). The erasures are zeros written first, after `yes`
and before the rest (they make nothing look bootable); afterwards the same search runs on
what reads back from the device and must find nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .errors import MbrescueError

ReadFn = Callable[[int, int], bytes]
Ranges = list[tuple[int, int]]  # (offset, length) in bytes

GPT_SIGNATURE = b"EFI PART"
MD_MAGIC = 0xA92B4EFC
MD_SUPERBLOCK_BYTES = 4096
MD_090_RESERVED_BYTES = 64 << 10
LVM_LABEL = b"LABELONE"
LVM_TYPE = b"LVM2 001"
# A GPT entry array beyond 1 MiB is no array a tool writes; such a header is erased alone.
MAX_GPT_ARRAY_BYTES = 1 << 20


@dataclass(frozen=True)
class Stale:
    offset_bytes: int
    length_bytes: int
    what: str

    @property
    def end_bytes(self) -> int:
        return self.offset_bytes + self.length_bytes

    def text(self, sector_bytes: int) -> str:
        first = self.offset_bytes // sector_bytes
        last = (self.end_bytes - 1) // sector_bytes
        where = f"sector {first}" if first == last else f"sectors {first}..{last}"
        return f"{self.what} at {where}"


def _gpt_at(read: ReadFn, size_bytes: int, header_lba: int, sector_bytes: int,
            where: str) -> list[Stale]:
    offset = header_lba * sector_bytes
    if offset < 0 or offset + sector_bytes > size_bytes:
        return []
    raw = read(offset, sector_bytes)
    if raw[:8] != GPT_SIGNATURE:
        return []
    found = [Stale(offset, sector_bytes, f"{where} GPT header ({sector_bytes}-byte sectors)")]
    entries_lba, count, entry_bytes = struct.unpack_from("<QII", raw, 72)
    array_bytes = count * entry_bytes
    array_at = entries_lba * sector_bytes
    if 0 < array_bytes <= MAX_GPT_ARRAY_BYTES and array_at + array_bytes <= size_bytes:
        padded = -(-array_bytes // sector_bytes) * sector_bytes
        found.append(Stale(array_at, min(padded, size_bytes - array_at),
                           f"{where} GPT entries ({sector_bytes}-byte sectors)"))
    return found


def _md_at(read: ReadFn, size_bytes: int, offset: int, version: str) -> list[Stale]:
    if offset < 0 or offset + MD_SUPERBLOCK_BYTES > size_bytes:
        return []
    raw = read(offset, 8)
    magic_le, major_le = struct.unpack("<II", raw)
    magic_be = struct.unpack(">I", raw[:4])[0]
    want_major = 0 if version == "0.90" else 1
    if (magic_le == MD_MAGIC and major_le == want_major) or (
            version == "0.90" and magic_be == MD_MAGIC):
        return [Stale(offset, MD_SUPERBLOCK_BYTES, f"md RAID superblock (metadata {version})")]
    return []


def find_stale(read: ReadFn, size_bytes: int, sector_bytes: int) -> list[Stale]:
    """Every partition-table, RAID and LVM signature at the places tools look for them."""
    found: list[Stale] = []
    for ss in sorted({sector_bytes, 512, 4096}):
        last_lba = size_bytes // ss - 1
        for lba, where in ((1, "primary"), (last_lba, "backup")):
            found += _gpt_at(read, size_bytes, lba, ss, where)
    md_10 = (size_bytes - 8192) & ~4095
    md_090 = (size_bytes & ~(MD_090_RESERVED_BYTES - 1)) - MD_090_RESERVED_BYTES
    for offset, version in ((md_090, "0.90"), (md_10, "1.0"), (0, "1.1"), (4096, "1.2")):
        found += _md_at(read, size_bytes, offset, version)
    for index in range(4):
        offset = index * 512
        if offset + 512 <= size_bytes:
            raw = read(offset, 32)
            if raw[:8] == LVM_LABEL and raw[24:32] == LVM_TYPE:
                found.append(Stale(offset, 512, "LVM physical volume label"))
    unique: dict[tuple[int, int], Stale] = {}
    for item in found:
        unique.setdefault((item.offset_bytes, item.length_bytes), item)
    return sorted(unique.values(), key=lambda s: s.offset_bytes)


def _inside(item: Stale, ranges: Ranges) -> bool:
    return any(lo <= item.offset_bytes and item.end_bytes <= lo + n for lo, n in ranges)


def _touches(item: Stale, ranges: Ranges) -> bool:
    return any(item.offset_bytes < lo + n and lo < item.end_bytes for lo, n in ranges)


def to_erase(found: list[Stale], written: Ranges, kept: Ranges) -> list[Stale]:
    """Of `found`, what the restore must erase: not overwritten by its own writes anyway
    (`written`), not inside a partition whose contents it keeps (`kept`)."""
    return [item for item in found if not _inside(item, written) and not _touches(item, kept)]


def plan_erase(read: ReadFn, size_bytes: int, sector_bytes: int, written: Ranges,
               kept: Ranges) -> list[Stale]:
    """What to erase on this target (read now, before `yes`; nothing is written here)."""
    try:
        found = find_stale(read, size_bytes, sector_bytes)
    except MbrescueError:
        return []  # an unreadable spot: the write would fail there anyway, and say so
    return to_erase(found, written, kept)


def erase_writes(erase: list[Stale]) -> list[tuple[int, bytes]]:
    return [(item.offset_bytes, bytes(item.length_bytes)) for item in erase]


def check_erased(read: ReadFn, size_bytes: int, sector_bytes: int, target: str,
                 written: Ranges, kept: Ranges) -> None:
    """After the restore, read back from the device: nothing stale is left outside the
    restore's own writes."""
    left = to_erase(find_stale(read, size_bytes, sector_bytes), written, kept)
    if left:
        raise MbrescueError(
            f"verification failed: {target} still carries "
            + ", ".join(item.text(sector_bytes) for item in left)
        )
