"""Write a planned restore to the target, then prove it by reading it back.

The region is streamed from the capture in 8 MiB pwritev groups (stored chunks go out
as views of the capture's bytes, without an inflate copy), the plan's in-region writes
patched into the stream and the rest written after it; then fsync. The check reads the
region back past the page cache (O_DIRECT, or dropped cache pages where O_DIRECT is
refused) and hashes it with the patched ranges put back to the captured bytes: that
must give the capture's SHA-256. The patched and outside writes must read back as
planned, and the partition tables and swap headers are parsed again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from . import gpt, stale
from .capfile import REGION_MEMBER, Capture
from .console import Console
from .disk import DiskInfo
from .errors import MbrescueError
from .layout import read_layout
from .plan import Plan, Write, is_deferred, kept_ranges, written_ranges
from .probe import probe
from .targets import busy_reason

BLKFLSBUF = 0x1261  # _IO(0x12, 97)
BLKRRPART = 0x125F  # _IO(0x12, 95)
# Read-back alignment that satisfies O_DIRECT on 512-byte and 4Kn devices alike.
DIRECT_ALIGN = 4096
READ_BLOCK_BYTES = 4 << 20
SMALL_MEMBER_BYTES = 16 << 10
WRITE_BLOCK_BYTES = 8 << 20  # per pwritev; the capture's chunks are 1 MiB


@dataclass
class Stats:
    write_seconds: float = 0.0
    verify_seconds: float = 0.0
    region_bytes: int = 0
    read_back: str = ""  # how the page cache was bypassed

    @property
    def write_mib_s(self) -> float:
        return self.region_bytes / max(self.write_seconds, 1e-9) / (1 << 20)

    @property
    def verify_mib_s(self) -> float:
        return self.region_bytes / max(self.verify_seconds, 1e-9) / (1 << 20)


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
    sizes = capture.region.chunks
    expected = capture.region.chunk_sha256
    slab = bytearray(block_bytes + max(sizes, default=0))
    view = memoryview(slab)
    # Runs of zeros (free space of /boot, the gap after the MBR) come as identical small
    # members: inflate each distinct one once.
    small: dict[bytes, bytes] = {}
    # The capture's own descriptor, the one its checksums were verified through.
    at = member.offset
    group: list[bytes | memoryview] = []
    raw_bytes = used = 0
    for index, size in enumerate(sizes):
        if used + size > len(slab):
            yield group
            group, raw_bytes, used = [], 0, 0
        packed = view[used : used + size]
        if os.preadv(capture.fd, [packed], at) != size:
            raise MbrescueError(f"{capture.path} is truncated (region)")
        at += size
        # Hashed again as it is written: what goes to the disk is what was verified,
        # and a mismatch stops the restore before the boot sectors are written.
        if hashlib.sha256(packed).hexdigest() != expected[index]:
            raise MbrescueError(
                f"{capture.path}: region chunk {index} changed since it was verified; "
                "stopped before the boot sectors were written"
            )
        used += size
        stored = stored_blocks(packed)
        if stored is not None and sum(map(len, stored)) != capture.region.raw_chunk_bytes(index):
            stored = None  # inflate names the wrong length
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
    raw = capture.unpack(index, packed)
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


def invalidate(fd: int, plan: Plan) -> None:
    """Zero what will be written last, first: a target that looked healthy before (an
    older copy of the same host) must not look healthy while the restore runs. The stale
    signatures the plan names are zeroed here too, before anything else is written."""
    for offset, data in stale.erase_writes(plan.erase):
        _pwrite_all(fd, data, offset, plan)
    for offset, length in plan.deferred:
        length = min(length, plan.target.size_bytes - offset)
        if length > 0:
            _pwrite_all(fd, bytes(length), offset, plan)
    _fsync(fd, plan)


def write_plan(fd: int, capture: Capture, plan: Plan, console: Console,
               originals: list[tuple[int, bytes]], held: list[tuple[int, bytes]]) -> float:
    """The region with its in-region adjustments, then everything past it; fsync. Seconds.

    The deferred ranges go out as zeros here; their final bytes are kept in `held` for
    `write_held`, and the captured bytes they replace in `originals` for the check.
    """
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
            originals.extend(
                item for item in replaced if not is_deferred(plan, item[0], item[0] + len(item[1]))
            )
            buffers.append(_hold_deferred(plan, piece, data, at, originals, held))
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
            data = write.data[start - write.offset_bytes :]
            if is_deferred(plan, write.offset_bytes, write.end_bytes):
                held.append((start, data))
            else:
                _pwrite_all(fd, data, start, plan)
    try:
        os.fsync(fd)
    except OSError as exc:
        progress.finish()
        raise _locate_write_error(fd, capture, plan, console, exc) from exc
    return progress.finish()


def _locate_write_error(fd: int, capture: Capture, plan: Plan, console: Console,
                        first: OSError) -> MbrescueError:
    """The error for a failed flush, naming the sector where it can.

    Writes go through the page cache, so a failing sector only shows at fsync, for the
    whole device. The region is written again group by group, each one flushed, and the
    failing group block by block (4 KiB: the page cache writes whole blocks), which
    names the first failing block. The same bytes go to the same places as before, and
    the deferred ranges stay zero, so this changes nothing a good write would not.
    """
    console.say(f"mbrescue: flushing {plan.target.path} failed ({first.strerror}); writing the "
                "region again in flushed pieces to find where")
    in_region = [w for w in plan.writes if w.offset_bytes < plan.region_bytes]
    step = max(plan.sector_bytes, DIRECT_ALIGN)
    offset = 0
    for group in region_groups(capture, WRITE_BLOCK_BYTES):
        pieces = []
        at = offset
        for piece in group:
            patched, _ = _overlay(piece, at, in_region)
            pieces.append(_hold_deferred(plan, piece, patched, at, [], []))
            at += len(piece)
        data = b"".join(pieces)
        try:
            _pwrite_all(fd, data, offset, plan)
            os.fdatasync(fd)
        except (OSError, MbrescueError):
            for block in range(0, len(data), step):
                try:
                    os.pwrite(fd, data[block : block + step], offset + block)
                    os.fdatasync(fd)
                except OSError as exc:
                    lba = (offset + block) // plan.sector_bytes
                    last = lba + min(step, len(data) - block) // plan.sector_bytes - 1
                    return MbrescueError(
                        f"write error on {plan.target.path} at sector {lba} (the block of "
                        f"sectors {lba}..{last}): {exc.strerror}"
                    )
            first_lba = offset // plan.sector_bytes
            return MbrescueError(
                f"write error on {plan.target.path} in sectors {first_lba}.."
                f"{(offset + len(data)) // plan.sector_bytes - 1}: {first.strerror}"
            )
        offset += len(data)
    return MbrescueError(f"flushing {plan.target.path} failed: {first.strerror} (writing it "
                         "again in flushed pieces found no failing sector)")


def _hold_deferred(plan: Plan, piece: bytes | memoryview, data: bytes | memoryview, at: int,
                   originals: list[tuple[int, bytes]], held: list[tuple[int, bytes]]
                   ) -> bytes | memoryview:
    """`data` (the piece with its writes patched in) with the deferred ranges zeroed."""
    end = at + len(piece)
    patched: bytearray | None = None
    for lo, length in plan.deferred:
        a, b = max(lo, at), min(lo + length, end)
        if a >= b:
            continue
        originals.append((a, bytes(piece[a - at : b - at])))
        held.append((a, bytes(data[a - at : b - at])))
        if patched is None:
            patched = bytearray(data)
        patched[a - at : b - at] = bytes(b - a)
    return bytes(patched) if patched is not None else data


def write_held(fd: int, plan: Plan, held: list[tuple[int, bytes]]) -> None:
    """The deferred ranges' final bytes: the moment the disk starts to look bootable."""
    for offset, data in held:
        _pwrite_all(fd, data, offset, plan)
    _fsync(fd, plan)


def _fsync(fd: int, plan: Plan) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise MbrescueError(f"flushing {plan.target.path} failed: {exc.strerror}") from exc


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
    """Read the region back and hash it with the adjusted and the deferred ranges put back
    to what the capture holds there: that must give the capture's SHA-256. The adjusted
    ranges and the writes past the region must read back as planned (the deferred ones
    are checked by `verify_held`, once written)."""
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
        if digest.hexdigest() != capture.region.sha256:
            raise MbrescueError(
                f"verification failed: the region read back from {plan.target.path} does not "
                f"match the capture's SHA-256"
            )
        for write in plan.writes:
            if is_deferred(plan, write.offset_bytes, write.end_bytes):
                continue
            if reader.read(write.offset_bytes, len(write.data)) != write.data:
                raise MbrescueError(
                    f"verification failed: the {write.what} at sector "
                    f"{write.offset_bytes // plan.sector_bytes} of {plan.target.path} "
                    "reads back wrong"
                )
        return seconds, reader.method
    finally:
        reader.close()


def verify_held(capture: Capture, plan: Plan, held: list[tuple[int, bytes]]) -> None:
    """The deferred ranges read back as written, then the tables are re-parsed."""
    reader = ReadBack(plan.target.path, plan.target.kind)
    try:
        for offset, data in held:
            if reader.read(offset, len(data)) != data:
                raise MbrescueError(
                    f"verification failed: sector {offset // plan.sector_bytes} of "
                    f"{plan.target.path} reads back wrong"
                )
        _check_tables(capture, plan, reader)
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
        for part in capture.manifest.partitions:
            number = part.number
            got = found_parts.get(number)
            size = plan.shrunk.get(number, part.size_sectors)
            if got is None or got.start_lba != part.start_lba or (
                got.size_sectors != size and not got.is_extended
            ):
                raise MbrescueError(
                    f"verification failed: partition {number} on {plan.target.path} is not "
                    f"where the plan put it"
                )
    for record in capture.manifest.swap:
        offset = record.start_lba * plan.sector_bytes
        found = probe(reader.fd, offset, 1 << 20)
        if found is None or found.type != "swap" or found.uuid != record.uuid or (
            (found.label or None) != (record.label or None)
        ):
            raise MbrescueError(
                f"verification failed: swap partition {record.partition} does not read back "
                f"with label {record.label} and UUID {record.uuid}"
            )
    stale.check_erased(reader.read, plan.target.size_bytes, plan.sector_bytes,
                       plan.target.path, written_ranges(plan),
                       kept_ranges(plan, capture.manifest))


def reread_partitions(target: DiskInfo, console: Console) -> None:
    """Ask the kernel to read the new table (BLKRRPART); a refusal is only a warning."""
    if target.kind != "block":
        return
    fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKRRPART, 0)
    except OSError as exc:
        console.say(
            f"mbrescue: warning: the kernel did not re-read the partition table of "
            f"{target.path} ({exc.strerror}); it will at the next boot"
        )
    finally:
        os.close(fd)


def execute(capture: Capture, plan: Plan, console: Console) -> Stats:
    """Write, adjust, verify, re-read; the plan was shown and agreed to."""
    reason = busy_reason(plan.target)
    if reason:
        raise MbrescueError(f"{plan.target.path} cannot be written: {reason}")
    originals: list[tuple[int, bytes]] = []
    held: list[tuple[int, bytes]] = []
    fd = open_target(plan)
    try:
        # Safety rule 6: what makes the disk look bootable is blanked first and written
        # last, after everything else reads back right.
        invalidate(fd, plan)
        write_seconds = write_plan(fd, capture, plan, console, originals, held)
        verify_seconds, method = verify_plan(capture, plan, console, originals)
        started = time.monotonic()
        write_held(fd, plan, held)
    finally:
        os.close(fd)
    verify_held(capture, plan, held)
    verify_seconds += time.monotonic() - started
    reread_partitions(plan.target, console)
    return Stats(write_seconds, verify_seconds, plan.region_bytes, method)
