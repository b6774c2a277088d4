"""`mbrescue capture`: read a host disk's boot region into one capture file.

The boot region runs from sector 0 to the end of the last partition of the boot
chain (BIOS boot partition, ESP, the partition holding `/boot`): the MBR — all 512
bytes, since the partition table and the 0x55AA signature are as needed as the
boot code —, the gap after it where GRUB's core image lives on msdos disks, and
the `/boot` file system itself. For fixture A's layout that is exactly the old
`dd count=<swap start>`. GPT disks also keep their backup table at the end. A
mounted `/boot` is frozen while it is read; a file-level archive of it is added
as a fallback that does not depend on the disk's geometry. The file format is
described in `builder/runner/capfile.py`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import io
import os
import signal
import socket
import stat
import struct
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import __version__, log
from .errors import MbrescueError
from .freeze import (
    Mount,
    describe_stacked,
    dev_of,
    freeze_limit_s,
    frozen,
    is_system_root,
    partition_mounts,
    refuse_writes_onto,
    stacked_device,
    stacked_mounts,
)
from .runner import bootfiles, bootloader, capfile, filecopy, mbr
from .runner.errors import Interrupted
from .runner.layout import Layout, Partition, read_layout
from .runner.manifest import MAC_RE
from .runner.outputs import (
    check_hostname,
    check_output_dir,
    check_output_file,
    check_parent_dir,
    create_temporary,
    refuse_same_file,
)

BIOS_BOOT_GUID = "21686148-6449-6e6f-744e-656564454649"
ESP_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
LINUX_FS_TYPES = ("ext2", "ext3", "ext4", "xfs", "vfat")
BLKFLSBUF = 0x1261
# Reading the same unfreezable file system twice must agree; a busy one may need a retry.
UNFROZEN_READ_ATTEMPTS = 3
ZERO_CHUNK = bytes(capfile.CHUNK_BYTES)


@dataclass(frozen=True)
class CaptureOptions:
    source: Path
    output: Path | None = None
    boot_partition: int | None = None
    hostname: str | None = None
    sector_bytes: int | None = None
    compress_level: int = 6
    progress: bool | None = None
    macs: tuple[str, ...] | None = None  # --mac: the host's MACs (None: read this machine's)


@dataclass(frozen=True)
class CaptureResult:
    path: Path
    manifest: dict

    def as_json(self, source: Path) -> dict[str, object]:
        """`capture --json` (both command lines): what was written, and its digest."""
        from .runner.capfile import Capture

        with Capture.open(os.fspath(self.path)) as written:
            manifest_sha256 = written.manifest_sha256
        region = self.manifest["region"]
        return {"capture": os.fspath(self.path), "source": os.fspath(source),
                "host": self.manifest.get("hostname"), "region_bytes": region["length_bytes"],
                "region_sha256": region.get("sha256"), "size_bytes": self.path.stat().st_size,
                "manifest_sha256": manifest_sha256}


def _is_block(path: Path) -> bool:
    return stat.S_ISBLK(os.stat(path).st_mode)


def check_source(source: Path) -> None:
    try:
        st = os.stat(source)
    except FileNotFoundError as exc:
        raise MbrescueError(f"{source}: no such file or device") from exc
    except OSError as exc:
        raise MbrescueError(f"{source}: {(exc.strerror or str(exc)).lower()}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise MbrescueError(f"{source} is a directory, not a disk or disk image")
    if not os.access(source, os.R_OK):
        raise MbrescueError(f"{source}: permission denied (run as root to read a disk)")


def _type_of(partition: Partition) -> str:
    return (partition.type or "").lower()


def guess_boot_partition(
    layout: Layout, mounted: dict[int, str], *, live_disk: bool = False
) -> Partition:
    """The partition holding /boot: mounted at /boot, else the first likely one.

    live_disk: the source is a block device with partitions in use. There the
    first-likely guess would be the root file system when /boot is no partition of
    its own, and the root is never frozen: such a source must name its partition.
    """
    by_number = {p.number: p for p in layout.partitions}
    for number, mountpoint in mounted.items():
        if mountpoint == "/boot" and number in by_number:
            return by_number[number]
    if live_disk and mounted:
        where = ", ".join(f"partition {n} at {m}" for n, m in sorted(mounted.items()))
        raise MbrescueError(
            f"no partition of this disk is mounted at /boot ({where}): /boot is not a "
            "partition of its own here, and a guess could pick the running system's root",
            hint="name the partition holding /boot with --boot-partition N",
        )
    candidates = [
        p
        for p in layout.partitions
        if p.fs is not None and p.fs.type in LINUX_FS_TYPES and _type_of(p) != ESP_GUID
    ]
    active = [p for p in candidates if p.bootable]
    if active:
        return active[0]
    if candidates:
        return candidates[0]
    raise MbrescueError(
        "no partition looks like /boot (no ext2/3/4, xfs or vfat file system found)",
        hint="name it with --boot-partition N",
    )


def boot_chain(layout: Layout, boot: Partition) -> list[Partition]:
    """BIOS boot partition and ESP (when present) plus /boot: what booting needs."""
    chain = [p for p in layout.partitions if _type_of(p) in (BIOS_BOOT_GUID, ESP_GUID)]
    if boot not in chain:
        chain.append(boot)
    return sorted(chain, key=lambda p: p.start_lba)


def _zero_member() -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, capfile.GZIP_WBITS)
    return packer.compress(ZERO_CHUNK) + packer.flush()


# Most of a /boot region is kernels and initrds, compressed already: deflate gains
# nothing there and runs ~10x slower than storing, so such data is stored (deflate's
# stored blocks: still one valid gzip member that `zcat` and `zlib` read). A sample at
# the start of every segment decides for that segment, so a chunk that holds the end
# of a System.map and the start of an initrd deflates the one and stores the other.
# Measured on the bench region (257 MiB, 2 cores): deflating a whole chunk when any
# sample compressed cost 0.6 s for 33 chunks, 20 of them ending up no smaller.
SEGMENT_BYTES = 64 << 10
SAMPLE_BYTES = 4 << 10
INCOMPRESSIBLE_RATIO = 0.9
# deflate's stored block holds at most 65535 bytes behind a 5-byte header.
STORED_BLOCK_MAX_BYTES = 0xFFFF
# A gzip header (RFC 1952) as zlib writes it: no name, no time, OS "Unix".
GZIP_HEADER = bytes((0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 3))
# An empty stored block with BFINAL set: ends a body of byte-aligned, non-final blocks.
FINAL_EMPTY_BLOCK = b"\x01\x00\x00\xff\xff"


def _compressible(sample: bytes | memoryview) -> bool:
    return len(zlib.compress(sample, 1)) < INCOMPRESSIBLE_RATIO * len(sample)


def _incompressible(chunk: bytes) -> bool:
    """No sample of the chunk compresses."""
    view = memoryview(chunk)
    return not any(
        _compressible(view[start : start + SAMPLE_BYTES])
        for start in range(0, len(view), SEGMENT_BYTES)
    )


def _stored_blocks(data: memoryview, parts: list[bytes | memoryview]) -> None:
    for start in range(0, len(data), STORED_BLOCK_MAX_BYTES):
        piece = data[start : start + STORED_BLOCK_MAX_BYTES]
        parts.append(struct.pack("<BHH", 0, len(piece), len(piece) ^ 0xFFFF))
        parts.append(piece)


def deflate_body(data: bytes, level: int) -> bytes:
    """Raw deflate blocks for data: byte-aligned, none of them final, no reference to
    anything before data, so bodies concatenate into one deflate stream (as pigz's do).

    Each run of segments whose sample compresses is deflated by its own compressor
    (a sync flush ends it byte-aligned); every other segment is stored.
    """
    view = memoryview(data)
    flags = [
        _compressible(view[start : start + SAMPLE_BYTES])
        for start in range(0, len(view), SEGMENT_BYTES)
    ]
    parts: list[bytes | memoryview] = []
    index = 0
    while index < len(flags):
        end = index
        while end < len(flags) and flags[end] == flags[index]:
            end += 1
        run = view[index * SEGMENT_BYTES : end * SEGMENT_BYTES]
        if flags[index]:
            packer = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
            parts.append(packer.compress(run) + packer.flush(zlib.Z_SYNC_FLUSH))
        else:
            _stored_blocks(run, parts)
        index = end
    return b"".join(parts)


def gzip_trailer(crc32: int, length: int) -> bytes:
    return FINAL_EMPTY_BLOCK + struct.pack("<II", crc32, length & 0xFFFFFFFF)


def _pack(chunk: bytes, level: int, zero_member: tuple[bytes, str]) -> tuple[bytes, str]:
    """One gzip member for the chunk and its SHA-256 (hashed here, in parallel)."""
    if len(chunk) == len(ZERO_CHUNK) and chunk == ZERO_CHUNK:
        return zero_member
    packed = b"".join(
        (GZIP_HEADER, deflate_body(chunk, level), gzip_trailer(zlib.crc32(chunk), len(chunk)))
    )
    return packed, hashlib.sha256(packed).hexdigest()


@dataclass
class RegionRecord:
    sha256: str
    chunks: list[int]
    chunk_sha256: list[str]


def _next_data(fd: int, offset: int) -> int | None:
    """Where data starts at or after offset in a regular file (holes read as zeros)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # only a hole from offset to the end
            return None
        raise


def _read_chunks(fd: int, length: int) -> Iterator[bytes]:
    """The first length bytes, chunk by chunk; an image file's holes are not read at all.

    Reading a hole makes the kernel fill page-cache pages with zeros (18 s of system
    time for a 9 GiB sparse image, measured); SEEK_DATA says where they are, and it
    counts written-but-unflushed (delayed allocation) pages as data.
    """
    seekable = stat.S_ISREG(os.fstat(fd).st_mode)
    data_at: int | None = 0
    offset = 0
    while offset < length:
        want = min(capfile.CHUNK_BYTES, length - offset)
        if seekable and (data_at is None or data_at < offset):
            data_at = _next_data(fd, offset)
        if (
            seekable
            and want == capfile.CHUNK_BYTES
            and (data_at is None or data_at >= offset + want)
        ):
            yield ZERO_CHUNK
            offset += want
            continue
        data = os.pread(fd, want, offset)
        if len(data) != want:
            raise MbrescueError(f"short read at byte {offset + len(data)} of the source")
        yield data
        offset += want


def region_digest(source: Path, length: int) -> str:
    digest = hashlib.sha256()
    fd = _open_source(source)
    try:
        for chunk in _read_chunks(fd, length):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _open_source(source: Path) -> int:
    fd = os.open(source, os.O_RDONLY)
    if _is_block(source):
        # Drop cached blocks of the whole disk: the frozen partition's data went
        # out through another block device, so this one's cache may be stale.
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, BLKFLSBUF, 0)
    return fd


def write_region(
    fd: int, length: int, out: BinaryIO, level: int, progress: log.Progress
) -> RegionRecord:
    """Compress the region in parallel chunks (zlib and hashlib drop the GIL), write in order."""
    raw_digest = hashlib.sha256()
    sizes: list[int] = []
    digests: list[str] = []
    zero_packed = _zero_member()
    zero_member = (zero_packed, hashlib.sha256(zero_packed).hexdigest())
    workers = max(os.cpu_count() or 1, 1)
    pending: list[Future[tuple[bytes, str]]] = []
    out.flush()
    out_fd = out.fileno()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            packed, digest = pending.pop(0).result()
            _write_all(out_fd, packed)
            sizes.append(len(packed))
            digests.append(digest)

    # Three kinds of work overlap: this thread reads and writes, one thread hashes
    # the raw region in order, the pool compresses and hashes each member.
    with ThreadPoolExecutor(1) as hasher, ThreadPoolExecutor(workers) as pool:
        hashed: list[Future[None]] = []
        for chunk in _read_chunks(fd, length):
            pending.append(pool.submit(_pack, chunk, level, zero_member))
            hashed.append(hasher.submit(raw_digest.update, chunk))
            progress.advance(len(chunk))
            drain(2 * workers)
            while len(hashed) > 2 * workers:
                hashed.pop(0).result()
        drain(0)
        for future in hashed:
            future.result()
    # The tar writer goes on through the buffered object: bring it to the end.
    out.seek(0, os.SEEK_END)
    return RegionRecord(raw_digest.hexdigest(), sizes, digests)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


# -- under the freeze: copy raw, as fast as the disk reads; compress after the thaw ---------------
#
# Measured with `mbrescue capture` of the bench's mounted 256 MiB /boot (2 cores, page
# cache warm, 3 runs each): compressing while frozen held the freeze 3.7-4.0 s (wall
# 4.2-4.4 s); copying the raw region and an uncompressed tar of the files to memory,
# then compressing after the thaw, 0.20-0.25 s (wall 4.4-4.8 s). On a busier machine
# the spool file did as well as memory (0.4-2.8 s against 0.6-1.9 s). So the spool
# is memory (a memfd: no file system at all) while the region is small next to the
# RAM available, else an unnamed file (O_TMPFILE) in the output's directory, which is
# checked to be on another file system than the one frozen. Neither leaves anything
# behind, whatever ends the process.
SPOOL_MEMORY_MAX_BYTES = 2 << 30


def _memory_available_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def _spool(directory: Path, expected_bytes: int) -> Iterator[int]:
    """An anonymous read-write file, in memory when it fits easily, else in directory."""
    if expected_bytes <= min(SPOOL_MEMORY_MAX_BYTES, _memory_available_bytes() // 4):
        fd = os.memfd_create("mbrescue-spool", os.MFD_CLOEXEC)
    else:
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            name = directory / f".mbrescue-spool-{os.getpid()}-{id(exc)}"
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.unlink(name)
    try:
        yield fd
    finally:
        os.close(fd)


def spool_region(source: Path, length: int, spool_fd: int, progress: log.Progress) -> None:
    """The raw region into the spool; runs of zeros stay holes (no write, no space)."""
    os.ftruncate(spool_fd, 0)  # a retry starts from an empty spool: holes must read as zeros
    fd = _open_source(source)
    try:
        offset = 0
        for chunk in _read_chunks(fd, length):
            if not (len(chunk) == len(ZERO_CHUNK) and chunk == ZERO_CHUNK):
                _pwrite_all(spool_fd, chunk, offset)
            offset += len(chunk)
            progress.advance(len(chunk))
        os.ftruncate(spool_fd, length)
    finally:
        os.close(fd)


def spool_boot_files(mountpoint: str, spool_fd: int) -> int:
    """An uncompressed tar of the mounted /boot into the spool; returns the file count.

    The headers are tarfile's (its `gettarinfo` also finds hard links); each file's data
    goes from the page cache into the spool by sendfile, without passing through Python:
    this runs under the freeze (measured on the bench's /boot: 0.5 s through tarfile's
    16 KiB reads on a loaded machine, ~0.1 s this way).
    """
    count = 0
    os.ftruncate(spool_fd, 0)
    offset = 0

    def put(data: bytes) -> None:
        nonlocal offset
        _pwrite_all(spool_fd, data, offset)
        offset += len(data)

    # Writes nothing: it only makes the headers, as `TarFile.add` would.
    with tarfile.open(fileobj=io.BytesIO(), mode="w", format=tarfile.GNU_FORMAT) as headers:
        for root, dirs, files in os.walk(mountpoint):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                try:
                    info = headers.gettarinfo(path, arcname=os.path.relpath(path, mountpoint))
                    put(info.tobuf(tarfile.GNU_FORMAT, headers.encoding, headers.errors))
                    if info.isreg():
                        _sendfile_all(path, spool_fd, offset, info.size)
                        offset += info.size
                        put(bytes(-info.size % tarfile.BLOCKSIZE))
                    count += 1
                except OSError as exc:
                    raise MbrescueError(
                        f"cannot read {path} for the /boot archive: {exc.strerror}"
                    ) from exc
    # The end: two zero blocks, then zeros to a whole record, as TarFile.close writes.
    put(bytes(2 * tarfile.BLOCKSIZE))
    put(bytes(-offset % tarfile.RECORDSIZE))
    return count


def _sendfile_all(path: str, spool_fd: int, offset: int, size: int) -> None:
    """size bytes of the file at path into the spool at offset, or OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.lseek(spool_fd, offset, os.SEEK_SET)
        done = 0
        while done < size:
            sent = os.sendfile(spool_fd, fd, done, size - done)
            if sent == 0:
                raise OSError(errno.EIO, f"{path} ended at byte {done} of {size}")
            done += sent
    finally:
        os.close(fd)


def pack_boot_files(spool_fd: int, out: BinaryIO, level: int = 6) -> str:
    """gzip the spooled tar into out (a standard .tar.gz: one gzip member); returns its
    SHA-256.

    The tar holds /boot's kernels and initrds, compressed already: each piece is
    deflated or stored as the region's chunks are (measured on the bench's /boot,
    130 MiB of tar: 6.8 s at gzip level 6 on one core), the pieces on all cores, and
    their bodies joined into one deflate stream.
    """
    digest = hashlib.sha256()
    crc = 0
    length = 0
    workers = max(os.cpu_count() or 1, 1)
    pending: list[Future[bytes]] = []

    def emit(packed: bytes) -> None:
        out.write(packed)
        digest.update(packed)

    emit(GZIP_HEADER)
    with ThreadPoolExecutor(workers) as pool:
        while True:
            piece = os.pread(spool_fd, capfile.CHUNK_BYTES, length)
            if not piece:
                break
            length += len(piece)
            pending.append(pool.submit(deflate_body, piece, level))
            crc = zlib.crc32(piece, crc)
            while len(pending) > 2 * workers:
                emit(pending.pop(0).result())
        for future in pending:
            emit(future.result())
    emit(gzip_trailer(crc, length))
    return digest.hexdigest()


def _default_hostname(source: Path) -> str:
    if _is_block(source):
        return socket.gethostname()
    return source.name.split(".")[0] or "host"


def _temp_output(output: Path) -> tuple[Path, BinaryIO]:
    fd, tmp = create_temporary(output, 0o600)
    return tmp, os.fdopen(fd, "w+b")


def _refuse_stacked(source: Path, starts: dict[int, int], sector: int, chain: set[int]) -> None:
    """/boot (or a boot-chain partition) under md RAID or device-mapper: say so, read nothing."""
    if _is_block(source):
        device = stacked_device(dev_of(os.stat(source).st_rdev))
        if device is not None:
            if device.kind == "md RAID1":
                raise MbrescueError(
                    f"{source} is the {device.kind} array {device.name}, not a disk: not supported",
                    hint="capture each RAID1 member disk",
                )
            raise MbrescueError(
                f"{source} is a {device.kind} device ({device.name}), not a disk: not supported",
                hint="capture the disk that holds /boot on a plain partition",
            )
    for stacked in stacked_mounts(os.fspath(source), starts, sector):
        if stacked.partition in chain or stacked.mount.mountpoint == "/boot":
            raise describe_stacked(os.fspath(source), stacked)


def _interrupt_on_sigterm() -> contextlib.AbstractContextManager[object]:
    """SIGTERM unwinds like Ctrl-C (the temporary output is removed)."""
    stack = contextlib.ExitStack()
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, interrupt)
        stack.callback(signal.signal, signal.SIGTERM, previous)
    return stack


def capture(options: CaptureOptions) -> CaptureResult:
    with _interrupt_on_sigterm():
        try:
            return _capture(options)
        except KeyboardInterrupt as exc:
            # One line and a failure status: the frozen file system is thawed by now.
            raise Interrupted(
                f"capture interrupted ({str(exc) or 'SIGINT'}); nothing kept"
            ) from exc


def _read_whole_disk(source: Path, sector_bytes: int | None) -> Layout:
    """The source's partition table; none at all is most often a partition given for its disk."""
    try:
        return read_layout(os.fspath(source), sector_bytes)
    except MbrescueError as exc:
        if "no partition table" not in str(exc) or exc.hint:
            raise
        whole = _whole_disk_of(source)
        example = f"{whole}, the disk that holds it" if whole else "/dev/sda"
        raise MbrescueError(str(exc), hint=f"is {source} a partition or a file-system image? "
                            f"give the whole disk (e.g. {example})") from exc


def _whole_disk_of(source: Path) -> str | None:
    """/dev/sda for the partition /dev/sda1 (from sysfs), else None."""
    try:
        rdev = os.stat(source).st_rdev
        if not stat.S_ISBLK(os.stat(source).st_mode):
            return None
        link = os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    except OSError:
        return None
    if not os.path.exists(os.path.join(link, "partition")):
        return None
    return "/dev/" + os.path.basename(os.path.dirname(link))


def _capture(options: CaptureOptions) -> CaptureResult:
    source = options.source
    freeze_limit_s()  # a bad MBRESCUE_FREEZE_LIMIT_S fails before any work
    check_source(source)
    layout = _read_whole_disk(source, options.sector_bytes)
    for warning in layout.warnings:
        log.info(f"warning: {warning}")
    sector = layout.disk.logical_sector_bytes
    numbers = {p.number: p for p in layout.partitions}
    starts = {p.number: p.start_lba for p in layout.partitions if not p.is_extended}
    _refuse_stacked(source, starts, sector, set())
    mounted = partition_mounts(os.fspath(source), starts, sector)
    if options.boot_partition is not None:
        if options.boot_partition not in numbers or numbers[options.boot_partition].is_extended:
            have = ", ".join(str(n) for n in sorted(numbers)) or "none"
            raise MbrescueError(
                f"--boot-partition {options.boot_partition}: {source} has no such partition "
                f"(partitions: {have})"
            )
        boot = numbers[options.boot_partition]
        if _is_swap(boot):
            raise MbrescueError(
                f"--boot-partition {boot.number}: partition {boot.number} of {source} is swap, "
                "not a /boot file system (give the number of the partition /boot is on)"
            )
    else:
        boot = guess_boot_partition(
            layout,
            {n: m.mountpoint for n, m in mounted.items()},
            live_disk=_is_block(source),
        )
    chain = boot_chain(layout, boot)
    _refuse_stacked(source, starts, sector, {p.number for p in chain})
    region_end_lba = max(p.start_lba + p.size_sectors for p in chain)
    region_bytes = region_end_lba * sector
    if region_bytes > layout.disk.size_bytes:
        raise MbrescueError(f"partition {boot.number} runs past the end of {source}")

    hostname = check_hostname(options.hostname or _default_hostname(source))
    macs = _host_macs(source, options.macs)
    output = options.output or Path.cwd() / f"{hostname}.mbrescue"
    if output.is_dir():
        output = output / f"{hostname}.mbrescue"
    check_output_file(output)
    refuse_same_file(source, output, "the capture")
    check_parent_dir(output)
    check_output_dir(output.parent)

    boot_mount = mounted.get(boot.number)
    # Other mounted file systems of the chain (an ESP at /boot/efi: vfat, which cannot be
    # frozen) are not frozen; their bytes must read the same twice.
    others_in_chain = [p for p in chain if p.number != boot.number and p.number in mounted]
    others = [mounted[p.number] for p in others_in_chain]
    other_ranges = [(p.start_lba * sector, p.size_sectors * sector) for p in others_in_chain]
    to_freeze: Mount | None = None
    if boot_mount is not None:
        if is_system_root(boot_mount):
            log.info(
                f"partition {boot.number} is mounted at {boot_mount.mountpoint}, the running "
                "system's root: it is never frozen; reading it twice and comparing instead"
            )
        else:
            to_freeze = boot_mount
            # The output, its temporary name and the spool all live in output.parent.
            refuse_writes_onto(boot_mount, {"the output's directory": os.fspath(output.parent)})
    created = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    mtime = int(created.timestamp())

    tmp, out = _temp_output(output)
    try:
        with out, contextlib.ExitStack() as stack:
            tar = capfile.TarWriter(out)
            region_spool = files_spool = None
            frozen_ok = False
            files_count: int | None = None
            if to_freeze is not None:
                region_spool = stack.enter_context(_spool(output.parent, region_bytes))
                files_spool = stack.enter_context(_spool(output.parent, region_bytes))
                for attempt in range(1, UNFROZEN_READ_ATTEMPTS + 1):
                    reading = log.Progress("reading boot region", region_bytes, options.progress)
                    with frozen(to_freeze.mountpoint) as frozen_ok:
                        if frozen_ok:
                            spool_region(source, region_bytes, region_spool, reading)
                            files_count = spool_boot_files(to_freeze.mountpoint, files_spool)
                    reading.finish()
                    if not frozen_ok or not others:
                        break
                    if _unchanged(source, region_spool, other_ranges):
                        log.info(f"{_names(others)} (not frozen) read the same twice")
                        break
                    log.info(f"{_names(others)} changed while it was read (attempt {attempt})")
                else:
                    raise _kept_changing(others)
            live_host = boot_mount is not None and boot_mount.mountpoint == "/boot"
            # What `check` compares comes from the spools alone: worked out on another
            # core while this one compresses (hashlib lets go of the GIL).
            early_fingerprint: Future[dict] | None = None
            if frozen_ok and files_count is not None:
                assert region_spool is not None
                early_fingerprint = stack.enter_context(ThreadPoolExecutor(1)).submit(
                    bootfiles.fingerprint, layout, chain, region_spool, files_spool, None,
                    live_host,
                )
            # The file-level copies are read from the region's spool (what the region member
            # holds, so their files refer to its bytes), on another thread while this one
            # compresses the region when it was frozen; their tar goes in after the region.
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="mbrescue-files-")))  # left after the thread is done with it
            early_copies: Future[list[tuple[dict, Path]]] | None = None
            if frozen_ok:
                assert region_spool is not None
                early_copies = stack.enter_context(ThreadPoolExecutor(1)).submit(
                    _read_file_copies, layout, chain, region_spool, scratch)
            if frozen_ok:
                assert region_spool is not None
                progress = log.Progress("compressing boot region", region_bytes, options.progress)
                with tar.member(capfile.REGION_MEMBER, mtime) as stream:
                    region = write_region(
                        region_spool, region_bytes, stream, options.compress_level, progress
                    )
                progress.finish()
            else:
                watched = ([boot_mount] if boot_mount is not None else []) + others
                region_spool = stack.enter_context(_spool(output.parent, region_bytes))
                region = _read_unfrozen(source, region_bytes, region_spool, tar, mtime, options,
                                        watched)
            gpt_tail = _gpt_tail(source, layout, tar, mtime)
            assert region_spool is not None
            copies = (early_copies.result() if early_copies is not None
                      else _read_file_copies(layout, chain, region_spool, scratch))
            file_copies = filecopy.append_copies(tar, copies, mtime)
            # The file-level copy of /boot's partition holds its files already (read from
            # the same frozen spool): the archive of the mounted /boot is only the fallback
            # for a host without the tools that copy needs.
            boot_copy = next((c["member"] for c in file_copies if c["partition"] == boot.number),
                             None)
            if boot_copy is not None and to_freeze is not None and frozen_ok:
                assert files_count is not None
                boot_files = {
                    "member": None,
                    "sha256": None,
                    "file_count": files_count,
                    "mountpoint": to_freeze.mountpoint,
                    "reason": f"its files are in the file-level copy {boot_copy}",
                }
            elif boot_mount is not None and to_freeze is not None:
                if files_count is None:  # not freezable (vfat): the live files, as they are
                    files_spool = stack.enter_context(_spool(output.parent, region_bytes))
                    files_count = spool_boot_files(boot_mount.mountpoint, files_spool)
                assert files_spool is not None
                with tar.member(capfile.BOOT_FILES_MEMBER, mtime) as stream:
                    boot_sha = pack_boot_files(files_spool, stream, options.compress_level)
                boot_files = {
                    "member": capfile.BOOT_FILES_MEMBER,
                    "sha256": boot_sha,
                    "file_count": files_count,
                    "mountpoint": boot_mount.mountpoint,
                    "reason": None,
                }
            else:
                reason = (
                    f"partition {boot.number} is the running system's root, so no file-level copy"
                    if boot_mount is not None
                    else f"partition {boot.number} is not mounted, so no file-level copy"
                )
                boot_files = {
                    "member": None,
                    "sha256": None,
                    "file_count": 0,
                    "mountpoint": None,
                    "reason": reason,
                }
            if early_fingerprint is not None:
                fingerprint = _warn_of_kernels(early_fingerprint.result())
            else:
                fingerprint = _fingerprint(
                    source, layout, chain, region_spool,
                    files_spool if boot_files["member"] is not None else None,
                    str(boot_files["reason"]) if boot_files["reason"] else None, live_host,
                )
            boot_loader = _boot_loader(source, layout, chain, boot.number, region_bytes,
                                       region_spool, out, file_copies, fingerprint)
            manifest = {
                "format": capfile.FORMAT,
                "format_version": capfile.FORMAT_VERSION,
                "tool_version": __version__,
                "hostname": hostname,
                "created": created.isoformat().replace("+00:00", "Z"),
                "source": {
                    "path": os.fspath(source),
                    "kind": layout.disk.kind,
                    "size_bytes": layout.disk.size_bytes,
                    "logical_sector_bytes": layout.disk.logical_sector_bytes,
                    "physical_sector_bytes": layout.disk.physical_sector_bytes,
                    "model": layout.disk.model,
                    "serial": layout.disk.serial,
                    "wwn": layout.disk.wwn,
                },
                "layout": layout.to_json(),
                "boot_partition": boot.number,
                "boot_chain": [p.number for p in chain],
                "boot_fs": _fs_json(boot),
                "boot_loader": boot_loader,
                "frozen": bool(frozen_ok),
                "region": {
                    "member": capfile.REGION_MEMBER,
                    "offset_bytes": 0,
                    "length_bytes": region_bytes,
                    "end_lba": region_end_lba,
                    "sha256": region.sha256,
                    "compression": "gzip-members",
                    "compressed_bytes": sum(region.chunks),
                    "chunk_bytes": capfile.CHUNK_BYTES,
                    "chunks": region.chunks,
                    "chunk_sha256": region.chunk_sha256,
                },
                "ebrs": _ebr_records(source, layout),
                "gpt_tail": gpt_tail,
                "swap": _swap_records(layout),
                "boot_files": boot_files,
                "file_copies": file_copies,
                "fingerprint": fingerprint,
                "macs": list(macs),
            }
            capfile.write_manifest(tar, manifest, mtime)
            if bootloader.no_boot_code(record["method"] for record in boot_loader):
                log.info(f"warning: {source}: {bootloader.NO_BOOT_CODE_WARNING}")
            tar.close()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise MbrescueError(
                f"no space left on the device while writing {output}; nothing kept"
            ) from exc
        raise MbrescueError(f"cannot write {output}: {exc.strerror}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return CaptureResult(output, manifest)


def _read_unfrozen(
    source: Path,
    region_bytes: int,
    spool: int,
    tar: capfile.TarWriter,
    mtime: int,
    options: CaptureOptions,
    watched: list[Mount],
) -> RegionRecord:
    """The region read from the source into the spool and compressed from there; read again
    and compared when any of it is mounted."""
    out = tar.out
    region_at = out.tell()
    for attempt in range(1, UNFROZEN_READ_ATTEMPTS + 1):
        out.seek(region_at)
        out.truncate()
        reading = log.Progress("reading boot region", region_bytes, options.progress)
        spool_region(source, region_bytes, spool, reading)
        reading.finish()
        progress = log.Progress("compressing boot region", region_bytes, options.progress)
        with tar.member(capfile.REGION_MEMBER, mtime) as stream:
            region = write_region(spool, region_bytes, stream, options.compress_level, progress)
        progress.finish()
        if not watched:
            break
        # Not frozen and mounted: a second read must agree or the file system moved.
        if region_digest(source, region_bytes) == region.sha256:
            break
        log.info(f"{_names(watched)} changed while it was read (attempt {attempt})")
    else:
        raise _kept_changing(watched)
    return region


def _names(mounts: list[Mount]) -> str:
    return ", ".join(m.mountpoint for m in mounts)


def _kept_changing(mounts: list[Mount]) -> MbrescueError:
    return MbrescueError(
        f"{_names(mounts)} kept changing while it was read ({UNFROZEN_READ_ATTEMPTS} attempts)",
        hint="stop what writes to it and retry",
    )


def _unchanged(source: Path, spool_fd: int, ranges: list[tuple[int, int]]) -> bool:
    """The byte ranges (offset, length) read the same again from the source as in the spool."""
    fd = _open_source(source)
    try:
        for offset, length in ranges:
            again, spooled = hashlib.sha256(), hashlib.sha256()
            for start in range(offset, offset + length, capfile.CHUNK_BYTES):
                want = min(capfile.CHUNK_BYTES, offset + length - start)
                again.update(os.pread(fd, want, start))
                spooled.update(os.pread(spool_fd, want, start))
            if again.digest() != spooled.digest():
                return False
    finally:
        os.close(fd)
    return True


def _gpt_tail(source: Path, layout: Layout, tar: capfile.TarWriter, mtime: int) -> dict | None:
    if layout.table != "gpt":
        return None
    # The backup entry array and header sit in the disk's last sectors.
    assert layout.gpt is not None
    sector = layout.disk.logical_sector_bytes
    entries_bytes = layout.gpt.entry_count * layout.gpt.entry_bytes
    tail_bytes = (1 + -(-entries_bytes // sector)) * sector
    tail_offset = layout.disk.size_bytes - tail_bytes
    fd = os.open(source, os.O_RDONLY)
    try:
        tail = os.pread(fd, tail_bytes, tail_offset)
    finally:
        os.close(fd)
    tar.add_bytes(capfile.GPT_TAIL_MEMBER, tail, mtime)
    return {
        "member": capfile.GPT_TAIL_MEMBER,
        "offset_bytes": tail_offset,
        "length_bytes": tail_bytes,
        "sha256": hashlib.sha256(tail).hexdigest(),
    }


def check_capture(path: Path) -> str:
    """Open a capture and check all its checksums; a one-line summary or MbrescueError."""
    capture = capfile.Capture.open(os.fspath(path))
    capture.verify()
    region = capture.manifest.region
    return (
        f"{capture.manifest.hostname}, region {log.human_bytes(region.length_bytes)} "
        f"sha256 {region.sha256[:16]}… verified"
    )


def _fs_json(partition: Partition) -> dict | None:
    if partition.fs is None:
        return None
    return {
        "partition": partition.number,
        "type": partition.fs.type,
        "label": partition.fs.label,
        "uuid": partition.fs.uuid,
    }


def _swap_records(layout: Layout) -> list[dict]:
    records = []
    for p in layout.partitions:
        if p.fs is not None and p.fs.type == "swap":
            records.append(
                {
                    "partition": p.number,
                    "start_lba": p.start_lba,
                    "size_sectors": p.size_sectors,
                    "label": p.fs.label,
                    "uuid": p.fs.uuid,
                    "page_bytes": p.fs.swap_page_bytes,
                    "version": p.fs.swap_version,
                }
            )
    return records


def _ebr_records(source: Path, layout: Layout) -> list[dict]:
    """The extended boot records verbatim: a restored logical swap needs its EBR back."""
    if layout.table != "msdos":
        return []
    sector = layout.disk.logical_sector_bytes
    fd = os.open(source, os.O_RDONLY)
    try:

        def read_sector(lba: int) -> bytes:
            return os.pread(fd, sector, lba * sector)

        lbas: set[int] = set()
        for extended in (p for p in layout.partitions if p.is_extended):
            lbas.add(extended.start_lba)
            for logical in mbr.walk_ebr_chain(
                read_sector, extended.start_lba, extended.size_sectors
            ):
                lbas.add(logical.ebr_lba)
        return [{"lba": lba, "hex": read_sector(lba).hex()} for lba in sorted(lbas)]
    finally:
        os.close(fd)


def _fingerprint(source: Path, layout: Layout, chain: list[Partition], region_spool: int | None,
                 files_spool: int | None, files_reason: str | None, live_host: bool) -> dict:
    """What `mbrescue check` compares (runner/bootfiles.py); warns of a kernel without modules."""
    fd = region_spool if region_spool is not None else os.open(source, os.O_RDONLY)
    try:
        record = bootfiles.fingerprint(layout, chain, fd, files_spool, files_reason, live_host)
    finally:
        if region_spool is None:
            os.close(fd)
    return _warn_of_kernels(record)


def _warn_of_kernels(record: dict) -> dict:
    for kernel in record["kernels"]:
        if kernel["modules"] is False:
            log.info(
                f"warning: /boot/{kernel['file']} has no {bootfiles.MODULES_DIR}/"
                f"{kernel['version']} on this system: restored, it would boot without its modules"
            )
    return record


def _copy_chain(layout: Layout, chain: list[Partition]) -> list[tuple[int, int, str]]:
    sector = layout.disk.logical_sector_bytes
    return [(p.number, p.start_lba * sector, p.fs.type) for p in chain if p.fs is not None]


def _is_swap(part: Partition) -> bool:
    return (part.fs is not None and part.fs.type == "swap") or (part.type or "").lower() in (
        "0x82", "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f")


def _read_file_copies(layout: Layout, chain: list[Partition], spool: int,
                      scratch: Path) -> list[tuple[dict, Path]]:
    """The file-level copy of each boot-chain file system (runner/filecopy.py), read from the
    region's spool (the bytes the region member holds): its files then refer to them."""
    return filecopy.read_copies(f"/proc/self/fd/{spool}", _copy_chain(layout, chain), scratch,
                                (spool,), warn=log.info, region_fd=spool)


def _boot_loader(source: Path, layout: Layout, chain: list[Partition], boot_number: int,
                 region_bytes: int, spool: int | None, out: BinaryIO, file_copies: list[dict],
                 fingerprint: dict) -> list[dict]:
    """How the boot loader was installed (runner/bootloader.py), from the region's bytes as
    captured (its spool; the source without one) and the file copies' listings."""
    out.flush()
    files: dict[int, list[str]] = {}
    # The output is open write-only: read it through a second, read-only open of the same file.
    written = os.open(f"/proc/self/fd/{out.fileno()}", os.O_RDONLY)
    try:
        for record in file_copies:
            if record["partition"] == boot_number and fingerprint.get("files"):
                # /boot's listing is at hand: no need to inflate its (large) copy again.
                files[boot_number] = [entry["path"] for entry in fingerprint["files"]]
                continue
            names = bootloader.member_names(written, record["member"])
            if names is not None:
                files[record["partition"]] = names
    finally:
        os.close(written)
    views = [bootloader.PartitionView(p.number, p.start_lba, p.size_sectors, p.type or "",
                                      p.fs.type if p.fs else None, p.bootable)
             for p in layout.partitions if not p.is_extended]
    fd = spool if spool is not None else os.open(source, os.O_RDONLY)
    try:
        def read(offset: int, length: int) -> bytes:
            return os.pread(fd, max(0, min(length, region_bytes - offset)), offset)

        return bootloader.detect(read, layout.disk.logical_sector_bytes, layout.table, views,
                                 [p.number for p in chain], files)
    finally:
        if spool is None:
            os.close(fd)


# --- the host's MAC addresses (they pick its network-boot menu: builder/netboot.py) ----------

SYS_NET = "/sys/class/net"


def normal_mac(text: str) -> str:
    """A MAC address as the manifest and GRUB's $net_default_mac spell it: lower case, colons."""
    mac = text.strip().lower().replace("-", ":")
    if not MAC_RE.fullmatch(mac) or mac == "00:00:00:00:00:00":
        raise MbrescueError(f"{text!r} is not a MAC address (like 52:54:00:12:34:56)")
    if int(mac[:2], 16) & 1:
        raise MbrescueError(f"{text!r} is a multicast address, not a machine's MAC address")
    return mac


def nic_macs(sys_net: str = SYS_NET) -> tuple[str, ...]:
    """This machine's physical NICs' MAC addresses: interfaces with a device behind them (so
    not lo, bridges, bonds, VLANs, tunnels, ifb), each once, sorted."""
    found = set()
    for name in sorted(os.listdir(sys_net)) if os.path.isdir(sys_net) else ():
        base = os.path.join(sys_net, name)
        if not os.path.exists(os.path.join(base, "device")):
            continue
        # A bonded NIC shows the bond's address; the firmware boots with its own.
        for leaf in ("bonding_slave/perm_hwaddr", "address"):
            try:
                with open(os.path.join(base, leaf)) as stream:
                    text = stream.read().strip()
                break
            except OSError:
                continue
        else:
            continue
        with contextlib.suppress(MbrescueError):  # all zero, or not Ethernet (InfiniBand)
            found.add(normal_mac(text))
    return tuple(sorted(found))


def _host_macs(source: Path, given: tuple[str, ...] | None) -> tuple[str, ...]:
    if given is not None:
        macs: list[str] = []
        for text in given:
            try:
                mac = normal_mac(text)
            except MbrescueError as exc:
                raise MbrescueError(f"--mac: {exc}") from None
            if mac not in macs:
                macs.append(mac)
        return tuple(macs)
    if not _is_block(source):
        return ()  # an image file: whose machine it came from is not known here
    macs = list(nic_macs())
    log.info(f"MAC addresses of this machine's NICs (they pick its network-boot menu): "
             f"{', '.join(macs) or 'none found'}")
    return tuple(macs)
