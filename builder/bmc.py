"""`mbrescue rescue HOST --bmc URL`: the dead host's BMC boots its rescue ISO (Redfish).

Through OpenStack's sushy client: find the system, insert the ISO as virtual media (a local
ISO is served over HTTP from here for the time of the rescue only), set a one-time boot
override to the CD in the capture's firmware mode, reset or power on, follow the restore,
then eject, clear the override and power the host on: it boots its restored disk.

How "restore complete" reaches the controller: the rescue system powers the machine off
after a verified restore (`mbrescue.after=poweroff`), and the controller watches the power
state over Redfish. Every BMC reports power state; a serial console or a network path back
from the rescue system (drivers, DHCP, an HTTP client in the stripped Python) is not given
on every BMC or network. A failed restore leaves the machine on (in its rescue shell), so a
failure is never taken for success: the controller times out and says where to look.

The kernel arguments reach the rescue kernel without a rebuild: grub.cfg carries a
fixed-size slot (grub.py) that the controller fills, at the same length, in the copy of the
ISO it serves; only an ISO built with `--allow-unattended` gets them, and the runner still
restores only onto an identified disk. An ISO not built so (or given as a URL) is booted and
left to the person at the console.

Everything the rescue sets up registers its undo first (ExitStack): the HTTP server, the
medium inserted, the boot override, the ISO copy.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pycdlib
import pycdlib.pycdlibexception

from . import log
from .errors import MbrescueError
from .grub import BMC_SLOT_BYTES, BMC_SLOT_TAG, filled_bmc_slot
from .iso import ISO_FILES
from .runner.bootloader import UEFI
from .runner.capfile import Capture

POLL_S = 2.0


@dataclass(frozen=True)
class RescueOptions:
    host: str
    bmc_url: str  # https://bmc.example (the Redfish root /redfish/v1 is added)
    user: str | None = None
    password_file: Path | None = None
    iso: str | None = None  # a path or an http(s) URL [./HOST-rescue.iso]
    ca_file: Path | None = None
    insecure: bool = False
    force: bool = False  # eject someone else's medium
    timeout_s: float = 1800
    target: str | None = None  # mbrescue.target= for the unattended restore
    serve_address: str | None = None  # where the BMC fetches a local ISO [the route to it]
    system: str | None = None  # Systems/<id> when the BMC has several


@dataclass(frozen=True)
class IsoFacts:
    """What the controller reads from a local ISO before it is served."""

    hostname: str
    unattended_allowed: bool
    uefi: bool
    slot_offset: int  # byte offset of grub.cfg's BMC slot in the ISO file


def read_iso(path: Path) -> IsoFacts:
    """The host, opt-in, firmware and slot of a rescue ISO built by `mbrescue build`."""
    iso = pycdlib.PyCdlib()
    try:
        iso.open(os.fspath(path))
    except (OSError, pycdlib.pycdlibexception.PyCdlibException) as exc:
        raise MbrescueError(f"{path} is not a readable ISO ({exc})") from exc
    try:
        with tempfile.TemporaryDirectory(prefix="mbrescue-bmc-") as scratch:
            try:
                options_path = Path(scratch) / "options.json"
                iso.get_file_from_iso(os.fspath(options_path),
                                      iso_path=ISO_FILES["/mbrescue/options.json"])
                payload_path = Path(scratch) / "payload.img"
                iso.get_file_from_iso(os.fspath(payload_path),
                                      iso_path=ISO_FILES["/mbrescue/payload.img"])
                record = iso.get_record(iso_path=ISO_FILES["/boot/grub/grub.cfg"])
            except pycdlib.pycdlibexception.PyCdlibException as exc:
                raise MbrescueError(f"{path} is not an mbrescue rescue ISO ({exc})") from exc
            try:
                options = json.loads(options_path.read_text())
            except ValueError as exc:
                raise MbrescueError(f"{path}: its /mbrescue/options.json is unreadable") from exc
            capture = Capture.open(os.fspath(payload_path))
            try:
                manifest = capture.manifest
                uefi = any(item.method == UEFI for item in manifest.boot_loader or ())
                hostname = manifest.hostname
            finally:
                capture.close()
        cfg_offset = record.extent_location() * 2048
        cfg_length = record.get_data_length()
    finally:
        iso.close()
    with open(path, "rb") as stream:
        stream.seek(cfg_offset)
        cfg = stream.read(cfg_length)
    at = cfg.find(BMC_SLOT_TAG.encode())
    if at < 0 or cfg.count(BMC_SLOT_TAG.encode()) != 1:
        at = -1
    return IsoFacts(hostname=hostname,
                    unattended_allowed=isinstance(options, dict)
                    and options.get("unattended_allowed") is True,
                    uefi=uefi, slot_offset=cfg_offset + at if at >= 0 else -1)


def unattended_copy(iso: Path, facts: IsoFacts, kernel_args: list[str], folder: Path) -> Path:
    """A copy of the ISO whose grub.cfg slot holds the BMC rescue's kernel arguments."""
    copy = folder / iso.name
    shutil.copyfile(iso, copy)
    with open(copy, "r+b") as stream:
        stream.seek(facts.slot_offset)
        if not stream.read(len(BMC_SLOT_TAG)) == BMC_SLOT_TAG.encode():
            raise MbrescueError(f"{iso}: grub.cfg's BMC slot moved")
        stream.seek(facts.slot_offset)
        filled = filled_bmc_slot(kernel_args)
        assert len(filled) == BMC_SLOT_BYTES - 1
        stream.write(filled)
    return copy


# ------------------------------------------------------------------ serving the ISO


class _OneFile(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of the one ISO at its one path; nothing else (404)."""

    server: _IsoServer

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        if self.path != self.server.url_path:
            self.send_error(404)
            return
        size = self.server.iso.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if body:
            with open(self.server.iso, "rb") as stream:
                shutil.copyfileobj(stream, self.wfile, 1 << 20)
            self.server.served += 1

    def log_message(self, format: str, *args: object) -> None:
        log.debug(f"iso server: {self.address_string()} {format % args}")


class _IsoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: str, iso: Path) -> None:
        super().__init__((address, 0), _OneFile)
        self.iso = iso
        self.url_path = "/" + quote(iso.name)
        self.served = 0


def reaching_address(bmc_url: str) -> str:
    """This machine's address on the route to the BMC (no packet is sent: UDP connect)."""
    parts = urlsplit(bmc_url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            return probe.getsockname()[0]
    except OSError as exc:
        raise MbrescueError(f"BMC {bmc_url} unreachable: no route to {host} ({exc})") from exc


@contextlib.contextmanager
def serving(iso: Path, address: str) -> Iterator[tuple[str, _IsoServer]]:
    """The ISO over HTTP at address (an ephemeral port) while the context lasts."""
    try:
        server = _IsoServer(address, iso)
    except OSError as exc:
        raise MbrescueError(f"cannot serve the ISO on {address}: {exc.strerror}") from exc
    thread = threading.Thread(target=server.serve_forever, name="iso-server", daemon=True)
    thread.start()
    host = f"[{address}]" if ":" in address else address
    try:
        yield f"http://{host}:{server.server_address[1]}{server.url_path}", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# ------------------------------------------------------------------ Redfish


def _sushy_errors(bmc_url: str) -> Callable[[Exception], MbrescueError]:
    import sushy.exceptions as sx

    def translate(exc: Exception) -> MbrescueError:
        if isinstance(exc, sx.AccessError) and exc.status_code == 401:
            return MbrescueError(f"BMC {bmc_url} refused the credentials (HTTP 401)",
                                 hint="check --user and --password-file")
        if isinstance(exc, sx.ConnectionError):
            text = str(exc)
            if "CERTIFICATE_VERIFY_FAILED" in text or "SSLError" in text:
                return MbrescueError(f"BMC {bmc_url}: its TLS certificate is not trusted",
                                     hint="--ca-file FILE names the CA; --insecure skips the check")
            return MbrescueError(f"BMC {bmc_url} unreachable",
                                 hint="check the URL and that this machine reaches the BMC")
        if isinstance(exc, sx.HTTPError):
            detail = exc.detail or exc.code
            return MbrescueError(f"BMC {bmc_url}: {exc.status_code} {detail}")
        return MbrescueError(f"BMC {bmc_url}: {exc}")

    return translate


def _password(options: RescueOptions) -> str | None:
    if options.password_file is None:
        return None
    try:
        return options.password_file.read_text().rstrip("\n")
    except OSError as exc:
        raise MbrescueError(f"cannot read {options.password_file}: {exc.strerror}") from exc


def _connect(options: RescueOptions):
    import sushy

    if options.insecure and options.ca_file is not None:
        raise MbrescueError("--ca-file and --insecure exclude each other")
    verify: bool | str = True
    if options.insecure:
        verify = False
    elif options.ca_file is not None:
        if not options.ca_file.is_file():
            raise MbrescueError(f"{options.ca_file}: no such CA file")
        verify = os.fspath(options.ca_file)
    root = options.bmc_url.rstrip("/")
    if not root.endswith("/redfish/v1"):
        root += "/redfish/v1"
    return sushy.Sushy(root, username=options.user, password=_password(options), verify=verify)


def _find_system(conn, options: RescueOptions):
    members = conn.get_system_collection().get_members()
    if options.system is not None:
        chosen = [s for s in members if s.identity == options.system]
        if not chosen:
            raise MbrescueError(f"BMC {options.bmc_url} has no system {options.system!r}",
                                hint=f"its systems: {', '.join(s.identity for s in members)}")
        return chosen[0]
    if len(members) != 1:
        raise MbrescueError(f"BMC {options.bmc_url} has {len(members)} systems",
                            hint=f"name one with --system: {', '.join(s.identity for s in members)}")
    return members[0]


def _cd(system):
    import sushy

    for medium in system.virtual_media.get_members():
        if sushy.VirtualMediaType.CD in (medium.media_types or ()) or medium.identity == "Cd":
            return medium
    raise MbrescueError(f"system {system.identity} offers no virtual CD")


def _wait_power(system, wanted, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        system.refresh(force=True)
        if system.power_state == wanted:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)


@dataclass(frozen=True)
class RescueReport:
    lines: tuple[str, ...]


def rescue(options: RescueOptions) -> RescueReport:
    """Boot HOST's rescue ISO through its BMC and, for an unattended ISO, see it restored."""
    import sushy
    import sushy.exceptions as sx

    iso_text = options.iso or f"{options.host}-rescue.iso"
    iso_url = iso_text if urlsplit(iso_text).scheme in ("http", "https") else None
    facts: IsoFacts | None = None
    if iso_url is None:
        iso_path = Path(iso_text)
        if not iso_path.is_file():
            raise MbrescueError(f"{iso_path}: no such ISO", hint=f"mbrescue build builds "
                                f"{options.host}-rescue.iso from the host's capture")
        facts = read_iso(iso_path)
        if facts.hostname != options.host:
            raise MbrescueError(f"{iso_path} is the rescue ISO of {facts.hostname!r}, "
                                f"not of {options.host!r}")
    unattended = facts is not None and facts.unattended_allowed and facts.slot_offset >= 0
    translate = _sushy_errors(options.bmc_url)
    lines: list[str] = []
    try:
        with contextlib.ExitStack() as undo:
            conn = _connect(options)
            system = _find_system(conn, options)
            cd = _cd(system)
            if cd.inserted or cd.image:
                if not options.force:
                    raise MbrescueError(f"system {system.identity}'s virtual CD already "
                                        f"holds {cd.image or 'a medium'}",
                                        hint="someone may be using it; --force ejects it")
                log.info(f"ejecting {cd.image or 'the medium'} from the virtual CD (--force)")
                cd.eject_media()
            if iso_url is None:
                assert facts is not None
                folder = Path(undo.enter_context(
                    tempfile.TemporaryDirectory(prefix="mbrescue-rescue-")))
                served = Path(iso_text)
                if unattended:
                    args = ["mbrescue.unattended=1", "mbrescue.after=poweroff"]
                    if options.target:
                        args.append(f"mbrescue.target={options.target}")
                    served = unattended_copy(Path(iso_text), facts, args, folder)
                address = options.serve_address or reaching_address(options.bmc_url)
                iso_url, _server = undo.enter_context(serving(served, address))
                log.info(f"serving {iso_text} at {iso_url} for the time of the rescue")
            cd.insert_media(iso_url, inserted=True, write_protected=True)
            undo.callback(_eject_quietly, cd)
            mode = (sushy.BootSourceOverrideMode.UEFI if facts is not None and facts.uefi
                    else sushy.BootSourceOverrideMode.LEGACY if facts is not None else None)
            if mode == system.boot.mode:
                mode = None  # asked only to change it: some services refuse a mode they have
            system.set_system_boot_options(target=sushy.BootSource.CD,
                                           enabled=sushy.BootSourceOverrideEnabled.ONCE,
                                           mode=mode)
            undo.callback(_clear_override, system)
            system.refresh(force=True)
            boot = system.boot
            if (boot.target != sushy.BootSource.CD
                    or boot.enabled == sushy.BootSourceOverrideEnabled.DISABLED):
                raise MbrescueError(f"system {system.identity} ignored the boot override "
                                    f"(it boots {boot.target}, {boot.enabled})")
            was_on = system.power_state == sushy.PowerState.ON
            system.reset_system(sushy.ResetType.FORCE_RESTART if was_on else sushy.ResetType.ON)
            started = time.monotonic()
            lines.append(f"{options.host}: booting {Path(iso_text).name} from virtual media "
                         f"({'restarted' if was_on else 'powered on'})")
            log.info(lines[-1])
            if not unattended:
                lines.append(f"{options.host}: the rescue ISO asks before it writes: answer it on "
                             f"the console (the BMC's remote console or serial-over-LAN, e.g. "
                             f"ipmitool -I lanplus -H {urlsplit(options.bmc_url).hostname} "
                             f"sol activate)")
                if facts is not None:
                    lines.append("the ISO is served from here until the machine powers off or "
                                 f"{options.timeout_s:.0f} s pass (Ctrl-C ends it)")
                    log.info(lines[-2])
                    log.info(lines[-1])
                    _wait_power(system, sushy.PowerState.OFF, options.timeout_s)
                else:
                    undo.pop_all()  # the person at the console needs the medium and the boot
                return RescueReport(tuple(lines))
            log.info(f"{options.host}: waiting for the restore (the rescue system powers off "
                     f"when it is done; at most {options.timeout_s:.0f} s)")
            if not _wait_power(system, sushy.PowerState.OFF, options.timeout_s):
                raise MbrescueError(f"{options.host}: no restore complete within "
                                    f"{options.timeout_s:.0f} s (the machine is still on)",
                                    hint="its console shows why (the rescue shell)")
            lines.append(f"{options.host}: restore complete (the rescue system powered off "
                         f"after {time.monotonic() - started:.0f} s)")
            log.info(lines[-1])
            undo.close()  # eject, clear the override, stop serving, before the host boots
            system.reset_system(sushy.ResetType.ON)
            lines.append(f"{options.host}: medium ejected, boot override cleared, powered on: "
                         f"it boots its restored disk")
            return RescueReport(tuple(lines))
    except sx.SushyError as exc:
        raise translate(exc) from exc


def _eject_quietly(cd) -> None:
    import sushy.exceptions as sx

    try:
        cd.eject_media()
    except sx.SushyError as exc:
        log.info(f"mbrescue: warning: ejecting the virtual CD failed: {exc}")


def _clear_override(system) -> None:
    import sushy
    import sushy.exceptions as sx

    try:
        # Kept as Continuous by some services (sushy-emulator): cleared here in any case.
        system.set_system_boot_options(target=sushy.BootSource.HDD,
                                       enabled=sushy.BootSourceOverrideEnabled.DISABLED)
    except sx.SushyError as exc:
        log.info(f"mbrescue: warning: clearing the boot override failed: {exc}")
