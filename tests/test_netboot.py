"""Network boot: `mbrescue build --netboot DIR` writes one PXE/UEFI tree for many hosts.

The tree is built once per module from real captures of fixtures A and D (with the real kit,
base initramfs and GRUB), then booted in QEMU over user-mode networking's built-in TFTP
server with the virtio NIC's iPXE ROM (Debian's ipxe-qemu): the machine with host-a's MAC
address gets host-a's menu, whose default restores a blank disk (answered `yes`), and the
disk then boots alone to fixture A's marker; a machine with an unknown MAC gets the list of
hosts and nothing starts by itself.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from builder.bootcheck import COMPLETE, FAILED, PROMPT
from builder.errors import MbrescueError
from builder.fixtures import Fixture, boot_to_marker
from builder.netboot import normal_mac, parse_mac_option
from builder.vm import Disk, Vm, VmConfig, VmTimeout
from tests.conftest import mbrescue, one_error_line

HOST_A_MAC = "52:54:00:12:34:56"
UNKNOWN_MAC = "52:54:00:65:43:21"
SCRATCH_SERIAL = "MBRESCUE-SCRATCH"
BOOT_TIMEOUT_S = 240.0
MARKER_TIMEOUT_S = 240.0
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
    def __init__(self, root: Path, built: dict[str, object], captures: dict[str, Path]):
        self.root = root
        self.built = built
        self.captures = captures


@pytest.fixture(scope="module")
def tree(fixtures: dict[str, Fixture], tmp_path_factory: pytest.TempPathFactory) -> Tree:
    work = tmp_path_factory.mktemp("netboot")
    captures = {}
    for name in ("A", "D"):
        source = work / f"host-{name.lower()}.img"
        subprocess.run(["cp", "--sparse=always", fixtures[name].path, source], check=True)
        out = work / f"host-{name.lower()}.mbrescue"
        _check(mbrescue("capture", source, "-o", out, "--hostname", f"host-{name.lower()}"))
        source.unlink()
        captures[name] = out
    root = work / "tree"
    started = time.monotonic()
    result = _check(mbrescue("build", "--netboot", root, captures["A"], captures["D"],
                             "--mac", f"host-a={HOST_A_MAC.upper()}", "--json"))  # fmt: skip
    print(f"netboot tree for 2 hosts built in {time.monotonic() - started:.1f} s")
    return Tree(root, json.loads(result.stdout), captures)


# --- the tree and its description ---------------------------------------------------------------


def test_mac_addresses_are_normalised_and_checked() -> None:
    assert normal_mac("52-54-00-AB-cd-EF") == "52:54:00:ab:cd:ef"
    assert parse_mac_option("host-a=52:54:00:12:34:56") == ("host-a", "52:54:00:12:34:56")
    for bad in ("52:54:00:12:34", "52:54:00:12:34:5g", "01:00:5e:00:00:01", ""):
        with pytest.raises(MbrescueError):
            normal_mac(bad)
    with pytest.raises(MbrescueError):
        parse_mac_option("52:54:00:12:34:56")


def test_json_names_boot_files_and_macs(tree: Tree) -> None:
    built = tree.built
    assert built["bios_boot_file"] == "boot/grub/i386-pc/core.0"
    assert built["uefi_boot_file"] == "efi/bootx64.efi"
    assert built["hosts"] == [{"host": "host-a", "macs": [HOST_A_MAC]},
                              {"host": "host-d", "macs": []}]  # fmt: skip
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
    assert built["hosts"] == [{"host": "host-a", "macs": []},
                              {"host": "host-d", "macs": [HOST_A_MAC]}]  # fmt: skip
    assert built["built"] == ["host-d"]
    assert "hosts/host-d.cfg" in (copy / f"boot/grub/mac/{HOST_A_MAC}.cfg").read_text()
    assert (copy / "mbrescue/hosts/host-a/payload.img").is_file()
    assert "host-a" in (copy / "boot/grub/grub.cfg").read_text()


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
def test_bios_pxe_unknown_mac_lists_hosts_and_boots_nothing(tree: Tree, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch.img"
    with open(scratch, "wb") as stream:
        stream.truncate(64 << 20)
    serial_log = tmp_path / "serial.log"
    config = _net_vm(tree, "bios", UNKNOWN_MAC,
                     [Disk(scratch, interface="virtio", serial=SCRATCH_SERIAL, bootindex=1)])
    wait_s = 20.0
    try:
        with Vm(config, serial_log) as vm:
            vm.expect(NOTHING_DEFAULT, timeout=BOOT_TIMEOUT_S)
            vm.expect(r"Rescue menu of host host-d", timeout=30)
            print(f"BIOS PXE, unknown MAC: list menu {vm.elapsed():.1f} s after QEMU start")
            assert "Rescue menu of host host-a (MAC 52:54:00:12:34:56)" in vm.output
            # GRUB waits for a person: nothing starts, however long it is left.
            time.sleep(wait_s)
            assert not re.search(STARTED, vm.output), _tail(serial_log)
            assert vm.running(), "the machine did something by itself (rebooted or stopped)"
    except VmTimeout as exc:
        raise AssertionError(f"{str(exc).splitlines()[0]}\n{_tail(serial_log)}") from None
    assert scratch.read_bytes().count(0) == 64 << 20


@pytest.mark.qemu
def test_uefi_secure_boot_known_mac_restores_blank_disk(
    tree: Tree, fixtures: dict[str, Fixture], tmp_path: Path
) -> None:
    # Secure Boot enforced: the firmware checks shim, shim checks Debian's signed network
    # GRUB and the kernel; GRUB reads the tree's menus with its built-in commands only.
    _, text = _restore_over_network(tree, fixtures["A"], tmp_path, "uefi", secure_boot=True)
    assert re.search(r"Secure\s+Boot\s+is\s+enforced\s+\(GRUB\s+lockdown\)", text)
    assert "kernel lockdown: on" in text
