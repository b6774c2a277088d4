"""Property tests for the disk-layout parsers: hostile bytes in, a value or MbrescueError out.

Every parser of a disk structure in the runner (sector 0, the EBR chain, GPT headers and
entry arrays, both GPT copies, the superblock probes, the whole `read_layout`, the layout's
JSON form) is fed raw bytes and, more usefully, structures built the way the real ones are
and then damaged: absurd entry counts and sizes with their CRCs fixed up so the parser goes
past the CRC check, links that loop or point anywhere, flipped bytes.

The property is the runner's contract with a user: a result, or one `MbrescueError` line.
Every call runs under a time guard (SIGALRM, a hang fails the example) and a tracemalloc
peak limit, and the in-memory disks refuse a read larger than a GPT entry array may be or
past the disk's end (a parser must check a count before it reads by it). The budget is the
"ci" profile in conftest.py: fixed, derandomized, reproducible.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import tempfile
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.runner import gpt, mbr
from builder.runner.errors import MbrescueError
from builder.runner.layout import Layout, read_layout
from builder.runner.probe import probe

T = TypeVar("T")

CALL_SECONDS = 5.0  # one parser call; the real ones take milliseconds
MEMORY_BYTES = 64 << 20  # peak Python allocation of one call
MAX_READ_BYTES = gpt.MAX_ENTRIES_BYTES  # nothing on a disk's tables is bigger
FILE_BYTES = 1 << 43  # a sparse image file larger than this is refused by ext4 (16 TiB)
LINUX_FS_GUID = "0fc63daf-8483-4772-8e79-3d69d8477de4"
# The profile's budget, times 4 for the parsers that take milliseconds per example.
MORE = settings(max_examples=4 * settings.default.max_examples)
SLOW = settings(
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ]
)


class Hang(AssertionError):
    pass


@contextmanager
def contained(seconds: float = CALL_SECONDS, memory_bytes: int = MEMORY_BYTES) -> Iterator[None]:
    """Fail the example when the body runs longer than `seconds` or allocates too much."""

    def alarm(signum: int, frame: object) -> None:
        raise Hang(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        tracemalloc.stop()
    assert peak <= memory_bytes, f"peak allocation {peak} bytes"


def outcome(call: Callable[[], T]) -> T | MbrescueError:
    """The call's result, or its MbrescueError; any other exception fails the example."""
    with contained():
        try:
            return call()
        except MbrescueError as error:
            message = str(error)
            assert message and "\n" not in message, repr(message)
            return error


class SparseDisk:
    """A disk image in memory: a size and the bytes written to it, zeros elsewhere.

    `read` is the runner's ReadFn; it fails the example (not with MbrescueError) when asked
    for more than any table can hold or for bytes past the end, since the parser knows the
    disk's size and must check before it reads.
    """

    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.patches: list[tuple[int, bytes]] = []
        self.bytes_read = 0

    def put(self, offset: int, data: bytes) -> None:
        if 0 <= offset < self.size_bytes:
            self.patches.append((offset, bytes(data[: self.size_bytes - offset])))

    def content(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for start, data in self.patches:
            low, high = max(start, offset), min(start + len(data), offset + length)
            if low < high:
                out[low - offset : high - offset] = data[low - start : high - start]
        return bytes(out)

    def read(self, offset: int, length: int) -> bytes:
        assert 0 <= length <= MAX_READ_BYTES, f"a read of {length} bytes was asked for"
        assert 0 <= offset and offset + length <= self.size_bytes, (
            f"a read of {length} bytes at {offset} runs past the disk's end ({self.size_bytes})"
        )
        self.bytes_read += length
        return self.content(offset, length)

    def write_to(self, path: Path) -> None:
        with open(path, "wb") as handle:
            handle.truncate(self.size_bytes)
            for start, data in self.patches:
                handle.seek(start)
                handle.write(data)


# --- strategies -------------------------------------------------------------------------


def uint(bits: int) -> st.SearchStrategy[int]:
    """Unsigned values of a field, biased towards the edges where parsers break."""
    top = (1 << bits) - 1
    return st.one_of(
        st.integers(0, 70),
        st.sampled_from([top, top >> 1, (top >> 1) + 1, 1 << (bits // 2)]),
        st.integers(0, top),
    )


def near(value: int, bits: int = 64) -> st.SearchStrategy[int]:
    """A value at or next to `value` (an LBA near the disk's end, say), or any other."""
    top = (1 << bits) - 1
    return st.one_of(
        st.integers(max(0, value - 3), min(top, value + 3)),
        uint(bits),
    )


MBR_TYPES = st.one_of(st.sampled_from([0x00, 0x05, 0x0F, 0x85, 0x83, 0x82, 0xEE, 0x0C]), uint(8))


@st.composite
def mbr_entries(draw: st.DrawFn, disk_sectors: int, part_type: int | None = None) -> bytes:
    status = draw(st.one_of(st.sampled_from([0x00, 0x80]), uint(8)))
    kind = draw(MBR_TYPES) if part_type is None else part_type
    start = draw(st.one_of(st.integers(0, max(0, disk_sectors - 1)), uint(32)))
    # An msdos entry holds 32-bit fields: a disk past 2 TiB cannot be described to its end.
    size = draw(st.one_of(st.integers(0, min(0xFFFFFFFF, max(0, disk_sectors - start))),
                          uint(32)))
    chs = draw(st.binary(min_size=6, max_size=6))
    return struct.pack("<B3sB3sII", status, chs[:3], kind, chs[3:], start, size)


@st.composite
def mbr_sectors(draw: st.DrawFn, disk_sectors: int, entries: list[bytes] | None = None) -> bytes:
    boot = draw(st.one_of(st.just(bytes(446)), st.binary(min_size=446, max_size=446)))
    if entries is None:
        entries = [draw(mbr_entries(disk_sectors)) for _ in range(4)]
    signature = draw(st.sampled_from([mbr.BOOT_SIGNATURE] * 5 + [b"\0\0", b"\xaa\x55"]))
    return boot + b"".join(entries) + signature


@st.composite
def ebr_chains(
    draw: st.DrawFn, extended_start: int, extended_size: int, sector_bytes: int = 512
) -> list[tuple[int, bytes]]:
    """(LBA, EBR sector) pairs: a chain as fdisk lays it, with links that may loop or stray."""
    count = draw(st.integers(0, 6))
    inside = st.integers(extended_start, extended_start + max(extended_size, 1) + 2)
    lbas = [extended_start] + [draw(st.one_of(inside, uint(32))) for _ in range(count - 1)]
    records = []
    for position, lba in enumerate(lbas):
        logical = draw(mbr_entries(max(extended_size, 1)))
        if position + 1 < len(lbas):
            target = draw(st.sampled_from([lbas[position + 1], *lbas]))  # on, or a loop
            relative = target - extended_start
            if relative < 0 or (draw(st.booleans()) and draw(st.booleans())):
                relative = draw(uint(32))
            size = draw(st.one_of(st.just(extended_size), uint(32)))
            link = mbr.encode_entry(0, draw(st.sampled_from([0x05, 0x0F, 0x85])), relative, size)
        else:
            link = bytes(16)
        entries = [logical, link, bytes(16), bytes(16)]
        if draw(st.booleans()):
            entries = draw(st.permutations(entries))
        sector = draw(mbr_sectors(extended_size, entries))
        records.append((lba, sector.ljust(sector_bytes, b"\0")))
    return records


@st.composite
def flips(draw: st.DrawFn, limit_bytes: int) -> list[tuple[int, int]]:
    """A few (offset, byte) damages inside the first `limit_bytes`."""
    return draw(st.lists(st.tuples(st.integers(0, max(0, limit_bytes - 1)), uint(8)), max_size=4))


HEADER_FIELDS = {  # name: (offset, struct format) in a GPT header
    "revision": (8, "<I"),
    "header_bytes": (12, "<I"),
    "my_lba": (24, "<Q"),
    "alternate_lba": (32, "<Q"),
    "first_usable_lba": (40, "<Q"),
    "last_usable_lba": (48, "<Q"),
    "entries_lba": (72, "<Q"),
    "entry_count": (80, "<I"),
    "entry_bytes": (84, "<I"),
    "entries_crc32": (88, "<I"),
}
ENTRY_COUNTS = st.one_of(
    st.sampled_from([128, 4, 1, 0, 32768, 32769, 1 << 31, (1 << 32) - 1]), uint(32)
)
ENTRY_SIZES = st.one_of(
    st.sampled_from([128, 128, 256, 0, 8, 64, 92, 127, 129, 132, 136, 4096, 1 << 31]), uint(32)
)


@st.composite
def gpt_entries(draw: st.DrawFn, disk_sectors: int) -> bytes:
    kind = draw(
        st.one_of(st.just(gpt.parse_guid(LINUX_FS_GUID)), st.binary(min_size=16, max_size=16))
    )
    unique = draw(st.binary(min_size=16, max_size=16))
    first = draw(st.one_of(st.integers(0, disk_sectors + 2), uint(64)))
    last = draw(st.one_of(st.integers(max(0, first - 2), first + 64), near(disk_sectors), uint(64)))
    attributes = draw(uint(64))
    name = draw(st.one_of(st.just(bytes(72)), st.binary(min_size=72, max_size=72)))
    return struct.pack(
        gpt.ENTRY_FORMAT, kind, unique, first, min(last, (1 << 64) - 1), attributes, name
    )


def place_gpt_copy(
    draw: st.DrawFn,
    disk: SparseDisk,
    sector_bytes: int,
    header_lba: int,
    fields: dict[str, int],
    entries: list[bytes],
) -> None:
    """One header and its entry array on `disk`: fields maybe overridden, CRCs made right."""
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(HEADER_FIELDS)))
        fields[name] = draw(near(fields[name], 8 * struct.calcsize(HEADER_FIELDS[name][1])))
    count, size, entries_lba = fields["entry_count"], fields["entry_bytes"], fields["entries_lba"]
    total = count * size
    array = bytearray(min(total, MAX_READ_BYTES + 4096))
    for index, entry in enumerate(entries):
        if size and index * size + 128 <= len(array):
            array[index * size : index * size + 128] = entry
    disk.put(entries_lba * sector_bytes, array)
    # The entry CRC as the header's fields describe the array, so the parser goes past it.
    if total <= 2 * MAX_READ_BYTES and (entries_lba * sector_bytes + total) <= disk.size_bytes:
        fields["entries_crc32"] = zlib.crc32(disk.content(entries_lba * sector_bytes, total))
    header = bytearray(sector_bytes)
    header[:8] = gpt.SIGNATURE
    header[56:72] = draw(st.binary(min_size=16, max_size=16))  # disk GUID
    for name, value in fields.items():
        offset, fmt = HEADER_FIELDS[name]
        struct.pack_into(fmt, header, offset, value)
    sealed = gpt.encode_header(bytes(header)) if draw(st.integers(0, 9)) else bytes(header)
    disk.put(header_lba * sector_bytes, sealed)


@st.composite
def gpt_disks(draw: st.DrawFn, max_bytes: int = 1 << 52) -> tuple[SparseDisk, int]:
    """(disk, sector bytes): a protective MBR and two GPT copies, made right then damaged."""
    sector_bytes = draw(st.sampled_from([512, 512, 4096]))
    disk_sectors = draw(st.one_of(st.integers(3, 300), st.integers(300, max_bytes // sector_bytes)))
    disk = SparseDisk(disk_sectors * sector_bytes)
    last_lba = disk_sectors - 1
    count = draw(ENTRY_COUNTS)
    size = draw(ENTRY_SIZES)
    entries_sectors = max(1, min(-(-count * size // sector_bytes), 1 << 40))
    entries = draw(st.lists(gpt_entries(disk_sectors), max_size=4))
    protective = mbr.encode_entry(0, 0xEE, 1, min(last_lba, 0xFFFFFFFF))
    disk.put(0, draw(mbr_sectors(disk_sectors, [protective, *[bytes(16)] * 3])))
    common = {
        "revision": 0x10000,
        "header_bytes": 92,
        "first_usable_lba": 2 + entries_sectors,
        "last_usable_lba": max(0, last_lba - entries_sectors - 1),
        "entry_count": count,
        "entry_bytes": size,
        "entries_crc32": 0,
    }
    if draw(st.integers(0, 9)):
        primary = {**common, "my_lba": 1, "alternate_lba": last_lba, "entries_lba": 2}
        place_gpt_copy(draw, disk, sector_bytes, 1, primary, entries)
    if draw(st.integers(0, 9)):
        backup_entries_lba = max(0, last_lba - entries_sectors)
        backup = {
            **common,
            "my_lba": last_lba,
            "alternate_lba": 1,
            "entries_lba": backup_entries_lba,
        }
        place_gpt_copy(draw, disk, sector_bytes, last_lba, backup, entries)
    for offset, value in draw(flips(min(disk.size_bytes, 64 * sector_bytes))):
        disk.put(offset, bytes([value]))
    for offset, value in draw(flips(64 * sector_bytes)):
        disk.put(disk.size_bytes - 1 - offset, bytes([value]))
    return disk, sector_bytes


@st.composite
def superblocks(draw: st.DrawFn) -> tuple[int, bytes]:
    """(offset inside the partition, bytes): a file-system or swap signature with odd fields."""
    kind = draw(st.sampled_from(["ext", "xfs", "swap", "vfat"]))
    if kind == "ext":
        block = bytearray(
            draw(st.one_of(st.just(bytes(1024)), st.binary(min_size=1024, max_size=1024)))
        )
        struct.pack_into("<H", block, 0x38, 0xEF53)
        struct.pack_into("<I", block, 0x18, draw(uint(32)))  # log block size
        struct.pack_into("<III", block, 0x5C, draw(uint(32)), draw(uint(32)), draw(uint(32)))
        return 1024, bytes(block)
    if kind == "xfs":
        block = bytearray(draw(st.binary(min_size=512, max_size=512)))
        block[:4] = b"XFSB"
        return 0, bytes(block)
    if kind == "swap":
        page = draw(st.sampled_from([4096, 8192, 16384, 65536, 2048]))
        block = bytearray(page)
        block[1024:1036] = struct.pack(
            "<III", draw(st.sampled_from([1, 0, 2])), draw(uint(32)), draw(uint(32))
        )
        block[1036:1068] = draw(st.binary(min_size=32, max_size=32))
        block[page - 10 :] = draw(st.sampled_from([b"SWAPSPACE2", b"SWAP-SPACE", b"\0S1SUSPEND"]))
        return 0, bytes(block)
    block = bytearray(draw(st.one_of(st.just(bytes(512)), st.binary(min_size=512, max_size=512))))
    struct.pack_into(
        "<HBHBHHBH",
        block,
        0x0B,
        draw(st.sampled_from([512, 4096, 1024, 0, 513])),  # bytes per sector
        draw(st.sampled_from([1, 8, 128, 0, 3])),  # sectors per cluster
        draw(uint(16)),  # reserved sectors
        draw(st.sampled_from([1, 2, 0, 255])),
        draw(uint(16)),  # root entries
        draw(uint(16)),  # total sectors (16-bit)
        draw(st.sampled_from([0xF8, 0xF0, 0x00])),
        draw(st.one_of(st.just(0), uint(16))),  # FAT16 sectors per FAT; 0 means FAT32
    )
    struct.pack_into("<II", block, 0x20, draw(uint(32)), draw(uint(32)))  # total32, FAT32 size
    struct.pack_into("<I", block, 0x2C, draw(uint(32)))  # FAT32 root cluster
    block[0x26] = block[0x42] = 0x29
    block[510:512] = b"\x55\xaa"
    return 0, bytes(block)


@st.composite
def msdos_disks(draw: st.DrawFn, max_bytes: int = FILE_BYTES) -> tuple[SparseDisk, int]:
    """(disk, sector bytes): sector 0, EBR chains, superblocks at the partitions' starts."""
    sector_bytes = draw(st.sampled_from([512, 512, 512, 4096]))
    disk_sectors = draw(st.one_of(st.integers(1, 4096), st.integers(1, max_bytes // sector_bytes)))
    disk = SparseDisk(disk_sectors * sector_bytes)
    entries = [draw(mbr_entries(disk_sectors)) for _ in range(4)]
    disk.put(0, draw(mbr_sectors(disk_sectors, entries)))
    starts = []
    for raw in entries:
        entry = mbr.parse_entry(raw, 0)
        starts.append(entry.start_lba)
        if entry.is_extended:
            for lba, sector in draw(ebr_chains(entry.start_lba, entry.size_sectors, sector_bytes)):
                disk.put(lba * sector_bytes, sector)
                starts.append(lba + mbr.parse_entry(sector[0x1BE:0x1CE], 0).start_lba)
    for start in draw(st.lists(st.sampled_from(starts), max_size=3)):
        offset, block = draw(superblocks())
        disk.put(start * sector_bytes + offset, block)
    for offset, value in draw(flips(min(disk.size_bytes, 8 * sector_bytes))):
        disk.put(offset, bytes([value]))
    return disk, sector_bytes


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


# --- MBR and the EBR chain --------------------------------------------------------------


@MORE
@given(st.binary(max_size=1100))
def test_parse_mbr_any_bytes(raw: bytes) -> None:
    result = outcome(lambda: mbr.parse_mbr(raw))
    if isinstance(result, mbr.Mbr):
        assert len(result.entries) == 4 and len(result.boot_code) == 440


@given(st.data())
def test_parse_mbr_structured(data: st.DataObject) -> None:
    sector = data.draw(mbr_sectors(data.draw(uint(32))))
    result = outcome(lambda: mbr.parse_mbr(sector))
    assert isinstance(result, mbr.Mbr)
    index = data.draw(st.integers(-1, 4))
    size = data.draw(st.one_of(st.integers(-1, 4096), uint(33)))
    outcome(lambda: mbr.resize_entry(sector, index, size))


@SLOW
@given(st.data())
def test_walk_ebr_chain_structured(data: st.DataObject) -> None:
    extended_start = data.draw(st.one_of(st.integers(0, 4096), uint(32)))
    extended_size = data.draw(st.one_of(st.integers(0, 4096), uint(32)))
    records = dict(data.draw(ebr_chains(extended_start, extended_size)))
    disk_sectors = data.draw(st.one_of(st.just(extended_start + extended_size), uint(33)))
    reads: list[int] = []

    def read_sector(lba: int) -> bytes:
        reads.append(lba)
        if lba >= disk_sectors:
            raise MbrescueError(f"an EBR link points to sector {lba}, past the disk's end")
        return records.get(lba, bytes(512))

    result = outcome(lambda: mbr.walk_ebr_chain(read_sector, extended_start, extended_size))
    assert len(reads) <= mbr.MAX_LOGICAL + 1 and len(set(reads)) == len(reads)
    assert all(extended_start <= lba < extended_start + extended_size for lba in reads)
    if isinstance(result, list):
        assert [p.number for p in result] == list(range(5, 5 + len(result)))


@given(
    st.dictionaries(st.integers(0, 64), st.binary(max_size=600), max_size=8),
    st.integers(0, 64),
    uint(32),
)
def test_walk_ebr_chain_any_reader(sectors: dict[int, bytes], start: int, size: int) -> None:
    """A reader that returns whatever it likes (short sectors, garbage) for any LBA."""
    result = outcome(
        lambda: mbr.walk_ebr_chain(lambda lba: sectors.get(lba % 65, b""), start, size)
    )
    assert isinstance(result, list | MbrescueError)


# --- GPT --------------------------------------------------------------------------------


@MORE
@given(st.binary(max_size=700))
def test_parse_header_any_bytes(raw: bytes) -> None:
    outcome(lambda: gpt.parse_header(raw))


@MORE
@given(st.binary(max_size=4096), ENTRY_COUNTS, ENTRY_SIZES)
def test_parse_entries_any_shape(raw: bytes, count: int, size: int) -> None:
    result = outcome(lambda: gpt.parse_entries(raw, count, size))
    if isinstance(result, list):
        assert len(result) <= count and all(1 <= e.number <= count for e in result)


GUID_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789abcdefABCDEF-{} \t\ng", min_size=30, max_size=40),
)


@MORE
@given(GUID_TEXT)
def test_parse_guid_any_text(text: str) -> None:
    result = outcome(lambda: gpt.parse_guid(text))
    if isinstance(result, bytes):
        assert len(result) == 16
        assert gpt.parse_guid(gpt.format_guid(result)) == result


@pytest.mark.parametrize("text", [" " * 32, "00 " * 10 + "00", "0" * 30 + "\n0"])
def test_parse_guid_refuses_whitespace(text: str) -> None:
    """bytes.fromhex skips whitespace: 32 characters are not always 16 bytes."""
    with pytest.raises(MbrescueError, match="not a GUID"):
        gpt.parse_guid(text)


@SLOW
@given(gpt_disks())
def test_read_gpt_damaged(case: tuple[SparseDisk, int]) -> None:
    disk, sector_bytes = case
    disk_sectors = disk.size_bytes // sector_bytes
    result = outcome(lambda: gpt.read_gpt(disk.read, disk_sectors, sector_bytes))
    # Two headers and two arrays at most (each copy checked once, the backup maybe twice).
    assert disk.bytes_read <= 3 * (sector_bytes + MAX_READ_BYTES)
    if isinstance(result, gpt.Gpt):
        header = result.header
        assert len(result.entries_raw) == header.entry_count * header.entry_bytes <= MAX_READ_BYTES
        assert header.entry_bytes >= 128 and header.entry_bytes % 8 == 0
        assert zlib.crc32(result.entries_raw) == header.entries_crc32
        assert len(result.entries) <= header.entry_count
        assert result.primary_valid or result.backup_valid
        if result.backup_valid:
            assert result.backup_lba != 1, "the primary counted as its own backup"


@SLOW
@given(gpt_disks(), st.one_of(st.integers(-1, 300), uint(40)))
def test_relocate_damaged(case: tuple[SparseDisk, int], new_disk_sectors: int) -> None:
    """relocate takes the captured header and array as bytes: it must check them itself."""
    disk, sector_bytes = case
    header = disk.content(sector_bytes, sector_bytes)
    fields = struct.unpack_from(gpt.HEADER_FORMAT, header)
    entries_lba, count, size = fields[10], fields[11], fields[12]
    total = min(count * size, 2 * MAX_READ_BYTES)
    entries = disk.content(min(entries_lba * sector_bytes, disk.size_bytes), total)
    sector0 = disk.content(0, sector_bytes)
    result = outcome(
        lambda: gpt.relocate(header, entries, new_disk_sectors, sector_bytes, mbr_sector=sector0)
    )
    if isinstance(result, list):
        for lba, data in result:
            assert 0 <= lba < new_disk_sectors and len(data) % sector_bytes == 0
            assert lba * sector_bytes + len(data) <= new_disk_sectors * sector_bytes


@given(st.data())
def test_resize_protective_any_sector(data: st.DataObject) -> None:
    old_disk_sectors = data.draw(st.one_of(st.integers(1, 300), uint(32)))
    entries = [data.draw(mbr_entries(old_disk_sectors)) for _ in range(4)]
    slot = data.draw(st.integers(0, 3))
    entries[slot] = data.draw(mbr_entries(old_disk_sectors, part_type=0xEE))
    sector = data.draw(mbr_sectors(old_disk_sectors, entries))
    disk_sectors = data.draw(st.one_of(st.integers(-1, 300), near(old_disk_sectors), uint(40)))
    old_alternate = data.draw(st.one_of(near(old_disk_sectors - 1), uint(64)))
    result = outcome(lambda: gpt.resize_protective(sector, disk_sectors, old_alternate))
    if isinstance(result, bytes):
        assert len(result) == len(sector)


# --- superblock probes and the whole layout ---------------------------------------------


@SLOW
@given(st.data())
def test_probe_any_window(data: st.DataObject) -> None:
    image = bytearray(data.draw(st.integers(0, 70000)))
    for _ in range(data.draw(st.integers(0, 2))):
        offset, block = data.draw(superblocks())
        start = data.draw(st.sampled_from([0, 512, 4096]))
        image[start + offset : start + offset + len(block)] = block
    for offset, value in data.draw(flips(max(1, len(image)))):
        if offset < len(image):
            image[offset] = value
    window_offset = data.draw(st.one_of(st.sampled_from([0, 512, 4096]), st.integers(-1, 80000)))
    window_bytes = data.draw(st.one_of(st.integers(-1, 80000), uint(48)))
    fd = os.memfd_create("fuzz-probe")
    try:
        os.write(fd, image)
        outcome(lambda: probe(fd, window_offset, window_bytes))
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def image_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mbrescue-fuzz-") as name:
        yield Path(name)


def layout_outcome(disk: SparseDisk, sector_bytes: int, image: Path) -> Layout | MbrescueError:
    disk.write_to(image)
    result = outcome(lambda: read_layout(os.fspath(image), sector_bytes))
    # These two guard the runner's own calls: a disk's contents must never reach them.
    assert not str(result).startswith(("bad probe window", "bad read request")), result
    if isinstance(result, Layout):
        json.dumps(result.to_json())  # the manifest's form must exist for whatever was read
        assert Layout.from_json(json.loads(json.dumps(result.to_json()))) == result
    return result


@SLOW
@given(msdos_disks())
def test_read_layout_msdos(image_dir: Path, case: tuple[SparseDisk, int]) -> None:
    disk, sector_bytes = case
    layout_outcome(disk, sector_bytes, image_dir / "msdos.img")


@SLOW
@given(gpt_disks(FILE_BYTES))
def test_read_layout_gpt(image_dir: Path, case: tuple[SparseDisk, int]) -> None:
    disk, sector_bytes = case
    layout_outcome(disk, sector_bytes, image_dir / "gpt.img")


@MORE
@given(st.binary(max_size=3000), st.booleans())
def test_read_layout_raw_bytes(image_dir: Path, raw: bytes, signed: bool) -> None:
    disk = SparseDisk(len(raw))
    disk.put(0, raw)
    if signed and len(raw) >= 512:
        disk.put(510, mbr.BOOT_SIGNATURE)
    layout_outcome(disk, 512, image_dir / "raw.img")


@given(JSON)
def test_layout_from_json_any_value(value: Any) -> None:
    outcome(lambda: Layout.from_json(value))


# --- the cases issue 7 names, as plain examples -------------------------------------------


def small_gpt(entry_count: int = 128, entry_bytes: int = 128) -> tuple[SparseDisk, int]:
    """A 2048-sector GPT disk with one partition; the shape fields as given, CRCs right."""
    disk = SparseDisk(2048 * 512)
    entry = struct.pack(
        gpt.ENTRY_FORMAT, gpt.parse_guid(LINUX_FS_GUID), bytes(range(16)), 40, 1000, 0, bytes(72)
    )
    disk.put(0, bytes(446) + mbr.encode_entry(0, 0xEE, 1, 2047) + bytes(48) + mbr.BOOT_SIGNATURE)
    for header_lba, entries_lba, alternate in ((1, 2, 2047), (2047, 2015, 1)):
        array = bytearray(min(entry_count * entry_bytes, 32 * 512))
        if len(array) >= 128:
            array[:128] = entry
        disk.put(entries_lba * 512, array)
        header = bytearray(512)
        header[:8] = gpt.SIGNATURE
        fields = {
            "revision": 0x10000, "header_bytes": 92, "my_lba": header_lba,
            "alternate_lba": alternate, "first_usable_lba": 34, "last_usable_lba": 2014,
            "entries_lba": entries_lba, "entry_count": entry_count, "entry_bytes": entry_bytes,
            "entries_crc32": zlib.crc32(disk.content(entries_lba * 512, len(array))),
        }  # fmt: skip
        for name, value in fields.items():
            struct.pack_into(HEADER_FIELDS[name][1], header, HEADER_FIELDS[name][0], value)
        disk.put(header_lba * 512, gpt.encode_header(bytes(header)))
    return disk, 512


def test_small_gpt_is_read() -> None:
    disk, sector = small_gpt()
    table = gpt.read_gpt(disk.read, 2048, sector)
    assert table.primary_valid and table.backup_valid and not table.warnings
    assert [(e.number, e.first_lba, e.last_lba) for e in table.entries] == [(1, 40, 1000)]


def test_gpt_entry_size_below_128_is_refused() -> None:
    disk, sector = small_gpt(entry_count=128, entry_bytes=64)
    with pytest.raises(MbrescueError, match="bad entry array shape"):
        gpt.read_gpt(disk.read, 2048, sector)
    with pytest.raises(MbrescueError, match="entry size"):
        gpt.parse_entries(disk.content(1024, 64 * 128), 128, 64)


def test_gpt_absurd_entry_count_reads_nothing_by_it() -> None:
    disk, sector = small_gpt(entry_count=(1 << 32) - 1)
    with pytest.raises(MbrescueError, match="entry array"):
        gpt.read_gpt(disk.read, 2048, sector)
    assert disk.bytes_read <= 4 * 512  # the headers, never the array they declare
    header = disk.content(512, 512)
    with pytest.raises(MbrescueError, match="entry array"):
        gpt.parse_header(header).entries_total_bytes  # noqa: B018 (the check is the point)


def test_relocate_refuses_zero_entry_size_without_looping() -> None:
    """entry_bytes 0 with 2**32-1 entries: an empty array whose CRC is right (crc32(b"") == 0)."""
    disk, sector = small_gpt(entry_count=(1 << 32) - 1, entry_bytes=0)
    header = disk.content(512, 512)
    with contained(), pytest.raises(MbrescueError, match="entry size"):
        gpt.relocate(header, b"", 4096, sector)


def test_ebr_chain_that_loops_is_refused() -> None:
    """Two EBRs whose links point at each other, as a damaged extended partition can."""
    first = bytes(446) + mbr.encode_entry(0, 0x83, 1, 10) + mbr.encode_entry(0, 0x05, 20, 12)
    second = bytes(446) + mbr.encode_entry(0, 0x83, 1, 10) + mbr.encode_entry(0, 0x05, 0, 12)
    sectors = {
        100: first + bytes(32) + mbr.BOOT_SIGNATURE,
        120: second + bytes(32) + mbr.BOOT_SIGNATURE,
    }
    with pytest.raises(MbrescueError, match="loops back to sector 100"):
        mbr.walk_ebr_chain(lambda lba: sectors.get(lba, bytes(512)), 100, 1000)


def test_gpt_entry_ending_before_it_starts_is_a_warning(tmp_path: Path) -> None:
    """A partition whose last LBA is below its first is reported, not a probe error."""
    disk, _ = small_gpt()
    for header_lba, entries_lba in ((1, 2), (2047, 2015)):
        entry = struct.pack(
            gpt.ENTRY_FORMAT, gpt.parse_guid(LINUX_FS_GUID), bytes(16), 900, 100, 0, bytes(72)
        )
        disk.put(entries_lba * 512, entry)
        crc = zlib.crc32(disk.content(entries_lba * 512, 128 * 128))
        disk.put(
            header_lba * 512,
            gpt.encode_header(disk.content(header_lba * 512, 512), entries_crc32=crc),
        )
    disk.write_to(tmp_path / "backwards.img")
    layout = read_layout(os.fspath(tmp_path / "backwards.img"))
    assert [p.fs for p in layout.partitions] == [None]
    assert any("partition 1 (900..100) does not fit" in w for w in layout.warnings), layout.warnings


def test_primary_pointing_at_itself_is_not_its_own_backup() -> None:
    """AlternateLBA 1 in the primary (CRC right) with the real backup wiped: no valid backup."""
    disk, sector = small_gpt()
    disk.put(512, gpt.encode_header(disk.content(512, 512), alternate_lba=1))
    disk.put(2047 * 512, bytes(512))
    table = gpt.read_gpt(disk.read, 2048, sector)
    assert table.primary_valid and not table.backup_valid
    assert table.backup_lba == 2047, table.backup_lba


def test_resize_protective_entry_past_the_new_end_is_refused() -> None:
    """A 0xEE entry (whole old disk) that starts past the end of the disk it is resized for."""
    sector = bytes(446) + mbr.encode_entry(0, 0xEE, 5000, 0xFFFFFFFF) + bytes(48) + b"\x55\xaa"
    with pytest.raises(MbrescueError, match="past the end"):
        gpt.resize_protective(sector, 100, old_alternate_lba=0)
