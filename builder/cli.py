"""The `mbrescue` command line: parse, call one function, turn known errors into one line.

Every failure a user can cause ends as `mbrescue: error: <what>` on stderr and a
non-zero exit status, never a traceback; `--debug` shows the commands run. An exception
no code expected is a bug: one line naming it and the `--debug` command that shows its
traceback, exit status 70. Ctrl-C: one line, exit status 130.
"""

from __future__ import annotations

import json
import shlex
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from . import log
from .errors import MbrescueError
from .runner.console import printable

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
    mac: Annotated[
        list[str] | None,
        typer.Option("--mac", help="A MAC address of the host's NICs to record (repeatable; "
                     "picks its network-boot menu) [a block device: this machine's NICs; "
                     "an image file: none]."),
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
            macs=tuple(mac) if mac else None,
        )
    )
    region = result.manifest["region"]
    log.info(
        f"captured {log.human_bytes(region['length_bytes'])} boot region of {source} "
        f"({log.human_bytes(result.path.stat().st_size)} on disk)"
    )
    log.info(f"wrote {result.path} (mode 0600: it holds the host's /boot, which can hold secrets)")


@app.command("check")
def check_command(
    capture: Annotated[Path, typer.Argument(help="A capture file, or a rescue ISO built from one.")],
    source: Annotated[
        Path | None,
        typer.Argument(help="Boot disk or image file [the disk holding the mounted /boot]."),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Count grubenv and mtime-only changes too.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    sector_bytes: Annotated[
        int | None,
        typer.Option("--sector-size", help="Logical sector size of an image SOURCE [the capture's]."),
    ] = None,
) -> None:
    """Does the capture still match SOURCE? Exit 0 it matches, 1 it drifted, 2 error."""
    from .runner.check import main_check

    status = main_check(
        str(capture), str(source) if source is not None else None, strict, as_json, sector_bytes
    )
    raise typer.Exit(status)


@app.command("inspect")
def inspect_command(
    path: Annotated[Path, typer.Argument(help="A capture file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Summarise a capture file: layout, region, swap, file systems, checksums."""
    from .inspect import describe, open_capture

    capture = open_capture(path)
    if as_json:
        print(json.dumps(capture.manifest.raw, indent=2))
    else:
        print(printable(describe(capture)))


@app.command("restore")
def restore_command(
    capture: Annotated[Path, typer.Argument(help="A capture file.")],
    target: Annotated[Path, typer.Argument(help="Disk (block device) or image file to write.")],
    yes: Annotated[
        bool,
        typer.Option("--yes", help="Do not ask; for scripts. DANGEROUS: TARGET is overwritten."),
    ] = False,
    sector_bytes: Annotated[
        int | None,
        typer.Option("--sector-size", help="Logical sector size of an image TARGET [512]."),
    ] = None,
    files: Annotated[
        bool,
        typer.Option("--files", help="Take the file-level path (new table, file systems made "
                     "again) even where the region path would do."),
    ] = False,
) -> None:
    """Write a capture's boot region onto TARGET, after showing the plan and a typed yes."""
    from .runner.console import Console
    from .runner.restore import restore

    console = Console.stdio()
    try:
        status = restore(
            str(capture), str(target), console=console, assume_yes=yes, sector_bytes=sector_bytes,
            files=files,
        )
    finally:
        console.close()
    raise typer.Exit(status)


@app.command("build")
def build_command(
    captures: Annotated[list[Path], typer.Argument(help="One or more capture files.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="ISO file (one capture) or directory [./HOST-rescue.iso]."
        ),
    ] = None,
    jobs: Annotated[int, typer.Option("-j", "--jobs", min=1, help="ISOs built at once.")] = 1,
    allow_unattended: Annotated[
        bool,
        typer.Option(
            "--allow-unattended",
            help="Let mbrescue.unattended=1 on the kernel command line restore without asking "
            "when the target is unambiguous. DANGEROUS: for fleets only. With --netboot it "
            "also needs --allow-unattended-netboot.",
        ),
    ] = False,
    allow_unattended_netboot: Annotated[
        bool,
        typer.Option(
            "--allow-unattended-netboot",
            help="With --netboot and --allow-unattended: really allow unattended restore from "
            "the network tree. DANGEROUS: anyone who can answer DHCP on that network (or plug "
            "a machine into it) can then boot a host's menu and restore without a prompt.",
        ),
    ] = False,
    expect_host: Annotated[
        list[str] | None,
        typer.Option(
            "--expect-host",
            metavar="NAME",
            help="The host the capture must be for (its recorded host name): any other name "
            "is refused and nothing is written. One per capture, in the captures' order; "
            "for a controller that builds what hosts sent it.",
        ),
    ] = None,
    netboot: Annotated[
        Path | None,
        typer.Option("--netboot", help="Write (or update) a network-boot tree in this "
                     "directory (PXE and UEFI) instead of ISOs."),
    ] = None,
    mac: Annotated[
        list[str] | None,
        typer.Option("--mac", help="With --netboot: HOST=MAC, the MAC address of a host's "
                     "machine (repeatable); its menu is chosen by it."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print what was built as JSON on stdout.")
    ] = False,
    encrypt: Annotated[
        bool,
        typer.Option("--encrypt", help="Store the capture age-encrypted with a passphrase "
                     "(scrypt); the rescue system asks for it before the plan. The kernel, "
                     "rescue system and GRUB stay public."),
    ] = False,
    passphrase_file: Annotated[
        Path | None,
        typer.Option("--passphrase-file", metavar="FILE",
                     help="With --encrypt: the passphrase is this file's one line."),
    ] = None,
    passphrase_env: Annotated[
        str | None,
        typer.Option("--passphrase-env", metavar="NAME",
                     help="With --encrypt: the passphrase is this environment variable's "
                     "value [default: typed twice on the terminal]."),
    ] = None,
) -> None:
    """Build a BIOS/UEFI, CD/USB bootable rescue ISO for each capture."""
    from .build import BuildOptions, build, summary

    if not encrypt and (passphrase_file is not None or passphrase_env is not None):
        raise MbrescueError("--passphrase-file and --passphrase-env need --encrypt")
    if encrypt and netboot is not None and allow_unattended:
        from .netboot import UNATTENDED_ENCRYPTED

        raise MbrescueError(UNATTENDED_ENCRYPTED)  # before anyone is asked for a passphrase
    passphrase = None
    if encrypt:
        from .passphrase import read_passphrase

        passphrase = read_passphrase(passphrase_file, passphrase_env)
    if netboot is not None:
        from . import netboot as net

        if output is not None:
            raise MbrescueError("--netboot and -o/--output exclude each other")
        tree = net.build_netboot(net.NetbootOptions(
            captures=tuple(captures), tree=netboot,
            macs=tuple(net.parse_mac_option(text) for text in mac or ()),
            unattended_allowed=allow_unattended,
            unattended_netboot_allowed=allow_unattended_netboot,
            expected_hosts=tuple(expect_host or ()), passphrase=passphrase,
        ))  # fmt: skip
        log.info(net.summary(tree))
        if as_json:
            print(json.dumps(tree.as_json(), indent=2))
        return
    if mac:
        raise MbrescueError("--mac needs --netboot")
    if allow_unattended_netboot:
        raise MbrescueError("--allow-unattended-netboot needs --netboot")
    reports = build(
        BuildOptions(
            captures=tuple(captures), output=output, jobs=jobs, unattended_allowed=allow_unattended,
            expected_hosts=tuple(expect_host or ()), passphrase=passphrase,
        )
    )
    for report in reports:
        log.info(summary(report))
    if as_json:
        print(json.dumps({"isos": [str(report.path) for report in reports]}, indent=2))


@app.command("verify")
def verify_command(
    iso: Annotated[Path, typer.Argument(help="A rescue ISO built by mbrescue build, or a "
                                         "capture file.")],
    boot: Annotated[
        bool,
        typer.Option(
            "--boot", help="Also boot it in QEMU (BIOS and UEFI) and restore a scratch disk."
        ),
    ] = False,
    passphrase_file: Annotated[
        Path | None,
        typer.Option("--passphrase-file", metavar="FILE",
                     help="An encrypted ISO's passphrase (this file's one line): the capture "
                     "is then decrypted and checked too; --boot needs it."),
    ] = None,
    passphrase_env: Annotated[
        str | None,
        typer.Option("--passphrase-env", metavar="NAME",
                     help="An encrypted ISO's passphrase from this environment variable."),
    ] = None,
) -> None:
    """Check a rescue ISO (with --boot, prove in QEMU that it restores a bootable disk), or
    a capture file whole: exit 0 good, 1 damaged."""
    from .verify import format_checks, verify_iso
    from .verify_capture import is_iso, verdict_line, verify_capture

    if not iso.is_file():
        raise MbrescueError(f"{iso}: no such ISO or capture file")
    if not is_iso(iso):
        if boot:
            raise MbrescueError(f"{iso} is not an ISO: --boot boots rescue ISOs, not captures")
        print(verdict_line(iso, verify_capture(iso)))
        return
    passphrase = None
    if passphrase_file is not None or passphrase_env is not None:
        from .passphrase import read_passphrase

        passphrase = read_passphrase(passphrase_file, passphrase_env)
    checks = verify_iso(iso, passphrase=passphrase)
    print(format_checks(checks))
    failed = [check.name for check in checks if not check.ok]
    if not failed and boot:
        from .bootcheck import verify_boot

        for result in verify_boot(iso, passphrase=passphrase):
            verdict = "PASS" if result.ok else "FAIL"
            prompt = (
                f", prompt after {result.seconds_to_prompt:.0f} s"
                if result.seconds_to_prompt
                else ""
            )
            print(
                f"{verdict}  boot {result.firmware.upper():<7} {result.seconds:5.0f} s{prompt}: {result.detail}"
            )
            if not result.ok:
                failed.append(f"boot {result.firmware}")
    if failed:
        raise MbrescueError(f"{iso} failed: {', '.join(failed)}")


@app.command("burn")
def burn_command(
    iso: Annotated[Path, typer.Argument(help="A rescue ISO.")],
    device: Annotated[
        Path, typer.Argument(help="USB stick (/dev/sdX), CD/DVD writer (/dev/sr0) or a file.")
    ],
    yes: Annotated[
        bool, typer.Option("--yes", help="Do not ask. DANGEROUS: DEVICE is overwritten.")
    ] = False,
) -> None:
    """Write a rescue ISO to a USB stick (byte for byte, read back) or burn it to a CD."""
    from .burn import BurnOptions, burn

    log.info(burn(BurnOptions(iso=iso, device=device, assume_yes=yes)))


@app.command("bundle")
def bundle_command(
    output: Annotated[
        Path, typer.Option("-o", "--output", help="The bundle file to write (or a directory).")
    ],
) -> None:
    """Write the host side (capture, restore) as one executable that needs nothing installed."""
    from .bundle import BundleOptions, bundle, summary

    log.info(summary(bundle(BundleOptions(output=output))))


def _error_line(exc: MbrescueError) -> None:
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    hint = f" (hint: {exc.hint})" if exc.hint else ""
    print(printable(f"mbrescue: error: {line}{hint}"), file=sys.stderr)
    if log.debug_enabled() and len(str(exc).splitlines()) > 1:
        print(str(exc), file=sys.stderr)


def _rerun_command(argv: list[str]) -> str:
    """The command the user typed, with --debug in front, ready to paste."""
    rest = [arg for arg in argv if arg != "--debug"]
    return shlex.join(["mbrescue", "--debug", *rest])


def _unexpected(exc: Exception, argv: list[str]) -> None:
    """One line for an exception no code expected; the traceback only under --debug."""
    message = str(exc).splitlines()[0] if str(exc).strip() else "(no message)"
    if log.debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
        where = "the traceback is above"
    else:
        where = f"rerun with --debug for the traceback: {_rerun_command(argv)}"
    print(
        f"mbrescue: error: {type(exc).__name__}: {message} (this is a bug; {where})",
        file=sys.stderr,
    )


def _interrupted() -> None:
    print("mbrescue: error: interrupted", file=sys.stderr)
    sys.exit(130)


def main() -> None:
    argv = sys.argv[1:]
    try:
        # Outside standalone mode typer turns Ctrl-C into a returned 130, and
        # `raise typer.Exit(n)` into a returned n: both are exit statuses here.
        status = app(args=argv, prog_name="mbrescue", standalone_mode=False)
        sys.stdout.flush()  # a full or closed stdout fails here, as one line, not at exit
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: one line, like every other error
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `mbrescue`: the help, as asked
            print(exc.format_message(), file=sys.stderr)
            sys.exit(2)
        print(f"mbrescue: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code or 2)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted()
    except OSError as exc:  # e.g. an I/O error reading a failing disk
        if log.debug_enabled():
            traceback.print_exception(exc, file=sys.stderr)
        where = f"{exc.filename}: " if exc.filename else ""
        print(printable(f"mbrescue: error: {where}{exc.strerror or exc}"), file=sys.stderr)
        sys.exit(1)
    except MbrescueError as exc:
        from .runner.restore import Interrupted

        _error_line(exc)
        # A restore stopped by Ctrl-C or SIGTERM: its line says what was written, how to finish.
        sys.exit(130 if isinstance(exc, Interrupted) else 1)
    except Exception as exc:  # the last guard: never a bare traceback
        _unexpected(exc, argv)
        sys.exit(70)  # EX_SOFTWARE: an internal error, not the user's
    if status == 130:
        _interrupted()
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
