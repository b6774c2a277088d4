"""`--debug` for the programs the capture and restore side run (losetup, mount, mke2fs …).

The command line (`mbrescue --debug`, the bundle's `--debug`) sets MBRESCUE_DEBUG=1; each
small `_run` helper calls `command()` before it starts a program, so the one switch reaches
code that imports nothing but the standard library, and the programs run by a child process
are logged too. Standard library only.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence

DEBUG_ENV = "MBRESCUE_DEBUG"


def enabled() -> bool:
    return os.environ.get(DEBUG_ENV) == "1"


def set_enabled(on: bool) -> None:
    """--debug turns it on (for this process and its children); without it, the
    environment decides."""
    if on:
        os.environ[DEBUG_ENV] = "1"


def command(argv: Sequence[str | os.PathLike[str]]) -> None:
    """Under --debug: the command, as a shell would take it, on stderr."""
    if enabled():
        print(f"mbrescue: debug: {shlex.join(os.fspath(a) for a in argv)}", file=sys.stderr,
              flush=True)
