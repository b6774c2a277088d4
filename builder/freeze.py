"""Finding where a source's partitions are mounted, and freezing them for a consistent read.

A mounted `/boot` keeps changing under a reader: FIFREEZE flushes it and holds new
writes until FITHAW, so the bytes read in between are a consistent file system.
Every writer of that file system waits meanwhile (a kernel update, and this very
process if it wrote there), so the freeze is kept short and bounded:

- the caller refuses, before freezing, to write anything on the file system it would
  freeze (`refuse_writes_onto`);
- the file system holding the running system's root is never frozen (`is_system_root`);
- a watchdog process, forked before the freeze, holds its own descriptor on the
  mount point and thaws when the limit passes or when this process dies, SIGKILL
  included (a killed process's freeze is never undone by the kernel);
- SIGTERM, SIGINT and SIGHUP unwind through the thaw; if the watchdog dies, the
  freeze is undone at once, because the bound no longer holds.

File systems that cannot be frozen (vfat) are reported so the caller can read
twice and compare instead. A partition under md RAID or device-mapper (LVM,
dm-crypt) is reported as such (`stacked_mounts`): its mounted file system is not
the partition's bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import log
from .errors import MbrescueError

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
# A frozen /boot stalls every writer of it (kernel and initrd updates, package
# managers), so no freeze outlives this many seconds: reading a real /boot (a few
# hundred MiB into memory or a spool file) takes a second or two, 60 s leaves a slow
# or busy disk room without letting a stuck capture hold the host's /boot for long.
FREEZE_LIMIT_S = 60.0
# Tests (and a cautious administrator) may lower the bound, never raise it.
FREEZE_LIMIT_ENV = "MBRESCUE_FREEZE_LIMIT_S"
# Exit codes of the watchdog process.
_WATCHDOG_RELEASED = 0  # the parent thawed and said so
_WATCHDOG_EXPIRED = 3  # the limit passed: the watchdog thawed
_WATCHDOG_ORPHANED = 4  # the parent went away without a word: the watchdog thawed
_WATCHDOG_IDLE = 5  # the limit passed, but the file system was thawed already


class FreezeLost(MbrescueError):
    """The file system was thawed before the read finished: the copy is not consistent."""


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


def freeze_limit_s() -> float:
    """FREEZE_LIMIT_S, or a lower bound from the environment."""
    raw = os.environ.get(FREEZE_LIMIT_ENV)
    if raw is None or raw == "":
        return FREEZE_LIMIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= FREEZE_LIMIT_S:
        raise MbrescueError(
            f"{FREEZE_LIMIT_ENV}={raw!r}: must be a number of seconds above 0 and at most "
            f"{FREEZE_LIMIT_S:g} (the bound may be lowered, never raised)"
        )
    return value


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


def dev_of(st_dev: int) -> str:
    return f"{os.major(st_dev)}:{os.minor(st_dev)}"


def _backing_of_source(source: str) -> tuple[str | None, str | None]:
    """(whole-disk major:minor if source is a block device, backing file if a file or loop)."""
    st = os.stat(source)
    if stat.S_ISBLK(st.st_mode):
        dev = dev_of(st.st_rdev)
        backing = _read(_sysfs_dev(dev) / "loop" / "backing_file")
        return dev, backing
    return None, os.path.realpath(source)


class _PartitionMatcher:
    """Tells which partition of the source (if any) a block device major:minor is."""

    def __init__(self, source: str, partition_starts: dict[int, int], sector_bytes: int) -> None:
        self.whole_dev, self.backing = _backing_of_source(source)
        self.partition_starts = partition_starts
        self.by_start = {start * sector_bytes: number for number, start in partition_starts.items()}

    def number(self, dev: str) -> int | None:
        sys_dir = _sysfs_dev(dev)
        if not sys_dir.exists():
            return None
        number: int | None = None
        part = _read(sys_dir / "partition")
        if part is not None and self.whole_dev is not None:
            parent = _read(sys_dir.resolve().parent / "dev")
            if parent == self.whole_dev:
                number = int(part)
        loop_backing = _read(sys_dir / "loop" / "backing_file")
        if (
            number is None
            and loop_backing
            and self.backing
            and _same_file(loop_backing, self.backing)
        ):
            offset = int(_read(sys_dir / "loop" / "offset") or 0)
            number = self.by_start.get(offset)
        return number if number in self.partition_starts else None


def partition_mounts(
    source: str, partition_starts: dict[int, int], sector_bytes: int
) -> dict[int, Mount]:
    """Which of the source's partitions (number → start LBA) are mounted, and where.

    Covers a real disk's partitions (sysfs `partition` under the disk) and the case
    of an image file, or a loop device over it, whose partition is mounted through
    another loop device at the partition's offset.
    """
    matcher = _PartitionMatcher(source, partition_starts, sector_bytes)
    result: dict[int, Mount] = {}
    for mount in mounts():
        number = matcher.number(mount.device)
        if number is not None:
            result.setdefault(number, mount)
    return result


# -- md RAID and device-mapper ------------------------------------------------------------------


@dataclass(frozen=True)
class StackedDevice:
    """A block device built on top of others: md RAID or device-mapper (LVM, dm-crypt...)."""

    dev: str  # major:minor
    name: str  # md0, vg-boot, ...
    kind: str  # "md RAID1", "LVM", "dm-crypt", "device-mapper"
    slaves: tuple[str, ...]  # major:minor of every device below it, recursively


def stacked_device(dev: str) -> StackedDevice | None:
    """What /sys/dev/block/MAJ:MIN says the device is, if it is md or device-mapper."""
    sys_dir = _sysfs_dev(dev)
    if (sys_dir / "md").is_dir():
        level = _read(sys_dir / "md" / "level") or "unknown level"
        kind = f"md {level.upper()}" if level.startswith("raid") else f"md {level}"
        name = sys_dir.resolve().name
    elif (sys_dir / "dm").is_dir():
        uuid = _read(sys_dir / "dm" / "uuid") or ""
        name = _read(sys_dir / "dm" / "name") or sys_dir.resolve().name
        if uuid.startswith("LVM-"):
            kind = "LVM"
        elif uuid.startswith("CRYPT-"):
            kind = "dm-crypt"
        else:
            kind = "device-mapper"
    else:
        return None
    return StackedDevice(dev, name, kind, tuple(_all_slaves(dev)))


def _all_slaves(dev: str) -> list[str]:
    found: list[str] = []
    pending = [dev]
    while pending:
        slaves_dir = _sysfs_dev(pending.pop()) / "slaves"
        try:
            names = sorted(os.listdir(slaves_dir))
        except OSError:
            continue
        for name in names:
            slave = _read(slaves_dir / name / "dev")
            if slave and slave not in found:
                found.append(slave)
                pending.append(slave)
    return found


@dataclass(frozen=True)
class StackedMount:
    partition: int
    mount: Mount
    device: StackedDevice


def stacked_mounts(
    source: str, partition_starts: dict[int, int], sector_bytes: int
) -> list[StackedMount]:
    """Mounted md/dm devices with one of the source's partitions below them."""
    matcher = _PartitionMatcher(source, partition_starts, sector_bytes)
    found = []
    for mount in mounts():
        device = stacked_device(mount.device)
        if device is None:
            continue
        for slave in device.slaves:
            number = matcher.number(slave)
            if number is not None:
                found.append(StackedMount(number, mount, device))
    return found


def describe_stacked(source: str, stacked: StackedMount) -> MbrescueError:
    """The one line that says what is and is not supported for /boot on md or dm."""
    where = f"partition {stacked.partition} of {source}"
    mounted = (
        f"{stacked.device.kind} device {stacked.device.name}, mounted at {stacked.mount.mountpoint}"
    )
    if stacked.device.kind == "md RAID1":
        return MbrescueError(
            f"{where} is a member of the {mounted}: capturing a mounted RAID1 member is not "
            "supported (its file system is written through the array, not through the member)",
            hint="capture each RAID1 member disk with the array stopped, e.g. from a live system",
        )
    return MbrescueError(
        f"{where} lies under the {mounted}: not supported: /boot on {stacked.device.kind} "
        "(a capture holds plain partitions only)",
        hint="keep /boot on a plain partition of the boot disk",
    )


# -- the system's root is never frozen -----------------------------------------------------------


def root_devices() -> set[str]:
    """The file systems that are the root of this process and of the running system (pid 1)."""
    found = {dev_of(os.stat("/").st_dev)}
    with contextlib.suppress(OSError):
        found.add(dev_of(os.stat("/proc/1/root").st_dev))
    return found


def is_system_root(mount: Mount) -> bool:
    return mount.mountpoint == "/" or mount.device in root_devices()


def refuse_writes_onto(mount: Mount, paths: dict[str, str]) -> None:
    """Refuse before freezing when something this process writes lives on mount's file system.

    paths: what it is → path (the output's directory, where the temporary output
    and spool live, and so on). stdout and stderr are checked too: a log redirected
    onto the frozen /boot would block the process until the thaw.
    """
    for what, path in paths.items():
        try:
            dev = dev_of(os.stat(path).st_dev)
        except OSError:
            continue
        if dev == mount.device:
            raise MbrescueError(
                f"{what} {path} is on {mount.mountpoint}, the file system to be frozen for the "
                "read (a write there would block until the thaw); nothing frozen, nothing written",
                hint="write the capture to another file system",
            )
    for fd, name in ((1, "standard output"), (2, "standard error")):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and dev_of(st.st_dev) == mount.device:
            raise MbrescueError(
                f"{name} is redirected to a file on {mount.mountpoint}, the file system that "
                "would be frozen for the read; nothing frozen, nothing written",
                hint=f"redirect it outside {mount.mountpoint}",
            )


# -- the freeze and its watchdog -----------------------------------------------------------------


class _Interrupted(KeyboardInterrupt):
    pass


def _signal_to_interrupt(signum: int, frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _thaw_quietly(fd: int) -> bool:
    """FITHAW; True if this call thawed it (False: it was not frozen, or failed)."""
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError:
        return False
    return True


def _watchdog(fd: int, parent_pipe: int, deadline: float, mountpoint: str) -> int:
    """The forked child: thaw at the deadline or when the parent goes, whichever first."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            if not _thaw_quietly(fd):
                return _WATCHDOG_IDLE  # thawed already: the parent is about to say so
            os.write(
                2,
                f"mbrescue: the freeze of {mountpoint} reached its limit; the watchdog "
                "thawed it\n".encode(),
            )
            return _WATCHDOG_EXPIRED
        try:
            ready, _, _ = select.select([parent_pipe], [], [], left)
        except InterruptedError:
            continue
        if ready:
            word = os.read(parent_pipe, 1)
            if word == b"d":
                return _WATCHDOG_RELEASED
            if _thaw_quietly(fd):
                os.write(
                    2,
                    f"mbrescue: the capture process ended while {mountpoint} was frozen; "
                    "the watchdog thawed it\n".encode(),
                )
            return _WATCHDOG_ORPHANED


def _start_watchdog(fd: int, mountpoint: str, limit_s: float) -> tuple[int, int]:
    """Fork the watchdog; returns (its pid, the write end of the pipe it watches)."""
    read_end, write_end = os.pipe()  # both close-on-exec: no later child holds them
    deadline = time.monotonic() + limit_s
    # No signal may reach the child before it ignores them (a Ctrl-C to the whole
    # process group must not kill the one process that would thaw).
    blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:  # the watchdog: never returns into the caller's code
        code = _WATCHDOG_EXPIRED
        try:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.close(write_end)
            code = _watchdog(fd, read_end, deadline, mountpoint)
        except BaseException:  # the child must reach os._exit, whatever happens
            _thaw_quietly(fd)
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(read_end)
    return pid, write_end


@contextlib.contextmanager
def frozen(mountpoint: str, limit_s: float | None = None) -> Iterator[bool]:
    """Freeze the file system at mountpoint for the block; yield False if it cannot be frozen.

    Raises FreezeLost at the end of the block if the file system was thawed before
    the block ended (the watchdog's limit, or someone else's `fsfreeze -u`).
    """
    limit_s = freeze_limit_s() if limit_s is None else limit_s
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
    previous = {signum: signal.getsignal(signum) for signum in handled}
    watchdog: tuple[int, int] | None = None
    finishing = False
    thaw_pending = False

    def watchdog_died(signum: int, frame: object) -> None:
        if finishing or watchdog is None:
            return
        try:
            pid, status = os.waitpid(watchdog[0], os.WNOHANG)
        except ChildProcessError:
            return
        code = os.waitstatus_to_exitcode(status)
        if pid == 0 or code == _WATCHDOG_IDLE:
            return  # another child of this process, or nothing was left to thaw
        if code == _WATCHDOG_EXPIRED:
            raise FreezeLost(
                f"the freeze of {mountpoint} reached its {limit_s:g} s limit before the read "
                "finished and the watchdog thawed it: the copy is not consistent; nothing kept",
                hint="retry when the disk is less busy",
            )
        raise FreezeLost(
            f"the freeze watchdog of {mountpoint} ended unexpectedly; thawed at once "
            "(without it the freeze is not bounded); nothing kept"
        )

    try:
        watchdog = _start_watchdog(fd, mountpoint, limit_s)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, _signal_to_interrupt)
        signal.signal(signal.SIGCHLD, watchdog_died)
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
        thaw_pending = True
        started = time.monotonic()
        log.info(f"froze {mountpoint} for a consistent read (at most {limit_s:g} s)")
        body_failed = True
        try:
            yield True
            body_failed = False
        finally:
            # The thaw comes first; only then is the watchdog told. A thaw that finds the
            # file system not frozen means it was thawed during the read.
            thawed_here = _thaw_quietly(fd)
            thaw_pending = False
            held_s = time.monotonic() - started
            if thawed_here:
                log.info(f"thawed {mountpoint} after {held_s:.2f} s")
            elif not body_failed:
                raise FreezeLost(
                    f"{mountpoint} was thawed before the read finished (freeze limit "
                    f"{limit_s:g} s, {held_s:.1f} s elapsed): the copy is not consistent; "
                    "nothing kept",
                    hint="retry when the disk is less busy",
                )
    finally:
        finishing = True
        if thaw_pending and _thaw_quietly(fd):  # a signal came before the block began
            log.info(f"thawed {mountpoint}")
        if watchdog is not None:
            pid, write_end = watchdog
            with contextlib.suppress(OSError):
                os.write(write_end, b"d")
            os.close(write_end)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for signum, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, handler)
        os.close(fd)
