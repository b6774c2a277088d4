"""UEFI Secure Boot: Debian's signed shim and GRUB in the kit, on the ISO, and booted enforced.

The loaders come from the real Debian packages (`apt-get download` into the cache). The ISO's
EFI parts are checked in the FAT image (mtools) and the ISO 9660 tree (a fresh pycdlib), the
menu's commands against the module list read out of Debian's signed GRUB image. Under QEMU,
OVMF runs with Secure Boot enforced (the SMM build with Microsoft's keys enrolled): a control
shows it refuses an unsigned `grub-mkimage` image, then the real rescue ISO of fixture D
restores a blank disk from CD and from USB, with the kernel reporting Secure Boot enabled.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pycdlib
import pytest

from builder import debs, grub, kit
from builder.bootcheck import COMPLETE, FAILED, PROMPT
from builder.fixtures import Fixture
from builder.run import output, run
from builder.vm import Disk, Vm, VmConfig, VmTimeout
from tests.conftest import mbrescue, sha256_of

EPOCH = "1700000000"
MEDIUM_ID = "5ecb007000000001"
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}
UNSIGNED_MARKER = "MBRESCUE-TEST-UNSIGNED-GRUB-RAN"
SCRATCH_SERIAL = "MBRESCUE-SCRATCH"
RESTORE_DEFAULT = r"default\s+is\s+the\s+restore"
# The kernel's own words: its EFI stub, then the secureboot driver.
KERNEL_SECURE_BOOT = "secureboot: Secure boot enabled"
MEMORY_MIB = 1024
GRUB_SAYS_ENFORCED = r"Secure\s+Boot\s+is\s+enforced"
LOCAL_DEFAULT = r"default\s+is\s+to\s+boot\s+the\s+local\s+disk"
HOST_MARKER = "MBRESCUE-TEST-SECURE-BOOT-HOST-BOOTED"


# --- the kit: Debian's signed loaders --------------------------------------------------------


def test_loaders_come_from_the_checked_debian_packages() -> None:
    loaders = kit.ensure_efi_loaders()
    assert set(loaders.packages) == {"shim-signed", "grub-efi-amd64-signed"}
    index = debs._load_index()
    cache = os.fspath(debs.cache_dir())
    for name, sha256 in loaders.package_sha256.items():
        record = index[name]
        assert record["sha256"] == sha256 and record["version"] == loaders.packages[name]
        assert debs.sha256_file(debs.cache_dir() / "debs" / record["file"]) == sha256
    for image in (loaders.shim, loaders.grub_removable, loaders.grub_disk):
        assert os.fspath(image).startswith(cache), image
        assert kit.authenticode_bytes(image) > 0, f"{image} is not signed"
    assert loaders.shim.name == "shimx64.efi.signed"
    assert loaders.grub_removable.name == "gcdx64.efi.signed"


def test_unsigned_grub_image_has_no_signature(tmp_path: Path) -> None:
    image = tmp_path / "unsigned.efi"
    run(["grub-mkimage", "-O", "x86_64-efi", "-p", "/x", "-o", image, "echo"])
    assert kit.authenticode_bytes(image) == 0


# --- the menu uses only what the signed GRUB has built in ------------------------------------

SCRIPT_WORDS = {"then", "else", "fi", "do", "done", "}", "{", "in"}


def menu_commands(text: str) -> set[str]:
    """The commands a GRUB script runs: the first word of each statement (and after if/elif)."""
    commands = set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for statement in line.split(";"):
            words = statement.split()
            while words and words[0] in ("if", "elif", "else", "then", "do", "!"):
                words = words[1:]
            if words and words[0] not in SCRIPT_WORDS:
                commands.add(words[0])
    return commands


def test_menu_and_loader_config_use_only_built_in_commands() -> None:
    menu = grub.render_grub_cfg(
        host="h", captured_at="now", region_size="1 MiB", boot_fs_uuid="u", medium_id=MEDIUM_ID
    )
    used = menu_commands(menu) | menu_commands(grub.efi_loader_config(MEDIUM_ID))
    assert "insmod" not in used
    assert used <= set(grub.SIGNED_GRUB_COMMANDS), used - set(grub.SIGNED_GRUB_COMMANDS)
    loaders = kit.ensure_efi_loaders()
    needed = {*grub.SIGNED_GRUB_COMMANDS.values(), *grub.SIGNED_GRUB_MODULES}
    for image in (loaders.grub_removable, loaders.grub_disk):
        built_in = set(grub.image_modules(image))
        assert "read" not in built_in  # as measured: what the menu must never need
        assert needed <= built_in, (image.name, needed - built_in)


# --- the ISO's UEFI path ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> grub.GrubImages:
    return grub.make_grub_images(tmp_path_factory.mktemp("grub"), medium_id=MEDIUM_ID)


def _fat_file(image: Path, path: str, out: Path) -> bytes:
    run(["mcopy", "-n", "-i", image, f"::{path}", out], env=MTOOLS_ENV)
    return out.read_bytes()


def test_fat_image_holds_the_signed_chain(images: grub.GrubImages, tmp_path: Path) -> None:
    loaders = kit.ensure_efi_loaders()
    fat = images.efi_fat
    assert _fat_file(fat, "EFI/BOOT/BOOTX64.EFI", tmp_path / "a") == loaders.shim.read_bytes()
    assert (_fat_file(fat, "EFI/BOOT/grubx64.efi", tmp_path / "b")
            == loaders.grub_removable.read_bytes())  # fmt: skip
    loader_cfg = grub.efi_loader_config(MEDIUM_ID).encode()
    assert _fat_file(fat, "boot/grub/grub.cfg", tmp_path / "c") == loader_cfg
    assert _fat_file(fat, "EFI/debian/grub.cfg", tmp_path / "d") == loader_cfg
    assert f"--file --set=root {grub.medium_marker(MEDIUM_ID)}" in loader_cfg.decode()
    # No fallback loader: shim would then write boot entries into the machine's NVRAM.
    listing = output(["mdir", "-b", "-i", fat, "::EFI/BOOT"], env=MTOOLS_ENV)
    assert "fbx64" not in listing.lower()


def test_iso_tree_holds_the_signed_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The small test ISO's builder; the tree's shim and GRUB are the FAT image's own bytes.
    from tests.test_iso import _assert_tree_shares_the_fat, build_iso

    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    built = build_iso(tmp_path, tmp_path / "t.iso", None)
    _assert_tree_shares_the_fat(built.path)
    loaders = kit.ensure_efi_loaders()
    iso = pycdlib.PyCdlib()
    iso.open(os.fspath(built.path))
    try:
        for rr_path, expected in (
            ("/EFI/BOOT/BOOTX64.EFI", loaders.shim.read_bytes()),
            ("/EFI/BOOT/grubx64.efi", loaders.grub_removable.read_bytes()),
            ("/EFI/debian/grub.cfg", grub.efi_loader_config("0123456789abcdef").encode()),
        ):
            with iso.open_file_from_iso(rr_path=rr_path) as stream:
                assert stream.read() == expected, rr_path
    finally:
        iso.close()


# --- QEMU with Secure Boot enforced ----------------------------------------------------------


def _esp_disk(work: Path, efi_binary: Path) -> Path:
    """A GPT disk whose ESP holds efi_binary as EFI/BOOT/BOOTX64.EFI."""
    disk = work / "esp.img"
    with open(disk, "wb") as stream:
        stream.truncate(40 << 20)
    run(["sfdisk", "-q", disk], input_bytes=b"label: gpt\nstart=2048, size=32768, type=U\n")
    run(["mkfs.vfat", "--offset", "2048", disk, "16384"])
    esp = f"{disk}@@{2048 * 512}"
    run(["mmd", "-i", esp, "::EFI", "::EFI/BOOT"], env=MTOOLS_ENV)
    run(["mcopy", "-i", esp, efi_binary, "::EFI/BOOT/BOOTX64.EFI"], env=MTOOLS_ENV)
    return disk


@pytest.mark.qemu
@pytest.mark.parametrize("secure_boot", [True, False], ids=["enforced", "off"])
def test_control_unsigned_grub_is_refused(secure_boot: bool, tmp_path: Path) -> None:
    """The same unsigned image: refused with Secure Boot enforced, runs with it off."""
    config = tmp_path / "embedded.cfg"
    config.write_text(f'echo "{UNSIGNED_MARKER}"\nsleep 60\n')
    image = tmp_path / "BOOTX64.EFI"
    run(["grub-mkimage", "-O", "x86_64-efi", "-p", "/nowhere", "-c", config, "-o", image,
         "echo", "sleep"])  # fmt: skip
    disk = _esp_disk(tmp_path, image)
    vm_config = VmConfig(
        firmware="uefi", secure_boot=secure_boot, disks=[Disk(disk, readonly=True, bootindex=0)]
    )
    with Vm(vm_config, tmp_path / "serial.log") as vm:
        if secure_boot:
            vm.expect(r"BdsDxe: failed to load Boot\d+[^\r\n]*Access Denied", timeout=120)
            time.sleep(2)
            assert UNSIGNED_MARKER not in vm.output
        else:
            vm.expect(UNSIGNED_MARKER, timeout=120)
        print(f"secure boot {secure_boot}: decided after {vm.elapsed():.1f} s")


def _build_rescue_iso(fixture: Fixture, work: Path, hostname: str) -> Path:
    """Capture a sparse copy of a fixture and build its rescue ISO with the CLI."""
    source = work / f"{hostname}.img"
    subprocess.run(["cp", "--sparse=always", fixture.path, source], check=True)
    capture = work / f"{hostname}.mbrescue"
    result = mbrescue("capture", source, "-o", capture, "--hostname", hostname)
    assert result.returncode == 0, result.stderr
    source.unlink()
    out = work / f"{hostname}.iso"
    started = time.monotonic()
    result = mbrescue("build", capture, "-o", out, env={"SOURCE_DATE_EPOCH": EPOCH})
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"built {out.name} in {time.monotonic() - started:.1f} s")
    return out


@pytest.fixture(scope="module")
def rescue_iso(fixtures: dict[str, Fixture], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real rescue ISO of fixture D (UEFI, GPT, its own GRUB unsigned), built once."""
    return _build_rescue_iso(fixtures["D"], tmp_path_factory.mktemp("sb-iso"), "host-d")


@pytest.fixture(scope="module")
def secure_host() -> Fixture:
    from builder.fixtures.secureboot import ensure_secure_boot_fixture

    return ensure_secure_boot_fixture()


@pytest.fixture(scope="module")
def secure_host_iso(secure_host: Fixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_rescue_iso(secure_host, tmp_path_factory.mktemp("sb-host-iso"), "host-s")


@pytest.mark.qemu
@pytest.mark.parametrize("interface", ["cdrom", "usb"])
def test_restore_under_secure_boot(
    rescue_iso: Path, fixtures: dict[str, Fixture], interface: str, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch.img"
    with open(scratch, "wb") as stream:
        stream.truncate(fixtures["D"].path.stat().st_size)
    disks = [
        Disk(rescue_iso, interface=interface, readonly=True, bootindex=0),
        Disk(scratch, interface="virtio", serial=SCRATCH_SERIAL, bootindex=1),
    ]
    config = VmConfig(firmware="uefi", secure_boot=True, memory_mib=MEMORY_MIB, disks=disks)
    log_path = tmp_path / "serial.log"
    try:
        with Vm(config, log_path) as vm:
            vm.expect(GRUB_SAYS_ENFORCED, timeout=240)
            vm.expect(RESTORE_DEFAULT, timeout=60)
            menu_s = vm.elapsed()
            vm.expect(re.escape(KERNEL_SECURE_BOOT), timeout=240)
            # The rescue system says so itself, on every console.
            vm.expect(r"mbrescue: UEFI Secure Boot is enforced", timeout=120)
            vm.expect(PROMPT, timeout=300)
            prompt_s = vm.elapsed()
            vm.send("yes\r")
            done = vm.expect(rf"{COMPLETE}|{FAILED}", timeout=300)
            assert done.group(0).startswith(COMPLETE), vm.output[-3000:]
            print(f"secure boot {interface}: menu {menu_s:.1f} s, prompt {prompt_s:.1f} s, "
                  f"complete {vm.elapsed():.1f} s")  # fmt: skip
            assert "Access Denied" not in vm.output
            assert "prohibited by secure boot policy" not in vm.output
    except VmTimeout as exc:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        raise AssertionError(f"{str(exc).splitlines()[0]}\n{text[-3000:]}") from None
    # The restore wrote the captured region back: the scratch disk starts as the fixture does.
    region_bytes = fixtures["D"].region_end_sectors * 512
    assert sha256_of(scratch, region_bytes) == sha256_of(fixtures["D"].path, region_bytes)


# --- a healthy host whose own chain is Debian's shim + signed GRUB + signed kernel ----------

HOST_INIT = f"""#!/bin/sh
/bin/busybox mkdir -p /proc /sys
/bin/busybox mount -t proc proc /proc
echo "{HOST_MARKER}"
echo "{HOST_MARKER}" > /dev/ttyS0
/bin/busybox poweroff -f
"""


def secure_boot_host_disk(work: Path, boot_fs_uuid: str, *, with_shim_chain: bool = True) -> Path:
    """A GPT disk laid out as Debian installs it for Secure Boot, without BOOTX64.EFI's shim.

    ESP: EFI/debian/{shimx64.efi, grubx64.efi (signed), grub.cfg -> /boot's grub.cfg}, and an
    unsigned grub-mkimage image as EFI/BOOT/BOOTX64.EFI, which enforcing firmware refuses, so
    the rescue menu must go on to the shim. /boot: Debian's signed kernel, an initrd printing
    HOST_MARKER, and a grub.cfg that boots it on the serial console. Without the shim chain:
    only the unsigned EFI/BOOT/BOOTX64.EFI and a /boot with no grub.cfg (nothing may start).
    """
    from builder import cpio

    loaders = kit.ensure_efi_loaders()
    the_kit = kit.ensure_kit()
    disk = work / "sb-host.img"
    with open(disk, "wb") as stream:
        stream.truncate(64 << 20)
    esp_start, esp_sectors, boot_start = 2048, 32768, 34816
    table = f"label: gpt\nstart={esp_start}, size={esp_sectors}, type=U\nstart={boot_start}, type=L\n"
    run(["sfdisk", "-q", disk], input_bytes=table.encode())
    run(["mkfs.vfat", "--offset", str(esp_start), disk, str(esp_sectors // 2)])
    esp = f"{disk}@@{esp_start * 512}"
    esp_cfg = work / "esp-grub.cfg"
    esp_cfg.write_text(
        f"search --no-floppy --fs-uuid --set=root {boot_fs_uuid}\n"
        "set prefix=($root)/grub\nconfigfile $prefix/grub.cfg\n"
    )
    unsigned = work / "unsigned.efi"
    (work / "unsigned.cfg").write_text('echo "unsigned image ran"\n')
    run(["grub-mkimage", "-O", "x86_64-efi", "-p", "/x", "-c", work / "unsigned.cfg", "-o",
         unsigned, "echo"])  # fmt: skip
    run(["mmd", "-i", esp, "::EFI", "::EFI/BOOT", "::EFI/debian"], env=MTOOLS_ENV)
    esp_files = [(unsigned, "EFI/BOOT/BOOTX64.EFI")]
    if with_shim_chain:
        esp_files += [
            (loaders.shim, "EFI/debian/shimx64.efi"),
            (loaders.grub_disk, "EFI/debian/grubx64.efi"),
            (esp_cfg, "EFI/debian/grub.cfg"),
        ]
    for source, target in esp_files:
        run(["mcopy", "-i", esp, source, f"::{target}"], env=MTOOLS_ENV)

    root = work / "boot"
    (root / "grub").mkdir(parents=True)
    if not with_shim_chain:
        run(["mke2fs", "-q", "-t", "ext4", "-E", f"offset={boot_start * 512}", "-U",
             boot_fs_uuid, "-d", root, "-F", disk, "28M"])  # fmt: skip
        return disk
    (root / "vmlinuz").write_bytes(the_kit.kernel.read_bytes())
    tree = cpio.Tree()
    tree.file_from("bin/busybox", the_kit.busybox, 0o755)
    tree.symlink("bin/sh", "busybox")
    tree.file("init", HOST_INIT.encode(), 0o755)
    with open(root / "initrd.img", "wb") as stream:
        cpio.write_tree(tree, stream)
    (root / "grub" / "grub.cfg").write_text(
        "serial --unit=0 --speed=115200\nterminal_input serial console\n"
        "terminal_output serial console\nset timeout=0\n"
        "menuentry host {\n  linux /vmlinuz console=ttyS0,115200n8\n  initrd /initrd.img\n}\n"
    )
    run(["mke2fs", "-q", "-t", "ext4", "-E", f"offset={boot_start * 512}", "-U", boot_fs_uuid,
         "-d", root, "-F", disk, "28M"])  # fmt: skip
    return disk


@pytest.mark.qemu
def test_healthy_shim_host_boots_locally_under_secure_boot(
    rescue_iso: Path, fixtures: dict[str, Fixture], tmp_path: Path
) -> None:
    """No input: the menu finds the host's /boot, the firmware refuses the unsigned
    EFI/BOOT/BOOTX64.EFI, the menu goes on to EFI/debian/shimx64.efi, whose chain boots."""
    disk = secure_boot_host_disk(tmp_path, fixtures["D"].boot_fs_uuid)
    before = debs.sha256_file(disk)
    disks = [
        Disk(rescue_iso, interface="cdrom", readonly=True, bootindex=0),
        Disk(disk, interface="virtio", bootindex=1),
    ]
    config = VmConfig(firmware="uefi", secure_boot=True, memory_mib=MEMORY_MIB, disks=disks)
    log_path = tmp_path / "serial.log"
    try:
        with Vm(config, log_path) as vm:
            vm.expect(GRUB_SAYS_ENFORCED, timeout=240)
            vm.expect(LOCAL_DEFAULT, timeout=60)
            vm.expect(r"starting\s+\(hd\d+,gpt1\)/EFI/BOOT/BOOTX64\.EFI", timeout=120)
            # Debian's GRUB asks shim to check an image before it chainloads it.
            vm.expect(r"bad shim signature", timeout=60)
            vm.expect(r"starting\s+\(hd\d+,gpt1\)/EFI/debian/shimx64\.efi", timeout=120)
            vm.expect(re.escape(KERNEL_SECURE_BOOT), timeout=240)
            vm.expect(HOST_MARKER, timeout=240)
            print(f"secure boot healthy host: local kernel up after {vm.elapsed():.1f} s")
            assert "unsigned image ran" not in vm.output
            assert "mbrescue.medium=" not in vm.output  # the rescue kernel never started
    except VmTimeout as exc:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        raise AssertionError(f"{str(exc).splitlines()[0]}\n{text[-3000:]}") from None
    assert debs.sha256_file(disk) == before


@pytest.mark.qemu
def test_refused_local_loader_hands_back_to_the_firmware(
    rescue_iso: Path, fixtures: dict[str, Fixture], tmp_path: Path
) -> None:
    """Healthy /boot found but its only loader is refused: GRUB exits to the firmware, which
    goes on with its boot order (the next option), instead of waiting at a GRUB prompt."""
    disk = secure_boot_host_disk(tmp_path, fixtures["D"].boot_fs_uuid, with_shim_chain=False)
    disks = [
        Disk(rescue_iso, interface="cdrom", readonly=True, bootindex=0),
        Disk(disk, interface="virtio", bootindex=1),
    ]
    config = VmConfig(firmware="uefi", secure_boot=True, memory_mib=MEMORY_MIB, disks=disks)
    log_path = tmp_path / "serial.log"
    try:
        with Vm(config, log_path) as vm:
            vm.expect(LOCAL_DEFAULT, timeout=240)
            vm.expect(r"bad shim signature", timeout=120)
            vm.expect(r"handing\s+back\s+to\s+the\s+firmware", timeout=60)
            # The firmware takes the next boot option (the disk), which it refuses in turn.
            vm.expect(r"BdsDxe: (loading|failed to load) Boot\d+[^\r\n]*", timeout=60)
            print(f"secure boot hand-back: firmware went on after {vm.elapsed():.1f} s")
            assert "unsigned image ran" not in vm.output
            assert "mbrescue.medium=" not in vm.output
    except VmTimeout as exc:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        raise AssertionError(f"{str(exc).splitlines()[0]}\n{text[-3000:]}") from None


# --- fixture S: Debian's own Secure Boot chain, restored and healthy --------------------------


@pytest.mark.qemu
def test_secure_boot_host_restored_then_boots_enforced(
    secure_host: Fixture, secure_host_iso: Path, tmp_path: Path
) -> None:
    from builder.fixtures.secureboot import boot_secure_to_marker

    scratch = tmp_path / "scratch.img"
    with open(scratch, "wb") as stream:
        stream.truncate(secure_host.path.stat().st_size)
    disks = [
        Disk(secure_host_iso, interface="usb", readonly=True, bootindex=0),
        Disk(scratch, interface="virtio", serial=SCRATCH_SERIAL, bootindex=1),
    ]
    config = VmConfig(firmware="uefi", secure_boot=True, memory_mib=MEMORY_MIB, disks=disks)
    log_path = tmp_path / "serial.log"
    try:
        with Vm(config, log_path) as vm:
            vm.expect(RESTORE_DEFAULT, timeout=240)
            vm.expect(PROMPT, timeout=300)
            vm.send("yes\r")
            done = vm.expect(rf"{COMPLETE}|{FAILED}", timeout=300)
            assert done.group(0).startswith(COMPLETE), vm.output[-3000:]
            print(f"fixture S restored from USB under Secure Boot in {vm.elapsed():.1f} s")
    except VmTimeout as exc:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        raise AssertionError(f"{str(exc).splitlines()[0]}\n{text[-3000:]}") from None
    seconds = boot_secure_to_marker(scratch, secure_host.marker)
    print(f"restored fixture S reached its marker under Secure Boot in {seconds:.1f} s")


@pytest.mark.qemu
def test_healthy_secure_boot_host_is_the_default(
    secure_host: Fixture, secure_host_iso: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "host.img"
    subprocess.run(["cp", "--sparse=always", secure_host.path, disk], check=True)
    before = debs.sha256_file(disk)
    disks = [
        Disk(secure_host_iso, interface="cdrom", readonly=True, bootindex=0),
        Disk(disk, interface="virtio", bootindex=1),
    ]
    config = VmConfig(firmware="uefi", secure_boot=True, memory_mib=MEMORY_MIB, disks=disks)
    log_path = tmp_path / "serial.log"
    try:
        with Vm(config, log_path) as vm:
            vm.expect(GRUB_SAYS_ENFORCED, timeout=240)
            vm.expect(LOCAL_DEFAULT, timeout=60)
            vm.expect(rf"{secure_host.marker}\r*\n", timeout=240)
            print(f"healthy fixture S booted through the menu in {vm.elapsed():.1f} s")
            assert "mbrescue.medium=" not in vm.output
    except VmTimeout as exc:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        raise AssertionError(f"{str(exc).splitlines()[0]}\n{text[-3000:]}") from None
    assert debs.sha256_file(disk) == before
