"""Where `build --encrypt` takes its passphrase from: a file, an environment variable, or a
prompt on the terminal — never the command line (`ps` shows every argument to every user).

One line: a trailing line end is not part of it (a file written by `echo` or a vault's
template ends with one), and any other line end is refused, since age reads one typed line.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from .errors import MbrescueError
from .runner.agecrypt import check_passphrase


def _one_line(raw: bytes, where: str) -> bytes:
    text = raw[:-1] if raw.endswith(b"\n") else raw
    text = text[:-1] if text.endswith(b"\r") else text
    try:
        check_passphrase(text)
    except MbrescueError as exc:
        raise MbrescueError(f"{where}: {exc}") from None
    return text


def read_passphrase(file: Path | None = None, env_name: str | None = None,
                    interactive: bool | None = None) -> bytes:
    """The passphrase from `file`, from the variable `env_name`, or typed twice on the
    terminal (only when stdin is one: a script without a source fails instead of hanging)."""
    if file is not None and env_name is not None:
        raise MbrescueError("--passphrase-file and --passphrase-env exclude each other")
    if file is not None:
        try:
            return _one_line(file.read_bytes(), f"--passphrase-file {file}")
        except OSError as exc:
            raise MbrescueError(f"cannot read --passphrase-file {file}: {exc.strerror}") from exc
    if env_name is not None:
        value = os.environb.get(os.fsencode(env_name))
        if value is None:
            raise MbrescueError(f"--passphrase-env {env_name}: no such environment variable")
        return _one_line(value, f"--passphrase-env {env_name}")
    if interactive is None:
        interactive = sys.stdin.isatty()
    if not interactive:
        raise MbrescueError("--encrypt needs a passphrase: --passphrase-file FILE, "
                            "--passphrase-env NAME, or run it on a terminal to type one")
    first = getpass.getpass("Passphrase for the rescue medium: ").encode()
    _one_line(first, "the passphrase")
    if getpass.getpass("The same passphrase again: ").encode() != first:
        raise MbrescueError("the two passphrases differ; nothing built")
    return first
