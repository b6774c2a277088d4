"""The host side's own command line: what the bundle (`mbrescue bundle -o PATH`) runs.

Standard library only (argparse, not typer), so that it runs on the rescue kit's
stripped Python with nothing installed on the protected host. `capture` and `restore`
take the arguments of `mbrescue capture` and `mbrescue restore` and call the very
functions those call (`capture.capture`, `runner.restore.restore`). Every failure a
user can cause is one `mbrescue: error: ...` line and a non-zero status.

Each subcommand is one `HostCommand` in `COMMANDS`; a later command (`check`,
`install`) is one module that defines its `HostCommand` and one line here. The bundle
takes every module of the package this file reaches by relative imports, so the new
module travels with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from . import __version__, log, options
from .errors import MbrescueError
from .runner import check as drift_check
from .runner import install as host_install
from .runner import refresh as host_refresh
from .runner.console import printable
from .runner.errors import Interrupted
from .runner.outputs import output_argument
from .runner.restore import cli_rerun

try:  # written into the bundle by builder/bundle.py: which kit the bundle was made from
    from ._bundle_info import KIT  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    KIT = None

# The bundle's launcher names the file it was started as (as typed, and its absolute path:
# inside the bundle sys.executable is empty); outside the bundle neither is set.
BUNDLE_ENV = "MBRESCUE_BUNDLE"
BUNDLE_FILE_ENV = "MBRESCUE_BUNDLE_FILE"


@dataclass(frozen=True)
class HostCommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `mbrescue: error:` line like every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"mbrescue: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class _Version(argparse.Action):
    """`--version` as it is, unwrapped (argparse's own action re-flows the text)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> NoReturn:
        print(version_text())
        parser.exit(0)


# ---- capture -------------------------------------------------------------------------------


def _capture_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_to_parser(parser, options.CAPTURE)


def _capture(args: argparse.Namespace) -> int:
    from .capture import CaptureOptions, capture

    source = Path(args.source)
    result = capture(CaptureOptions(
        source=source,
        output=output_argument(args.output),
        boot_partition=args.boot_partition,
        hostname=args.hostname,
        sector_bytes=args.sector_bytes,
        macs=tuple(args.mac) if args.mac else None,
    ))
    region = result.manifest["region"]
    log.info(
        f"captured {log.human_bytes(region['length_bytes'])} boot region of {source} "
        f"({log.human_bytes(result.path.stat().st_size)} on disk)"
    )
    log.info(f"wrote {result.path} (mode 0600: it holds the host's /boot, which can hold secrets)")
    if args.as_json:
        print(json.dumps(result.as_json(source), indent=2))
    return 0


# ---- restore -------------------------------------------------------------------------------


def _restore_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_to_parser(parser, options.RESTORE)


def _bundle_rerun(capture: str, sector_bytes: int | None, assume_yes: bool
                  ) -> Callable[[str], list[str]]:
    """The command that finishes an interrupted restore on this host: the bundle's own
    (a bundle-only host has no `mbrescue`)."""
    plain = cli_rerun(capture, sector_bytes, assume_yes)
    program = os.environ.get(BUNDLE_FILE_ENV) or os.environ.get(BUNDLE_ENV) or "mbrescue-host"
    return lambda target: [program, *plain(target)[1:]]


def _restore(args: argparse.Namespace) -> int:
    from .runner.console import Console
    from .runner.restore import restore

    console = Console.stdio()
    try:
        return restore(args.capture, args.target, console=console, assume_yes=args.yes,
                       sector_bytes=args.sector_bytes, files=args.files,
                       rerun=_bundle_rerun(args.capture, args.sector_bytes, args.yes))
    finally:
        console.close()


COMMANDS: tuple[HostCommand, ...] = (
    HostCommand("capture", "capture SOURCE's MBR, post-MBR gap, /boot and layout into one file",
                _capture_arguments, _capture),
    HostCommand("restore", "write a capture's boot region onto TARGET, after the plan and a "
                "typed yes", _restore_arguments, _restore),
    HostCommand("check", drift_check.HELP, drift_check.add_arguments, drift_check.run),
    HostCommand("install", host_install.INSTALL_HELP, host_install.add_install_arguments,
                host_install.run_install),
    HostCommand("uninstall", host_install.UNINSTALL_HELP, host_install.add_arguments,
                host_install.run_uninstall),
    HostCommand("refresh", host_refresh.HELP, host_refresh.add_arguments, host_refresh.run),
)


# ---- the command line ----------------------------------------------------------------------


def program_name() -> str:
    bundle = os.environ.get(BUNDLE_ENV)
    return os.path.basename(bundle) if bundle else "mbrescue-host"


def version_text() -> str:
    python = sys.version.split()[0]
    if KIT is None:
        return f"mbrescue {__version__} (not bundled; Python {python})"
    packages = ", ".join(f"{name} {version}" for name, version in sorted(KIT["packages"].items()))
    return (f"mbrescue {__version__} (host bundle; rescue kit's Python {python}; "
            f"Debian packages: {packages})")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog=program_name(), description=__doc__.split("\n")[0])
    top.add_argument("--version", action=_Version, nargs=0,
                     help="print the mbrescue version and the kit it was bundled from")
    top.add_argument("--debug", action="store_true", help="log debug output")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND",
                             parser_class=_Parser)
    for command in COMMANDS:
        command.add_arguments(sub.add_parser(command.name, help=command.help,
                                             description=command.help))
    return top


def _rerun_hint(argv: list[str]) -> str:
    return shlex.join([program_name(), "--debug", *(arg for arg in argv if arg != "--debug")])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    log.set_debug(args.debug)
    run = {command.name: command.run for command in COMMANDS}[args.command]
    try:
        status = run(args)
        sys.stdout.flush()
        return status
    except KeyboardInterrupt:
        print("mbrescue: error: interrupted", file=sys.stderr)
        return 130
    except MbrescueError as exc:
        line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        print(printable(f"mbrescue: error: {line}{hint}"), file=sys.stderr)
        return 130 if isinstance(exc, Interrupted) else 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(printable(f"mbrescue: error: {where}{exc.strerror or exc}"), file=sys.stderr)
        return 1
    except Exception as exc:  # the last guard: never a bare traceback
        if args.debug:
            traceback.print_exception(exc, file=sys.stderr)
            where = "the traceback is above"
        else:
            where = f"rerun with --debug for the traceback: {_rerun_hint(argv)}"
        message = str(exc).splitlines()[0] if str(exc).strip() else "(no message)"
        print(f"mbrescue: error: {type(exc).__name__}: {message} (this is a bug; {where})",
              file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
