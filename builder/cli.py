"""The `mbrescue` command line: parse, call one function, turn known errors into one line.

Every failure a user can cause ends as `mbrescue: error: <what>` on stderr and a
non-zero exit status, never a traceback; `--debug` shows the commands run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import log
from .errors import MbrescueError

app = typer.Typer(
    name="mbrescue",
    help="Capture a host's boot disk region and build a rescue ISO that restores it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Log every external command.")] = False,
) -> None:
    log.set_debug(debug)


@app.command("capture")
def capture_command(
    source: Annotated[Path, typer.Argument(help="Boot disk (block device) or disk image file.")],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Capture file or directory [./HOST.mbrescue]."),
    ] = None,
    boot_partition: Annotated[
        int | None,
        typer.Option("--boot-partition", help="Number of the /boot partition (default: guessed)."),
    ] = None,
    hostname: Annotated[str | None, typer.Option("--hostname", help="Host name to record.")] = None,
    sector_bytes: Annotated[
        int | None,
        typer.Option("--sector-size", help="Logical sector size of an image file [512]."),
    ] = None,
) -> None:
    """Capture SOURCE's MBR, post-MBR gap, /boot and layout into one file."""
    from .capture import CaptureOptions, capture

    result = capture(
        CaptureOptions(
            source=source,
            output=output,
            boot_partition=boot_partition,
            hostname=hostname,
            sector_bytes=sector_bytes,
        )
    )
    region = result.manifest["region"]
    log.info(
        f"captured {log.human_bytes(region['length_bytes'])} boot region of {source} "
        f"({log.human_bytes(result.path.stat().st_size)} on disk)"
    )
    log.info(f"wrote {result.path} (mode 0600: it holds the host's /boot, which can hold secrets)")


@app.command("inspect")
def inspect_command(
    path: Annotated[Path, typer.Argument(help="A capture file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Summarise a capture file: layout, region, swap, file systems, checksums."""
    from .inspect import describe, open_capture

    capture = open_capture(path)
    if as_json:
        print(json.dumps(capture.manifest, indent=2))
    else:
        print(describe(capture))


def main() -> None:
    try:
        app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: one line, like every other error
        print(f"mbrescue: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code or 2)
    except (typer.Abort, KeyboardInterrupt):
        print("mbrescue: error: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # e.g. an I/O error reading a failing disk
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mbrescue: error: {where}{exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)
    except MbrescueError as exc:
        line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        print(f"mbrescue: error: {line}{hint}", file=sys.stderr)
        if log.debug_enabled() and len(str(exc).splitlines()) > 1:
            print(str(exc), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
