"""Where an output file may go: never over something that is not a plain file.

Outputs are written to a temporary name and renamed over the destination when complete;
a rename over `/dev/sda` (or any device node, FIFO or socket) would replace the node
with a regular file. And a host name becomes part of file names, so it must be a name,
not a path.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

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
