"""Finding where a source's partitions are mounted, and freezing them for a consistent read.

A mounted `/boot` keeps changing under a reader: FIFREEZE flushes it and holds new
writes until FITHAW, so the bytes read in between are a consistent file system.
The thaw is registered before the freeze returns and runs on any exit, Ctrl-C
and SIGTERM included. File systems that cannot be frozen (vfat) are reported so
the caller can read twice and compare instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import log
from .errors import MbrescueError

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


@dataclass(frozen=True)
class Mount:
    device: str  # major:minor
    mountpoint: str
    fstype: str


def mounts() -> list[Mount]:
    found = []
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            sep = fields.index("-")
            mountpoint = fields[4].encode().decode("unicode_escape")
            found.append(Mount(fields[2], mountpoint, fields[sep + 1]))
    return found


def _sysfs_dev(dev: str) -> Path:
    return Path("/sys/dev/block") / dev


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _backing_of_source(source: str) -> tuple[str | None, str | None]:
    """(whole-disk major:minor if source is a block device, backing file if a file or loop)."""
    st = os.stat(source)
    if stat.S_ISBLK(st.st_mode):
        dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        backing = _read(_sysfs_dev(dev) / "loop" / "backing_file")
        return dev, backing
    return None, os.path.realpath(source)


def partition_mounts(
    source: str, partition_starts: dict[int, int], sector_bytes: int
) -> dict[int, Mount]:
    """Which of the source's partitions (number → start LBA) are mounted, and where.

    Covers a real disk's partitions (sysfs `partition` under the disk) and the case
    of an image file, or a loop device over it, whose partition is mounted through
    another loop device at the partition's offset.
    """
    whole_dev, backing = _backing_of_source(source)
    by_start = {start * sector_bytes: number for number, start in partition_starts.items()}
    result: dict[int, Mount] = {}
    for mount in mounts():
        sys_dir = _sysfs_dev(mount.device)
        if not sys_dir.exists():
            continue
        number: int | None = None
        part = _read(sys_dir / "partition")
        if part is not None and whole_dev is not None:
            parent = _read(sys_dir.resolve().parent / "dev")
            if parent == whole_dev:
                number = int(part)
        loop_backing = _read(sys_dir / "loop" / "backing_file")
        if number is None and loop_backing and backing and _same_file(loop_backing, backing):
            offset = int(_read(sys_dir / "loop" / "offset") or 0)
            number = by_start.get(offset)
        if number is not None and number in partition_starts:
            result.setdefault(number, mount)
    return result


def _signal_to_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def frozen(mountpoint: str) -> Iterator[bool]:
    """Freeze the file system at mountpoint for the block; yield False if it cannot be frozen."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                log.info(
                    f"{mountpoint} cannot be frozen ({exc.strerror}); reading it twice instead"
                )
                yield False
                return
            if exc.errno == errno.EBUSY:
                raise MbrescueError(f"{mountpoint} is already frozen by someone else") from exc
            raise MbrescueError(f"cannot freeze {mountpoint}: {exc.strerror}") from exc
        # From here on the thaw must happen whatever occurs, SIGTERM included.
        signal.signal(signal.SIGTERM, _signal_to_interrupt)
        log.info(f"froze {mountpoint} for a consistent read")
        try:
            yield True
        finally:
            fcntl.ioctl(fd, FITHAW, 0)
            log.info(f"thawed {mountpoint}")
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.close(fd)
