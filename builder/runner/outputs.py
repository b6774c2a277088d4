"""Where an output file may go: never over something that is not a plain file.

Outputs are written to a temporary name and renamed over the destination when complete;
a rename over `/dev/sda` (or any device node, FIFO or socket) would replace the node
with a regular file. And a host name becomes part of file names, so it must be a name,
not a path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import MbrescueError

# RFC 1123 labels joined by dots, as `hostname` prints them; no slash, no leading dot.
HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63}){0,8}")


def check_hostname(name: str) -> str:
    if not HOSTNAME_RE.fullmatch(name):
        raise MbrescueError(
            f"host name {name[:60]!r} is not a host name (letters, digits, '-', '_' and dots; "
            "it names the output files)"
        )
    return name


def check_output_file(path: Path) -> Path:
    """Refuse a destination that exists and is not a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise MbrescueError(f"cannot write {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = "a block device" if stat.S_ISBLK(st.st_mode) else (
            "a character device" if stat.S_ISCHR(st.st_mode) else "not a regular file")
        raise MbrescueError(f"refusing to write {path}: it is {kind}, not a file "
                            "(outputs replace what they are renamed over)")
    return path


# ---- creating an output: a fresh temporary name, then a rename -----------------------------
#
# An output directory may be shared (a TFTP tree, /tmp, a capture directory on a fleet
# controller). A temporary name someone else can predict and plant (a symlink to /etc/shadow,
# a file they own and keep open) must never be opened as ours: every temporary output is
# created with O_CREAT|O_EXCL|O_NOFOLLOW under a random name, in a directory that nobody
# else may write to (or, like /tmp, sticky: others cannot rename or remove what we made).
# Once created there, the name stays ours, so a writer that reopens it by name is safe.

TEMP_ATTEMPTS = 100


def output_argument(text: str | None) -> Path | None:
    """`-o TEXT` as typed: `-` and a trailing `/` mean what the user meant, not a file
    named `-` or a file named like the directory that does not exist."""
    if text is None:
        return None
    if text == "-":
        raise MbrescueError("-o -: this output is not written to stdout (it is written whole "
                            "to a temporary file, checked, then renamed into place)",
                            hint="give a file name or an existing directory")
    if text.endswith("/") and not os.path.isdir(text):
        raise MbrescueError(f"-o {text}: no such directory",
                            hint=f"create it first (mkdir -p {text}) or drop the trailing /")
    return Path(text)


def check_parent_dir(out: Path) -> None:
    """The directory an output goes into exists (a missing one is called missing)."""
    parent = out.parent
    if parent.is_dir():
        return
    if not os.path.lexists(parent):
        raise MbrescueError(f"cannot write {out}: {parent}: no such directory",
                            hint=f"create it first: mkdir -p {parent}")
    raise MbrescueError(f"cannot write {out}: {parent} is not a directory")


def check_output_dir(folder: Path) -> Path:
    """Refuse a directory in which another user could swap our temporary files."""
    try:
        st = os.stat(folder)
    except OSError as exc:
        raise MbrescueError(f"cannot write into {folder}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise MbrescueError(f"cannot write into {folder}: not a directory")
    sticky = bool(st.st_mode & stat.S_ISVTX)
    if st.st_mode & stat.S_IWOTH and not sticky:
        raise MbrescueError(
            f"refusing to write into {folder}: anybody may write to it and it is not sticky "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); another user could replace what is written")
    if st.st_uid not in (0, os.geteuid()) and not sticky:
        raise MbrescueError(f"refusing to write into {folder}: it belongs to user {st.st_uid}, "
                            "who could replace what is written")
    return folder


def create_temporary(dest: Path, mode: int = 0o600) -> tuple[int, Path]:
    """A new, empty, private file next to dest (fd open read-write, and its name)."""
    check_output_dir(dest.parent)
    check_output_file(dest)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(TEMP_ATTEMPTS):
        # The PID says whose it is (refresh removes those of a writer that died); the random
        # part makes the name one nobody can plant beforehand.
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{os.urandom(8).hex()}")
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise MbrescueError(f"cannot write {dest}: {exc.strerror}") from exc
        os.fchmod(fd, mode)  # the umask plays no part
        return fd, tmp
    raise MbrescueError(f"cannot write {dest}: no free temporary name in {dest.parent}")


def commit(tmp: Path, dest: Path) -> None:
    """Rename a complete temporary file over dest (a rename never follows a link at dest)."""
    check_output_file(dest)
    os.replace(tmp, dest)


@contextlib.contextmanager
def new_output(dest: Path, mode: int = 0o600) -> Iterator[tuple[BinaryIO, Path]]:
    """Write dest through a fresh temporary file; renamed over dest only if the block ends
    without an exception (then fsynced first), removed otherwise."""
    fd, tmp = create_temporary(dest, mode)
    try:
        with os.fdopen(fd, "w+b") as stream:
            yield stream, tmp
            stream.flush()
            os.fsync(stream.fileno())
        commit(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_output(dest: Path, data: bytes, mode: int = 0o600) -> None:
    """dest holds data, all of it or (on any failure) what it held before."""
    with new_output(dest, mode) as (stream, _):
        stream.write(data)


def copy_output(source: Path, dest: Path, mode: int = 0o600) -> None:
    with new_output(dest, mode) as (stream, _), open(source, "rb") as reading:
        shutil.copyfileobj(reading, stream, 1 << 20)


# ---- an input is never its own output ------------------------------------------------------


def _identities(path: str) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of what path is; for a block device also (-1, its device number)
    and, for a loop device, its backing file's (st_dev, st_ino)."""
    try:
        st = os.stat(path)
    except OSError:
        return set()
    found = {(st.st_dev, st.st_ino)}
    if stat.S_ISBLK(st.st_mode):
        found.add((-1, st.st_rdev))
        backing = loop_backing(st.st_rdev)
        if backing is not None:
            found.add(backing)
    return found


# <linux/loop.h>: LOOP_GET_STATUS64 fills a struct loop_info64 (232 bytes) whose first two
# fields are the backing file's device and inode numbers.
LOOP_GET_STATUS64 = 0x4C05
LOOP_INFO64_BYTES = 232
LOOP_MAJOR = 7


def loop_backing(rdev: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file loop device rdev reads; None if not a loop or detached.

    Asked of the device itself, not of sysfs's backing_file: that is a name, and a name is
    neither a hard link's nor, once the file is unlinked, anything that can be looked up."""
    sysfs = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/loop/backing_file"
    if os.major(rdev) == LOOP_MAJOR:
        # The rescue system's devtmpfs has no /dev/block: the node by its kernel name.
        node = "/dev/" + os.path.basename(os.path.realpath(os.path.dirname(os.path.dirname(sysfs))))
        with contextlib.suppress(OSError):
            fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                if os.fstat(fd).st_rdev != rdev:
                    raise OSError(f"{node} is another device")
                info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64_BYTES))
            finally:
                os.close(fd)
            device, inode = struct.unpack_from("<QQ", info)
            return (os.makedev((device >> 8) & 0xFFF, (device & 0xFF) | ((device >> 12) & ~0xFF)),
                    inode)
    try:
        with open(sysfs, encoding="utf-8", errors="surrogateescape") as handle:
            st = os.stat(handle.read().rstrip("\n"))
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def refuse_same_file(source: str | os.PathLike[str], output: str | os.PathLike[str],
                     what: str = "the output") -> None:
    """Refuse when output is source (same inode, through a symlink or a hard link, or a loop
    device backed by it)."""
    if _identities(os.fspath(source)) & _identities(os.fspath(output)):
        raise MbrescueError(f"{output} is {source} itself: {what} would overwrite its input; "
                            "nothing written")


# ---- inputs: never wait on a FIFO ----------------------------------------------------------


def open_input(path: str | os.PathLike[str], allow_block: bool = True) -> int:
    """A read-only descriptor on a regular file (or a block device); a FIFO, socket or
    character device is refused at once instead of blocking the open or the reads."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise MbrescueError(f"cannot read {os.fspath(path)}: {exc.strerror}") from exc
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or (allow_block and stat.S_ISBLK(mode))):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise MbrescueError(f"cannot read {os.fspath(path)}: it is {kind}"
                            f"{' or a block device' if allow_block and kind[0] == 'n' else ''}")
    os.set_blocking(fd, True)
    return fd
