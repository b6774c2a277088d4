"""Put a captured boot region back on a disk: plan, ask, write, adjust, verify.

The same code runs in the rescue system (`python3 -m mbrescue_runner rescue CAPTURE`,
every disk a candidate) and as `mbrescue restore CAPTURE TARGET` on any Linux. The
order of work follows DESIGN.md's safety rules: the capture's checksums are verified
before the first byte is written; every adjustment the target needs is decided
*before* writing (a partition that cannot fit refuses the restore, nothing written);
the plan is shown and only `yes` proceeds; the region is written with its in-region
adjustments (protective MBR, primary GPT header, shrunk MBR/EBR entries) patched into
the stream, the rest (GPT backup, EBRs outside the region, swap headers) after it;
then everything is read back from the device, past the page cache, and compared.
Every write is a pure function of the capture and the target's size, so running it
again after an interruption simply writes the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import gpt, mbr, swap
from .capfile import GZIP_WBITS, REGION_MEMBER, Capture
from .cmdline import OPTIONS_PATH, Switches, read_switches, unattended_allowed
from .console import Console, human_bytes
from .disk import DiskInfo, disk_info, list_disks, read_at
from .errors import MbrescueError
from .layout import read_layout
from .probe import probe
from .targets import Candidate, base_refusal, busy_reason, matches, rank

BLKFLSBUF = 0x1261  # _IO(0x12, 97)
BLKRRPART = 0x125F  # _IO(0x12, 95)
SWAP_TYPES = (0x82,)
LINUX_SWAP_GUID = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"
# mkswap refuses fewer than 10 pages; a swap shrunk below that is no swap at all.
MIN_SWAP_PAGES = 10
# Read-back alignment that satisfies O_DIRECT on 512-byte and 4Kn devices alike.
DIRECT_ALIGN = 4096
READ_BLOCK_BYTES = 4 << 20
SMALL_MEMBER_BYTES = 16 << 10
WRITE_BLOCK_BYTES = 8 << 20  # per pwritev; the capture's chunks are 1 MiB
CONFIRM_WORD = "yes"


@dataclass
class Write:
    """Bytes the plan puts at a byte offset of the target, besides the region as captured."""

    offset_bytes: int
    data: bytes
    what: str

    @property
    def end_bytes(self) -> int:
        return self.offset_bytes + len(self.data)


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

    @property
    def region_sectors(self) -> int:
        return self.region_bytes // self.sector_bytes


@dataclass
class Stats:
    write_seconds: float = 0.0
    verify_seconds: float = 0.0
    region_bytes: int = 0
    read_back: str = ""  # how the page cache was bypassed

    @property
    def write_mb_s(self) -> float:
        return self.region_bytes / max(self.write_seconds, 1e-9) / 1e6

    @property
    def verify_mb_s(self) -> float:
        return self.region_bytes / max(self.verify_seconds, 1e-9) / 1e6


class RegionHead:
    """The first bytes of the captured region (MBR, GPT header and entries), decoded once."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.data = b""
        self._chunks = capture.region_chunks()

    def read(self, offset: int, length: int) -> bytes:
        region_bytes = self.capture.region["length_bytes"]
        if offset + length > region_bytes:
            raise MbrescueError(
                f"the capture's region ({region_bytes} bytes) does not hold bytes "
                f"{offset}..{offset + length - 1}"
            )
        while len(self.data) < offset + length:
            self.data += next(self._chunks)
        return self.data[offset : offset + length]


# --- planning --------------------------------------------------------------------------


def _swap_numbers(manifest: dict) -> set[int]:
    return {record["partition"] for record in manifest.get("swap") or []}


def plan_restore(capture: Capture, head: RegionHead, target: DiskInfo) -> Plan:
    """Decide every write for this target, or refuse with the reason; writes nothing."""
    manifest = capture.manifest
    source = manifest["source"]
    sector = int(source["logical_sector_bytes"])
    region_bytes = int(manifest["region"]["length_bytes"])
    table = manifest["layout"]["table"]
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
    plan = Plan(target, sector, region_bytes, table)
    if table == "gpt":
        _plan_gpt(plan, manifest, head)
    else:
        _plan_msdos(plan, manifest, head)
    _plan_swap(plan, manifest)
    return plan


def _plan_gpt(plan: Plan, manifest: dict, head: RegionHead) -> None:
    sector = plan.sector_bytes
    disk_sectors = plan.target.size_bytes // sector
    header_raw = head.read(sector, sector)
    header = gpt.parse_header(header_raw)
    total = header.entries_total_bytes
    entries = bytearray(head.read(header.entries_lba * sector, total))
    entries_sectors = -(-total // sector)
    last_usable = disk_sectors - 1 - entries_sectors - 1
    swaps = _swap_numbers(manifest)
    changed = False
    for entry in gpt.parse_entries(bytes(entries), header.entry_count, header.entry_bytes):
        if entry.last_lba <= last_usable:
            continue
        if entry.number not in swaps and entry.type_guid != LINUX_SWAP_GUID:
            raise MbrescueError(
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
    source_sectors = int(manifest["source"]["size_bytes"]) // sector
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


def _mbr_extents(sector: bytes) -> list[tuple[int, int, int]]:
    return [(e.type, e.start_lba, e.size_sectors) for e in mbr.parse_mbr(sector).entries]


def _check_swap_size(plan: Plan, number: int, new_size_sectors: int, manifest: dict) -> None:
    page = 4096
    for record in manifest.get("swap") or []:
        if record["partition"] == number and record.get("page_bytes"):
            page = int(record["page_bytes"])
    if new_size_sectors * plan.sector_bytes < MIN_SWAP_PAGES * page:
        raise MbrescueError(
            f"{plan.target.path} is too small: swap partition {number} would shrink to "
            f"{max(new_size_sectors, 0)} sectors, less than {MIN_SWAP_PAGES} pages"
        )


def _plan_msdos(plan: Plan, manifest: dict, head: RegionHead) -> None:
    sector = plan.sector_bytes
    disk_sectors = plan.target.size_bytes // sector
    last_lba = disk_sectors - 1
    swaps = _swap_numbers(manifest)
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
            raise MbrescueError(
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


def _plan_ebrs(plan: Plan, manifest: dict, extended_start: int | None, swaps: set[int]) -> None:
    """Logical partitions: their EBRs come from the manifest (an EBR usually lies outside
    the region, so a blank target would otherwise lose every logical partition)."""
    records = manifest.get("ebrs") or []
    if extended_start is None:
        return
    if not records:
        records = ebrs_from_layout(manifest, extended_start)
    by_lba = {
        int(record["lba"]): bytes.fromhex(record["hex"])
        for record in records
        if int(record["lba"]) >= extended_start
    }
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
            raise MbrescueError(
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
                    raise MbrescueError(
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


def ebrs_from_layout(manifest: dict, extended_start: int) -> list[dict]:
    """EBR sectors rebuilt from the layout's logical partitions, for a capture that did not
    keep them verbatim: the chain's meaning (entries and links) is all an EBR holds."""
    logicals = sorted(
        (p for p in manifest["layout"]["partitions"] if p.get("is_logical")),
        key=lambda p: p["number"],
    )
    records = []
    for index, part in enumerate(logicals):
        ebr_lba = part.get("table_lba")
        if ebr_lba is None:
            raise MbrescueError(
                f"the capture does not say where logical partition {part['number']}'s EBR is"
            )
        sector = bytearray(512)
        status = 0x80 if part.get("bootable") else 0
        # CHS fields carry absolute addresses, the LBA fields relative ones.
        sector[446:462] = mbr.encode_entry(
            status, int(part["type"], 16), part["start_lba"] - ebr_lba, part["size_sectors"],
            mbr.chs_from_lba(part["start_lba"]), mbr.chs_from_lba(part["end_lba"]),
        )
        if index + 1 < len(logicals):
            following = logicals[index + 1]
            next_lba = following["table_lba"]
            sector[462:478] = mbr.encode_entry(
                0, 0x05, next_lba - extended_start, following["end_lba"] - next_lba + 1,
                mbr.chs_from_lba(next_lba), mbr.chs_from_lba(following["end_lba"]),
            )
        sector[510:512] = mbr.BOOT_SIGNATURE
        records.append({"lba": ebr_lba, "hex": bytes(sector).hex()})
    return records


def _plan_swap(plan: Plan, manifest: dict) -> None:
    sector = plan.sector_bytes
    for record in manifest.get("swap") or []:
        number = int(record["partition"])
        offset = int(record["start_lba"]) * sector
        shrunk = number in plan.shrunk
        size_sectors = plan.shrunk.get(number, int(record["size_sectors"]))
        page = int(record.get("page_bytes") or 4096)
        if offset + page <= plan.region_bytes and not shrunk:
            continue  # inside the region: restored with it, byte for byte
        if offset + page > plan.target.size_bytes:
            raise MbrescueError(
                f"swap partition {number} starts at sector {record['start_lba']}, too close to "
                f"the end of {plan.target.path} for a swap header"
            )
        if not record.get("uuid"):
            raise MbrescueError(f"the capture has no UUID for swap partition {number}")
        header = swap.make_swap_header(
            size_sectors * sector, page, record["uuid"], record.get("label")
        )
        plan.writes.append(Write(offset, header, f"swap header of partition {number}"))
        plan.recreated.append(
            f"swap partition {number}: label {record.get('label') or '(none)'}, "
            f"UUID {record['uuid']}, {human_bytes(size_sectors * sector)}"
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
    for line in plan.adjusted:
        console.say("  Will adjust: " + line)
    for line in plan.recreated:
        console.say("  Will recreate: " + line)


def show_capture(console: Console, capture: Capture) -> None:
    manifest = capture.manifest
    source = manifest["source"]
    console.say(
        f"mbrescue: capture of {manifest.get('hostname')} taken {manifest.get('created')} from "
        f"{source.get('path')} ({source.get('model') or 'model unknown'}, serial "
        f"{source.get('serial') or 'unknown'}, {human_bytes(source['size_bytes'])}, "
        f"{manifest['layout']['table']})"
    )


# --- writing ---------------------------------------------------------------------------


def stored_blocks(packed: bytes | memoryview) -> list[memoryview] | None:
    """The data of a gzip member made only of stored deflate blocks, as views into it, or
    None for any other member.

    The capture stores chunks that do not compress (kernels, initrds: most of a /boot)
    as stored blocks; handing their bytes straight to pwritev saves inflate's copy, which
    is what keeps the write phase level with `dd`. The member's SHA-256 was checked by
    `Capture.verify()` and the written region is checked again by reading it back.
    """
    view = memoryview(packed)
    if len(view) < 18 or view[:3] != b"\x1f\x8b\x08":
        return None
    flags = view[3]
    if flags & 0x18:  # a file name or comment: not what the capture writes; let zlib judge
        return None
    pos = 10
    if flags & 0x04:  # FEXTRA
        pos += 2 + int.from_bytes(view[pos : pos + 2], "little")
    if flags & 0x02:  # FHCRC
        pos += 2
    parts: list[memoryview] = []
    trailer = len(view) - 8
    while True:
        # A stored block: BFINAL bit, BTYPE 00, padding to the byte, LEN, NLEN, data. In a
        # run of stored blocks every header starts on a byte boundary.
        if pos + 5 > trailer or view[pos] & 0b110:
            return None
        length = int.from_bytes(view[pos + 1 : pos + 3], "little")
        if length ^ int.from_bytes(view[pos + 3 : pos + 5], "little") != 0xFFFF:
            return None
        if pos + 5 + length > trailer:
            return None
        if length:
            parts.append(view[pos + 5 : pos + 5 + length])
        final = view[pos] & 1
        pos += 5 + length
        if final:
            break
    if pos != trailer or sum(len(part) for part in parts) != int.from_bytes(
        view[trailer + 4 :], "little"
    ):
        return None
    return parts


def region_groups(capture: Capture, block_bytes: int) -> Iterator[list[bytes | memoryview]]:
    """The raw region as groups of buffers of at least `block_bytes` each (the last may be
    shorter), in order, each group for one pwritev.

    The compressed chunks are read into one reused slab, and stored chunks are handed on
    as views into it: the same memory is written again and again, as `dd` does with its
    one buffer, instead of fresh buffers for every chunk (measured: fresh memory made the
    page-cache writes several times slower here). A group's buffers are only valid until
    the next group is asked for.
    """
    member = capture.members[REGION_MEMBER]
    sizes = [int(size) for size in capture.region["chunks"]]
    if sum(sizes) != member.size:
        raise MbrescueError(f"{capture.path}: region chunk list does not match its member")
    slab = bytearray(block_bytes + max(sizes, default=0))
    view = memoryview(slab)
    # Runs of zeros (free space of /boot, the gap after the MBR) come as identical small
    # members: inflate each distinct one once.
    small: dict[bytes, bytes] = {}
    with open(capture.path, "rb", buffering=0) as stream:
        stream.seek(member.offset)
        group: list[bytes | memoryview] = []
        raw_bytes = used = 0
        for index, size in enumerate(sizes):
            if used + size > len(slab):
                yield group
                group, raw_bytes, used = [], 0, 0
            packed = view[used : used + size]
            if stream.readinto(packed) != size:
                raise MbrescueError(f"{capture.path} is truncated (region)")
            used += size
            stored = stored_blocks(packed)
            parts: list[bytes | memoryview] = (
                list(stored) if stored is not None
                else [_inflate(capture, index, bytes(packed), small)]
            )
            group.extend(parts)
            raw_bytes += sum(len(part) for part in parts)
            # pwritev takes at most IOV_MAX (1024) buffers.
            if raw_bytes >= block_bytes or len(group) > 512:
                yield group
                group, raw_bytes, used = [], 0, 0
        if group:
            yield group


def _inflate(capture: Capture, index: int, packed: bytes, small: dict[bytes, bytes]) -> bytes:
    if packed in small:
        return small[packed]
    try:
        unpacker = zlib.decompressobj(GZIP_WBITS)
        raw = unpacker.decompress(packed)
        if not unpacker.eof or unpacker.unused_data:
            raise zlib.error("member not complete")
    except zlib.error as exc:
        raise MbrescueError(f"{capture.path}: region chunk {index} is corrupt ({exc})") from exc
    if len(packed) <= SMALL_MEMBER_BYTES and len(small) < 8:
        small[packed] = raw
    return raw


def _overlay(
    chunk: bytes | memoryview, chunk_offset: int, writes: list[Write]
) -> tuple[bytes | memoryview, list[tuple[int, bytes]]]:
    """The chunk with the planned writes that fall into it patched in, plus the
    original bytes they replaced (offset, bytes) for the verification."""
    end = chunk_offset + len(chunk)
    patched: bytearray | None = None
    originals: list[tuple[int, bytes]] = []
    for write in writes:
        lo, hi = max(write.offset_bytes, chunk_offset), min(write.end_bytes, end)
        if lo >= hi:
            continue
        if patched is None:
            patched = bytearray(chunk)
        originals.append((lo, bytes(chunk[lo - chunk_offset : hi - chunk_offset])))
        patched[lo - chunk_offset : hi - chunk_offset] = write.data[
            lo - write.offset_bytes : hi - write.offset_bytes
        ]
    return (bytes(patched) if patched is not None else chunk), originals


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, plan: Plan) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            written = os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise MbrescueError(
                f"write error on {plan.target.path} at sector "
                f"{(offset + done) // plan.sector_bytes}: {exc.strerror}"
            ) from exc
        if written <= 0:
            raise MbrescueError(
                f"write error on {plan.target.path} at sector "
                f"{(offset + done) // plan.sector_bytes}: nothing written"
            )
        done += written


def _pwritev_all(fd: int, buffers: list[bytes | memoryview], offset: int, plan: Plan) -> None:
    total = sum(len(b) for b in buffers)
    try:
        written = os.pwritev(fd, buffers, offset)
    except OSError:
        written = 0  # the plain path below names the failing sector
    if written < total:
        # A short write (or an error): finish piece by piece, which reports the sector.
        _pwrite_all(fd, b"".join(buffers)[written:], offset + written, plan)


def open_target(plan: Plan) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC
    if plan.target.kind == "block":
        # O_EXCL on a block device fails while the kernel holds it (mounted, RAID, LVM).
        flags |= os.O_EXCL
    try:
        return os.open(plan.target.path, flags)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise MbrescueError(
                f"{plan.target.path} is in use (mounted or held by the kernel)"
            ) from exc
        raise MbrescueError(f"cannot open {plan.target.path} for writing: {exc.strerror}") from exc


def write_plan(fd: int, capture: Capture, plan: Plan, console: Console,
               originals: list[tuple[int, bytes]]) -> float:
    """The region with its in-region adjustments, then everything past it; fsync. Seconds."""
    progress = console.progress("writing", plan.region_bytes)
    in_region = [w for w in plan.writes if w.offset_bytes < plan.region_bytes]
    offset = 0
    # One thread on purpose: a reader thread measured slower here (fresh buffers handed
    # between threads), and stored chunks need no inflating anyway.
    for group in region_groups(capture, WRITE_BLOCK_BYTES):
        buffers: list[bytes | memoryview] = []
        at = offset
        for piece in group:
            data, replaced = _overlay(piece, at, in_region)
            originals.extend(replaced)
            buffers.append(data)
            at += len(piece)
        length = at - offset
        _pwritev_all(fd, buffers, offset, plan)
        offset += length
        progress.advance(length)
    if offset != plan.region_bytes:
        raise MbrescueError(
            f"the capture's region ended after {offset} of {plan.region_bytes} bytes"
        )
    for write in plan.writes:
        if write.end_bytes > plan.region_bytes:
            start = max(write.offset_bytes, plan.region_bytes)
            _pwrite_all(fd, write.data[start - write.offset_bytes :], start, plan)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise MbrescueError(f"flushing {plan.target.path} failed: {exc.strerror}") from exc
    return progress.finish()


# --- verifying -------------------------------------------------------------------------


class ReadBack:
    """Reads the target from the device itself: O_DIRECT into an aligned buffer, or, where
    the file system refuses O_DIRECT (tmpfs), after dropping the cached pages."""

    def __init__(self, path: str, kind: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if kind == "block":
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, BLKFLSBUF, 0)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.method = "page cache dropped (posix_fadvise)"
        self.direct_fd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self.direct_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            self.method = "O_DIRECT"
        # mmap memory is page-aligned, which O_DIRECT needs.
        self.buffer = mmap.mmap(-1, READ_BLOCK_BYTES + DIRECT_ALIGN)

    def close(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
        os.close(self.fd)
        self.buffer.close()

    def _direct(self, offset: int, length: int) -> bytes | None:
        assert self.direct_fd is not None
        start = offset - offset % DIRECT_ALIGN
        want = -(-(offset + length - start) // DIRECT_ALIGN) * DIRECT_ALIGN
        view = memoryview(self.buffer)[:want]
        try:
            got = os.preadv(self.direct_fd, [view], start)
        except OSError as exc:
            view.release()
            if exc.errno == errno.EINVAL:
                return None
            raise
        data = bytes(view[offset - start : min(got, offset - start + length)])
        view.release()
        return data

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (at most READ_BLOCK_BYTES at a time)."""
        if length > READ_BLOCK_BYTES:
            return b"".join(
                self.read(at, min(READ_BLOCK_BYTES, offset + length - at))
                for at in range(offset, offset + length, READ_BLOCK_BYTES)
            )
        data: bytes | None = None
        try:
            if self.direct_fd is not None:
                data = self._direct(offset, length)
                if data is None:
                    os.close(self.direct_fd)
                    self.direct_fd = None
                    self.method = "page cache dropped (posix_fadvise)"
            if data is None:
                data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise MbrescueError(
                f"read error on {self.path} at byte {offset} while verifying: {exc.strerror}"
            ) from exc
        if len(data) != length:
            raise MbrescueError(f"{self.path} ended at byte {offset + len(data)} while verifying")
        return data


def verify_plan(capture: Capture, plan: Plan, console: Console,
                originals: list[tuple[int, bytes]]) -> tuple[float, str]:
    """Read the region back and hash it with the adjusted ranges put back to what the
    capture holds there: that must give the capture's SHA-256. The adjusted ranges and the
    writes past the region must read back as planned; then the tables are re-parsed."""
    progress = console.progress("verifying", plan.region_bytes)
    reader = ReadBack(plan.target.path, plan.target.kind)
    try:
        digest = hashlib.sha256()
        replaced = sorted(originals)
        for offset in range(0, plan.region_bytes, READ_BLOCK_BYTES):
            length = min(READ_BLOCK_BYTES, plan.region_bytes - offset)
            data = reader.read(offset, length)
            at = offset
            for lo, original in replaced:
                hi = lo + len(original)
                if hi <= offset or lo >= offset + length:
                    continue
                digest.update(data[at - offset : lo - offset])
                digest.update(original)
                at = hi
            digest.update(data[at - offset :])
            progress.advance(length)
        seconds = progress.finish()
        if digest.hexdigest() != capture.region["sha256"]:
            raise MbrescueError(
                f"verification failed: the region read back from {plan.target.path} does not "
                f"match the capture's SHA-256"
            )
        for write in plan.writes:
            if reader.read(write.offset_bytes, len(write.data)) != write.data:
                raise MbrescueError(
                    f"verification failed: the {write.what} at sector "
                    f"{write.offset_bytes // plan.sector_bytes} of {plan.target.path} "
                    "reads back wrong"
                )
        _check_tables(capture, plan, reader)
        return seconds, reader.method
    finally:
        reader.close()


def _check_tables(capture: Capture, plan: Plan, reader: ReadBack) -> None:
    """Re-parse what was adjusted, with the same readers `mbrescue inspect` uses."""
    disk_sectors = plan.target.size_bytes // plan.sector_bytes
    if plan.table == "gpt":
        table = gpt.read_gpt(reader.read, disk_sectors, plan.sector_bytes)
        if not (table.primary_valid and table.backup_valid) or table.backup_lba != disk_sectors - 1:
            raise MbrescueError(
                f"verification failed: the GPT on {plan.target.path} is not sound "
                f"({'; '.join(table.warnings) or 'backup misplaced'})"
            )
        ends = {e.number: e.last_lba for e in table.entries}
        for number, size in plan.shrunk.items():
            first = next(e.first_lba for e in table.entries if e.number == number)
            if ends[number] != first + size - 1:
                raise MbrescueError(f"verification failed: partition {number} was not shrunk")
    else:
        # The whole MBR and EBR chain as the kernel will read it: every captured partition
        # back where it was, the shrunk ones with their new size.
        layout = read_layout(plan.target.path, plan.sector_bytes if plan.target.kind == "file"
                             else None)
        found_parts = {p.number: p for p in layout.partitions}
        for part in capture.manifest["layout"]["partitions"]:
            number = part["number"]
            got = found_parts.get(number)
            size = plan.shrunk.get(number, part["size_sectors"])
            if got is None or got.start_lba != part["start_lba"] or (
                got.size_sectors != size and not got.is_extended
            ):
                raise MbrescueError(
                    f"verification failed: partition {number} on {plan.target.path} is not "
                    f"where the plan put it"
                )
    for record in capture.manifest.get("swap") or []:
        offset = int(record["start_lba"]) * plan.sector_bytes
        found = probe(reader.fd, offset, 1 << 20)
        if found is None or found.type != "swap" or found.uuid != record.get("uuid") or (
            (found.label or None) != (record.get("label") or None)
        ):
            raise MbrescueError(
                f"verification failed: swap partition {record['partition']} does not read back "
                f"with label {record.get('label')} and UUID {record.get('uuid')}"
            )


def reread_partitions(plan: Plan, console: Console) -> None:
    if plan.target.kind != "block":
        return
    fd = os.open(plan.target.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKRRPART, 0)
    except OSError as exc:
        console.say(
            f"mbrescue: warning: the kernel did not re-read the partition table of "
            f"{plan.target.path} ({exc.strerror}); it will at the next boot"
        )
    finally:
        os.close(fd)


def execute(capture: Capture, plan: Plan, console: Console) -> Stats:
    """Write, adjust, verify, re-read; the plan was shown and agreed to."""
    reason = busy_reason(plan.target)
    if reason:
        raise MbrescueError(f"{plan.target.path} cannot be written: {reason}")
    originals: list[tuple[int, bytes]] = []
    fd = open_target(plan)
    try:
        write_seconds = write_plan(fd, capture, plan, console, originals)
    finally:
        os.close(fd)
    verify_seconds, method = verify_plan(capture, plan, console, originals)
    reread_partitions(plan, console)
    return Stats(write_seconds, verify_seconds, plan.region_bytes, method)


# --- the whole job -----------------------------------------------------------------------


def _choose(console: Console, offered: list[Candidate]) -> Candidate:
    console.say("Disks that can take the region:")
    for index, candidate in enumerate(offered, 1):
        console.say(f"  {index}) {disk_title(candidate.disk)} - {candidate.why}")
    while True:
        answer = console.ask(f"Restore onto which disk? Type its number (1..{len(offered)}), "
                             "or q to quit: ")
        if answer is None or answer.strip().lower() in ("q", "quit"):
            raise MbrescueError("aborted, nothing written")
        if answer.strip().isdigit() and 1 <= int(answer.strip()) <= len(offered):
            return offered[int(answer.strip()) - 1]
        console.say(f"'{answer.strip()}' is not one of the numbers shown.")


def rescue_candidates(capture: Capture, head: RegionHead, medium: str | None
                      ) -> list[tuple[Candidate, Plan | None]]:
    """Every disk the kernel sees, ranked, each with its plan or the reason it is refused."""
    found: list[tuple[Candidate, Plan | None]] = []
    for listed in list_disks():
        try:
            disk = listed if listed.is_cdrom else disk_info(listed.path)
            disk.is_cdrom = disk.is_cdrom or listed.is_cdrom
        except MbrescueError as exc:
            found.append((Candidate(listed, 9, "", str(exc)), None))
            continue
        order, why = rank(disk, capture.manifest["source"])
        candidate = Candidate(disk, order, why, base_refusal(disk, medium))
        plan = None
        if candidate.refusal is None:
            try:
                plan = plan_restore(capture, head, disk)
            except MbrescueError as exc:
                candidate.refusal = str(exc)
        found.append((candidate, plan))
    found.sort(key=lambda item: (item[0].rank, item[0].disk.size_bytes, item[0].disk.path))
    return found


def restore(
    capture_path: str,
    target: str | None,
    *,
    console: Console,
    assume_yes: bool = False,
    rescue: bool = False,
    medium: str | None = None,
    sector_bytes: int | None = None,
    switches: Switches | None = None,
    options_path: str = OPTIONS_PATH,
) -> int:
    """Restore the capture onto `target` (CLI) or onto a disk chosen in the rescue system.

    Returns 0 when the restore completed and verified; raises MbrescueError (one line)
    for a refusal, an abort or a failure. `rescue=True` reads the kernel command line
    switches (unless given) and offers every disk but the boot medium.
    """
    if rescue and switches is None:
        switches = read_switches()
    switches = switches or Switches()
    medium = medium or switches.medium
    capture = Capture.open(capture_path)
    show_capture(console, capture)
    console.say("mbrescue: checking the capture's checksums ...")
    capture.verify()
    console.say(f"mbrescue: capture verified (region SHA-256 {capture.region['sha256'][:16]}...)")
    head = RegionHead(capture)
    unambiguous = False
    if target is not None:
        disk = disk_info(target, sector_bytes)
        refusal = base_refusal(disk, medium)
        if refusal:
            raise MbrescueError(f"refusing {disk.path}: {refusal}")
        plan = plan_restore(capture, head, disk)
        unambiguous = True
    else:
        found = rescue_candidates(capture, head, medium)
        wanted = switches.target
        if wanted:
            chosen = [item for item in found if matches(item[0].disk, wanted)]
            if not chosen:
                names = ", ".join(c.disk.path for c, _ in found) or "none"
                raise MbrescueError(f"mbrescue.target={wanted} matches no disk (disks: {names})")
            candidate, maybe_plan = chosen[0]
            if candidate.refusal or maybe_plan is None:
                raise MbrescueError(f"refusing {candidate.disk.path}: {candidate.refusal}")
            plan = maybe_plan
            unambiguous = True
        else:
            for candidate, _ in found:
                if candidate.refusal:
                    console.say(f"  not offered: {candidate.disk.path}: {candidate.refusal}")
            offered = [(c, p) for c, p in found if p is not None and not c.refusal]
            if not offered:
                raise MbrescueError("no disk can take the region (see the reasons above)")
            if len(offered) == 1:
                plan = offered[0][1]  # type: ignore[assignment]
                unambiguous = True
            else:
                pick = _choose(console, [c for c, _ in offered])
                plan = next(p for c, p in offered if c is pick)  # type: ignore[misc]
    show_plan(console, plan)
    proceed = assume_yes
    if not proceed and switches.unattended:
        if not unattended_allowed(options_path):
            console.say("mbrescue: mbrescue.unattended=1 ignored: this rescue system was built "
                        "without the unattended opt-in")
        elif not unambiguous:
            console.say("mbrescue: mbrescue.unattended=1 ignored: more than one disk could be "
                        "the target")
        else:
            console.say(
                "mbrescue: unattended restore (mbrescue.unattended=1, allowed by the build)"
            )
            proceed = True
    if not proceed:
        answer = console.ask(
            f"Type {CONFIRM_WORD} to write {plan.target.path} "
            f"(sectors 0..{plan.region_sectors - 1} are overwritten): "
        )
        # Exactly the word: "y", "YES" or " yes" are not an informed consent to overwrite.
        if answer != CONFIRM_WORD:
            raise MbrescueError("aborted, nothing written")
    stats = execute(capture, plan, console)
    console.say(
        f"mbrescue: wrote {plan.region_bytes} bytes in {stats.write_seconds:.2f} s "
        f"({stats.write_mb_s:.1f} MB/s), verified in {stats.verify_seconds:.2f} s "
        f"({stats.verify_mb_s:.1f} MB/s, {stats.read_back})"
    )
    for line in plan.adjusted:
        console.say("mbrescue: adjusted: " + line)
    for line in plan.recreated:
        console.say("mbrescue: recreated: " + line)
    console.say(f"mbrescue: restore complete: {plan.target.path} holds the boot region of "
                f"{capture.manifest.get('hostname')}")
    return 0
