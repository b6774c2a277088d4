"""The GUID partition table: both headers, both entry arrays, their CRCs, and relocation.

A GPT keeps two copies: the primary header at LBA 1 with its entries after it,
and a backup header at the disk's last LBA with its entries just before it.
Reading checks both and says which was valid and which was used, so a disk with a
damaged primary is still understood (and the user told) while one with both
copies damaged is refused.

`relocate` is what `sgdisk -e` does after a GPT disk was copied onto a disk of
another size: point the primary header at the new last LBA, write a fresh backup
header and entry array there, fix every CRC and the protective MBR's size. Left
alone, a copied backup sits in the middle of a larger disk, and firmware may
"repair" the table from it.
"""

from __future__ import annotations

import string
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import MbrescueError
from .mbr import (
    BOOT_SIGNATURE,
    ENTRIES_OFFSET,
    ENTRY_BYTES,
    PROTECTIVE_TYPE,
    chs_from_lba,
    parse_entry,
)

SIGNATURE = b"EFI PART"
HEADER_FORMAT = "<8sIIIIQQQQ16sQIII"
HEADER_BYTES = struct.calcsize(HEADER_FORMAT)  # 92
ENTRY_FORMAT = "<16s16sQQQ72s"
ENTRY_MIN_BYTES = struct.calcsize(ENTRY_FORMAT)  # 128: the UEFI minimum and the usual size
# sgdisk allows large arrays, but more than this is garbage, not a partition table.
MAX_ENTRIES_BYTES = 4 << 20

ReadFn = Callable[[int, int], bytes]  # (offset_bytes, length_bytes) -> bytes


@dataclass
class GptHeader:
    revision: int
    header_bytes: int
    header_crc32: int
    my_lba: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: str
    entries_lba: int
    entry_count: int
    entry_bytes: int
    entries_crc32: int

    @property
    def entries_total_bytes(self) -> int:
        """The entry array's size, checked: every caller reads by it (see entry_array_bytes)."""
        return entry_array_bytes(self.entry_count, self.entry_bytes)


@dataclass
class GptEntry:
    number: int  # 1-based slot in the array, as Linux numbers partitions
    type_guid: str
    unique_guid: str
    first_lba: int
    last_lba: int
    attributes: int
    name: str

    @property
    def size_sectors(self) -> int:
        return self.last_lba - self.first_lba + 1

    @property
    def legacy_bios_bootable(self) -> bool:
        return bool(self.attributes & (1 << 2))


@dataclass
class Gpt:
    primary_valid: bool
    backup_valid: bool
    used: str  # "primary" or "backup"
    header: GptHeader  # of the copy used
    entries: list[GptEntry]  # non-empty slots only
    primary: GptHeader | None  # parsed when the header itself is sound (CRC ok)
    backup: GptHeader | None
    backup_lba: int  # where the backup was looked for (or found)
    primary_problem: str | None = None
    backup_problem: str | None = None
    warnings: list[str] = field(default_factory=list)
    header_raw: bytes = b""  # the used header's sector, as read
    entries_raw: bytes = b""  # the used entry array, as read


def format_guid(raw: bytes) -> str:
    """The canonical lowercase text of an on-disk (mixed-endian) GUID."""
    d1, d2, d3 = struct.unpack_from("<IHH", raw)
    tail = raw[8:16].hex()
    return f"{d1:08x}-{d2:04x}-{d3:04x}-{tail[:4]}-{tail[4:]}"


def parse_guid(text: str) -> bytes:
    """The on-disk bytes of a GUID written as text."""
    digits = text.replace("-", "").strip("{}")
    # Checked by hand: bytes.fromhex would skip whitespace and return fewer than 16 bytes.
    if len(digits) != 32 or not all(char in string.hexdigits for char in digits):
        raise MbrescueError(f"not a GUID: {text!r}")
    raw = bytes.fromhex(digits)
    d1, d2, d3 = struct.unpack(">IHH", raw[:8])
    return struct.pack("<IHH", d1, d2, d3) + raw[8:]


def entry_array_bytes(entry_count: int, entry_bytes: int) -> int:
    """count x size of an entry array, refused unless it is a shape a real GPT can have.

    Both numbers come from the disk (or a capture): an unchecked 2**32 entries would make a
    reader ask for 512 GiB, an entry size of 0 would make it loop 2**32 times over nothing.
    """
    if entry_bytes < ENTRY_MIN_BYTES or entry_bytes % 8:
        raise MbrescueError(
            f"GPT entry size {entry_bytes} bytes: it must be a multiple of 8, at least "
            f"{ENTRY_MIN_BYTES}"
        )
    total = entry_count * entry_bytes
    if total > MAX_ENTRIES_BYTES:
        raise MbrescueError(
            f"GPT entry array of {entry_count} entries of {entry_bytes} bytes ({total} bytes) "
            f"is over the {MAX_ENTRIES_BYTES}-byte limit: not a partition table"
        )
    return total


def header_crc(header: bytes, header_bytes: int) -> int:
    """CRC32 over the first `header_bytes` with the CRC field itself taken as zero."""
    data = bytearray(header[:header_bytes])
    data[16:20] = b"\0\0\0\0"
    return zlib.crc32(bytes(data)) & 0xFFFFFFFF


def parse_header(raw: bytes) -> GptHeader:
    """The header's fields as stored; no check of signature, CRC or shape (see _check_copy)."""
    if len(raw) < HEADER_BYTES:
        raise MbrescueError(f"a GPT header is {HEADER_BYTES} bytes, got {len(raw)}")
    fields = struct.unpack_from(HEADER_FORMAT, raw)
    return GptHeader(
        revision=fields[1],
        header_bytes=fields[2],
        header_crc32=fields[3],
        my_lba=fields[5],
        alternate_lba=fields[6],
        first_usable_lba=fields[7],
        last_usable_lba=fields[8],
        disk_guid=format_guid(fields[9]),
        entries_lba=fields[10],
        entry_count=fields[11],
        entry_bytes=fields[12],
        entries_crc32=fields[13],
    )


def encode_header(raw: bytes, **changes: int) -> bytes:
    """`raw` (a header sector) with some integer fields changed and the header CRC redone."""
    offsets = {
        "my_lba": (24, "<Q"),
        "alternate_lba": (32, "<Q"),
        "first_usable_lba": (40, "<Q"),
        "last_usable_lba": (48, "<Q"),
        "entries_lba": (72, "<Q"),
        "entries_crc32": (88, "<I"),
    }
    data = bytearray(raw)
    for name, value in changes.items():
        offset, fmt = offsets[name]
        struct.pack_into(fmt, data, offset, value)
    header_bytes = struct.unpack_from("<I", data, 12)[0]
    struct.pack_into("<I", data, 16, header_crc(bytes(data), header_bytes))
    return bytes(data)


def parse_entries(raw: bytes, entry_count: int, entry_bytes: int) -> list[GptEntry]:
    """The used slots of an entry array; the shape checked and the array long enough."""
    total = entry_array_bytes(entry_count, entry_bytes)
    if len(raw) < total:
        raise MbrescueError(f"the GPT entry array is short ({len(raw)} of {total} bytes)")
    entries: list[GptEntry] = []
    for index in range(entry_count):
        chunk = raw[index * entry_bytes : index * entry_bytes + ENTRY_MIN_BYTES]
        type_raw, unique_raw, first, last, attributes, name_raw = struct.unpack(ENTRY_FORMAT, chunk)
        if type_raw == bytes(16):
            continue
        name = name_raw.decode("utf-16-le", errors="replace").split("\x00", 1)[0]
        entries.append(
            GptEntry(
                number=index + 1,
                type_guid=format_guid(type_raw),
                unique_guid=format_guid(unique_raw),
                first_lba=first,
                last_lba=last,
                attributes=attributes,
                name=name,
            )
        )
    return entries


def _check_copy(
    read: ReadFn, lba: int, disk_sectors: int, sector_bytes: int
) -> tuple[GptHeader | None, bytes, bytes, str | None]:
    """(header if its CRC holds, header sector, entry array, problem or None)."""
    if not 0 <= lba < disk_sectors:
        return None, b"", b"", f"LBA {lba} is outside the disk"
    raw = read(lba * sector_bytes, sector_bytes)
    if raw[:8] != SIGNATURE:
        return None, raw, b"", f"no GPT header at LBA {lba}"
    header_bytes = struct.unpack_from("<I", raw, 12)[0]
    if not HEADER_BYTES <= header_bytes <= sector_bytes:
        return None, raw, b"", f"header at LBA {lba} has a bad size ({header_bytes})"
    header = parse_header(raw)
    if header_crc(raw, header_bytes) != header.header_crc32:
        return None, raw, b"", f"header at LBA {lba} fails its CRC32"
    if header.my_lba != lba:
        return header, raw, b"", f"header at LBA {lba} says it lives at LBA {header.my_lba}"
    if header.entry_count == 0:
        return header, raw, b"", f"header at LBA {lba} has a bad entry array shape (no entries)"
    try:
        total = header.entries_total_bytes
    except MbrescueError as exc:
        return header, raw, b"", f"header at LBA {lba} has a bad entry array shape ({exc})"
    entries_sectors = -(-total // sector_bytes)
    if header.entries_lba < 1 or header.entries_lba + entries_sectors > disk_sectors:
        return header, raw, b"", f"entry array of the header at LBA {lba} lies outside the disk"
    entries = read(header.entries_lba * sector_bytes, total)
    if zlib.crc32(entries) & 0xFFFFFFFF != header.entries_crc32:
        return header, raw, entries, f"entry array at LBA {header.entries_lba} fails its CRC32"
    return header, raw, entries, None


def read_gpt(read: ReadFn, disk_sectors: int, sector_bytes: int) -> Gpt:
    """Both copies checked; the primary used when valid, else the backup; both bad: refused."""
    if disk_sectors < 3:
        # Sector 0, the primary at 1 and a backup elsewhere: fewer, and the backup is the primary.
        raise MbrescueError(f"a disk of {disk_sectors} sectors is too small to hold a GPT")
    last_lba = disk_sectors - 1
    primary, primary_raw, primary_entries, primary_problem = _check_copy(
        read, 1, disk_sectors, sector_bytes
    )
    # The backup is where the primary says; failing that, at the last LBA (the only place
    # left to look when the primary is gone, and where it belongs on an unmoved disk).
    # AlternateLBA 1 would make the primary its own backup: never a second copy.
    candidates = []
    if primary is not None and 1 < primary.alternate_lba < disk_sectors:
        candidates.append(primary.alternate_lba)
    if last_lba not in candidates:
        candidates.append(last_lba)
    backup: GptHeader | None = None
    backup_raw = backup_entries = b""
    backup_problem: str | None = None
    backup_lba = candidates[0]
    for candidate in candidates:
        found, raw, array, problem = _check_copy(read, candidate, disk_sectors, sector_bytes)
        if problem is None:
            backup, backup_raw, backup_entries, backup_problem = found, raw, array, None
            backup_lba = candidate
            break
        if backup_problem is None:
            backup, backup_problem = found, problem
    primary_valid = primary_problem is None
    backup_valid = backup_problem is None
    if not primary_valid and not backup_valid:
        raise MbrescueError(
            f"both GPT copies are corrupt (primary: {primary_problem}; backup: {backup_problem})"
        )
    warnings: list[str] = []
    if primary_valid:
        assert primary is not None
        used, header, header_raw, entries_raw = "primary", primary, primary_raw, primary_entries
    else:
        assert backup is not None
        used, header, header_raw, entries_raw = "backup", backup, backup_raw, backup_entries
        warnings.append(f"primary GPT is corrupt ({primary_problem}); read from the backup")
    if primary_valid and not backup_valid:
        warnings.append(f"backup GPT is not valid ({backup_problem})")
    if primary_valid and backup_valid:
        assert primary is not None and backup is not None
        if primary.disk_guid != backup.disk_guid or primary_entries != backup_entries:
            warnings.append("primary and backup GPT differ; the primary is used")
        if backup_lba != last_lba:
            warnings.append(
                f"backup GPT header is at LBA {backup_lba}, not at the disk's last LBA {last_lba}"
            )
    if header.last_usable_lba > last_lba:
        warnings.append(
            f"GPT last usable LBA {header.last_usable_lba} is past the disk's end ({last_lba})"
        )
    entry_list = parse_entries(entries_raw, header.entry_count, header.entry_bytes)
    for entry in entry_list:
        if entry.last_lba > last_lba or entry.first_lba > entry.last_lba:
            warnings.append(
                f"partition {entry.number} ({entry.first_lba}..{entry.last_lba}) "
                f"does not fit the disk ({disk_sectors} sectors)"
            )
    return Gpt(
        primary_valid=primary_valid,
        backup_valid=backup_valid,
        used=used,
        header=header,
        entries=entry_list,
        primary=primary,
        backup=backup,
        backup_lba=backup_lba,
        primary_problem=primary_problem,
        backup_problem=backup_problem,
        warnings=warnings,
        header_raw=header_raw,
        entries_raw=entries_raw,
    )


def relocate(
    primary_header: bytes,
    entries: bytes,
    disk_sectors: int,
    sector_bytes: int,
    *,
    mbr_sector: bytes | None = None,
) -> list[tuple[int, bytes]]:
    """The sector writes that make a correct GPT on a disk of `disk_sectors` sectors.

    `primary_header` is the primary header (its sector, or at least its header bytes) and
    `entries` its entry array, as captured. Returned, in write order: the new backup entry
    array at last LBA - entry sectors, the backup header at the last LBA, the primary header
    at LBA 1 (AlternateLBA and LastUsableLBA changed, CRC redone), and, when `mbr_sector`
    (sector 0 as captured, the whole logical sector) is given, sector 0 with the protective
    0xEE entry resized. The
    primary entry array is unchanged and needs no write. Refused when a partition would end
    past the new last usable LBA.
    """
    if sector_bytes not in (512, 1024, 2048, 4096):
        raise MbrescueError(f"unsupported sector size {sector_bytes}")
    if len(primary_header) < HEADER_BYTES or primary_header[:8] != SIGNATURE:
        raise MbrescueError("the captured primary GPT header is missing or not a GPT header")
    header = parse_header(primary_header)
    if not HEADER_BYTES <= header.header_bytes <= min(len(primary_header), sector_bytes):
        raise MbrescueError(f"the captured GPT header has a bad size ({header.header_bytes})")
    if header_crc(primary_header, header.header_bytes) != header.header_crc32:
        raise MbrescueError("the captured primary GPT header fails its CRC32")
    if header.my_lba != 1:
        raise MbrescueError(
            f"the captured GPT header is not a primary (it says LBA {header.my_lba})"
        )
    total = header.entries_total_bytes
    if header.entry_count == 0:
        raise MbrescueError("the captured GPT header declares no entries")
    if len(entries) < total:
        raise MbrescueError(
            f"the captured GPT entry array is short ({len(entries)} < {total} bytes)"
        )
    entries = bytes(entries[:total])
    if zlib.crc32(entries) & 0xFFFFFFFF != header.entries_crc32:
        raise MbrescueError("the captured GPT entry array fails its CRC32")
    entries_sectors = -(-total // sector_bytes)
    last_lba = disk_sectors - 1
    backup_entries_lba = last_lba - entries_sectors
    last_usable_lba = backup_entries_lba - 1
    primary_entries_end = header.entries_lba + entries_sectors  # exclusive
    if last_usable_lba < max(header.first_usable_lba, primary_entries_end):
        raise MbrescueError(f"a disk of {disk_sectors} sectors is too small for this GPT")
    for entry in parse_entries(entries, header.entry_count, header.entry_bytes):
        if entry.last_lba > last_usable_lba:
            raise MbrescueError(
                f"GPT partition {entry.number} ends at LBA {entry.last_lba}, past the last "
                f"usable LBA {last_usable_lba} of a disk with {disk_sectors} sectors"
            )
    # Keep whatever followed the header in its sector (normally zeros) as it was.
    sector = bytes(primary_header[:sector_bytes]).ljust(sector_bytes, b"\0")
    new_primary = encode_header(sector, alternate_lba=last_lba, last_usable_lba=last_usable_lba)
    new_backup = encode_header(
        sector,
        my_lba=last_lba,
        alternate_lba=1,
        last_usable_lba=last_usable_lba,
        entries_lba=backup_entries_lba,
    )
    writes = [
        (backup_entries_lba, entries.ljust(entries_sectors * sector_bytes, b"\0")),
        (last_lba, new_backup),
        (1, new_primary),
    ]
    if mbr_sector is not None:
        new_mbr = resize_protective(
            mbr_sector, disk_sectors, old_alternate_lba=header.alternate_lba
        )
        if new_mbr != bytes(mbr_sector):
            writes.append((0, new_mbr))
    return writes


def resize_protective(mbr_sector: bytes, disk_sectors: int, old_alternate_lba: int) -> bytes:
    """Sector 0 (as long as given) with the 0xEE entry covering the whole new disk.

    The size is capped at 0xFFFFFFFF, as sgdisk does for disks past 2 TiB (512-byte sectors).

    Only an entry that covered the whole old disk is resized; a hybrid MBR's partial
    0xEE entry describes a choice made on purpose and is left alone.
    """
    sector = bytes(mbr_sector)
    if len(sector) < 512 or sector[510:512] != BOOT_SIGNATURE:
        raise MbrescueError("the protective MBR has no 0x55AA signature")
    for index in range(4):
        offset = ENTRIES_OFFSET + index * ENTRY_BYTES
        entry = parse_entry(sector[offset : offset + ENTRY_BYTES], index)
        if entry.type != PROTECTIVE_TYPE:
            continue
        whole_old_disk = entry.size_sectors == 0xFFFFFFFF or (
            entry.start_lba + entry.size_sectors - 1 == old_alternate_lba
        )
        if not whole_old_disk:
            continue
        if entry.start_lba >= disk_sectors:
            raise MbrescueError(
                f"the protective MBR entry starts at sector {entry.start_lba}, past the end "
                f"of a disk of {disk_sectors} sectors"
            )
        size = min(disk_sectors - entry.start_lba, 0xFFFFFFFF)
        # End CHS too, as sgdisk writes it (255/63 geometry, capped), so the result
        # matches what `sgdisk -e` would leave.
        chs_end = chs_from_lba(entry.start_lba + size - 1)
        new_entry = sector[offset : offset + 5] + chs_end + sector[offset + 8 : offset + 12]
        return sector[:offset] + new_entry + struct.pack("<I", size) + sector[offset + 16 :]
    return sector
