"""Command line of the runner: `rescue CAPTURE` (run by the rescue system's /init) and
`restore CAPTURE TARGET` (the same code path on any Linux; `mbrescue restore` calls
`restore.restore` directly).

Exit status 0 after a verified restore; 1 with one `mbrescue: error: ...` line for a
refusal, an abort or a failure; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys

from .cmdline import OPTIONS_PATH
from .console import Console
from .errors import MbrescueError
from .restore import restore


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
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rescue_mode = args.command == "rescue"
    console = Console.rescue() if rescue_mode else Console.stdio()
    try:
        if rescue_mode:
            return restore(args.capture, None, console=console, rescue=True,
                           options_path=args.options)
        return restore(args.capture, args.target, console=console, assume_yes=args.yes,
                       sector_bytes=args.sector_bytes)
    except MbrescueError as exc:
        console.error(str(exc))
        return 1
    except KeyboardInterrupt:
        console.error("interrupted; run the restore again to finish it")
        return 130
    finally:
        console.close()


if __name__ == "__main__":
    sys.exit(main())
