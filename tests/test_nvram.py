"""The firmware boot entry for the restored ESP (runner/nvram.py).

Byte layouts first (a load option built and parsed back, against the specification's
offsets; arbitrary bytes give a value or NvramError), then the decision and the writing
on a directory laid out as efivarfs is (variables as `Name-GUID` files of attributes +
data, the immutable flag efivarfs sets), through the runner's region and file-level paths
on loop devices. The proof is in QEMU: fixture D's rescue system under OVMF with a fresh
variable store and a blank disk says in its plan which entry it will add, adds it after
the restore, and the restored disk booted with the same variable store is started by
OVMF from that entry (BdsDxe names it); the entries OVMF itself wrote are parsed from the
variable store file too.
"""

from __future__ import annotations

import io
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder.kit import ensure_kit
from builder.runner import nvram
from builder.runner import restore as runner
from builder.runner.capfile import Capture
from builder.runner.cmdline import Switches
from builder.runner.console import Console, Terminal
from builder.runner.gpt import parse_guid
from builder.vm import OVMF_VARS, Disk, Vm, VmConfig, VmTimeout

from .conftest import loop_device, mbrescue, memory_initrd, sh

MiB = 1 << 20
GLOBAL = nvram.GLOBAL_GUID
D_ESP_GUID = "0d000001-0000-4d00-8000-00000000000d"


def answering(text: str) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    terminal = Terminal("test", -1, None, False, out_stream=out, in_stream=io.StringIO(text))
    return Console([terminal], error_stream=io.StringIO()), out


def gpt_hd(guid: str = D_ESP_GUID, number: int = 1, start: int = 2048,
           size: int = 81920) -> nvram.HardDrive:
    return nvram.HardDrive(number, start, size, parse_guid(guid), nvram.MBR_TYPE_GPT,
                           nvram.SIGNATURE_GUID)


# --- byte layouts ------------------------------------------------------------------------------


def test_load_option_layout_is_the_specifications() -> None:
    data = nvram.encode_load_option("debian", gpt_hd(), "\\EFI\\debian\\shimx64.efi")
    attributes, path_bytes = struct.unpack_from("<IH", data)
    assert attributes == nvram.LOAD_OPTION_ACTIVE
    description_end = 6 + len("debian\0") * 2
    assert data[6:description_end] == "debian\0".encode("utf-16-le")
    path = data[description_end:]
    assert len(path) == path_bytes  # no optional data
    # HD(): type 4, subtype 1, length 42; number, start, size, signature, MBR type, sig type.
    assert path[:4] == bytes([4, 1, 42, 0])
    assert struct.unpack_from("<IQQ", path, 4) == (1, 2048, 81920)
    assert path[24:40] == parse_guid(D_ESP_GUID)
    assert path[24:28] == bytes([0x01, 0x00, 0x00, 0x0D])  # mixed-endian: 0d000001 reversed
    assert path[40:42] == bytes([2, 2])
    file_node = path[42:-4]
    assert file_node[:2] == bytes([4, 4])
    assert struct.unpack_from("<H", file_node, 2)[0] == len(file_node)
    assert file_node[4:] == "\\EFI\\debian\\shimx64.efi\0".encode("utf-16-le")
    assert path[-4:] == bytes([0x7F, 0xFF, 4, 0])
    parsed = nvram.parse_load_option(data)
    assert parsed.description == "debian" and parsed.active
    assert parsed.hard_drive == gpt_hd()
    assert parsed.file_path == "\\EFI\\debian\\shimx64.efi"
    assert parsed.optional_data == b""
    assert parsed.hard_drive.text() == f"HD(1,GPT,{D_ESP_GUID.upper()},0x800,0x14000)"


def test_a_firmware_style_option_with_pci_nodes_and_split_path() -> None:
    """What firmware writes: a full path (PciRoot/Pci/...) before HD(), the file path in two
    nodes, optional data after the list."""
    acpi = struct.pack("<BBHII", 2, 1, 12, 0x0A0341D0, 0)  # PciRoot(0x0)
    pci = struct.pack("<BBHBB", 1, 1, 6, 0, 3)  # Pci(0x3,0x0)
    hd = nvram.HardDrive(2, 63, 1000, struct.pack("<I", 0xDEADBEEF).ljust(16, b"\0"),
                         nvram.MBR_TYPE_MSDOS, nvram.SIGNATURE_MBR)
    path = (acpi + pci + hd.encode() + nvram.file_path_node("\\EFI\\debian")
            + nvram.file_path_node("grubx64.efi") + nvram.END_NODE)
    data = struct.pack("<IH", 1, len(path)) + "deb\0".encode("utf-16-le") + path + b"RC"
    parsed = nvram.parse_load_option(data)
    assert parsed.hard_drive == hd
    assert parsed.file_path == "\\EFI\\debian\\grubx64.efi"
    assert parsed.optional_data == b"RC"
    assert hd.text() == "HD(2,MBR,0xDEADBEEF,0x3F,0x3E8)"


# Written by OVMF (Debian's ovmf, OVMF_VARS_4M.fd) during the QEMU test below, read from its
# variable store file: the hidden UiApp (an FvFile() path), a device it found on its own
# (PciRoot()/Pci(), 16 bytes of optional data: its auto-created mark) and the shell.
OVMF_UIAPP = bytes.fromhex(
    "090100002c0055006900410070007000000004071400c9bdb87cebf8344faaea3ee4af6516a10406140021"
    "aa2c4614760345836e8ab6f46623317fff0400")
OVMF_MISC_DEVICE = bytes.fromhex(
    "010000001600550045004600490020004d006900730063002000440065007600690063006500000002010c"
    "00d041030a000000000101060000047fff04004eac0881119f594d850ee21a522c59b2")


def test_real_ovmf_options_parse() -> None:
    uiapp = nvram.parse_load_option(OVMF_UIAPP)
    assert uiapp.description == "UiApp" and uiapp.attributes == 0x109  # active, hidden, app
    assert uiapp.hard_drive is None and uiapp.file_path is None and uiapp.optional_data == b""
    misc = nvram.parse_load_option(OVMF_MISC_DEVICE)
    assert misc.description == "UEFI Misc Device" and misc.active
    assert misc.hard_drive is None and len(misc.optional_data) == 16
    assert misc.device_path.endswith(nvram.END_NODE)
    # Our own option, built the same way, has the layout OVMF's have: attributes, length,
    # description, path list ending in the end node.
    ours = nvram.encode_load_option("UiApp", gpt_hd(), "\\EFI\\BOOT\\BOOTX64.EFI",
                                    attributes=0x109)
    assert ours[:6 + 12] == OVMF_UIAPP[:4] + ours[4:6] + OVMF_UIAPP[6:18]


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_nvram_error(data: bytes) -> None:
    try:
        nvram.parse_load_option(data)
    except nvram.NvramError:
        pass


def test_loader_choice() -> None:
    assert nvram.choose_loader(["EFI/BOOT/BOOTX64.EFI", "EFI/debian/grubx64.efi",
                                "EFI/debian/shimx64.efi", "EFI/debian/mmx64.efi"]) \
        == "EFI/debian/shimx64.efi"
    assert nvram.choose_loader(["EFI/BOOT/BOOTX64.EFI", "EFI/ubuntu/grubx64.efi"]) \
        == "EFI/ubuntu/grubx64.efi"
    assert nvram.choose_loader(["EFI/BOOT/BOOTX64.EFI", "EFI/BOOT/grubx64.efi"]) \
        == "EFI/BOOT/BOOTX64.EFI"
    assert nvram.choose_loader(["EFI/tools/shell.efi"]) is None
    assert nvram.same_loader("\\EFI\\BOOT\\BOOTX64.EFI", "EFI/boot/bootx64.efi")
    assert not nvram.same_loader("\\EFI\\BOOT\\BOOTX64.EFI", "\\EFI\\debian\\grubx64.efi")


def test_d_esp_from_the_capture(captures) -> None:
    """Fixture D (grub-install --removable --no-nvram): the removable path, named after the
    host; the region path keeps the captured sectors, the file-level path gives its own."""
    manifest = Capture.open(str(captures["D"])).manifest
    esp = nvram.esp_of(manifest)
    assert esp is not None
    assert esp.loader == "\\EFI\\BOOT\\BOOTX64.EFI"
    assert esp.description == manifest.hostname == "fixture-d"
    assert esp.hard_drive == gpt_hd()
    moved = nvram.esp_of(manifest, {1: (256, 10240)})
    assert moved is not None and (moved.hard_drive.start_lba, moved.hard_drive.size_sectors) \
        == (256, 10240)
    # A BIOS capture has no ESP: no entry.
    assert nvram.esp_of(Capture.open(str(captures["A"])).manifest) is None


# --- a directory laid out as efivarfs -------------------------------------------------------------


def put(efivars: Path, name: str, data: bytes, immutable: bool = False) -> Path:
    path = efivars / f"{name}-{GLOBAL}"
    path.write_bytes(struct.pack("<I", 7) + data)
    if immutable:
        sh("chattr", "+i", path)
    return path


@pytest.fixture
def efivars(tmp_path: Path) -> Iterator[Path]:
    """BootOrder 0001,0000: Boot0000 a CD (no HD()), Boot0001 another disk's ESP; both
    immutable as efivarfs makes them."""
    folder = tmp_path / "efivars"
    folder.mkdir()
    cd = struct.pack("<BBHII", 2, 1, 12, 0x0A0341D0, 0) + nvram.END_NODE
    put(folder, "Boot0000", struct.pack("<IH", 1, len(cd)) + "CD\0".encode("utf-16-le") + cd,
        immutable=True)
    other = nvram.encode_load_option("other", gpt_hd("11111111-2222-3333-4444-555555555555"),
                                     "\\EFI\\BOOT\\BOOTX64.EFI")
    put(folder, "Boot0001", other, immutable=True)
    put(folder, "BootOrder", struct.pack("<2H", 1, 0), immutable=True)
    put(folder, "Timeout", struct.pack("<H", 3))
    yield folder
    sh("chattr", "-R", "-i", folder)


def test_no_entry_for_the_esp_is_added_first(efivars: Path, captures) -> None:
    esp = nvram.esp_of(Capture.open(str(captures["D"])).manifest)
    entry = nvram.plan_entry(esp, "/dev/vda", str(efivars))
    assert entry is not None and entry.existing is None
    assert entry.plan_line() == (
        '  Will add: firmware boot entry "fixture-d" -> \\EFI\\BOOT\\BOOTX64.EFI on partition 1 '
        "(the firmware has none for the restored ESP), first in BootOrder, once the restore "
        "has verified")
    console, out = answering("")
    nvram.finish(console, entry)
    assert out.getvalue() == (
        'mbrescue: added firmware boot entry Boot0002 "fixture-d" -> '
        f"HD(1,GPT,{D_ESP_GUID.upper()},0x800,0x14000)/\\EFI\\BOOT\\BOOTX64.EFI, first in "
        "BootOrder\n")
    written = (efivars / f"Boot0002-{GLOBAL}").read_bytes()
    assert written[:4] == struct.pack("<I", 7)
    option = nvram.parse_load_option(written[4:])
    assert option.hard_drive == gpt_hd() and option.active
    assert (efivars / f"BootOrder-{GLOBAL}").read_bytes() == struct.pack("<I3H", 7, 2, 1, 0)
    # Now it is there: a second restore adds nothing and says which entry points there.
    again = nvram.plan_entry(esp, "/dev/vda", str(efivars))
    assert again is not None and again.existing == 2
    assert "Boot0002 already points at \\EFI\\BOOT\\BOOTX64.EFI on partition 1" \
        in again.plan_line()


def test_an_inactive_or_other_loader_entry_does_not_count(efivars: Path, captures) -> None:
    esp = nvram.esp_of(Capture.open(str(captures["D"])).manifest)
    assert esp is not None
    put(efivars, "Boot0005", nvram.encode_load_option("off", gpt_hd(), esp.loader,
                                                      attributes=0))
    put(efivars, "Boot0006", nvram.encode_load_option("grub", gpt_hd(),
                                                      "\\EFI\\debian\\grubx64.efi"))
    put(efivars, "Boot0007", nvram.encode_load_option("lower case", gpt_hd(),
                                                      "\\efi\\boot\\bootx64.efi"))
    firmware = nvram.read_firmware(str(efivars))
    assert nvram.matching_entry(esp, firmware) == 7


def test_a_refused_entry_leaves_the_restore_complete(tmp_path: Path, captures) -> None:
    esp = nvram.esp_of(Capture.open(str(captures["D"])).manifest)
    folder = tmp_path / "efivars"
    folder.mkdir()
    entry = nvram.plan_entry(esp, "/dev/vda", str(folder))
    assert entry is not None
    folder.rmdir()  # the firmware's store went away (or refused the write)
    console, out = answering("")
    nvram.finish(console, entry)
    line = out.getvalue()
    assert line.count("\n") == 1
    assert line.startswith("mbrescue: warning: the firmware boot entry was not added (")
    assert ("the disk is restored; to add it by hand: efibootmgr --create --disk /dev/vda "
            "--part 1 --label 'fixture-d' --loader '\\EFI\\BOOT\\BOOTX64.EFI'") in line


def test_bios_and_image_files_get_no_entry(tmp_path: Path, captures) -> None:
    esp = nvram.esp_of(Capture.open(str(captures["D"])).manifest)
    assert nvram.mount_efivarfs(str(tmp_path / "no-efi"), str(tmp_path / "x")) is None
    assert nvram.plan_entry(esp, "/dev/vda", None) is None
    assert nvram.plan_for_target(esp, str(tmp_path / "disk.img"), "file",
                                 str(tmp_path)) is None


# --- through the runner, on loop devices ------------------------------------------------------------


@pytest.mark.parametrize("files", [False, True])
def test_rescue_restore_adds_the_entry_last(fixtures, captures, efivars, tmp_path, monkeypatch,
                                            files) -> None:
    """The region path and the file-level path: the plan names the entry, the restore
    completes, the entry is added after the verification and before the completion line,
    with the HD() of the ESP as this path laid it."""
    monkeypatch.setattr(nvram, "mount_efivarfs", lambda: str(efivars))
    image = tmp_path / "target.img"
    with open(image, "wb") as stream:
        stream.truncate(fixtures["D"].path.stat().st_size)
    with loop_device(image) as device:
        console, out = answering("yes\n")
        assert runner.restore(str(captures["D"]), None, console=console, rescue=True,
                              disks=[device], switches=Switches(files=files),
                              options_path=str(tmp_path / "no-options.json")) == 0
    shown = out.getvalue()
    plan_at = shown.index('  Will add: firmware boot entry "fixture-d" -> \\EFI\\BOOT\\BOOTX64'
                          '.EFI on partition 1')
    assert plan_at < shown.index("Type yes to write")
    lines = shown.splitlines()
    assert lines[-1].startswith("mbrescue: restore complete")
    assert lines[-2].startswith('mbrescue: added firmware boot entry Boot0002 "fixture-d" -> '
                                f"HD(1,GPT,{D_ESP_GUID.upper()},0x800,")
    verified = next(i for i, line in enumerate(lines) if line.startswith(
        "mbrescue: verified:" if files else "mbrescue: wrote "))
    assert verified < len(lines) - 2
    option = nvram.parse_load_option((efivars / f"Boot0002-{GLOBAL}").read_bytes()[4:])
    assert option.hard_drive is not None and option.hard_drive.start_lba == 2048
    # The table on the disk agrees with the entry (sgdisk, an independent reader).
    info = sh("sgdisk", "-i", "1", image)
    assert f"Partition unique GUID: {D_ESP_GUID.upper()}" in info
    assert "First sector: 2048 " in info
    assert f"Partition size: {option.hard_drive.size_sectors} sectors" in info


# --- the proof: OVMF, two boots, one variable store ---------------------------------------------


def ovmf_variables(store: Path) -> dict[str, bytes]:
    """The valid variables of the global GUID in an OVMF variable store file (edk2's
    authenticated variable headers: StartId 0x55AA, State 0x3F for an added variable)."""
    raw = store.read_bytes()
    found: dict[str, bytes] = {}
    header = struct.Struct("<HBBIQ16sIII16s")
    at = raw.find(b"\xaa\x55\x3f")
    while 0 <= at and at + header.size <= len(raw):
        start, state, _, _, _, _, _, name_bytes, data_bytes, guid = header.unpack_from(raw, at)
        body = at + header.size
        if start == 0x55AA and state == 0x3F and name_bytes < 512 and data_bytes < 65536:
            name = raw[body:body + name_bytes].decode("utf-16-le", "replace").rstrip("\0")
            if guid == parse_guid(GLOBAL):
                found[name] = raw[body + name_bytes:body + name_bytes + data_bytes]
        at = raw.find(b"\xaa\x55\x3f", at + 1)
    return found


@pytest.mark.qemu
def test_ovmf_boots_the_restored_disk_from_the_added_entry(fixtures, captures, tmp_path) -> None:
    fixture = fixtures["D"]
    kit = ensure_kit()
    initrd = memory_initrd(captures["D"], tmp_path)
    target = tmp_path / "blank.img"
    with open(target, "wb") as stream:
        stream.truncate(fixture.path.stat().st_size)
    store = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, store)  # a fresh store: a new mainboard
    assert not [name for name in ovmf_variables(store) if name.startswith("Boot")]
    serial_log = tmp_path / "rescue.log"
    rescue = VmConfig(firmware="uefi", kernel=kit.kernel, initrd=initrd, memory_mib=1024,
                      append="console=ttyS0", vars_file=store,
                      disks=[Disk(target, serial="MBRESCUE-NEW")])
    try:
        with Vm(rescue, serial_log) as vm:
            plan = vm.expect(r"  Will add: firmware boot entry [^\r\n]*\r?\n", 400)
            vm.expect(r"Type yes to write", 60)
            vm.send("yes\r")
            added = vm.expect(r"mbrescue: (added firmware boot entry|warning)[^\r\n]*\r?\n",
                              400)
            vm.expect(r"mbrescue: restore complete[^\r\n]*", 60)
            vm.expect(r"press Enter to reboot", 60)
            text = vm.output
    except VmTimeout as exc:
        raise AssertionError(str(exc)) from None
    print(plan.group(0).strip())
    print(added.group(0).strip())
    assert "Traceback" not in text
    assert plan.group(0).startswith('  Will add: firmware boot entry "fixture-d" -> '
                                    "\\EFI\\BOOT\\BOOTX64.EFI on partition 1")
    number = re.match(r"mbrescue: added firmware boot entry Boot([0-9A-F]{4}) ", added.group(0))
    assert number, added.group(0)
    name = f"Boot{number.group(1)}"
    # The store file holds it: the firmware wrote it to flash, under the GUID of the
    # variables OVMF itself keeps there (Lang, PlatformLang, Timeout, its own Boot0000).
    assert {"Lang", "PlatformLang", "Timeout"} <= set(ovmf_variables(store))
    boots = store_boot_options(store)
    assert boots[name].hard_drive == gpt_hd()
    assert boots[name].file_path == "\\EFI\\BOOT\\BOOTX64.EFI"
    order = ovmf_variables(store)["BootOrder"]
    assert struct.unpack_from("<H", order)[0] == int(number.group(1), 16)
    # The restored disk alone, the same store, no boot index (OVMF then follows BootOrder).
    boot_log = tmp_path / "boot.log"
    disk_boot = VmConfig(firmware="uefi", memory_mib=512, vars_file=store,
                         disks=[Disk(target)])
    try:
        with Vm(disk_boot, boot_log) as vm:
            loading = vm.expect(r"BdsDxe: loading (Boot[0-9A-F]{4}) [^\r\n]*\r?\n", 120)
            vm.expect(rf"{re.escape(fixture.marker)}\r*\n", 300)
    except VmTimeout as exc:
        raise AssertionError(str(exc)) from None
    print(loading.group(0).strip())
    assert loading.group(1) == name, loading.group(0)
    assert f"HD(1,GPT,{D_ESP_GUID.upper()}," in loading.group(0)
    assert "\\EFI\\BOOT\\BOOTX64.EFI" in loading.group(0)
    assert subprocess.run(["sgdisk", "-v", target], capture_output=True).returncode == 0
    # OVMF's own entries, written during the disk's boot, parse too (real firmware layouts:
    # PciRoot()/Pci()/... paths, optional data).
    boots = store_boot_options(store)
    assert boots[name].hard_drive == gpt_hd()
    assert any(option.hard_drive is None for option in boots.values()), boots


def store_boot_options(store: Path) -> dict[str, nvram.LoadOption]:
    boots = {key: nvram.parse_load_option(value) for key, value in ovmf_variables(store).items()
             if re.fullmatch(r"Boot[0-9A-F]{4}", key)}
    for key, option in sorted(boots.items()):
        print(f"{key}: {option.description!r} hd={option.hard_drive and option.hard_drive.text()}"
              f" file={option.file_path} optional={len(option.optional_data)} bytes")
    return boots


@pytest.fixture(scope="module")
def iso_d(captures, tmp_path_factory) -> Path:
    """Fixture D's rescue ISO, built by the CLI as a user would."""
    out = tmp_path_factory.mktemp("iso-d") / "host-d.iso"
    result = mbrescue("build", captures["D"], "-o", out, env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.qemu
def test_iso_file_level_4kn_entry_counts_in_the_targets_sectors(fixtures, iso_d,
                                                               tmp_path) -> None:
    """The rescue ISO (booted from CD, so OVMF has entries of its own) restores D onto a
    blank 4Kn disk by the file-level path: the entry's HD() gives the new ESP's start and
    size in 4096-byte sectors, and OVMF boots the disk from it with the same store."""
    target = tmp_path / "blank-4kn.img"
    with open(target, "wb") as stream:
        stream.truncate(fixtures["D"].path.stat().st_size)
    store = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, store)
    rescue = VmConfig(firmware="uefi", memory_mib=1024, vars_file=store, disks=[
        Disk(iso_d, interface="cdrom", readonly=True, bootindex=0),
        Disk(target, serial="MBRESCUE-4KN", logical_block_bytes=4096, bootindex=1)])
    try:
        with Vm(rescue, tmp_path / "rescue.log") as vm:
            vm.expect(r"Restore path: file-level path", 400)
            plan = vm.expect(r"  Will add: firmware boot entry [^\r\n]*\r?\n", 120)
            vm.expect(r"Type yes to write", 60)
            vm.send("yes\r")
            added = vm.expect(r"mbrescue: (added firmware boot entry|warning)[^\r\n]*\r?\n",
                              400)
            vm.expect(r"mbrescue: restore complete[^\r\n]*\(file-level path\)", 60)
    except VmTimeout as exc:
        raise AssertionError(str(exc)) from None
    print(plan.group(0).strip())
    print(added.group(0).strip())
    number = re.match(r"mbrescue: added firmware boot entry (Boot[0-9A-F]{4}) ", added.group(0))
    assert number, added.group(0)
    # Where the file-level path put the ESP, in the disk's own 4096-byte sectors (sgdisk on
    # a 4Kn loop device reads the table independently).
    device = sh("losetup", "--find", "--show", "--sector-size", "4096", target).strip()
    try:
        info = sh("sgdisk", "-i", "1", device)
    finally:
        sh("losetup", "--detach", device)
    first = int(re.search(r"First sector: (\d+)", info).group(1))  # type: ignore[union-attr]
    size = int(re.search(r"Partition size: (\d+) sectors", info).group(1))  # type: ignore[union-attr]
    boots = store_boot_options(store)
    assert boots[number.group(1)].hard_drive == gpt_hd(start=first, size=size)
    assert len(boots) > 2  # OVMF's own, from the CD boot, stay
    with Vm(VmConfig(firmware="uefi", memory_mib=512, vars_file=store,
                     disks=[Disk(target, logical_block_bytes=4096)]),
            tmp_path / "boot.log") as vm:
        try:
            loading = vm.expect(r"BdsDxe: loading (Boot[0-9A-F]{4}) [^\r\n]*\r?\n", 120)
            vm.expect(rf"{re.escape(fixtures['D'].marker)}\r*\n", 300)
        except VmTimeout as exc:
            raise AssertionError(str(exc)) from None
    print(loading.group(0).strip())
    assert loading.group(1) == number.group(1)
    assert f"HD(1,GPT,{D_ESP_GUID.upper()},0x{first:X},0x{size:X})" in loading.group(0)
