"""Command line of the runner: `rescue CAPTURE` (run by the rescue system's /init) and
`restore CAPTURE TARGET` (the same code path on any Linux; `mbrescue restore` calls
`restore.restore` directly).

Exit status 0 after a verified restore; 1 with one `mbrescue: error: ...` line for a
refusal, an abort or a failure; 130 when interrupted (Ctrl-C, SIGTERM), with a line that
says "nothing written" or gives the exact command that finishes the restore.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from .cmdline import OPTIONS_PATH, capture_encrypted
from .console import Console
from .errors import MbrescueError
from .restore import Interrupted, restore
from .unlock import unlock

# What the rescue system's /init puts in front of the runner; repeated in the resume hint.
RERUN_ENVIRONMENT = ("PYTHONHASHSEED", "PYTHONPATH")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mbrescue_runner", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    rescue = sub.add_parser("rescue", help="restore from inside the rescue system (every console)")
    rescue.add_argument("capture")
    rescue.add_argument("--options", default=OPTIONS_PATH,
                        help="the build's options file (unattended opt-in)")
    direct = sub.add_parser("restore", help="restore onto TARGET (block device or image file)")
    direct.add_argument("capture")
    direct.add_argument("target")
    direct.add_argument("--yes", action="store_true", help="do not ask (for scripts)")
    direct.add_argument("--sector-bytes", type=int, default=None,
                        help="logical sector size of an image file TARGET (default 512)")
    direct.add_argument("--files", action="store_true",
                        help="take the file-level path even where the region path would do")
    return top


def runner_rerun(capture: str, sector_bytes: int | None, assume_yes: bool
                 ) -> Callable[[str], list[str]]:
    """This runner's `restore` command line for a target, as it can be typed again (in the
    rescue shell or wherever this ran)."""
    environment = [f"{name}={os.environ[name]}" for name in RERUN_ENVIRONMENT
                   if name in os.environ]

    def words(target: str) -> list[str]:
        extra = ["--sector-bytes", str(sector_bytes)] if sector_bytes else []
        return [*environment, sys.executable, "-m", __package__ or "mbrescue_runner",
                "restore", os.path.abspath(capture), os.path.abspath(target), *extra,
                *(["--yes"] if assume_yes else [])]

    return words


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rescue_mode = args.command == "rescue"
    console = Console.rescue() if rescue_mode else Console.stdio()
    try:
        if rescue_mode:
            capture = args.capture
            if capture_encrypted(args.options):
                # The plan needs the manifest: the passphrase first (unlock.py).
                capture = unlock(capture, console)
            return restore(capture, None, console=console, rescue=True,
                           options_path=args.options,
                           rerun=runner_rerun(capture, None, False))
        return restore(args.capture, args.target, console=console, assume_yes=args.yes,
                       sector_bytes=args.sector_bytes, files=args.files,
                       rerun=runner_rerun(args.capture, args.sector_bytes, args.yes))
    except Interrupted as exc:
        console.error(str(exc))
        return 130
    except MbrescueError as exc:
        console.error(str(exc))
        return 1
    except KeyboardInterrupt:
        console.error("interrupted before the restore began, nothing written")
        return 130
    finally:
        console.close()


if __name__ == "__main__":
    sys.exit(main())
