"""How the captured disk's boot loader was installed, found from the captured bytes.

The file-level path makes each boot-chain file system again, so every file lands in new
blocks. Whether the boot loader survives that depends on how it was installed, and only
the bytes say so: GRUB 2's boot.img in sector 0 names the sector of its core image (in the
post-MBR gap, in a BIOS boot partition, or — a blocklist install — inside a file system,
where a file system made again moves it); GRUB legacy's stage1 names the sector of its
stage1.5 (in the gap: it loads stage2 by name, so that survives) or of stage2 itself (a
blocklist); syslinux/extlinux keeps the sector of ldlinux.sys in the partition's boot
sector; a UEFI host boots files on its ESP by path. `detect` reads those signatures and
returns one record per place — the disk (sector 0 and what it loads) and each boot-chain
partition — with the evidence seen, for the manifest's `boot_loader` list (parsed in
manifest.py). `cannot_remake` says why the file-level path must refuse an install method.

The byte offsets are GRUB's and syslinux's own layout (GRUB 2 `boot.S`/`diskboot.S`, GRUB
0.97 `stage1.S`/`start.S`/`asm.S`, syslinux's boot sector), checked against the fixtures
and against real installs by GRUB 0.97's shell and extlinux 6.04.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import MbrescueError

# The methods' names are the manifest's vocabulary (the schema owns them); re-exported here.
from .manifest import (
    EXTLINUX_VBR,
    GRUB2_BIOS_BOOT_PARTITION,
    GRUB2_BLOCKLIST,
    GRUB2_EMBEDDED_GAP,
    GRUB_LEGACY_BLOCKLIST,
    GRUB_LEGACY_STAGE1_5,
    MAX_LOADER_PATHS,
    METHODS,
    NONE,
    UEFI,
    UNKNOWN,
    BootLoaderRecord,
    Manifest,
)
from .tarbounds import BoundedTarInfo

__all__ = ["GRUB2_EMBEDDED_GAP", "MAX_LOADER_PATHS", "METHODS", "NONE", "UEFI", "UNKNOWN"]  # re-exported

DESCRIPTIONS = {
    GRUB2_EMBEDDED_GAP: "GRUB 2, core image embedded in the post-MBR gap",
    GRUB2_BIOS_BOOT_PARTITION: "GRUB 2, core image in the BIOS boot partition",
    GRUB2_BLOCKLIST: "GRUB 2, blocklist install (core.img read from file-system sectors)",
    GRUB_LEGACY_STAGE1_5: "GRUB legacy, stage1.5 in the post-MBR gap",
    GRUB_LEGACY_BLOCKLIST: "GRUB legacy, stage1 reading stage2 from file-system sectors",
    EXTLINUX_VBR: "syslinux/extlinux in the partition's boot sector",
    UEFI: "UEFI loaders on the ESP",
    NONE: "no boot code",
    UNKNOWN: "boot code mbrescue does not recognise",
}

BIOS_BOOT_GUID = "21686148-6449-6e6f-744e-656564454649"
ESP_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
ESP_MBR_TYPE = "0xef"

# GRUB 2's boot.img: its message strings, the load address word at 0x5a (0x8000) and the
# 64-bit sector of the core image's first sector (diskboot.img) at 0x5c.
GRUB2_STRINGS = b"GRUB \0Geom\0Hard Disk\0Read\0 Error\r\n\0"
GRUB2_KERNEL_ADDRESS_AT = 0x5A
GRUB2_KERNEL_ADDRESS = 0x8000
GRUB2_KERNEL_SECTOR_AT = 0x5C
# diskboot.img: blocklist entries of 12 bytes (start u64, sectors u16, segment u16) from
# 0x1f4 downwards, ending at one with no sectors; the first loads at segment 0x820.
DISKBOOT_LIST_AT = 0x1F4
DISKBOOT_ENTRY_BYTES = 12
DISKBOOT_SEGMENT = 0x820
DISKBOOT_STRING = b"loading\0"
# GRUB 0.97's stage1: " Error" ends without CR LF; version 3.2 at 0x3e; the 32-bit sector
# of stage1.5's or stage2's first sector at 0x44. That sector (start.S) says which one it
# is in its message and lists the rest in 8-byte entries (start u32, sectors u16, segment
# u16) from 0x1f8 downwards. The next sector (asm.S) holds version 3.2 at 6, the
# stage2_id at 0x10 and, after the version string, the stage2 path stage1.5 loads.
LEGACY_STRINGS = b"GRUB \0Geom\0Hard Disk\0Read\0 Error\0"
LEGACY_VERSION_AT = 0x3E
LEGACY_VERSION = b"\x03\x02"
LEGACY_STAGE2_SECTOR_AT = 0x44
LEGACY_LIST_AT = 0x1F8
LEGACY_ENTRY_BYTES = 8
LEGACY_STAGE1_5 = b"Loading stage1.5"
LEGACY_STAGE2 = b"Loading stage2"
LEGACY_STAGE2_IDS = {1: "ffs", 2: "e2fs", 3: "fat", 4: "minix", 5: "reiserfs", 6: "vstafs",
                     7: "jfs", 8: "xfs", 9: "iso9660", 10: "ufs2"}
# syslinux's boot sector: its OEM name (bytes 3..10) and its 32-bit magic near the end.
SYSLINUX_OEM_NAMES = (b"SYSLINUX", b"EXTLINUX")
LDLINUX_MAGIC = struct.pack("<I", 0x3EB202FE)
# syslinux's mbr.bin / gptmbr.bin: they start the active (legacy-BIOS-bootable) partition.
SYSLINUX_MBR_STRINGS = (b"Missing operating system.", b"Missing OS")
MAX_LIST_ENTRIES = 40


@dataclass(frozen=True)
class PartitionView:
    """What detection needs of a partition (from the layout at capture, the manifest later)."""

    number: int
    start_lba: int
    size_sectors: int
    type: str  # MBR "0x83" or a GPT type GUID
    fs_type: str | None
    bootable: bool

    def holds(self, lba: int) -> bool:
        return self.start_lba <= lba < self.start_lba + self.size_sectors


def _record(partition: int | None, method: str, evidence: list[str], **extra: Any) -> dict:
    return {"partition": partition, "method": method, "evidence": evidence,
            "loader_paths": extra.get("loader_paths", []),
            "core_lba": extra.get("core_lba"), "core_sectors": extra.get("core_sectors"),
            "core_partition": extra.get("core_partition")}


def _u16(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<H", data, at)[0])


def _blocklist(sector: bytes, first_at: int, entry_bytes: int,
               start_format: str) -> list[tuple[int, int, int]]:
    """(start, sectors, segment) entries from first_at downwards, to the one with no sectors."""
    entries = []
    at = first_at
    for _ in range(MAX_LIST_ENTRIES):
        if at < 0x100 or at + entry_bytes > len(sector):
            break
        start = struct.unpack_from(start_format, sector, at)[0]
        count = _u16(sector, at + entry_bytes - 4)
        segment = _u16(sector, at + entry_bytes - 2)
        if count == 0:
            break
        entries.append((int(start), count, segment))
        at -= entry_bytes
    return entries


def detect(read: Callable[[int, int], bytes], sector_bytes: int, table: str,
           partitions: Sequence[PartitionView], chain: Iterable[int],
           files: Mapping[int, Sequence[str]]) -> list[dict]:
    """One record for the disk (partition None) and one per boot-chain partition.

    `read(offset, length)` reads the captured region (short or empty past its end);
    `files` lists the paths (relative to the file system's root) of each partition
    whose file-level copy or file list the capture has.
    """
    chain_numbers = list(chain)
    by_number = {p.number: p for p in partitions}
    used = [p for p in partitions if p.size_sectors > 0 and not (
        table == "msdos" and p.type.lower() in ("0x5", "0xf", "0x85"))]
    first_lba = min((p.start_lba for p in used), default=1)
    partition_records = [_partition_record(read, sector_bytes, table, by_number[n],
                                           files.get(n))
                         for n in chain_numbers if n in by_number]
    disk = _disk_record(read, sector_bytes, table, used, first_lba, partition_records)
    return [disk, *partition_records]


def _disk_record(read: Callable[[int, int], bytes], sector_bytes: int, table: str,
                 used: list[PartitionView], first_lba: int,
                 partition_records: list[dict]) -> dict:
    head = read(0, 512)
    if len(head) < 512:
        return _record(None, UNKNOWN, ["sector 0 is not in the capture"])
    code = head[:440]
    if not any(code):
        return _record(None, NONE, ["sector 0 holds no boot code (bytes 0..439 are zero)"])
    if GRUB2_STRINGS in code and _u16(code, GRUB2_KERNEL_ADDRESS_AT) == GRUB2_KERNEL_ADDRESS:
        return _grub2(read, sector_bytes, table, used, first_lba, code)
    if LEGACY_STRINGS in code and code[LEGACY_VERSION_AT:LEGACY_VERSION_AT + 2] == LEGACY_VERSION:
        return _legacy(read, sector_bytes, used, first_lba, code, None)
    loaders = [r for r in partition_records if r["method"] in (EXTLINUX_VBR, GRUB2_BLOCKLIST,
                                                               GRUB_LEGACY_BLOCKLIST)]
    chained = [r for r in loaders
               if any(p.number == r["partition"] and p.bootable for p in used)] or loaders
    known = next((s for s in SYSLINUX_MBR_STRINGS if s in code), None)
    what = (f"syslinux's MBR code ({known.decode()!r} in sector 0)" if known
            else "sector 0's boot code (not GRUB's)")
    if len(chained) == 1:
        target = chained[0]
        return _record(None, target["method"],
                       [f"{what} starts the boot sector of the active partition "
                        f"{target['partition']}",
                        *(f"partition {target['partition']}: {line}"
                          for line in target["evidence"])],
                       core_partition=target["partition"], core_lba=target["core_lba"],
                       core_sectors=target["core_sectors"])
    return _record(None, UNKNOWN, [f"{what}: no known boot loader signature in sector 0 nor "
                                   "in a boot-chain partition's boot sector"])


def _grub2(read: Callable[[int, int], bytes], sector_bytes: int, table: str,
           used: list[PartitionView], first_lba: int, code: bytes) -> dict:
    kernel_lba = int(struct.unpack_from("<Q", code, GRUB2_KERNEL_SECTOR_AT)[0])
    evidence = [f"sector 0 is GRUB 2's boot.img (its messages at byte "
                f"{code.find(GRUB2_STRINGS)}); it loads the core image from sector {kernel_lba}"]
    diskboot = read(kernel_lba * sector_bytes, 512) if kernel_lba > 0 else b""
    if len(diskboot) < 512:
        return _record(None, UNKNOWN, [*evidence, f"sector {kernel_lba} is not in the capture"])
    entries = _blocklist(diskboot, DISKBOOT_LIST_AT, DISKBOOT_ENTRY_BYTES, "<Q")
    if DISKBOOT_STRING not in diskboot or not entries or entries[0][2] != DISKBOOT_SEGMENT:
        return _record(None, UNKNOWN, [*evidence, f"sector {kernel_lba} is not GRUB 2's "
                                       "diskboot.img (its 'loading' message or its blocklist "
                                       f"at 0x{DISKBOOT_LIST_AT:x} for segment 0x820 is "
                                       "missing)"])
    core_sectors = 1 + sum(count for _, count, _ in entries)
    lists = ", ".join(f"{start}+{count}" for start, count, _ in entries)
    evidence.append(f"sector {kernel_lba} is diskboot.img, the core image's first sector; its "
                    f"blocklist ({lists}) makes the core {core_sectors} sectors")
    core_end = max([kernel_lba] + [start + count - 1 for start, count, _ in entries])
    if kernel_lba < first_lba and core_end < first_lba:
        evidence.append(f"the core lies in sectors {kernel_lba}..{core_end}, between the "
                        f"partition table and the first partition (sector {first_lba})")
        return _record(None, GRUB2_EMBEDDED_GAP, evidence, core_lba=kernel_lba,
                       core_sectors=core_sectors)
    home = next((p for p in used if p.holds(kernel_lba)), None)
    if home is None or not home.holds(core_end):
        return _record(None, UNKNOWN, [*evidence, f"the core's sectors {kernel_lba}..{core_end} "
                                       "are not inside one partition nor the gap"])
    if home.type.lower() == BIOS_BOOT_GUID:
        evidence.append(f"the core lies in the BIOS boot partition {home.number} (sectors "
                        f"{home.start_lba}..{home.start_lba + home.size_sectors - 1})")
        return _record(None, GRUB2_BIOS_BOOT_PARTITION, evidence, core_lba=kernel_lba,
                       core_sectors=core_sectors, core_partition=home.number)
    evidence.append(f"the core lies inside partition {home.number}"
                    + (f" ({home.fs_type}: the sectors of /boot/grub/i386-pc/core.img)"
                       if home.fs_type else ""))
    return _record(None, GRUB2_BLOCKLIST, evidence, core_lba=kernel_lba,
                   core_sectors=core_sectors, core_partition=home.number)


def _legacy(read: Callable[[int, int], bytes], sector_bytes: int, used: list[PartitionView],
            first_lba: int, code: bytes, partition: int | None) -> dict:
    stage_lba = int(struct.unpack_from("<I", code, LEGACY_STAGE2_SECTOR_AT)[0])
    where = "sector 0" if partition is None else f"partition {partition}'s boot sector"
    evidence = [f"{where} is GRUB legacy's stage1 ('GRUB ' message, version 3.2 at "
                f"0x{LEGACY_VERSION_AT:x}); it loads sector {stage_lba}"]
    start = read(stage_lba * sector_bytes, 1024) if stage_lba > 0 else b""
    if len(start) < 1024:
        return _record(partition, UNKNOWN, [*evidence, f"sector {stage_lba} is not in the "
                                            "capture"])
    entries = _blocklist(start[:512], LEGACY_LIST_AT, LEGACY_ENTRY_BYTES, "<I")
    total = 1 + sum(count for _, count, _ in entries)
    end = max([stage_lba] + [s + c - 1 for s, c, _ in entries])
    home = next((p for p in used if p.holds(stage_lba)), None)
    if LEGACY_STAGE1_5 in start[:512] and start[512 + 6:512 + 8] == LEGACY_VERSION:
        stage2_id = start[512 + 0x10]
        version_end = start.find(b"\0", 512 + 0x12)
        path_at = version_end + 1 + 4
        path_end = start.find(b"\0", path_at)
        stage2_path = start[path_at:path_end].decode("ascii", "replace") if (
            version_end > 0 and path_end > path_at) else "?"
        evidence.append(f"sector {stage_lba} starts stage1.5 for "
                        f"{LEGACY_STAGE2_IDS.get(stage2_id, '?')} ('Loading stage1.5', {total} "
                        f"sectors, version 3.2), which loads {stage2_path!r} by name")
        if end < first_lba:
            evidence.append(f"stage1.5 lies in sectors {stage_lba}..{end}, between the "
                            f"partition table and the first partition (sector {first_lba})")
            return _record(partition, GRUB_LEGACY_STAGE1_5, evidence, core_lba=stage_lba,
                           core_sectors=total)
    elif LEGACY_STAGE2 in start[:512]:
        evidence.append(f"sector {stage_lba} starts stage2 itself ('Loading stage2', {total} "
                        "sectors by its blocklist)")
    else:
        return _record(partition, UNKNOWN, [*evidence, f"sector {stage_lba} is neither "
                                            "stage1.5 nor stage2 ('Loading stage' missing)"])
    if home is None:
        return _record(partition, UNKNOWN, [*evidence, f"sector {stage_lba} is in no partition"])
    evidence.append(f"they lie inside partition {home.number}'s file system")
    return _record(partition, GRUB_LEGACY_BLOCKLIST, evidence, core_lba=stage_lba,
                   core_sectors=total, core_partition=home.number)


def _partition_record(read: Callable[[int, int], bytes], sector_bytes: int, table: str,
                      part: PartitionView, files: Sequence[str] | None) -> dict:
    kind = part.type.lower()
    if kind in (ESP_GUID, ESP_MBR_TYPE):
        return _esp_record(part, files)
    boot = read(part.start_lba * sector_bytes, 512)
    if len(boot) < 512:
        return _record(part.number, UNKNOWN, ["its first sector is not in the capture"])
    if kind == BIOS_BOOT_GUID:
        entries = _blocklist(boot, DISKBOOT_LIST_AT, DISKBOOT_ENTRY_BYTES, "<Q")
        if DISKBOOT_STRING in boot and entries and entries[0][2] == DISKBOOT_SEGMENT:
            sectors = 1 + sum(count for _, count, _ in entries)
            return _record(part.number, GRUB2_BIOS_BOOT_PARTITION,
                           [f"its first sector (sector {part.start_lba}) is GRUB 2's "
                            f"diskboot.img; the core image is {sectors} sectors"],
                           core_lba=part.start_lba, core_sectors=sectors,
                           core_partition=part.number)
        if not any(boot):
            return _record(part.number, NONE, ["a BIOS boot partition whose first sector is "
                                               "empty"])
        return _record(part.number, UNKNOWN, ["a BIOS boot partition without GRUB 2's "
                                              "diskboot.img in its first sector"])
    oem = boot[3:11]
    if oem in SYSLINUX_OEM_NAMES and boot[510:512] == b"\x55\xaa":
        evidence = [f"its boot sector carries {oem.decode()!r} (bytes 3..10)"
                    + (" and syslinux's LDLINUX magic" if LDLINUX_MAGIC in boot else "")]
        found = [p for p in files or () if p.lower().rsplit("/", 1)[-1] == "ldlinux.sys"]
        if found:
            evidence.append(f"its files hold {found[0]}, whose sectors the boot sector names")
        return _record(part.number, EXTLINUX_VBR, evidence)
    if GRUB2_STRINGS in boot[:440] and _u16(boot, GRUB2_KERNEL_ADDRESS_AT) == GRUB2_KERNEL_ADDRESS:
        record = _grub2(read, sector_bytes, table, [part], part.start_lba, boot)
        method = record["method"] if record["method"] != GRUB2_EMBEDDED_GAP else UNKNOWN
        return {**record, "partition": part.number, "method": method,
                "evidence": [f"partition {part.number}'s boot sector: " + record["evidence"][0],
                             *record["evidence"][1:]]}
    if LEGACY_STRINGS in boot[:440] and boot[LEGACY_VERSION_AT:LEGACY_VERSION_AT + 2] == \
            LEGACY_VERSION:
        record = _legacy(read, sector_bytes, [part], part.start_lba, boot, part.number)
        if record["method"] == GRUB_LEGACY_STAGE1_5:
            record["method"] = UNKNOWN
        return record
    if part.fs_type in ("ext2", "ext3", "ext4") and not any(boot):
        return _record(part.number, NONE, [f"its boot sector (the {part.fs_type} boot block) "
                                           "is empty"])
    if part.fs_type == "vfat":
        return _record(part.number, NONE, ["a FAT boot sector with no known boot loader"])
    if not any(boot):
        return _record(part.number, NONE, ["its first sector is empty"])
    return _record(part.number, NONE, ["no known boot loader signature in its first sector"])


def _esp_record(part: PartitionView, files: Sequence[str] | None) -> dict:
    if files is None:
        return _record(part.number, UNKNOWN, ["an ESP without a file-level copy: its loaders "
                                              "cannot be listed"])
    loaders = sorted({path.strip("/") for path in files if _is_loader(path)},
                     key=str.lower)[:MAX_LOADER_PATHS]
    if not loaders:
        return _record(part.number, UNKNOWN, ["an ESP holding no EFI/*/*.efi loader"])
    return _record(part.number, UEFI, [f"the ESP's files hold {len(loaders)} loader(s) under "
                                       "EFI/"], loader_paths=loaders)


def _is_loader(path: str) -> bool:
    parts = path.strip("/").split("/")
    return (len(parts) == 3 and parts[0].lower() == "efi"
            and parts[2].lower().endswith(".efi") and len(parts[2]) > 4)


# --- reading a capture being written ----------------------------------------------------


def member_names(fd: int, member: str, limit_bytes: int = 64 << 20) -> list[str] | None:
    """The file names inside the tar.gz `member` of the (uncompressed) tar file open at fd,
    found by walking the outer tar's headers; None when it has no such member."""
    offset = 0
    while True:
        header = os.pread(fd, tarfile.BLOCKSIZE, offset)
        if len(header) < tarfile.BLOCKSIZE or not any(header):
            return None
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.TarError:
            return None
        data_at = offset + tarfile.BLOCKSIZE
        if info.name == member:
            if info.size > limit_bytes:
                return None
            unpacker = zlib.decompressobj(31)
            # Bounded: a file listing needs the headers, never more than limit_bytes of tar.
            raw = unpacker.decompress(os.pread(fd, info.size, data_at), limit_bytes)
            try:
                with tarfile.open(fileobj=io.BytesIO(raw), mode="r:",
                                  tarinfo=BoundedTarInfo) as inner:
                    return [item.name for item in inner if item.isreg()]
            except (tarfile.TarError, MbrescueError):
                return None
        offset = data_at + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


# --- what the file-level path can re-make --------------------------------------------------


def found_now(manifest: Manifest, read_region: Callable[[int, int], bytes]
              ) -> tuple[BootLoaderRecord, ...]:
    """For a capture whose manifest predates the record: the same detection, run on the
    (verified) region; the ESP's loaders are not listed (its record says so: unknown)."""
    region_bytes = manifest.region.length_bytes

    def read(offset: int, length: int) -> bytes:
        length = max(0, min(length, region_bytes - offset))
        return read_region(offset, length) if length else b""

    views = [PartitionView(p.number, p.start_lba, p.size_sectors, p.type,
                           p.fs.type if p.fs else None, p.bootable)
             for p in manifest.partitions if not p.is_extended]
    found = detect(read, manifest.source.logical_sector_bytes, manifest.table, views,
                   manifest.boot_chain, {})
    return tuple(BootLoaderRecord(r["partition"], r["method"], tuple(r["evidence"]), (),
                                  r["core_lba"], r["core_sectors"], r["core_partition"])
                 for r in found)


def embedded_core(records: Sequence[BootLoaderRecord]) -> BootLoaderRecord | None:
    """The disk's GRUB 2 core when it lies outside every file system (the post-MBR gap or a
    BIOS boot partition) with its sectors known; None for every other install.

    Such a core does not depend on where the file systems are: boot.img in sector 0 names
    the core's first sector, diskboot.img's blocklist the core's own other sectors, and the
    core finds /boot by partition number (grub-install hardcodes `(,msdos1)` or `(,gpt2)`
    in its prefix when /boot is on the disk it boots from) or by file-system UUID (its
    load.cfg's `search.fs_uuid`), both kept by the file-level path. So it can stay at its
    sectors while /boot moves, as long as those sectors stay free.
    """
    for record in records:
        if (record.partition is None and record.method in (GRUB2_EMBEDDED_GAP,
                                                            GRUB2_BIOS_BOOT_PARTITION)
                and record.core_lba is not None and record.core_sectors):
            return record
    return None


def core_clash(core: BootLoaderRecord, spans: Iterable[tuple[str, int, int]]) -> str | None:
    """What of a new layout covers the core's sectors, or None: spans are (what, first
    sector, last sector) of every partition and EBR except the BIOS boot partition that
    holds the core, in the captured sector size."""
    assert core.core_lba is not None and core.core_sectors is not None
    first, last = core.core_lba, core.core_lba + core.core_sectors - 1
    where = ("the post-MBR gap" if core.core_partition is None
             else f"BIOS boot partition {core.core_partition}")
    for what, start, end in spans:
        if start <= last and end >= first:
            return (f"{what} would take sectors {start}..{end}, over GRUB 2's core in {where} "
                    f"(sectors {first}..{last}), which must stay where boot.img finds it")
    return None


def cannot_remake(records: Sequence[BootLoaderRecord], offsets_kept: bool) -> str | None:
    """Why the file-level path cannot give back this boot loader, or None when it can.

    offsets_kept: the sector size is the captured one and the boot code goes back where it
    was: every boot-chain partition keeps its byte offset, or (GRUB 2's core in the gap or
    a BIOS boot partition, `embedded_core`) the core's sectors stay untouched.
    """
    for record in records:
        where = (f"partition {record.core_partition}" if record.core_partition is not None
                 else "the disk")
        if record.method == GRUB2_BLOCKLIST:
            return (f"GRUB 2 was installed with a blocklist: its boot sector reads core.img from "
                    f"fixed sectors ({record.core_lba}+{record.core_sectors}) of {where}'s file "
                    "system, which a file system made again does not keep")
        if record.method == GRUB_LEGACY_BLOCKLIST:
            return (f"GRUB legacy's stage1 reads stage2 from fixed sectors ({record.core_lba}+"
                    f"{record.core_sectors}) of {where}'s file system, which a file system "
                    "made again does not keep")
        if record.method == EXTLINUX_VBR:
            number = record.partition if record.partition is not None else record.core_partition
            return (f"syslinux/extlinux boots from partition {number}'s boot sector, which names "
                    "the sectors of ldlinux.sys; a file system made again moves them and the "
                    "rescue system cannot run extlinux to install it again")
        if record.method == GRUB_LEGACY_STAGE1_5 and not offsets_kept:
            return ("GRUB legacy's stage1.5 in the post-MBR gap can only be written back at the "
                    "same sectors, and the boot chain's partitions cannot keep theirs here (the "
                    "rescue system has no GRUB legacy to install it again)")
    return None


# Said by `capture` and `build` when no record shows a way to boot (issue 17: such a disk
# used to be noticed only in the restore plan, on the day it was needed).
NO_BOOT_CODE_WARNING = (
    "no boot code: sector 0 holds none and no boot-chain partition has a boot loader, nor "
    "an ESP a UEFI loader, so a disk restored from this capture will not boot by itself "
    "(install the boot loader on the source, e.g. grub-install, and capture again)"
)


def no_boot_code(methods: Iterable[str]) -> bool:
    """True when every record (the disk's, each boot-chain partition's) says `none`."""
    listed = list(methods)
    return bool(listed) and all(method == NONE for method in listed)


def summary(records: Sequence[BootLoaderRecord]) -> str:
    """One line for the plan: the disk's method, then the partitions' own loaders."""
    parts = []
    for record in records:
        if record.partition is not None and record.method in (NONE,):
            continue
        if record.partition is not None and record.method == GRUB2_BIOS_BOOT_PARTITION:
            continue  # the disk's record names it already
        text = f"{record.method} ({DESCRIPTIONS[record.method]}"
        if record.partition is not None:
            text = f"partition {record.partition}: " + text
        if record.core_lba is not None and record.core_sectors is not None:
            text += f", sectors {record.core_lba}..{record.core_lba + record.core_sectors - 1}"
        if record.loader_paths:
            text += ": " + ", ".join(record.loader_paths[:4])
        parts.append(text + ")")
    return "; ".join(parts) or "not recorded"
