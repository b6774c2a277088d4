"""The `mbrescue` command line: parse, call one function, turn known errors into one line.

Every failure a user can cause ends as `mbrescue: error: <what>` on stderr and a
non-zero exit status, never a traceback; `--debug` shows the commands run. An exception
no code expected is a bug: one line naming it and the `--debug` command that shows its
traceback, exit status 70. Ctrl-C: one line, exit status 130.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__, log, options
from .errors import MbrescueError
from .runner.console import printable
from .runner.outputs import output_argument

app = typer.Typer(
    name="mbrescue",
    help="Capture a host's boot disk region and build a rescue ISO that restores it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _takes(table: tuple[options.Option, ...]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a `**given` command the parameters of one of builder/options.py's tables (typer
    reads `__signature__`): the bundle's argparse builds the same command from the same table."""

    def parameter(option: options.Option) -> inspect.Parameter:
        kind = Path if option.path else option.kind
        if option.positional:
            info: Any = typer.Argument(help=option.help, show_default=False)
            return inspect.Parameter(option.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                     annotation=Annotated[kind, info])
        info = typer.Option(*option.flags, help=option.help, metavar=option.metavar,
                            show_default=False)
        if option.kind is bool:
            return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=False,
                                     annotation=Annotated[bool, info])
        annotated = list[str] if option.kind is list else kind
        return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[annotated | None, info])

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        positional = [parameter(o) for o in table if o.positional]
        named = [parameter(o) for o in table if not o.positional]
        command.__signature__ = inspect.Signature([*positional, *named])  # type: ignore[attr-defined]
        return command

    return decorate


def _version(shown: bool) -> None:
    if shown:
        print(f"mbrescue {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True,
                           help="Print the mbrescue version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Log every external command.")] = False,
) -> None:
    log.set_debug(debug)


@app.command("capture")
@_takes(options.CAPTURE)
def capture_command(**given: Any) -> None:
    """Capture SOURCE's MBR, post-MBR gap, /boot and layout into one file."""
    from .capture import CaptureOptions, capture

    result = capture(
        CaptureOptions(
            source=given["source"],
            output=output_argument(given["output"]),
            boot_partition=given["boot_partition"],
            hostname=given["hostname"],
            sector_bytes=given["sector_bytes"],
            macs=tuple(given["mac"]) if given["mac"] else None,
        )
    )
    region = result.manifest["region"]
    log.info(
        f"captured {log.human_bytes(region['length_bytes'])} boot region of {given['source']} "
        f"({log.human_bytes(result.path.stat().st_size)} on disk)"
    )
    log.info(f"wrote {result.path} (mode 0600: it holds the host's /boot, which can hold secrets)")
    if given["as_json"]:
        print(json.dumps(result.as_json(given["source"]), indent=2))


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
@_takes(options.RESTORE)
def restore_command(**given: Any) -> None:
    """Write a capture's boot region onto TARGET, after showing the plan and a typed yes."""
    from .runner.console import Console
    from .runner.restore import restore

    console = Console.stdio()
    try:
        status = restore(
            str(given["capture"]), str(given["target"]), console=console,
            assume_yes=given["yes"], sector_bytes=given["sector_bytes"], files=given["files"],
        )
    finally:
        console.close()
    raise typer.Exit(status)


@app.command("build")
def build_command(
    captures: Annotated[list[Path], typer.Argument(help="One or more capture files.")],
    output: Annotated[
        str | None,
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
    serial: Annotated[
        str,
        typer.Option("--serial", metavar="PORT[,SPEED]",
                     help="The serial console GRUB and the rescue system use, e.g. ttyS1,115200 "
                     "(many servers' serial-over-LAN is the second port) [ttyS0,115200]."),
    ] = "ttyS0,115200",
    unattended_default: Annotated[
        int | None,
        typer.Option("--unattended-default", metavar="SECONDS", min=5, max=600,
                     help="With --allow-unattended: when the host's /boot is not found, GRUB "
                     "starts the unattended restore after this visible countdown, so a remote "
                     "dead machine restores with nobody at it. Only a disk with the captured "
                     "serial/WWN is written; any other stops at the prompt. DANGEROUS."),
    ] = None,
    group: Annotated[
        str | None,
        typer.Option("--group", metavar="NAME", help="With --netboot: the group the TFTP "
                     "server runs as (dnsmasq drops to its own user): payloads and menus "
                     "0640, group NAME, never world-readable. Kept in the tree: a later "
                     "build without --group keeps it [the tree's; new tree: root only, 0600]."),
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
    from .build import BuildOptions, build, report_json, summary, unattended_line
    from .grub import parse_serial

    serial_port = parse_serial(serial)

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
        if unattended_default is not None:
            raise MbrescueError("--unattended-default is for ISOs, not --netboot (a network "
                                "tree restores unattended only with --allow-unattended-netboot "
                                "and mbrescue.unattended=1)")
        tree = net.build_netboot(net.NetbootOptions(
            captures=tuple(captures), tree=netboot,
            macs=tuple(net.parse_mac_option(text) for text in mac or ()),
            unattended_allowed=allow_unattended,
            unattended_netboot_allowed=allow_unattended_netboot,
            expected_hosts=tuple(expect_host or ()), serial=serial_port, group=group,
            passphrase=passphrase,
        ))  # fmt: skip
        log.info(net.summary(tree))
        if as_json:
            print(json.dumps(tree.as_json(), indent=2))
        return
    if mac:
        raise MbrescueError("--mac needs --netboot")
    if group is not None:
        raise MbrescueError("--group needs --netboot (an ISO is one file: chgrp it)")
    if allow_unattended_netboot:
        raise MbrescueError("--allow-unattended-netboot needs --netboot")
    options = BuildOptions(
        captures=tuple(captures), output=output_argument(output), jobs=jobs,
        unattended_allowed=allow_unattended, expected_hosts=tuple(expect_host or ()),
        serial=serial_port, unattended_default_s=unattended_default, passphrase=passphrase,
    )
    reports = build(options)
    for report in reports:
        log.info(summary(report))
    unattended = unattended_line(options)
    if unattended:
        log.info(unattended)
    if as_json:
        print(json.dumps({"isos": [str(report.path) for report in reports],
                          "builds": [report_json(report) for report in reports]}, indent=2))


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
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON object on stdout "
                           "(also when it fails).")
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
    from .bootcheck import verify_boot
    from .verify import SIZE_CHECK, format_checks, verify_iso
    from .verify_capture import is_iso, verdict_line, verify_capture

    if not iso.is_file():
        raise MbrescueError(f"{iso}: no such ISO or capture file")
    if not is_iso(iso):
        if boot:
            raise MbrescueError(f"{iso} is not an ISO: --boot boots rescue ISOs, not captures")
        if not as_json:
            print(verdict_line(iso, verify_capture(iso)))
            return
        try:
            found = verify_capture(iso)
        except MbrescueError as exc:
            print(json.dumps({"capture": str(iso), "ok": False, "error": str(exc)}, indent=2))
            raise
        print(json.dumps({"capture": str(iso), "ok": True, "error": None,
                          **dataclasses.asdict(found)}, indent=2))
        return
    passphrase = None
    if passphrase_file is not None or passphrase_env is not None:
        from .passphrase import read_passphrase

        passphrase = read_passphrase(passphrase_file, passphrase_env)
    checks = verify_iso(iso, passphrase=passphrase)
    failed = [check.name for check in checks if not check.ok]
    cut = next((c for c in checks if c.name == SIZE_CHECK and not c.ok), None)
    if as_json:
        boots = verify_boot(iso, passphrase=passphrase) if boot and not failed else []
        failed += [f"boot {r.firmware}" for r in boots if not r.ok]
        error = f"{iso} failed: {cut.detail if cut else ', '.join(failed)}" if failed else None
        print(json.dumps({
            "iso": str(iso), "ok": not failed, "error": error,
            "checks": [dataclasses.asdict(check) for check in checks],
            "boots": [{"firmware": r.firmware, "ok": r.ok, "seconds": round(r.seconds, 1),
                       "detail": r.detail} for r in boots],
        }, indent=2))  # fmt: skip
        if error:
            raise MbrescueError(error)
        return
    print(format_checks(checks))
    if cut is not None:
        raise MbrescueError(f"{iso} failed: {cut.detail}",
                            hint="copy or download it again, then compare its SHA-256")
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
        str, typer.Option("-o", "--output", help="The bundle file to write (or a directory).")
    ],
) -> None:
    """Write the host side (capture, restore) as one executable that needs nothing installed."""
    from .bundle import BundleOptions, bundle, summary

    path = output_argument(output)
    assert path is not None
    log.info(f"building the host bundle {path} (the rescue kit's Python and the host side; "
             "about 10 s) ...")
    log.info(summary(bundle(BundleOptions(output=path))))


@app.command("rescue")
def rescue_command(
    host: Annotated[str, typer.Argument(help="The host to rescue (its capture's host name).")],
    bmc: Annotated[str, typer.Option("--bmc", help="The host's BMC (Redfish), e.g. "
                                     "https://bmc.example.")],
    user: Annotated[str | None, typer.Option("--user", help="BMC user name.")] = None,
    password_file: Annotated[
        Path | None, typer.Option("--password-file", help="File holding the BMC password.")
    ] = None,
    iso: Annotated[
        str | None,
        typer.Option("--iso", help="Rescue ISO: a path (served over HTTP from here for the "
                     "rescue only) or an http(s) URL the BMC fetches [./HOST-rescue.iso]."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option("--target", help="The disk to restore (serial, WWN or /dev path): "
                     "mbrescue.target= for an unattended ISO [the captured serial/WWN]."),
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option("--ca-file", help="CA certificate(s) the BMC's TLS must chain to.")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Do not verify the BMC's TLS certificate.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Eject a medium someone else left in the virtual CD.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait for the restore.")
    ] = 1800,
    serve_address: Annotated[
        str | None,
        typer.Option("--serve-address", help="Address the BMC fetches a local ISO from "
                     "[this machine's address on the route to the BMC]."),
    ] = None,
    system: Annotated[
        str | None, typer.Option("--system", help="Redfish system id, where the BMC has several.")
    ] = None,
) -> None:
    """Boot HOST's rescue ISO through its BMC (Redfish virtual media) and follow the restore."""
    from .bmc import RescueOptions, rescue

    rescue(RescueOptions(
        host=host, bmc_url=bmc, user=user, password_file=password_file, iso=iso,
        ca_file=ca_file, insecure=insecure, force=force, timeout_s=timeout, target=target,
        serve_address=serve_address, system=system,
    ))  # fmt: skip


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
        from .runner.errors import Interrupted

        _error_line(exc)
        # A capture or restore stopped by Ctrl-C or SIGTERM (a restore's line says what was
        # written and how to finish).
        sys.exit(130 if isinstance(exc, Interrupted) else 1)
    except Exception as exc:  # the last guard: never a bare traceback
        _unexpected(exc, argv)
        sys.exit(70)  # EX_SOFTWARE: an internal error, not the user's
    if status == 130:
        _interrupted()
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
