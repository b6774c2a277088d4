"""Decide, before anything is written, every byte a restore puts on a target.

The region goes back as captured; what the target's size asks for on top is planned
here as a list of writes: the GPT relocated to the target's end (backup header and
entries, primary header, protective MBR), a swap partition that would run past a
smaller target's end shrunk (in the MBR, an EBR or the GPT entry array), the EBR chain
of logical partitions (usually outside the region), and swap headers recreated with
their captured label and UUID. A partition that cannot fit and is not swap refuses the
restore here, before the first byte is written. Also the words the plan is shown in.
"""

from __future__ import annotations

import calendar
import time
import zlib
from dataclasses import dataclass, field

from . import bootloader, gpt, mbr, stale, swap
from .capfile import Capture
from .console import Console, human_bytes
from .disk import DiskInfo, read_at
from .errors import DoesNotFit, MbrescueError
from .layout import read_layout
from .manifest import EbrRecord, KernelRecord, Manifest

SWAP_TYPES = (0x82,)
LINUX_SWAP_GUID = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"
# mkswap refuses fewer than 10 pages; a swap shrunk below that is no swap at all.
MIN_SWAP_PAGES = 10


@dataclass
class Write:
    """Bytes the plan puts at a byte offset of the target, besides the region as captured."""

    offset_bytes: int
    data: bytes
    what: str

    @property
    def end_bytes(self) -> int:
        return self.offset_bytes + len(self.data)


@dataclass(frozen=True)
class Lost:
    """A partition the target holds now that the restore takes away."""

    number: int
    detail: str  # "(sectors a..b, size, type)"
    fate: str  # "overwritten by the region", "leaves the partition table; ..."

    def text(self) -> str:
        return f"partition {self.number} {self.detail}: {self.fate}"


@dataclass
class Plan:
    target: DiskInfo
    sector_bytes: int
    region_bytes: int
    table: str
    writes: list[Write] = field(default_factory=list)
    adjusted: list[str] = field(default_factory=list)  # what changes against the capture
    recreated: list[str] = field(default_factory=list)
    shrunk: dict[int, int] = field(default_factory=dict)  # partition number -> new size
    # Byte ranges (offset, length) written last, after the rest is on the disk and read
    # back: what makes the disk look bootable or healthy (sector 0, the GPT headers, the
    # boot chain's superblocks). Until they are there the ISO's boot-time probe finds no
    # captured /boot, so an interrupted restore never looks healthy (safety rule 6).
    deferred: list[tuple[int, int]] = field(default_factory=list)
    deferred_what: list[str] = field(default_factory=list)
    boot_loader: str = ""  # how it was installed (runner/bootloader.py), for the plan's text
    # Signatures of what the target held before (old GPT headers, RAID, LVM) outside what
    # this restore writes and keeps: zeroed first, checked gone at the end (safety rule 9).
    erase: list[stale.Stale] = field(default_factory=list)
    # The target's partitions that this restore overwrites or drops from the table, in words.
    lost: list[Lost] = field(default_factory=list)

    @property
    def region_sectors(self) -> int:
        return self.region_bytes // self.sector_bytes


class RegionHead:
    """The first bytes of the captured region (MBR, GPT header and entries), decoded once."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.data = b""
        self._chunks = capture.region_chunks()

    def read(self, offset: int, length: int) -> bytes:
        region_bytes = self.capture.region.length_bytes
        if offset + length > region_bytes:
            raise MbrescueError(
                f"the capture's region ({region_bytes} bytes) does not hold bytes "
                f"{offset}..{offset + length - 1}"
            )
        while len(self.data) < offset + length:
            self.data += next(self._chunks)
        return self.data[offset : offset + length]


# --- planning --------------------------------------------------------------------------


def plan_restore(capture: Capture, head: RegionHead, target: DiskInfo) -> Plan:
    """Decide every write for this target, or refuse with the reason; writes nothing."""
    manifest = capture.manifest
    sector = manifest.source.logical_sector_bytes
    region_bytes = manifest.region.length_bytes
    table = manifest.table
    if target.logical_sector_bytes != sector:
        raise MbrescueError(
            f"{target.path} has {target.logical_sector_bytes}-byte logical sectors, the captured "
            f"disk had {sector}-byte sectors; the region would not fit its partition table"
        )
    if target.size_bytes < region_bytes:
        raise MbrescueError(
            f"{target.path} is smaller than the region ({human_bytes(target.size_bytes)} < "
            f"{human_bytes(region_bytes)}, {region_bytes} bytes)"
        )
    plan = Plan(target, sector, region_bytes, table,
                boot_loader=boot_loader_text(manifest))
    if table == "gpt":
        _plan_gpt(plan, manifest, head)
    else:
        _plan_msdos(plan, manifest, head)
    _plan_swap(plan, manifest)
    _plan_deferred(plan, manifest)
    plan.erase = stale.plan_erase(lambda at, n: read_at(target.path, at, n), target.size_bytes,
                                  sector, written_ranges(plan), kept_ranges(plan, manifest))
    plan.lost = lost_partitions(plan, manifest)
    return plan


def lost_partitions(plan: Plan, manifest: Manifest) -> list[Lost]:
    """The target's partitions that do not come through as they are: overwritten by the
    region, or past it and no longer in the restored table (their sectors stay, no table
    names them). A partition the restored table has at the same place and size stays."""
    target = plan.target
    try:
        layout = read_layout(target.path,
                             target.logical_sector_bytes if target.kind == "file" else None)
    except MbrescueError:
        return []  # blank or no table: nothing to name beyond the sectors written
    sector = layout.sector_bytes
    new = {(p.start_lba, plan.shrunk.get(p.number, p.size_sectors)) for p in manifest.partitions}
    lost = []
    for part in layout.partitions:
        if part.is_extended or (part.start_lba, part.size_sectors) in new:
            continue
        what = part.type_name + (f", {part.fs.type}" if part.fs else "")
        end_bytes = (part.end_lba + 1) * sector
        fate = ("overwritten by the region" if end_bytes <= plan.region_bytes
                else "leaves the partition table" + (
                    "; its start is overwritten by the region"
                    if part.start_lba * sector < plan.region_bytes else ""))
        lost.append(Lost(part.number, f"(sectors {part.start_lba}..{part.end_lba}, "
                         f"{human_bytes(part.size_sectors * sector)}, {what})", fate))
    return lost


def prompt_text(plan: Plan, confirm_word: str) -> str:
    """The region path's question: every sector range it writes and every partition of the
    target it takes away, not only the region."""
    sector = plan.sector_bytes
    past = [f"the {w.what} at sector {w.offset_bytes // sector}" for w in plan.writes
            if w.offset_bytes >= plan.region_bytes]
    if plan.erase:
        past.append(f"{len(plan.erase)} stale signature(s) zeroed (listed above)")
    words = f"sectors 0..{plan.region_sectors - 1} are overwritten"
    if past:
        words += ", and past them " + ", ".join(past)
    for item in plan.lost:
        words += f"; partition {item.number} it holds now {item.detail} is lost"
    return f"Type {confirm_word} to write {plan.target.path} ({words}): "


def written_ranges(plan: Plan) -> stale.Ranges:
    """Every byte range the region path writes: the region and each planned write."""
    return [(0, plan.region_bytes), *((w.offset_bytes, len(w.data)) for w in plan.writes)]


def kept_ranges(plan: Plan, manifest: Manifest) -> stale.Ranges:
    """The parts of the restored table's partitions past the region that the region path
    leaves as the target has them (not swap, which it recreates, nor the extended
    container): what lies there belongs to those partitions, not to the disk's past."""
    sector = plan.sector_bytes
    kept = []
    for part in manifest.partitions:
        if part.is_extended or part.number in manifest.swap_numbers:
            continue
        start = max(part.start_lba * sector, plan.region_bytes)
        end = (part.start_lba + part.size_sectors) * sector
        if end > start:
            kept.append((start, end - start))
    return kept


# The first 64 KiB of a file system hold every superblock a probe reads: ext's at 1 KiB,
# FAT's boot sector, XFS's at 0; GRUB's `search --fs-uuid` finds none of them until then.
SUPERBLOCK_SPAN_BYTES = 64 << 10


def _plan_deferred(plan: Plan, manifest: Manifest) -> None:
    sector = plan.sector_bytes
    ranges = [(0, (2 if plan.table == "gpt" else 1) * sector)]
    plan.deferred_what.append("sector 0" + (" and the primary GPT header" if plan.table == "gpt"
                                            else " (boot code and partition table)"))
    for number in manifest.boot_chain:
        part = manifest.partition(number)
        if part.fs is None:
            continue
        start = part.start_lba * sector
        ranges.append((start, min(SUPERBLOCK_SPAN_BYTES, part.size_sectors * sector)))
        plan.deferred_what.append(f"the superblock of partition {number} ({part.fs.type})")
    for write in plan.writes:
        if write.what == "backup GPT header":
            ranges.append((write.offset_bytes, len(write.data)))
            plan.deferred_what.append("the backup GPT header")
    # A planned write that overlaps a deferred range joins it whole, so each write is
    # either deferred entirely or not at all.
    while True:
        merged = _merge(ranges + [
            (w.offset_bytes, len(w.data)) for w in plan.writes
            if any(_overlaps(w.offset_bytes, w.end_bytes, lo, lo + n) for lo, n in ranges)
        ])
        if merged == ranges:
            break
        ranges = merged
    plan.deferred = ranges


def _overlaps(lo: int, hi: int, other_lo: int, other_hi: int) -> bool:
    return lo < other_hi and other_lo < hi


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, length in sorted(ranges):
        if merged and lo <= merged[-1][0] + merged[-1][1]:
            last_lo, last_length = merged[-1]
            merged[-1] = (last_lo, max(last_lo + last_length, lo + length) - last_lo)
        else:
            merged.append((lo, length))
    return merged


def is_deferred(plan: Plan, lo: int, hi: int) -> bool:
    return any(lo >= d_lo and hi <= d_lo + d_len for d_lo, d_len in plan.deferred)


def _plan_gpt(plan: Plan, manifest: Manifest, head: RegionHead) -> None:
    sector = plan.sector_bytes
    disk_sectors = plan.target.size_bytes // sector
    header_raw = head.read(sector, sector)
    header = gpt.parse_header(header_raw)
    total = header.entries_total_bytes
    entries = bytearray(head.read(header.entries_lba * sector, total))
    entries_sectors = -(-total // sector)
    last_usable = disk_sectors - 1 - entries_sectors - 1
    swaps = manifest.swap_numbers
    changed = False
    for entry in gpt.parse_entries(bytes(entries), header.entry_count, header.entry_bytes):
        if entry.last_lba <= last_usable:
            continue
        if entry.number not in swaps and entry.type_guid != LINUX_SWAP_GUID:
            raise DoesNotFit(
                f"partition {entry.number} ends at sector {entry.last_lba}, past the last usable "
                f"sector {last_usable} of {plan.target.path}; only swap can be shrunk"
            )
        new_size = last_usable - entry.first_lba + 1
        _check_swap_size(plan, entry.number, new_size, manifest)
        # Entry layout: type, unique GUID, first LBA, last LBA (offset 40).
        at = (entry.number - 1) * header.entry_bytes + 40
        entries[at : at + 8] = last_usable.to_bytes(8, "little")
        plan.shrunk[entry.number] = new_size
        plan.adjusted.append(
            f"swap partition {entry.number} shrunk from {entry.size_sectors} to {new_size} "
            f"sectors ({human_bytes(entry.size_sectors * sector)} -> "
            f"{human_bytes(new_size * sector)}) to end before the GPT backup"
        )
        changed = True
    if changed:
        header_raw = gpt.encode_header(
            header_raw, entries_crc32=zlib.crc32(bytes(entries)) & 0xFFFFFFFF
        )
        plan.writes.append(
            Write(header.entries_lba * sector,
                  bytes(entries).ljust(entries_sectors * sector, b"\0"), "primary GPT entries")
        )
    writes = gpt.relocate(header_raw, bytes(entries), disk_sectors, sector,
                          mbr_sector=head.read(0, 512))
    names = {0: "protective MBR", 1: "primary GPT header", disk_sectors - 1: "backup GPT header"}
    for lba, data in writes:
        if lba == 0 and _mbr_extents(data) == _mbr_extents(head.read(0, 512)):
            # Same size: only the CHS guess would change; keep the captured sector 0 exact.
            continue
        plan.writes.append(Write(lba * sector, data, names.get(lba, "backup GPT entries")))
    source_sectors = manifest.source.size_sectors
    if disk_sectors != source_sectors or changed:
        plan.adjusted.append(
            f"GPT backup header and entries written at sectors {disk_sectors - 1 - entries_sectors}"
            f"..{disk_sectors - 1} (the target's end), primary header and CRCs updated"
        )
    else:
        plan.recreated.append(
            f"GPT backup header and entries at sectors {disk_sectors - 1 - entries_sectors}"
            f"..{disk_sectors - 1}, as captured"
        )


def _mbr_type(text: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        raise MbrescueError(f"the capture's partition type {text[:20]!r} is not an MBR type") from None


def _mbr_extents(sector: bytes) -> list[tuple[int, int, int]]:
    return [(e.type, e.start_lba, e.size_sectors) for e in mbr.parse_mbr(sector).entries]


def _check_swap_size(plan: Plan, number: int, new_size_sectors: int,
                     manifest: Manifest) -> None:
    page = 4096
    for record in manifest.swap:
        if record.partition == number:
            page = record.page_bytes
    if new_size_sectors * plan.sector_bytes < MIN_SWAP_PAGES * page:
        raise DoesNotFit(
            f"{plan.target.path} is too small: swap partition {number} would shrink to "
            f"{max(new_size_sectors, 0)} sectors, less than {MIN_SWAP_PAGES} pages"
        )


def _plan_msdos(plan: Plan, manifest: Manifest, head: RegionHead) -> None:
    sector = plan.sector_bytes
    disk_sectors = plan.target.size_bytes // sector
    last_lba = disk_sectors - 1
    swaps = manifest.swap_numbers
    sector0 = head.read(0, 512)
    table = mbr.parse_mbr(sector0)
    new_sector0 = sector0
    extended_start: int | None = None
    for entry in table.entries:
        if entry.is_empty:
            continue
        number = entry.index + 1
        end = entry.start_lba + entry.size_sectors - 1
        if entry.is_extended:
            extended_start = entry.start_lba
            if end > last_lba:
                # The container only; its logicals are judged one by one below.
                new_sector0 = mbr.resize_entry(
                    new_sector0, entry.index, disk_sectors - entry.start_lba
                )
                plan.adjusted.append(
                    f"extended partition {number} shrunk to end at the target's last "
                    f"sector {last_lba}"
                )
            continue
        if end <= last_lba:
            continue
        if number not in swaps and entry.type not in SWAP_TYPES:
            raise DoesNotFit(
                f"partition {number} (type 0x{entry.type:02x}) ends at sector {end}, past the "
                f"end of {plan.target.path} (last sector {last_lba}); only swap can be shrunk"
            )
        new_size = disk_sectors - entry.start_lba
        _check_swap_size(plan, number, new_size, manifest)
        new_sector0 = mbr.resize_entry(new_sector0, entry.index, new_size)
        plan.shrunk[number] = new_size
        plan.adjusted.append(
            f"swap partition {number} shrunk from {entry.size_sectors} to {new_size} sectors "
            f"({human_bytes(entry.size_sectors * sector)} -> {human_bytes(new_size * sector)})"
        )
    if new_sector0 != sector0:
        plan.writes.append(Write(0, new_sector0, "MBR (partition sizes)"))
    _plan_ebrs(plan, manifest, extended_start, swaps)


def _plan_ebrs(plan: Plan, manifest: Manifest, extended_start: int | None,
               swaps: set[int]) -> None:
    """Logical partitions: their EBRs come from the manifest (an EBR usually lies outside
    the region, so a blank target would otherwise lose every logical partition)."""
    records = list(manifest.ebrs)
    if extended_start is None:
        return
    if not records:
        records = ebrs_from_layout(manifest, extended_start)
    by_lba = {record.lba: record.sector for record in records if record.lba >= extended_start}
    sector = plan.sector_bytes
    disk_sectors = plan.target.size_bytes // sector
    last_lba = disk_sectors - 1
    number = 5
    # Follow the chain as Linux does (first EBR at the extended start, then the links), so
    # logical numbers come out as the kernel will give them.
    chain: list[int] = []
    ebr_lba: int | None = extended_start
    while ebr_lba is not None and ebr_lba in by_lba and ebr_lba not in chain:
        chain.append(ebr_lba)
        links = [e for e in mbr.parse_mbr(by_lba[ebr_lba][:512]).entries if e.is_extended]
        ebr_lba = extended_start + links[0].start_lba if links else None
    if len(chain) != len(by_lba):
        raise MbrescueError("the capture's EBRs do not form one chain from the extended partition")
    for ebr_lba in chain:
        raw = by_lba[ebr_lba]
        data = raw[:512]
        if ebr_lba > last_lba:
            raise DoesNotFit(
                f"logical partition {number} (its EBR at sector {ebr_lba}) lies past the end of "
                f"{plan.target.path} (last sector {last_lba})"
            )
        table = mbr.parse_mbr(data)
        for entry in table.entries:
            if entry.is_empty:
                continue
            if entry.is_extended:
                link_start = extended_start + entry.start_lba
                if link_start + entry.size_sectors - 1 > last_lba:
                    data = mbr.resize_entry(data, entry.index, disk_sectors - link_start)
                continue
            start = ebr_lba + entry.start_lba
            end = start + entry.size_sectors - 1
            if end > last_lba:
                if number not in swaps and entry.type not in SWAP_TYPES:
                    raise DoesNotFit(
                        f"logical partition {number} (type 0x{entry.type:02x}) ends at sector "
                        f"{end}, past the end of {plan.target.path} (last sector {last_lba}); "
                        f"only swap can be shrunk"
                    )
                new_size = disk_sectors - start
                _check_swap_size(plan, number, new_size, manifest)
                data = mbr.resize_entry(data, entry.index, new_size)
                plan.shrunk[number] = new_size
                plan.adjusted.append(
                    f"swap partition {number} (logical) shrunk from {entry.size_sectors} to "
                    f"{new_size} sectors ({human_bytes(entry.size_sectors * sector)} -> "
                    f"{human_bytes(new_size * sector)})"
                )
            number += 1
        offset = ebr_lba * sector
        if offset >= plan.region_bytes or data != raw[:512]:
            plan.writes.append(Write(offset, data, f"EBR at sector {ebr_lba}"))
            if offset >= plan.region_bytes:
                plan.recreated.append(f"EBR at sector {ebr_lba} (the chain of logical partitions)")


def ebrs_from_layout(manifest: Manifest, extended_start: int) -> list[EbrRecord]:
    """EBR sectors rebuilt from the layout's logical partitions, for a capture that did not
    keep them verbatim: the chain's meaning (entries and links) is all an EBR holds."""
    logicals = sorted(
        (p for p in manifest.partitions if p.is_logical),
        key=lambda p: p.number,
    )
    records = []
    for index, part in enumerate(logicals):
        ebr_lba = part.table_lba
        if ebr_lba is None:
            raise MbrescueError(
                f"the capture does not say where logical partition {part.number}'s EBR is"
            )
        sector = bytearray(512)
        status = 0x80 if part.bootable else 0
        # CHS fields carry absolute addresses, the LBA fields relative ones.
        sector[446:462] = mbr.encode_entry(
            status, _mbr_type(part.type), part.start_lba - ebr_lba, part.size_sectors,
            mbr.chs_from_lba(part.start_lba), mbr.chs_from_lba(part.end_lba),
        )
        if index + 1 < len(logicals):
            following = logicals[index + 1]
            next_lba = following.table_lba
            if next_lba is None:
                raise MbrescueError(
                    f"the capture does not say where logical partition {following.number}'s "
                    "EBR is"
                )
            sector[462:478] = mbr.encode_entry(
                0, 0x05, next_lba - extended_start, following.end_lba - next_lba + 1,
                mbr.chs_from_lba(next_lba), mbr.chs_from_lba(following.end_lba),
            )
        sector[510:512] = mbr.BOOT_SIGNATURE
        records.append(EbrRecord(ebr_lba, bytes(sector)))
    return records


def _plan_swap(plan: Plan, manifest: Manifest) -> None:
    sector = plan.sector_bytes
    for record in manifest.swap:
        number = record.partition
        offset = record.start_lba * sector
        shrunk = number in plan.shrunk
        size_sectors = plan.shrunk.get(number, record.size_sectors)
        page = record.page_bytes
        if offset + page <= plan.region_bytes and not shrunk:
            continue  # inside the region: restored with it, byte for byte
        if offset + page > plan.target.size_bytes:
            raise DoesNotFit(
                f"swap partition {number} starts at sector {record.start_lba}, too close to "
                f"the end of {plan.target.path} for a swap header"
            )
        header = swap.make_swap_header(
            size_sectors * sector, page, record.uuid, record.label
        )
        plan.writes.append(Write(offset, header, f"swap header of partition {number}"))
        plan.recreated.append(
            f"swap partition {number}: label {record.label or '(none)'}, "
            f"UUID {record.uuid}, {human_bytes(size_sectors * sector)}"
        )


# --- showing ---------------------------------------------------------------------------


def describe_contents(target: DiskInfo) -> list[str]:
    """What the target holds now, in a few lines."""
    try:
        first = read_at(target.path, 0, 512)
    except MbrescueError as exc:
        return [f"unreadable ({exc})"]
    if first == bytes(512):
        return ["blank (sector 0 is all zeros)"]
    try:
        layout = read_layout(
            target.path, target.logical_sector_bytes if target.kind == "file" else None
        )
    except MbrescueError as exc:
        return [f"no partition table ({exc})"]
    lines = [f"{layout.table} partition table, id {layout.disk_id}"]
    for part in layout.partitions:
        fs = part.fs
        what = "no file system found"
        if fs is not None:
            what = fs.type + (f' "{fs.label}"' if fs.label else "")
            what += f" UUID {fs.uuid}" if fs.uuid else ""
        if part.is_extended:
            what = "extended"
        lines.append(
            f"  partition {part.number}: sectors {part.start_lba}..{part.end_lba} "
            f"({human_bytes(part.size_sectors * layout.disk.logical_sector_bytes)}) "
            f"{part.type_name}, {what}"
        )
    return lines


def disk_title(disk: DiskInfo) -> str:
    return (
        f"{disk.path}: {disk.model or 'model unknown'}, serial {disk.serial or 'unknown'}, "
        f"{human_bytes(disk.size_bytes)} ({disk.size_bytes} bytes, "
        f"{disk.logical_sector_bytes}-byte sectors)"
    )


def show_plan(console: Console, plan: Plan) -> None:
    console.say(f"Target {disk_title(plan.target)}")
    console.say("  It holds now:")
    for line in describe_contents(plan.target):
        console.say("    " + line)
    console.say(
        f"  Will write: the boot region, {plan.region_bytes} bytes "
        f"({human_bytes(plan.region_bytes)}), sectors 0..{plan.region_sectors - 1}"
    )
    console.say(f"  Boot loader: {plan.boot_loader}; written back as captured, with the region")
    for line in plan.adjusted:
        console.say("  Will adjust: " + line)
    for line in plan.recreated:
        console.say("  Will recreate: " + line)
    for line in erase_lines(plan.erase, plan.sector_bytes):
        console.say("  Will erase: " + line)
    for item in plan.lost:
        console.say("  Will lose: " + item.text())
    console.say("  Written last, once the rest reads back right (until then the disk does "
                "not look bootable): " + ", ".join(plan.deferred_what))


def erase_lines(erase: list[stale.Stale], sector_bytes: int) -> list[str]:
    """The plan's words for the stale signatures a restore zeroes (both paths)."""
    return [f"stale {item.text(sector_bytes)} (what the disk held before; a tool would still "
            "act on it)" for item in erase]


def boot_loader_text(manifest: Manifest) -> str:
    """The install method as the plan names it (runner/bootloader.py)."""
    if manifest.boot_loader is None:
        return "how it was installed is not recorded (a capture from an older mbrescue)"
    return bootloader.summary(manifest.boot_loader)


def show_capture(console: Console, capture: Capture) -> None:
    manifest = capture.manifest
    source = manifest.source
    console.say(
        f"mbrescue: capture of {manifest.hostname} taken {manifest.created} "
        f"({capture_age(manifest.created)}) from "
        f"{source.path} ({source.model or 'model unknown'}, serial "
        f"{source.serial or 'unknown'}, {human_bytes(source.size_bytes)}, "
        f"{manifest.table})"
    )
    kernels = manifest.fingerprint.kernels if manifest.fingerprint else ()
    if kernels:
        console.say("mbrescue: kernels in the captured /boot (what comes back): "
                    + ", ".join(kernel_text(kernel) for kernel in kernels))


def kernel_text(kernel: KernelRecord) -> str:
    """A kernel as the plan lists it: its version, and the menu title of the BLS entry
    that boots it (RHEL 8+, Fedora)."""
    return kernel.version if kernel.title is None else f"{kernel.version} ({kernel.title})"


def capture_age(created: str, now_s: float | None = None) -> str:
    """'captured 41 days ago', in words a person at the console weighs before `yes`."""
    try:
        taken_s = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return "age unknown"
    age_s = (time.time() if now_s is None else now_s) - taken_s
    if age_s < -60:
        return "this machine's clock is before the capture time: age unknown"
    days = int(age_s // 86400)
    if days >= 2:
        return f"captured {days} days ago"
    hours = int(age_s // 3600)
    return f"captured {hours} hours ago" if hours >= 2 else "captured just now"
