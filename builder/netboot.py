"""`mbrescue build --netboot DIR`: one network-boot tree (PXE and UEFI) for many hosts.

The tree holds GRUB's network images once (BIOS: grub-mknetdir's core.0; UEFI: Debian's
shim and signed network GRUB, so Secure Boot works), the kernel and the base initrd once,
and per host its payload (the same payload initramfs the ISO carries) and its menu (the
ISO's grub.cfg, with the host's payload path). Both GRUBs read boot/grub/grub.cfg first:
it picks the host menu by the booting machine's MAC address (`$net_default_mac`,
boot/grub/mac/<mac>.cfg); any other machine gets a list of the hosts with nothing
booting by default. The host menu keeps the ISO's safety: its default is decided at boot by
the /boot UUID probe (the local disk when the host's /boot is found) and the restore still
asks for `yes`.

A host's MAC addresses come from its capture (capture records the NICs of the machine it
ran on; `capture --mac` sets them); `--mac HOST=MAC` here replaces what HOST's capture
recorded. A host with none is only in the list that unknown machines get.

Building into an existing tree updates it: the hosts built before stay (recorded in
mbrescue/hosts.json), a host built again replaces its payload and menu (and keeps its
earlier MACs when neither its capture nor --mac names any), and a MAC address that a host
built now claims moves to it.

    DIR/boot/grub/i386-pc/core.0      BIOS boot file (and GRUB's modules beside it)
    DIR/efi/bootx64.efi, grubx64.efi  UEFI boot file (shim) and the signed GRUB it starts
    DIR/grub/grub.cfg                 where the signed GRUB looks: sources the one below
    DIR/boot/grub/grub.cfg            the MAC dispatcher and the list of hosts
    DIR/boot/grub/hosts/HOST.cfg      HOST's menu; boot/grub/mac/MAC.cfg points to it
    DIR/mbrescue/vmlinuz, base.img    shared
    DIR/mbrescue/hosts/HOST/payload.img
    DIR/mbrescue/tree.json            the tree's --group, kept for the next build

Who reads the hosts' files: by default root only (payloads 0600), which a TFTP server that
drops to its own user (dnsmasq does) cannot serve. `--group NAME` (the group the TFTP server
runs as, e.g. dnsmasq's `group=`) makes payloads and host menus 0640 of group NAME, never
world-readable; a new tree folder is then root:NAME 0750. The group is recorded in the tree,
so a later build without --group keeps it (and gives it to every host's files, built then or
before).
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from . import log
from .build import (
    SharedParts,
    check_capture,
    check_expected_hosts,
    check_expected_names,
    prepare_shared,
)
from .capture import normal_mac
from .debs import sha256_file
from .errors import MbrescueError
from .grub import DEFAULT_SERIAL, TEMPLATES, NetImages, SerialPort, make_net_images, render_grub_cfg
from .initramfs import make_payload_initramfs
from .iso import new_medium_id
from .run import require_tools
from .runner import agecrypt
from .runner.capfile import PAYLOAD_CAPTURE_MEMBER, Capture, newc_member
from .runner.cmdline import options_json
from .runner.outputs import check_output_dir, commit, copy_output, create_temporary, new_output

INDEX = "mbrescue/hosts.json"
INDEX_VERSION = 1
# Who may read the hosts' files (--group), kept for the next build: beside the index.
ACCESS = "mbrescue/tree.json"
ACCESS_VERSION = 1
_HOST = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class NetbootOptions:
    captures: tuple[Path, ...]
    tree: Path
    macs: tuple[tuple[str, str], ...] = ()  # (host name, MAC address), from --mac HOST=MAC
    unattended_allowed: bool = False
    # --allow-unattended-netboot: the second, explicit opt-in that unattended_allowed needs
    # on a network (see check_unattended).
    unattended_netboot_allowed: bool = False
    expected_hosts: tuple[str, ...] = ()  # --expect-host, one per capture (empty: any)
    serial: SerialPort = DEFAULT_SERIAL  # --serial
    group: str | None = None  # --group: the TFTP server's group (None: what the tree has)
    # --encrypt: each host's payload holds its capture age-encrypted with this passphrase
    # (TFTP has no authentication: anyone who can reach the server can fetch any payload).
    passphrase: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class TreeAccess:
    """Who reads a host's payload and menus: root only (0600 payloads, the default), or
    also the group the TFTP server runs as (0640, that group; never world-readable)."""

    group: str | None = None
    gid: int | None = None

    @property
    def payload_mode(self) -> int:
        return 0o600 if self.gid is None else 0o640

    @property
    def menu_mode(self) -> int:
        return 0o644 if self.gid is None else 0o640

    def settle(self, fd: int, mode: int) -> None:
        """A file of ours, still under its private name: its group first, then its mode."""
        if self.gid is not None:
            os.fchown(fd, -1, self.gid)
        os.fchmod(fd, mode)


def tree_access(tree: Path, group: str | None) -> TreeAccess:
    """--group, else what the tree's last build recorded, else root only."""
    path = tree / ACCESS
    where = "--group"
    if group is None and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MbrescueError(f"{path}: not a network-boot tree record ({exc})") from exc
        if not isinstance(data, dict) or data.get("version") != ACCESS_VERSION or not (
                data.get("group") is None or isinstance(data.get("group"), str)):  # fmt: skip
            raise MbrescueError(f"{path}: not a version {ACCESS_VERSION} network-boot tree record")
        group, where = data.get("group"), f"{path} (the tree's group)"
    if group is None:
        return TreeAccess()
    try:
        return TreeAccess(group, grp.getgrnam(group).gr_gid)
    except KeyError:
        raise MbrescueError(f"{where}: no group {group!r} on this machine; nothing written",
                            hint="give --group NAME, the group the TFTP server runs as"
                            ) from None


# Where a host's MAC addresses came from, strongest first.
FROM_OPTION, FROM_CAPTURE, FROM_EARLIER = "--mac", "capture", "earlier build"


@dataclass(frozen=True)
class NetHost:
    name: str
    macs: tuple[str, ...]
    macs_from: str | None = None  # FROM_*; None: the host has no MAC address

    @property
    def list_only(self) -> bool:
        """No machine gets this host's menu by itself: only the list of hosts shows it."""
        return not self.macs


@dataclass(frozen=True)
class NetbootReport:
    tree: Path
    bios_boot_file: str
    uefi_boot_file: str
    hosts: tuple[NetHost, ...]  # every host in the tree, built now or before
    built: tuple[str, ...]  # the hosts built by this run
    size_bytes: int
    seconds: float
    group: str | None = None  # --group (kept in the tree); None: payloads root-only

    def as_json(self) -> dict[str, object]:
        return {
            "netboot": os.fspath(self.tree),
            "bios_boot_file": self.bios_boot_file,
            "uefi_boot_file": self.uefi_boot_file,
            "hosts": [{"host": host.name, "macs": list(host.macs), "macs_from": host.macs_from,
                       "list_only": host.list_only} for host in self.hosts],
            "built": list(self.built),
            "size_bytes": self.size_bytes,
            "group": self.group,
        }


# How dnsmasq reads each field of `dhcp-host=MAC,...,NAME` (dnsmasq(8), --dhcp-host; its
# option.c): a dotted quad is an address, digits with an optional s/m/h/d/w suffix a lease
# time, `infinite` a lease time, `ignore` an instruction. Quotes do not help (dnsmasq strips
# them before it reads the field), so such a host name is refused.
_DNSMASQ_WORDS = ("ignore", "infinite")
_DNSMASQ_LEASE = re.compile(r"[0-9]+[smhdwSMHDW]?")
_DNSMASQ_ADDRESS = re.compile(r"[0-9.]+")


def dnsmasq_misreads(name: str) -> str | None:
    """What dnsmasq's dhcp-host= would take host name `name` for, if not a name."""
    if name.lower() in _DNSMASQ_WORDS:
        return f"its keyword {name.lower()}"
    if _DNSMASQ_LEASE.fullmatch(name):
        return "a lease time"
    if _DNSMASQ_ADDRESS.fullmatch(name):
        return "an IP address"
    return None


def parse_mac_option(text: str) -> tuple[str, str]:
    """`--mac HOST=MAC` -> (host, mac)."""
    host, sep, mac = text.partition("=")
    if not sep or not host:
        raise MbrescueError(f"--mac {text!r}: expected HOST=MAC")
    return host, normal_mac(mac)


def read_index(tree: Path) -> dict[str, tuple[str, ...]]:
    """The hosts an earlier build put into the tree: host name -> MAC addresses."""
    path = tree / INDEX
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MbrescueError(f"{path}: not a network-boot index ({exc})") from exc
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
        raise MbrescueError(f"{path}: not a version {INDEX_VERSION} network-boot index")
    hosts = data.get("hosts")
    if not isinstance(hosts, dict):
        raise MbrescueError(f"{path}: hosts: expected an object")
    index = {}
    for name, macs in hosts.items():
        if not _HOST.fullmatch(name) or not isinstance(macs, list):
            raise MbrescueError(f"{path}: host {name!r}: bad entry")
        index[name] = tuple(normal_mac(str(mac)) for mac in macs)
    return index


def assign_macs(given: tuple[tuple[str, str], ...], recorded: dict[str, tuple[str, ...]],
                index: dict[str, tuple[str, ...]]) -> tuple[NetHost, ...]:  # fmt: skip
    """Every host's MAC addresses: `given` (--mac HOST=MAC) for the hosts it names, else what
    the host's capture recorded (`recorded`: the hosts built now), else the tree's index (the
    hosts built before). One MAC belongs to one host: --mac over a capture, a capture over an
    earlier build; two captures recording one MAC are refused (made on one machine?)."""
    owner: dict[str, str] = {}
    chosen: dict[str, tuple[list[str], str | None]] = {}
    for host, mac in given:
        if owner.get(mac, host) != host:
            raise MbrescueError(f"--mac: {mac} given for both {owner[mac]} and {host}")
        owner[mac] = host
        macs, _ = chosen.setdefault(host, ([], FROM_OPTION))
        if mac not in macs:
            macs.append(mac)
    by_option = set(chosen)
    for host in sorted(recorded):
        if host in chosen or not recorded[host]:
            continue
        macs = []
        for mac in recorded[host]:
            if mac in owner and owner[mac] in by_option:
                log.info(f"netboot: {mac}, recorded by {host}'s capture, goes to {owner[mac]} "
                         "(--mac)")  # fmt: skip
                continue
            if mac in owner:
                raise MbrescueError(
                    f"the captures of {owner[mac]} and {host} both recorded MAC address {mac} "
                    "(captured on one machine?)",
                    hint=f"give --mac {owner[mac]}=MAC and --mac {host}=MAC",
                )
            owner[mac] = host
            macs.append(mac)
        chosen[host] = (macs, FROM_CAPTURE)
    # The rest keep what the tree knew, less what a host built now claims.
    for host in sorted(set(index) | set(recorded)):
        if host not in chosen:
            chosen[host] = ([mac for mac in index.get(host, ()) if mac not in owner],
                            FROM_EARLIER)  # fmt: skip
    return tuple(NetHost(host, tuple(macs), source if macs else None)
                 for host, (macs, source) in sorted(chosen.items()))  # fmt: skip


def _write(path: Path, data: bytes, mode: int = 0o644, access: TreeAccess | None = None) -> None:
    # A machine booting during an update reads the old file or the new one, never half.
    path.parent.mkdir(parents=True, exist_ok=True)
    with new_output(path, 0o600) as (stream, _):
        (access or TreeAccess()).settle(stream.fileno(), mode)
        stream.write(data)


def _check_tree_dirs(tree: Path) -> None:
    """Every folder of an existing tree is one nobody else may write to: checked before the
    first write (the TFTP tree may be shared; a planted name must never be written through)."""
    if not tree.is_dir():
        return
    check_output_dir(tree)
    for folder, subdirs, _ in os.walk(tree):
        for name in subdirs:
            check_output_dir(Path(folder) / name)


@dataclass
class _Staged:
    """A host's files, complete and checked under private temporary names."""

    files: list[tuple[Path, Path]]  # (temporary, final)
    # Made on the way (an encrypted capture before it goes into its payload): removed always.
    scratch: list[Path] = field(default_factory=list)

    def commit(self) -> None:
        for tmp, final in self.files:
            commit(tmp, final)

    def discard(self) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)
        for path in self.scratch:
            path.unlink(missing_ok=True)


def _check_payload(payload: Path, capture_path: Path, capture_sha256: str) -> None:
    """The payload carries exactly the capture that was checked (read back from the file)."""
    with open(payload, "rb") as stream:
        fd = stream.fileno()
        offset, size = newc_member(fd, 0, os.fstat(fd).st_size, PAYLOAD_CAPTURE_MEMBER)
        digest = hashlib.sha256()
        while size > 0:
            piece = os.pread(fd, min(size, 1 << 22), offset)
            if not piece:
                break
            digest.update(piece)
            offset += len(piece)
            size -= len(piece)
    if size != 0 or digest.hexdigest() != capture_sha256:
        raise MbrescueError(f"the network payload made from {capture_path} does not hold it "
                            "as checked; nothing replaced")


def render_dispatcher(hosts: tuple[NetHost, ...], serial: SerialPort = DEFAULT_SERIAL) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template("netboot.cfg.j2").render(
        hosts=[{"name": host.name, "macs": host.macs} for host in hosts],
        serial_unit=serial.unit, serial_speed=serial.speed,
    )


def _boot_fs_uuid(path: Path, capture: Capture) -> str:
    manifest = capture.manifest
    boot_fs_uuid = manifest.boot_fs.uuid if manifest.boot_fs else None
    if not boot_fs_uuid:
        raise MbrescueError(f"{path}: the captured /boot has no file system UUID to look for")
    return boot_fs_uuid


def _add_host(tree: Path, path: Path, capture: Capture, options: NetbootOptions,
              shared: SharedParts, staged: _Staged, access: TreeAccess) -> None:  # fmt: skip
    manifest = capture.manifest
    host = manifest.hostname
    boot_fs_uuid = _boot_fs_uuid(path, capture)
    # No medium to skip on a network boot: the id only has to match no disk.
    medium_id = new_medium_id(manifest.region.sha256, manifest.created, shared.base_initrd.name)
    payload_dir = tree / "mbrescue" / "hosts" / host
    payload_dir.mkdir(parents=True, exist_ok=True)
    capture_sha256 = sha256_file(path)
    payload_capture, payload_sha256, encrypted_sha256 = path, capture_sha256, None
    if options.passphrase is not None:
        # Encrypted from the descriptor that was checked; a private name beside the payload.
        fd, sealed = create_temporary(payload_dir / "capture.age", 0o600)
        os.close(fd)
        staged.scratch.append(sealed)
        agecrypt.encrypt(capture.fd, capture.base, capture.size, os.fspath(sealed),
                         options.passphrase)
        payload_capture = sealed
        payload_sha256 = encrypted_sha256 = sha256_file(sealed)
    options_file = options_json(options.unattended_allowed, capture_sha256,
                                capture.manifest_sha256, encrypted_sha256)
    # The capture can hold secrets from /boot: only root and (--group) the TFTP server may
    # read it, from the first byte written. The host's payload.img is replaced only once
    # every host's new files are complete and checked.
    final = payload_dir / "payload.img"
    fd, tmp = create_temporary(final, 0o600)
    os.close(fd)
    staged.files.append((tmp, final))
    make_payload_initramfs(payload_capture, tmp, extra={"options.json": options_file})
    _check_payload(tmp, path, payload_sha256)
    # The writer makes its file anew (0600, root's group); the name is still ours.
    with open(tmp, "rb") as stream:
        access.settle(stream.fileno(), access.payload_mode)
    menu = render_grub_cfg(
        host=host,
        captured_at=manifest.created,
        region_size=log.human_bytes(manifest.region.length_bytes),
        boot_fs_uuid=boot_fs_uuid,
        medium_id=medium_id,
        payload_path=f"/mbrescue/hosts/{host}/payload.img",
        serial=options.serial,
    )
    menu_path = tree / "boot" / "grub" / "hosts" / f"{host}.cfg"
    menu_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temporary(menu_path, 0o600)
    staged.files.append((tmp, menu_path))
    access.settle(fd, access.menu_mode)
    with open(fd, "wb") as stream:
        stream.write(menu.encode())


def _tree_bytes(tree: Path) -> int:
    return sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())


UNATTENDED_ENCRYPTED = (
    "--encrypt with --allow-unattended on a network-boot tree: an unattended network restore "
    "has nobody to type the passphrase; unattended restore is for unencrypted trees only")


def check_unattended(options: NetbootOptions) -> None:
    """Unattended restore over the network needs its own opt-in.

    On a disc, `mbrescue.unattended=1` needs someone to put the disc in and edit the
    kernel command line. A network tree is handed to whatever machine DHCP points at it:
    anyone who can answer DHCP on that network (or plug a machine into it) can boot a
    host's menu, and with the opt-in in the payload, restore onto a disk without a person
    typing `yes`. So --allow-unattended alone is refused here, and
    --allow-unattended-netboot alone means nothing."""
    if options.unattended_allowed and not options.unattended_netboot_allowed:
        raise MbrescueError(
            "--allow-unattended on a network-boot tree lets any machine that can be booted "
            "from it (anyone who answers DHCP there) restore without asking: add "
            "--allow-unattended-netboot to mean that"
        )
    if options.unattended_netboot_allowed and not options.unattended_allowed:
        raise MbrescueError("--allow-unattended-netboot needs --allow-unattended")
    if options.unattended_allowed and options.passphrase is not None:
        # A key without a person (clevis + tang) is not built: see issue 21.
        raise MbrescueError(UNATTENDED_ENCRYPTED)


def build_netboot(options: NetbootOptions) -> NetbootReport:
    started = time.monotonic()
    if not options.captures:
        raise MbrescueError("no capture given")
    check_unattended(options)
    if options.passphrase is not None:
        agecrypt.check_passphrase(options.passphrase)
        require_tools("age")
    check_expected_names(options.expected_hosts, len(options.captures))
    tree = options.tree
    if tree.exists() and not tree.is_dir():
        raise MbrescueError(f"--netboot {tree}: not a directory")
    if not tree.parent.is_dir():
        raise MbrescueError(f"--netboot {tree}: {tree.parent} is not a directory")
    # Every capture is checked, and every --mac matched to one, before anything is written.
    captures = [(path, check_capture(path)) for path in options.captures]
    check_expected_hosts(captures, options.expected_hosts)
    names = [capture.manifest.hostname for _, capture in captures]
    if len(set(names)) != len(names):
        raise MbrescueError("two captures are for the same host name")
    for name in names:
        if not _HOST.fullmatch(name):
            raise MbrescueError(f"host name {name!r} cannot name files in the tree")
        misread = dnsmasq_misreads(name)
        if misread:
            raise MbrescueError(
                f"host name {name!r}: a DHCP server's host entry (dnsmasq's dhcp-host=MAC,NAME) "
                f"would take it for {misread}, not a name; nothing written",
                hint="capture again with --hostname NAME (a name with a letter in it)")
    for host, mac in options.macs:
        if host not in names:
            raise MbrescueError(f"--mac {host}={mac}: no capture given for host {host}")
    for path, capture in captures:
        _boot_fs_uuid(path, capture)
    _check_tree_dirs(tree)
    index = read_index(tree) if tree.is_dir() else {}
    access = tree_access(tree, options.group)
    hosts = assign_macs(options.macs, {c.manifest.hostname: c.manifest.macs for _, c in captures},
                        index)  # fmt: skip
    if not tree.is_dir():
        tree.mkdir(0o700)
        if access.gid is not None:  # root and the TFTP server's group: rwxr-x---
            os.chown(tree, -1, access.gid)
        os.chmod(tree, 0o750 if access.gid is not None else 0o755)
    shared = prepare_shared()
    staged = _Staged([])
    try:
        for path, capture in captures:
            _add_host(tree, path, capture, options, shared, staged, access)
        _write_shared(tree, shared)
        images = make_net_images(tree, dispatcher=render_dispatcher(hosts, options.serial))
        staged.commit()
    finally:
        staged.discard()
    for _, capture in captures:
        log.info(f"netboot: host {capture.manifest.hostname} added to {tree}")
    for net_host in hosts:
        if net_host.list_only and net_host.name in names:
            log.info(f"warning: host {net_host.name} has no MAC address: no machine gets its "
                     "menu by itself, it is only in the list that unknown machines get (capture "
                     f"on the host, capture --mac, or build --mac {net_host.name}=MAC)")  # fmt: skip
    _write_mac_menus(tree, hosts, access)
    _settle_earlier_hosts(tree, hosts, set(names), access)
    _write(tree / ACCESS, (json.dumps({"version": ACCESS_VERSION, "group": access.group},
                                      indent=2) + "\n").encode())  # fmt: skip
    _write(tree / INDEX, (json.dumps(
        {"version": INDEX_VERSION, "hosts": {h.name: list(h.macs) for h in hosts}},
        indent=2) + "\n").encode())  # fmt: skip
    return _report(tree, images, hosts, tuple(names), started, access)


def _settle_earlier_hosts(tree: Path, hosts: tuple[NetHost, ...], built: set[str],
                          access: TreeAccess) -> None:  # fmt: skip
    """The hosts not built now get the tree's group and mode too (a --group that changed, or
    a tree an older build left root-only). Only regular files: the folders were checked."""
    for host in hosts:
        if host.name in built:
            continue
        for path, mode in ((tree / "mbrescue" / "hosts" / host.name / "payload.img",
                            access.payload_mode),
                           (tree / "boot" / "grub" / "hosts" / f"{host.name}.cfg",
                            access.menu_mode)):  # fmt: skip
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    access.settle(fd, mode)
            finally:
                os.close(fd)


def _write_shared(tree: Path, shared: SharedParts) -> None:
    folder = tree / "mbrescue"
    folder.mkdir(exist_ok=True)
    for source, name in ((shared.kit.kernel, "vmlinuz"), (shared.base_initrd, "base.img")):
        copy_output(source, folder / name, 0o644)


def _write_mac_menus(tree: Path, hosts: tuple[NetHost, ...], access: TreeAccess) -> None:
    folder = tree / "boot" / "grub" / "mac"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {}
    for host in hosts:
        for mac in host.macs:
            wanted[f"{mac}.cfg"] = f'configfile "($root)/boot/grub/hosts/{host.name}.cfg"\n'
    for stale in folder.glob("*.cfg"):
        if stale.name not in wanted:
            stale.unlink()
    for name, text in wanted.items():
        _write(folder / name, text.encode(), access.menu_mode, access)


def _report(tree: Path, images: NetImages, hosts: tuple[NetHost, ...], built: tuple[str, ...],
            started: float, access: TreeAccess) -> NetbootReport:  # fmt: skip
    return NetbootReport(
        tree=tree,
        bios_boot_file=images.bios_boot_file,
        uefi_boot_file=images.uefi_boot_file,
        hosts=hosts,
        built=built,
        size_bytes=_tree_bytes(tree),
        seconds=time.monotonic() - started,
        group=access.group,
    )


def summary(report: NetbootReport) -> str:
    macs = "; ".join(f"{h.name}: {', '.join(h.macs)} (from {h.macs_from})" if h.macs
                     else f"{h.name}: no MAC address (in the list menu only)"
                     for h in report.hosts)  # fmt: skip
    return (
        f"{report.tree}: network-boot tree, {log.human_bytes(report.size_bytes)}, "
        f"{len(report.built)} host(s) built in {report.seconds:.1f} s; DHCP boot files: "
        f"BIOS {report.bios_boot_file}, UEFI {report.uefi_boot_file}; hosts: {macs}; "
        + (f"payloads and menus 0640, group {report.group}" if report.group
           else "payloads 0600 root only (--group NAME: readable by the TFTP server's group)")
    )

