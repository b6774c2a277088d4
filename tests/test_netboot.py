"""Network boot: `mbrescue build --netboot DIR` writes one PXE/UEFI tree for many hosts.

The tree is built once per module from real captures of fixtures A and D (with the real kit,
base initramfs and GRUB): host-a's capture recorded its MAC address (`capture --mac`), D's
none, and the build is given no --mac, so every known-MAC boot below shows the capture's
record picking the menu. It is booted in QEMU over user-mode networking's built-in TFTP
server (BIOS: the virtio NIC's iPXE ROM from Debian's ipxe-qemu; UEFI: OVMF's own PXE): the
machine with host-a's MAC address gets host-a's menu, whose default restores a blank disk
(answered `yes`), and the disk then boots alone to fixture A's marker; with host-a's healthy
disk attached the same menu boots that disk with no input; a machine with an unknown MAC
gets the list of hosts and nothing starts by itself.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from builder.bootcheck import COMPLETE, FAILED, PROMPT
from builder.errors import MbrescueError
from builder.fixtures import Fixture, boot_to_marker
from builder.netboot import (
    FROM_CAPTURE,
    FROM_EARLIER,
    FROM_OPTION,
    NetHost,
    assign_macs,
    dnsmasq_misreads,
    normal_mac,
    parse_mac_option,
)
from builder.runner.capfile import Capture
from builder.runner.manifest import parse_manifest
from builder.vm import Disk, Vm, VmConfig, VmTimeout
from tests.conftest import mbrescue, one_error_line

HOST_A_MAC = "52:54:00:12:34:56"
UNKNOWN_MAC = "52:54:00:65:43:21"
SCRATCH_SERIAL = "MBRESCUE-SCRATCH"
BOOT_TIMEOUT_S = 240.0
MARKER_TIMEOUT_S = 240.0
# How long a list menu is watched for something starting by itself: longer than any timeout
# the tree's menus set (a host menu's local-disk default waits 10 s).
WAIT_S = 12.0
# GRUB wraps its serial output at 80 columns, so any space may become a line break.
RESTORE_DEFAULT = r"default\s+is\s+the\s+restore"
NOTHING_DEFAULT = r"nothing\s+boots\s+by\s+default"
# What the rescue system's start shows (GRUB's entry, then the kernel): none of it may appear
# for an unknown MAC.
STARTED = r"loading the rescue system|Linux version|mbrescue: booted by"


def _check(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"
    return result


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no serial log)"
    return f"serial log {path}, last {chars} characters:\n{text[-chars:]}"


class Tree:
    def __init__(self, root: Path, built: dict[str, object], captures: dict[str, Path],
                 log: str):  # fmt: skip
        self.root = root
        self.built = built
        self.captures = captures
        self.log = log  # the build's stderr


@pytest.fixture(scope="module")
def tree(fixtures: dict[str, Fixture], tmp_path_factory: pytest.TempPathFactory) -> Tree:
    work = tmp_path_factory.mktemp("netboot")
    captures = {}
    for name, macs in (("A", ("--mac", HOST_A_MAC.upper().replace(":", "-"))), ("D", ())):
        out = work / f"host-{name.lower()}.mbrescue"
        # An image file as the source: only --mac records a MAC address.
        _check(mbrescue("capture", fixtures[name].path, "-o", out,
                        "--hostname", f"host-{name.lower()}", *macs))  # fmt: skip
        captures[name] = out
    root = work / "tree"
    started = time.monotonic()
    result = _check(mbrescue("build", "--netboot", root, captures["A"], captures["D"], "--json"))
    print(f"netboot tree for 2 hosts built in {time.monotonic() - started:.1f} s")
    return Tree(root, json.loads(result.stdout), captures, result.stderr)


# --- the tree and its description ---------------------------------------------------------------


def test_mac_addresses_are_normalised_and_checked() -> None:
    assert normal_mac("52-54-00-AB-cd-EF") == "52:54:00:ab:cd:ef"
    assert parse_mac_option("host-a=52:54:00:12:34:56") == ("host-a", "52:54:00:12:34:56")
    for bad in ("52:54:00:12:34", "52:54:00:12:34:5g", "01:00:5e:00:00:01", "", "0:0:0:0:0:0",
                "00:00:00:00:00:00"):
        with pytest.raises(MbrescueError):
            normal_mac(bad)
    with pytest.raises(MbrescueError):
        parse_mac_option("52:54:00:12:34:56")


def test_json_names_boot_files_and_macs(tree: Tree) -> None:
    built = tree.built
    assert built["bios_boot_file"] == "boot/grub/i386-pc/core.0"
    assert built["uefi_boot_file"] == "efi/bootx64.efi"
    assert built["hosts"] == [
        {"host": "host-a", "macs": [HOST_A_MAC], "macs_from": "capture", "list_only": False},
        {"host": "host-d", "macs": [], "macs_from": None, "list_only": True},
    ]
    assert re.search(r"warning: host host-d has no MAC address: .* only in the list", tree.log)
    assert "host-d: no MAC address (in the list menu only)" in tree.log
    assert f"host-a: {HOST_A_MAC} (from capture)" in tree.log
    for name in (built["bios_boot_file"], built["uefi_boot_file"], "efi/grubx64.efi",
                 "grub/grub.cfg", "boot/grub/grub.cfg", "mbrescue/vmlinuz", "mbrescue/base.img",
                 "mbrescue/hosts/host-a/payload.img", "mbrescue/hosts/host-d/payload.img"):
        assert (tree.root / str(name)).is_file(), name
    # The kernel and base are there once for all hosts; each payload holds the capture.
    assert not list(tree.root.glob("mbrescue/hosts/*/vmlinuz"))
    assert (tree.root / "mbrescue/hosts/host-a/payload.img").stat().st_mode & 0o077 == 0
    mac_menu = (tree.root / f"boot/grub/mac/{HOST_A_MAC}.cfg").read_text()
    assert "hosts/host-a.cfg" in mac_menu
    host_menu = (tree.root / "boot/grub/hosts/host-a.cfg").read_text()
    assert "/mbrescue/hosts/host-a/payload.img" in host_menu
    assert "/mbrescue/payload.img" not in host_menu
    listing = (tree.root / "boot/grub/grub.cfg").read_text()
    assert "set timeout=-1" in listing and "set default=reboot" in listing


def test_update_keeps_hosts_and_moves_a_mac(tree: Tree, tmp_path: Path) -> None:
    copy = tmp_path / "tree"
    subprocess.run(["cp", "-a", tree.root, copy], check=True)
    # host-d built again with host-a's MAC: the MAC moves, host-a stays in the list.
    result = _check(mbrescue("build", "--netboot", copy, tree.captures["D"],
                             "--mac", f"host-d={HOST_A_MAC}", "--json"))  # fmt: skip
    built = json.loads(result.stdout)
    assert [(h["host"], h["macs"], h["macs_from"]) for h in built["hosts"]] == [
        ("host-a", [], None), ("host-d", [HOST_A_MAC], "--mac")]  # fmt: skip
    assert built["built"] == ["host-d"]
    assert "hosts/host-d.cfg" in (copy / f"boot/grub/mac/{HOST_A_MAC}.cfg").read_text()
    assert (copy / "mbrescue/hosts/host-a/payload.img").is_file()
    assert "host-a" in (copy / "boot/grub/grub.cfg").read_text()


def test_mac_sources_and_their_order() -> None:
    a, b, c = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"
    # --mac replaces what the host's capture recorded; the capture's record beats the tree's.
    assert assign_macs((("h1", c),), {"h1": (a,), "h2": (b,)}, {"h3": (b, c), "h2": (a,)}) == (
        NetHost("h1", (c,), FROM_OPTION), NetHost("h2", (b,), FROM_CAPTURE),
        NetHost("h3", (), None))  # fmt: skip
    # A capture with no MAC keeps the tree's; another host's --mac takes a recorded MAC.
    assert assign_macs((("h2", a),), {"h1": (a, b), "h2": ()}, {"h2": (c,), "h1": (c,)}) == (
        NetHost("h1", (b,), FROM_CAPTURE), NetHost("h2", (a,), FROM_OPTION))  # fmt: skip
    assert assign_macs((), {"h1": ()}, {"h1": (c,)}) == (NetHost("h1", (c,), FROM_EARLIER),)
    with pytest.raises(MbrescueError, match="both recorded MAC address"):
        assign_macs((), {"h1": (a,), "h2": (a,)}, {})


def test_manifest_mac_addresses_are_checked(tree: Tree) -> None:
    raw = Capture.open(str(tree.captures["A"])).manifest.raw
    assert raw["macs"] == [HOST_A_MAC]
    assert parse_manifest(dict(raw, macs=None)).macs == ()
    for macs, field in (("52:54:00:12:34:56", "macs is invalid: expected a list"),
                        (["52:54:00:12:34:5"], r"macs\[0\] is invalid"),
                        (["52:54:00:12:34:56", 7], r"macs\[1\] is invalid: an integer"),
                        (["52:54:00:AB:CD:EF"], r"macs\[0\] is invalid"),
                        (["33:33:00:00:00:01"], r"macs\[0\] is invalid: .* not a machine's"),
                        ([HOST_A_MAC, HOST_A_MAC], "macs is invalid: an address appears twice"),
                        ([f"52:54:00:00:00:{n:02x}" for n in range(65)], "macs is invalid")):
        with pytest.raises(MbrescueError, match=field):
            parse_manifest(dict(raw, macs=macs))


def test_two_captures_with_one_mac_are_refused(tree: Tree, fixtures: dict[str, Fixture],
                                               tmp_path: Path) -> None:  # fmt: skip
    # Two hosts captured on one machine record its NIC twice: refused, saying what to give.
    other = tmp_path / "host-x.mbrescue"
    _check(mbrescue("capture", fixtures["D"].path, "-o", other, "--hostname", "host-x",
                    "--mac", HOST_A_MAC))  # fmt: skip
    line = one_error_line(mbrescue("build", "--netboot", tmp_path / "new", tree.captures["A"],
                                   other))  # fmt: skip
    assert "both recorded MAC address" in line and "--mac host-a=MAC" in line, line
    assert not (tmp_path / "new").exists()


# The README's generator, word for word: `build --json` on stdin, the DHCP range as argument.
DNSMASQ_FROM_JSON = """\
import json, sys
built = json.load(sys.stdin)
print(f\"\"\"# mbrescue network boot; made from: mbrescue build --netboot ... --json
port=0
enable-tftp
tftp-root={built["netboot"]}
dhcp-range={sys.argv[1]}
dhcp-match=set:efi64,option:client-arch,7
dhcp-match=set:efi64,option:client-arch,9
dhcp-boot=tag:!efi64,{built["bios_boot_file"]}
dhcp-boot=tag:efi64,{built["uefi_boot_file"]}\"\"\")
for host in built["hosts"]:
    if host["macs"]:
        print(f"dhcp-host={','.join(host['macs'])},{host['host']}")
    else:
        print(f"# {host['host']}: no MAC address, so only in the list of hosts")
"""


def test_dnsmasq_configuration_from_json(tree: Tree, tmp_path: Path) -> None:
    made = subprocess.run(["python3", "-c", DNSMASQ_FROM_JSON, "192.168.100.100,192.168.100.199,1h"],
                          input=json.dumps(tree.built), capture_output=True, text=True)  # fmt: skip
    assert made.returncode == 0, made.stderr
    conf = tmp_path / "mbrescue.conf"
    conf.write_text(made.stdout)
    lines = made.stdout.splitlines()
    assert f"tftp-root={tree.root}" in lines
    assert "dhcp-boot=tag:!efi64,boot/grub/i386-pc/core.0" in lines
    assert "dhcp-boot=tag:efi64,efi/bootx64.efi" in lines
    # Only host-a has a MAC address; host-d is only in the list menu.
    assert [line for line in lines if line.startswith("dhcp-host=")] == [
        f"dhcp-host={HOST_A_MAC},host-a"]  # fmt: skip
    assert "# host-d: no MAC address, so only in the list of hosts" in lines
    checked = subprocess.run(["dnsmasq", "--test", "-C", conf], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert "syntax check OK" in checked.stderr + checked.stdout


def _access(path: Path) -> tuple[int, str]:
    st = path.stat()
    return st.st_mode & 0o7777, grp.getgrgid(st.st_gid).gr_name


def test_group_lets_the_tftp_server_read_and_survives_a_rebuild(
        tree: Tree, request: pytest.FixtureRequest) -> None:  # fmt: skip
    """--group NAME: payloads and menus 0640, group NAME (the TFTP server's: dnsmasq drops to
    its own user), in a tree folder root:NAME 0750; a rebuild without --group keeps it."""
    group = "dip"
    # Outside pytest's own 0700 folders, so that the TFTP server's user can reach the tree.
    base = Path(tempfile.mkdtemp(prefix="mbrescue-tftp-"))
    request.addfinalizer(lambda: shutil.rmtree(base))
    base.chmod(0o711)
    root = base / "tree"
    root.mkdir()
    os.chown(root, 0, grp.getgrnam(group).gr_gid)
    root.chmod(0o750)
    built = json.loads(_check(mbrescue("build", "--netboot", root, tree.captures["A"],
                                       "--group", group, "--json")).stdout)  # fmt: skip
    assert built["group"] == group
    private = ("mbrescue/hosts/host-a/payload.img", "boot/grub/hosts/host-a.cfg",
               f"boot/grub/mac/{HOST_A_MAC}.cfg")
    for name in private:
        assert _access(root / name) == (0o640, group), name
    assert json.loads((root / "mbrescue/tree.json").read_text())["group"] == group
    # The TFTP server's user, in that group only, reads the payload.
    read = subprocess.run(["runuser", "-u", "nobody", "-g", group, "--", "head", "-c", "1",
                           root / private[0]], capture_output=True)  # fmt: skip
    assert read.returncode == 0, read.stderr
    # Rebuilt without --group (and with a second host): still the tree's group and mode.
    _check(mbrescue("build", "--netboot", root, tree.captures["A"], tree.captures["D"]))
    for name in (*private, "mbrescue/hosts/host-d/payload.img"):
        assert _access(root / name) == (0o640, group), name
    assert _access(root) == (0o750, group)
    # A group that does not exist: one line, nothing changed.
    line = one_error_line(mbrescue("build", "--netboot", root, tree.captures["A"],
                                   "--group", "no-such-group-here"))  # fmt: skip
    assert "no-such-group-here" in line, line
    assert _access(root / private[0]) == (0o640, group)


def test_host_names_dnsmasq_would_misread() -> None:
    # dhcp-host=MAC,NAME: dnsmasq takes these words, addresses and lease times for themselves.
    for name in ("ignore", "infinite", "IGNORE", "10.0.0.5", "192.168.1.1", "3600", "45m", "12h",
                 "2d", "1w", "90s"):
        assert dnsmasq_misreads(name), name
    for name in ("host-a", "web01", "db.example.com", "10h-rack", "m", "ignore2", "s3"):
        assert dnsmasq_misreads(name) is None, name


def test_a_host_named_like_a_dnsmasq_keyword_is_refused(fixtures: dict[str, Fixture],
                                                         tmp_path: Path) -> None:  # fmt: skip
    for name in ("ignore", "10.0.0.5"):
        capture = tmp_path / f"{name}.mbrescue"
        _check(mbrescue("capture", fixtures["A"].path, "-o", capture, "--hostname", name,
                        "--mac", HOST_A_MAC))  # fmt: skip
        out = tmp_path / "tree"
        line = one_error_line(mbrescue("build", "--netboot", out, capture))
        assert f"host name {name!r}" in line and "dnsmasq" in line, line
        assert not out.exists()


def test_bad_input_is_one_error_line(tree: Tree, tmp_path: Path) -> None:
    out = tmp_path / "new"
    for args in (
        ("--mac", "host-a=52:54:00:12:34"),
        ("--mac", "nobody=52:54:00:12:34:56"),
        ("--mac", f"host-a={HOST_A_MAC}", "--mac", f"host-d={HOST_A_MAC}", tree.captures["D"]),
    ):
        result = mbrescue("build", "--netboot", out, tree.captures["A"], *args)
        one_error_line(result)
        assert not out.exists(), args
    one_error_line(mbrescue("build", tree.captures["A"], "--mac", f"host-a={HOST_A_MAC}"))


# --- booting it -----------------------------------------------------------------------------


def _net_vm(tree: Tree, firmware: str, mac: str, disks: list[Disk],
            secure_boot: bool = False) -> VmConfig:  # fmt: skip
    boot_file = tree.built["bios_boot_file" if firmware == "bios" else "uefi_boot_file"]
    # BIOS: QEMU takes the NIC's PXE ROM from ipxe-qemu. UEFI: OVMF's own PXE (VirtioNetDxe),
    # as on real UEFI machines: under iPXE's EFI ROM (ipxe-qemu 1.0.0+git-20190125) shim gets
    # grubx64.efi in a 4 MiB buffer and refuses it ("Malformed binary after Attribute
    # Certificate Table") when Secure Boot is on.
    rom = ",romfile=" if firmware == "uefi" else ""
    extra = [
        "-netdev", f"user,id=n0,tftp={tree.root},bootfile={boot_file}",
        "-device", f"virtio-net-pci,netdev=n0,mac={mac},bootindex=0{rom}",
    ]  # fmt: skip
    return VmConfig(firmware=firmware, memory_mib=1024, disks=disks, extra=extra,
                    secure_boot=secure_boot)  # fmt: skip


def _restore_over_network(tree: Tree, fixture: Fixture, tmp_path: Path, firmware: str,
                          secure_boot: bool = False) -> tuple[Path, str]:  # fmt: skip
    scratch = tmp_path / "scratch.img"
    with open(scratch, "wb") as stream:
        stream.truncate(fixture.path.stat().st_size)
    serial_log = tmp_path / "serial.log"
    config = _net_vm(tree, firmware, HOST_A_MAC,
                     [Disk(scratch, interface="virtio", serial=SCRATCH_SERIAL, bootindex=1)],
                     secure_boot=secure_boot)  # fmt: skip
    try:
        with Vm(config, serial_log) as vm:
            vm.expect(r"rescue\s+medium\s+for\s+host\s+host-a", timeout=BOOT_TIMEOUT_S)
            menu_s = vm.elapsed()
            vm.expect(RESTORE_DEFAULT, timeout=BOOT_TIMEOUT_S)
            vm.expect(PROMPT, timeout=BOOT_TIMEOUT_S)
            prompt_s = vm.elapsed()
            vm.send("yes\r")
            done = vm.expect(rf"{COMPLETE}|{FAILED}", timeout=BOOT_TIMEOUT_S)
            assert done.group(0).startswith(COMPLETE), _tail(serial_log)
            print(f"{firmware} network boot: host menu {menu_s:.1f} s, prompt {prompt_s:.1f} s, "
                  f"restore complete {vm.elapsed():.1f} s after QEMU start")  # fmt: skip
    except VmTimeout as exc:
        raise AssertionError(f"{str(exc).splitlines()[0]}\n{_tail(serial_log)}") from None
    target = re.search(r"Target (/dev/\S+): [^\r\n]*", vm.output)
    assert target and f"serial {SCRATCH_SERIAL}" in target.group(0), _tail(serial_log)
    return scratch, vm.output


@pytest.mark.qemu
def test_bios_pxe_known_mac_restores_blank_disk(
    tree: Tree, fixtures: dict[str, Fixture], tmp_path: Path
) -> None:
    fixture = fixtures["A"]
    scratch, _ = _restore_over_network(tree, fixture, tmp_path, "bios")
    seconds = boot_to_marker(scratch, fixture, timeout=MARKER_TIMEOUT_S)
    print(f"restored disk reached its marker in {seconds:.1f} s")


@pytest.mark.qemu
def test_bios_pxe_known_mac_with_healthy_disk_boots_it(
    tree: Tree, fixtures: dict[str, Fixture], tmp_path: Path
) -> None:
    # Host-a's own healthy disk (read-only) behind the network boot: GRUB finds its /boot and,
    # with no input, hands the machine to it; fixture A's system then prints its marker.
    fixture = fixtures["A"]
    serial_log = tmp_path / "serial.log"
    config = _net_vm(tree, "bios", HOST_A_MAC,
                     [Disk(fixture.path, interface="virtio", readonly=True, bootindex=1)])
    try:
        with Vm(config, serial_log) as vm:
            vm.expect(r"rescue\s+medium\s+for\s+host\s+host-a", timeout=BOOT_TIMEOUT_S)
            vm.expect(r"default\s+is\s+to\s+boot\s+the\s+local\s+disk", timeout=30)
            vm.expect(rf"{re.escape(fixture.marker)}\r*\n", timeout=MARKER_TIMEOUT_S)
            print(f"BIOS PXE, healthy disk: its marker {vm.elapsed():.1f} s after QEMU start")
    except VmTimeout as exc:
        raise AssertionError(f"{str(exc).splitlines()[0]}\n{_tail(serial_log)}") from None
    assert "loading the rescue system" not in vm.output, _tail(serial_log)


def _unknown_mac_boots_nothing(tree: Tree, tmp_path: Path, firmware: str, wait_s: float,
                               secure_boot: bool = False) -> None:  # fmt: skip
    scratch = tmp_path / "scratch.img"
    with open(scratch, "wb") as stream:
        stream.truncate(64 << 20)
    serial_log = tmp_path / "serial.log"
    config = _net_vm(tree, firmware, UNKNOWN_MAC,
                     [Disk(scratch, interface="virtio", serial=SCRATCH_SERIAL, bootindex=1)],
                     secure_boot=secure_boot)  # fmt: skip
    try:
        with Vm(config, serial_log) as vm:
            vm.expect(NOTHING_DEFAULT, timeout=BOOT_TIMEOUT_S)
            vm.expect(r"Rescue menu of host host-d", timeout=30)
            print(f"{firmware} network boot, unknown MAC: list menu {vm.elapsed():.1f} s after "
                  "QEMU start")  # fmt: skip
            assert "Rescue menu of host host-a (MAC 52:54:00:12:34:56)" in vm.output
            # GRUB waits for a person: nothing starts, however long it is left.
            time.sleep(wait_s)
            assert not re.search(STARTED, vm.output), _tail(serial_log)
            assert vm.running(), "the machine did something by itself (rebooted or stopped)"
    except VmTimeout as exc:
        raise AssertionError(f"{str(exc).splitlines()[0]}\n{_tail(serial_log)}") from None
    assert scratch.read_bytes().count(0) == 64 << 20


@pytest.mark.qemu
def test_bios_pxe_unknown_mac_lists_hosts_and_boots_nothing(tree: Tree, tmp_path: Path) -> None:
    _unknown_mac_boots_nothing(tree, tmp_path, "bios", wait_s=WAIT_S)


@pytest.mark.qemu
def test_uefi_secure_boot_unknown_mac_lists_hosts_and_boots_nothing(
    tree: Tree, tmp_path: Path
) -> None:
    _unknown_mac_boots_nothing(tree, tmp_path, "uefi", wait_s=WAIT_S, secure_boot=True)


@pytest.mark.qemu
def test_uefi_secure_boot_known_mac_restores_blank_disk(
    tree: Tree, fixtures: dict[str, Fixture], tmp_path: Path
) -> None:
    # Secure Boot enforced: the firmware checks shim, shim checks Debian's signed network
    # GRUB and the kernel; GRUB reads the tree's menus with its built-in commands only.
    _, text = _restore_over_network(tree, fixtures["A"], tmp_path, "uefi", secure_boot=True)
    assert re.search(r"Secure\s+Boot\s+is\s+enforced\s+\(GRUB\s+lockdown\)", text)
    assert "kernel lockdown: on" in text
