"""The rescue ISO: structure (pycdlib, xorriso, sgdisk), reproducibility, and QEMU boots.

The ISO is built once per module from Debian's kernel, a tiny busybox initramfs whose
/init prints a marker, the kernel command line and the base initrd's own marker (the default
entries load only the base: the rescue system reads the capture from the medium), then powers
off, and a real payload (the project's payload builder around a real capture of a small disk).
QEMU boots it four ways (BIOS/UEFI x CD/USB), once more from USB with the El Torito EFI
entry wiped (so only the GPT's ESP can boot UEFI), and with "healthy" local disks holding
the captured /boot UUID, where the default entry must boot the local disk: its MBR code
(BIOS), its ESP's BOOTX64.EFI (UEFI), or its grub.cfg when it has no boot code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pycdlib
import pytest

from builder import build, buildrecord, capture, cpio, debs, grub, initramfs, iso, kit, verify
from builder.debs import cache_dir
from builder.errors import MbrescueError
from builder.run import output, run
from builder.runner.isofs import directory_records, record_name
from builder.vm import Disk, Vm, VmConfig
from tests.conftest import mbrescue, one_error_line

EPOCH = "1700000000"
BOOT_FS_UUID = "5b0c4c8e-3f0a-4e57-9c1e-2a4d5e6f7a8b"
MEDIUM_ID = "0123456789abcdef"
INIT_MARKER = "MBRESCUE-TEST-INIT"
PAYLOAD_MARKER = "MBRESCUE-TEST-PAYLOAD"
BASE_MARKER = "MBRESCUE-TEST-BASE"
LOCAL_MBR_MARKER = "MBRESCUE-TEST-LOCAL-MBR"
LOCAL_ESP_MARKER = "MBRESCUE-TEST-LOCAL-ESP"
LOCAL_CFG_MARKER = "MBRESCUE-TEST-LOCAL-GRUB-CFG"

INIT_SCRIPT = f"""#!/bin/sh
/bin/busybox mkdir -p /proc /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
for tty in /dev/ttyS0 /dev/console; do
  echo "{INIT_MARKER} cmdline: $(/bin/busybox cat /proc/cmdline)" > $tty
  echo "{INIT_MARKER} base: $(/bin/busybox cat /base-marker)" > $tty
done
/bin/busybox poweroff -f
"""


def _cpio(tree: cpio.Tree, path: Path) -> Path:
    with open(path, "wb") as stream:
        cpio.write_tree(tree, stream)
    return path


def make_capture(work: Path) -> Path:
    """A real capture of a small MBR disk image whose /boot ext4 has BOOT_FS_UUID."""
    image = work / "host-disk.img"
    with open(image, "wb") as stream:
        stream.truncate(24 << 20)
    table = "label: dos\nstart=2048, size=16384, type=83, bootable\nstart=18432, type=82\n"
    run(["sfdisk", "-q", image], input_bytes=table.encode())
    run(["mke2fs", "-q", "-t", "ext4", "-E", f"offset={2048 * 512}", "-U", BOOT_FS_UUID,
         "-F", image, "8M"])  # fmt: skip
    options = capture.CaptureOptions(
        source=image, output=work / "testhost.mbrescue", hostname="testhost"
    )
    return capture.capture(options).path


def build_iso(
    work: Path,
    out: Path,
    capture_file: Path | None,
    *,
    local_timeout_s: int = 10,
    restore_timeout_s: int = 5,
    efi_fat: Path | None = None,
) -> iso.IsoReport:
    kernel_deb, kernel_root = debs.fetch_extracted(debs.kernel_package())
    kernel = next((kernel_root / "boot").glob("vmlinuz-*"))
    _, busybox_root = debs.fetch_extracted("busybox-static")
    base = cpio.Tree()
    base.file_from("bin/busybox", busybox_root / "bin" / "busybox", 0o755)
    base.symlink("bin/sh", "busybox")
    base.file("init", INIT_SCRIPT.encode(), 0o755)
    base.file("base-marker", f"{BASE_MARKER}\n".encode())
    capture_sha256 = debs.sha256_file(capture_file) if capture_file else "0" * 64
    if capture_file is None:  # a payload with no capture in it (what verify must refuse)
        tree = cpio.Tree()
        tree.file("mbrescue/marker", f"{PAYLOAD_MARKER}\n".encode())
        payload = _cpio(tree, work / "payload.img")
    else:
        payload = initramfs.make_payload_initramfs(
            capture_file, work / "payload.img", extra={"marker": f"{PAYLOAD_MARKER}\n".encode()}
        )
    images = grub.make_grub_images(work / "grub", medium_id=MEDIUM_ID)
    if efi_fat is not None:  # another FAT image in place of make_efi_fat's
        images = dataclasses.replace(images, efi_fat=efi_fat)
    cfg = grub.render_grub_cfg(
        host="testhost",
        captured_at="2023-11-14 22:13 UTC",
        region_size="259 MiB",
        boot_fs_uuid=BOOT_FS_UUID,
        medium_id=MEDIUM_ID,
        local_timeout_s=local_timeout_s,
        restore_timeout_s=restore_timeout_s,
    )
    return iso.write_iso(
        out,
        grub=images,
        kernel=kernel,
        base_initrd=_cpio(base, work / "base.img"),
        payload=payload,
        options_json=json.dumps({"capture_sha256": capture_sha256}).encode(),
        build_record=buildrecord.make_record(buildrecord.signed_files(
            kernel, debs.kernel_package(), kernel_deb.version, images)),
        grub_cfg=cfg,
        volume_label="testhost",
        medium_id=MEDIUM_ID,
    )


@pytest.fixture(scope="module")
def epoch() -> Iterator[None]:
    saved = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    yield
    if saved is None:
        del os.environ["SOURCE_DATE_EPOCH"]
    else:
        os.environ["SOURCE_DATE_EPOCH"] = saved


# Short menu timeouts: the QEMU tests wait for them in real time.
TEST_TIMEOUTS = {"local_timeout_s": 2, "restore_timeout_s": 1}
_built_at: list[float] = []


@pytest.fixture(scope="module")
def capture_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_capture(tmp_path_factory.mktemp("capture"))


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, epoch: None, capture_file: Path
) -> iso.IsoReport:
    work = tmp_path_factory.mktemp("iso")
    report = build_iso(work, work / "out" / "testhost.iso", capture_file, **TEST_TIMEOUTS)
    _built_at.append(time.monotonic())
    return report


# --- structure ----------------------------------------------------------------------------------


def test_written_atomically_mode_0600(built: iso.IsoReport) -> None:
    assert built.path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in built.path.parent.iterdir()] == [built.path.name]
    # Padded past the ISO's end (GRUB's BIOS driver reads 32 KiB blocks), to a MiB multiple.
    assert built.size_bytes == built.path.stat().st_size
    assert built.size_bytes % (1024 * 1024) == 0


def test_verify_passes(built: iso.IsoReport) -> None:
    checks = verify.verify_iso(built.path)
    assert all(check.ok for check in checks), verify.format_checks(checks)
    names = {check.name for check in checks}
    assert {
        "El Torito BIOS entry",
        "El Torito EFI entry",
        "hybrid MBR (GRUB)",
        "partition table",
        "payload checksum",
    } <= names
    payload = next(check for check in checks if check.name == "payload checksum")
    assert "capture checked: testhost" in payload.detail  # builder.capture.check_capture ran


def test_pycdlib_reopens(built: iso.IsoReport) -> None:
    reopened = pycdlib.PyCdlib()
    reopened.open(str(built.path))
    try:
        assert reopened.has_rock_ridge() and reopened.has_joliet()
        assert reopened.pvd.volume_identifier.decode().strip() == "TESTHOST"
        assert MEDIUM_ID in reopened.pvd.volume_set_identifier.decode()
        assert MEDIUM_ID in reopened.pvd.application_identifier.text.decode()
        with reopened.open_file_from_iso(joliet_path="/mbrescue/payload.sha256") as sums:
            names = verify.parse_sums(sums.read().decode())
        assert set(names) == {"payload.img", "capture.mbrescue", "options.json"}
        # The capture can hold secrets from /boot: only root reads it on a mounted medium.
        record = reopened.get_record(rr_path="/mbrescue/payload.img")
        assert record.rock_ridge.get_file_mode() & 0o777 == 0o400
        with reopened.open_file_from_iso(rr_path="/boot/grub/grub.cfg") as cfg:
            assert f"mbrescue.medium={MEDIUM_ID}" in cfg.read().decode()
        reopened.get_record(rr_path=grub.medium_marker(MEDIUM_ID))
    finally:
        reopened.close()


def test_xorriso_agrees(built: iso.IsoReport) -> None:
    report = output(
        [
            "xorriso",
            "-indev",
            built.path,
            "-report_el_torito",
            "plain",
            "-report_system_area",
            "plain",
        ]
    )
    assert "El Torito boot img :   1  BIOS  y   none" in report
    assert "El Torito boot img :   2  UEFI  y   none" in report
    assert "boot-info-table grub2-boot-info" in report
    assert "grub2-mbr" in report and "protective-msdos-label" in report
    assert "GPT partition path :   1  /boot/grub/efi.img" in report


def test_sgdisk_and_sfdisk(built: iso.IsoReport) -> None:
    assert "No problems found" in output(["sgdisk", "-v", built.path])
    table = json.loads(output(["sfdisk", "--json", built.path]))["partitiontable"]
    assert table["label"] == "gpt" and len(table["partitions"]) == 1
    esp = table["partitions"][0]
    assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    assert esp["start"] == built.efi_image_block * 4


def test_verify_finds_damage(built: iso.IsoReport, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.iso"
    shutil.copyfile(built.path, damaged)
    reopened = pycdlib.PyCdlib()
    reopened.open(str(built.path))
    payload_block = reopened.get_record(rr_path="/mbrescue/payload.img").extent_location()
    reopened.close()
    with open(damaged, "r+b") as stream:
        stream.seek(0)
        stream.write(bytes(16))  # boot code gone
        stream.seek(payload_block * 2048 + 200)
        stream.write(b"X")  # inside the capture
    failed = {check.name for check in verify.verify_iso(damaged) if not check.ok}
    assert failed == {"hybrid MBR (GRUB)", "payload checksum"}


def test_verify_refuses_payload_without_capture(epoch: None, tmp_path: Path) -> None:
    # A real ISO from the project's own functions, whose payload holds no capture.
    report = build_iso(tmp_path, tmp_path / "out" / "empty.iso", None, **TEST_TIMEOUTS)
    checks = {check.name: check for check in verify.verify_iso(report.path)}
    assert not checks["payload checksum"].ok, checks["payload checksum"]
    assert "no capture" in checks["payload checksum"].detail
    assert [name for name, check in checks.items() if not check.ok] == ["payload checksum"]
    result = subprocess.run(
        [sys.executable, "-m", "builder.cli", "verify", os.fspath(report.path)],
        cwd=Path(__file__).resolve().parent.parent, text=True, capture_output=True,
        stdin=subprocess.DEVNULL, timeout=600,
    )  # fmt: skip
    assert "payload checksum" in one_error_line(result)
    assert "no capture" in result.stdout


def test_build_summary_comes_from_a_check_of_the_written_file(
    built: iso.IsoReport, capture_file: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy.iso"
    shutil.copyfile(built.path, copy)
    report = dataclasses.replace(built, path=copy)
    checked = build.check_written(report, debs.sha256_file(capture_file))
    assert checked.boots == ("BIOS CD", "UEFI CD", "BIOS USB", "UEFI USB")
    text = build.summary(checked)
    for words in ("El Torito BIOS entry", "EFI/BOOT/BOOTX64.EFI", "hybrid MBR",
                  "GPT with an ESP", "payload with the checked capture"):  # fmt: skip
        assert words in text, text
    # A capture other than the one the build checked: refused, and the ISO removed.
    with pytest.raises(MbrescueError, match="not the one the build checked"):
        build.check_written(report, "0" * 64)
    assert not copy.exists()


def test_build_summary_refuses_an_iso_without_its_efi_entry(
    built: iso.IsoReport, capture_file: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "no-efi.iso"
    shutil.copyfile(built.path, copy)
    with open(copy, "r+b") as stream:
        stream.seek(17 * 2048 + 0x47)
        catalog_block = struct.unpack("<I", stream.read(4))[0]
        stream.seek(catalog_block * 2048 + 64)
        stream.write(bytes(64))  # the EFI section header and its entry
    # The old summary said "UEFI CD" for any ISO; the check of the file finds no EFI entry.
    with pytest.raises(MbrescueError, match="El Torito EFI entry"):
        build.check_written(dataclasses.replace(built, path=copy), debs.sha256_file(capture_file))
    assert not copy.exists()


def test_missing_input_is_refused(built: iso.IsoReport, tmp_path: Path) -> None:
    images = grub.make_grub_images(tmp_path / "grub", medium_id=MEDIUM_ID)
    with pytest.raises(MbrescueError, match="missing"):
        iso.write_iso(
            tmp_path / "x.iso",
            grub=images,
            kernel=tmp_path / "nope",
            base_initrd=tmp_path / "nope",
            payload=tmp_path / "nope",
            options_json=b"{}",
            build_record=b"{}",
            grub_cfg="",
            volume_label="x",
            medium_id=MEDIUM_ID,
        )
    assert not (tmp_path / "x.iso").exists()


# --- QEMU boots ---------------------------------------------------------------------------------

BOOT_MODES = {
    "bios-cd": ("bios", "cdrom"),
    "uefi-cd": ("uefi", "cdrom"),
    "bios-usb": ("bios", "usb"),
    "uefi-usb": ("uefi", "usb"),
}


def _boot_to_marker(
    image: Path,
    firmware: str,
    interface: str,
    log_path: Path,
    extra_disks: list[Disk] | None = None,
) -> tuple[str, float]:
    disks = [Disk(image, interface=interface, readonly=True), *(extra_disks or [])]
    with Vm(VmConfig(firmware=firmware, disks=disks), log_path) as vm:
        vm.expect(r"default is the restore", timeout=120)
        cmdline = vm.expect(rf"{INIT_MARKER} cmdline: ([^\r\n]*)\r?\n", timeout=180).group(1)
        vm.expect(rf"{INIT_MARKER} base: {BASE_MARKER}", timeout=30)
        return cmdline, vm.elapsed()


@pytest.mark.qemu
@pytest.mark.parametrize("mode", list(BOOT_MODES))
def test_boots(built: iso.IsoReport, mode: str, tmp_path: Path) -> None:
    firmware, interface = BOOT_MODES[mode]
    cmdline, seconds = _boot_to_marker(built.path, firmware, interface, tmp_path / "serial.log")
    print(f"{mode}: marker after {seconds:.1f} s")
    # The default entry is the restore on the screen: serial first, tty0 last.
    assert cmdline.endswith(f"console=ttyS0,115200n8 console=tty0 mbrescue.medium={MEDIUM_ID}"), (
        cmdline
    )


@pytest.mark.qemu
def test_uefi_usb_boots_through_gpt_without_el_torito(built: iso.IsoReport, tmp_path: Path) -> None:
    # OVMF boots the El Torito EFI entry even from a disk, which would hide a broken GPT:
    # wipe that entry in a copy so only the GPT's ESP is left.
    copy = tmp_path / "no-efi-eltorito.iso"
    shutil.copyfile(built.path, copy)
    with open(copy, "r+b") as stream:
        entries = verify.read_boot_catalog(stream)
        assert [entry.platform for entry in entries] == [0, 0xEF]
        stream.seek(17 * 2048 + 0x47)
        catalog_block = struct.unpack("<I", stream.read(4))[0]
        stream.seek(catalog_block * 2048 + 64)
        stream.write(bytes(64))  # the EFI section header and its entry
    with open(copy, "rb") as stream:
        assert [entry.platform for entry in verify.read_boot_catalog(stream)] == [0]
    cmdline, seconds = _boot_to_marker(copy, "uefi", "usb", tmp_path / "serial.log")
    print(f"uefi-usb via GPT only: marker after {seconds:.1f} s")
    assert f"mbrescue.medium={MEDIUM_ID}" in cmdline


# 16-bit real-mode boot code: print the NUL-terminated text after it on COM1, then halt.
# xor ax,ax; mov ds,ax; mov si,0x7c16; mov dx,0x3f8; cld; l: lodsb; test al,al; jz h;
# out dx,al; jmp l; h: hlt; jmp h
MBR_PRINT_CODE = bytes.fromhex("31c08ed8be167cbaf803fcac84c07403eeebf8f4ebfd")


def _local_efi_binary(work: Path) -> Path:
    """A GRUB EFI image whose embedded config prints the local ESP's marker."""
    config = work / "esp.cfg"
    config.write_text(f'echo "{LOCAL_ESP_MARKER}"\n')
    image = work / "BOOTX64.EFI"
    run(["grub-mkimage", "-O", "x86_64-efi", "-p", "/nowhere", "-c", config, "-o", image, "echo"])
    return image


@pytest.fixture(scope="module")
def healthy_disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Disks carrying the captured /boot's UUID, each with its own way to show it booted.

    "gpt": MBR code printing LOCAL_MBR_MARKER, an ESP whose BOOTX64.EFI prints
    LOCAL_ESP_MARKER, and the ext4 /boot. "bare": an ext4 only, no boot code anywhere, so the
    menu falls back to the host's grub.cfg, which prints LOCAL_CFG_MARKER.
    """
    work = tmp_path_factory.mktemp("healthy")
    root = work / "root"
    (root / "grub").mkdir(parents=True)
    (root / "grub" / "grub.cfg").write_text(f'echo "{LOCAL_CFG_MARKER}"\nsleep 60\n')
    bare = work / "bare.img"
    run(["mke2fs", "-q", "-t", "ext4", "-U", BOOT_FS_UUID, "-d", root, "-F", bare, "16M"])

    disk = work / "gpt.img"
    with open(disk, "wb") as stream:
        stream.truncate(40 << 20)
    esp_start, esp_sectors, boot_start = 2048, 16384, 18432
    table = (
        f"label: gpt\nstart={esp_start}, size={esp_sectors}, type=U\nstart={boot_start}, type=L\n"
    )
    run(["sfdisk", "-q", disk], input_bytes=table.encode())
    run(["mkfs.vfat", "--offset", str(esp_start), disk, str(esp_sectors // 2)])
    esp = f"{disk}@@{esp_start * 512}"
    run(["mmd", "-i", esp, "::EFI", "::EFI/BOOT"])
    run(["mcopy", "-i", esp, _local_efi_binary(work), "::EFI/BOOT/BOOTX64.EFI"])
    run(
        [
            "mke2fs",
            "-q",
            "-t",
            "ext4",
            "-E",
            f"offset={boot_start * 512}",
            "-U",
            BOOT_FS_UUID,
            "-d",
            root,
            "-F",
            disk,
            "10M",
        ]
    )
    code = MBR_PRINT_CODE + f"{LOCAL_MBR_MARKER}\r\n".encode() + b"\0"
    with open(disk, "r+b") as stream:
        stream.write(code)  # before the partition table at 446, which stays
    return {"gpt": disk, "bare": bare}


HEALTHY_CASES = {
    # firmware, disk, what shows that the local disk booted
    "bios-mbr-chain": ("bios", "gpt", LOCAL_MBR_MARKER),
    "uefi-esp-chain": ("uefi", "gpt", LOCAL_ESP_MARKER),
    "bios-grub-cfg-fallback": ("bios", "bare", LOCAL_CFG_MARKER),
}


@pytest.mark.qemu
@pytest.mark.parametrize("case", list(HEALTHY_CASES))
def test_healthy_disk_boots_locally(
    built: iso.IsoReport, healthy_disks: dict[str, Path], case: str, tmp_path: Path
) -> None:
    firmware, which, marker = HEALTHY_CASES[case]
    disk = tmp_path / "disk.img"
    shutil.copyfile(healthy_disks[which], disk)
    before = disk.read_bytes()
    disks = [
        Disk(built.path, interface="cdrom", readonly=True),
        Disk(disk, interface="virtio", bootindex=1),
    ]
    with Vm(VmConfig(firmware=firmware, disks=disks), tmp_path / "serial.log") as vm:
        vm.expect(r"default is to boot the local disk", timeout=120)
        vm.expect(marker, timeout=60)
        print(f"{case}: local disk booted after {vm.elapsed():.1f} s")
        assert INIT_MARKER not in vm.output
    assert disk.read_bytes() == before


# --- reproducibility (last: the first build is then long enough ago) ----------------------------


def test_two_builds_identical(built: iso.IsoReport, capture_file: Path, tmp_path: Path) -> None:
    # Rebuild the GRUB images too, not just take them from the cache.
    shutil.rmtree(cache_dir() / "grub" / grub._cache_key(MEDIUM_ID), ignore_errors=True)
    time.sleep(max(0.0, 2.5 - (time.monotonic() - _built_at[0])))
    again = build_iso(tmp_path, tmp_path / "again.iso", capture_file, **TEST_TIMEOUTS)
    assert again.path.read_bytes() == built.path.read_bytes()


def test_verify_refuses_an_unsigned_loader(built: iso.IsoReport, tmp_path: Path) -> None:
    """The ISO tree's grubx64.efi (the FAT image's own bytes) with its Authenticode table
    removed (the certificate directory entry zeroed in place): a Secure Boot machine would
    refuse it, so must verify."""
    stripped = tmp_path / "stripped.iso"
    shutil.copyfile(built.path, stripped)
    reopened = pycdlib.PyCdlib()
    reopened.open(str(built.path))
    at = reopened.get_record(rr_path="/EFI/BOOT/grubx64.efi").extent_location() * 2048
    reopened.close()
    with open(stripped, "r+b") as stream:
        stream.seek(at + 0x3C)
        pe_at = struct.unpack("<I", stream.read(4))[0]
        stream.seek(at + pe_at + 24 + 112 + 8 * 4)  # data directory 4: the certificate table
        stream.write(bytes(8))
    failed = {check.name: check.detail for check in verify.verify_iso(stripped) if not check.ok}
    assert list(failed) == ["Secure Boot chain signed", "build record"], failed
    assert "grubx64.efi carries no signature" in failed["Secure Boot chain signed"]
    assert "grubx64.efi is not the file the build recorded" in failed[
        "build record"]


def test_verify_proves_the_recorded_package_versions(built: iso.IsoReport) -> None:
    """Each signed file is the one the build record names, and (the packages being in this
    machine's download cache) byte for byte the file the named Debian package ships."""
    checks = {check.name: check for check in verify.verify_iso(built.path)}
    record = checks["build record"]
    assert record.ok, record.detail
    for name, package in (("BOOTX64.EFI", "shim-signed"), ("grubx64.efi", "grub-efi-amd64-signed"),
                          ("vmlinuz", debs.kernel_package())):  # fmt: skip
        assert f"{name}: {package} " in record.detail
    assert record.detail.count("identical to the package's file") == 3, record.detail


def test_verify_finds_a_loader_in_the_efi_image_unlike_the_record(
    with_copies: iso.IsoReport, tmp_path: Path
) -> None:
    """A CD boots UEFI from the El Torito FAT image, not the ISO 9660 tree: its shim must be
    the recorded one too. One byte of the DOS stub changed there (no signature check sees it),
    on an ISO whose tree holds separate copies (else the tree's bytes change with it)."""
    changed = tmp_path / "changed.iso"
    shutil.copyfile(with_copies.path, changed)
    reopened = pycdlib.PyCdlib()
    reopened.open(str(with_copies.path))
    efi_at = reopened.get_record(rr_path="/boot/grub/efi.img").extent_location() * 2048
    shim_at = reopened.get_record(rr_path="/EFI/BOOT/BOOTX64.EFI").extent_location() * 2048
    reopened.close()
    with open(changed, "r+b") as stream:
        stream.seek(shim_at)
        head = stream.read(512)
        stream.seek(efi_at)
        fat = stream.read(with_copies.efi_image_bytes)
        inner = fat.find(head)
        assert inner > 0, "shim not found in the FAT image"
        assert not efi_at <= shim_at < efi_at + len(fat), "the tree's shim is no copy"
        stream.seek(efi_at + inner + 0x50)  # "This program cannot be run in DOS mode"
        stream.write(b"t")
    failed = {check.name: check.detail for check in verify.verify_iso(changed) if not check.ok}
    assert list(failed) == ["EFI files in the tree", "build record"], failed
    assert "EFI/BOOT/BOOTX64.EFI in the EFI image differs" in failed[
        "build record"]
    assert ("the ISO 9660 record of /EFI/BOOT/BOOTX64.EFI holds other bytes than "
            "EFI/BOOT/BOOTX64.EFI in the EFI image") in failed["EFI files in the tree"]


# --- the tree's EFI files: the FAT image's own bytes, not a second copy -------------------------

OVERHEAD_LIMIT_BYTES = 30_000_000  # what the ISO may add to the capture it carries


def _efi_layout(path: Path) -> tuple[range, dict[tuple[str, str], tuple[int, int]]]:
    """The FAT image's blocks, and (kind, path) -> (block, length) of the tree's shim and GRUB."""
    reopened = pycdlib.PyCdlib()
    reopened.open(str(path))
    try:
        fat = reopened.get_record(rr_path="/boot/grub/efi.img")
        fat_blocks = range(fat.extent_location(),
                           fat.extent_location() + (fat.get_data_length() + 2047) // 2048)
        found = {}
        for rr_path in verify.EFI_TREE_FILES:
            for kind, record in (
                ("ISO 9660", reopened.get_record(iso_path=iso.ISO_FILES[rr_path])),
                ("Joliet", reopened.get_record(joliet_path=rr_path)),
            ):
                found[(kind, rr_path)] = (record.extent_location(), record.get_data_length())
        return fat_blocks, found
    finally:
        reopened.close()


def _assert_tree_shares_the_fat(path: Path) -> None:
    loaders = kit.ensure_efi_loaders()
    expected = {"/EFI/BOOT/BOOTX64.EFI": loaders.shim.read_bytes(),
                "/EFI/BOOT/grubx64.efi": loaders.grub_removable.read_bytes()}  # fmt: skip
    fat_blocks, records = _efi_layout(path)
    with open(path, "rb") as stream:
        for (kind, rr_path), (block, length) in records.items():
            assert length == len(expected[rr_path]), (kind, rr_path)
            assert block in fat_blocks and block + (length + 2047) // 2048 <= fat_blocks.stop, (
                f"the {kind} record of {rr_path} is at block {block}, outside the FAT image "
                f"(blocks {fat_blocks.start}..{fat_blocks.stop - 1})")
            stream.seek(block * 2048)
            assert stream.read(length) == expected[rr_path], (kind, rr_path)


def test_tree_efi_files_are_the_fat_images_bytes(built: iso.IsoReport) -> None:
    _assert_tree_shares_the_fat(built.path)
    check = next(c for c in verify.verify_iso(built.path) if c.name == "EFI files in the tree")
    assert check.ok and check.detail.count("the EFI image's bytes") == 2, check.detail


def test_overhead_over_the_capture_under_30_mb(
    capture_file: Path, tmp_path: Path, epoch: None
) -> None:
    """A real `mbrescue build` (the real kit's kernel and base initrd): the ISO adds less
    than 30 MB to the capture, shim and GRUB being stored once (in the FAT image)."""
    out = tmp_path / "real.iso"
    result = mbrescue("build", capture_file, "-o", out)
    assert result.returncode == 0, result.stdout + result.stderr
    overhead = out.stat().st_size - capture_file.stat().st_size
    print(f"ISO {out.stat().st_size} bytes, capture {capture_file.stat().st_size}: "
          f"overhead {overhead} bytes")  # fmt: skip
    assert overhead < OVERHEAD_LIMIT_BYTES
    _assert_tree_shares_the_fat(out)


def _record_at(path: Path, kind: str, rr_path: str) -> int:
    """The byte offset in the ISO file of one of the tree's directory records."""
    reopened = pycdlib.PyCdlib()
    reopened.open(str(path))
    try:
        lookup = ({"iso_path": iso.ISO_FILES[rr_path]} if kind == "ISO 9660"
                  else {"joliet_path": rr_path})  # fmt: skip
        parent = {key: value.rsplit("/", 1)[0] for key, value in lookup.items()}
        name = reopened.get_record(**lookup).file_ident
        folder = reopened.get_record(**parent)
        start, length = folder.extent_location() * 2048, folder.get_data_length()
    finally:
        reopened.close()
    with open(path, "rb") as stream:
        stream.seek(start)
        data = stream.read(length)
    (offset,) = [at for at, record in directory_records(data) if record_name(record) == name]
    return start + offset


def _aimed(built: iso.IsoReport, tmp_path: Path, kind: str, rr_path: str, block: int) -> Path:
    """A copy of the ISO whose one record points at `block` (both-endian, bytes 2..9)."""
    changed = tmp_path / "aimed.iso"
    shutil.copyfile(built.path, changed)
    at = _record_at(changed, kind, rr_path)
    with open(changed, "r+b") as stream:
        stream.seek(at + 2)
        stream.write(struct.pack("<I", block) + struct.pack(">I", block))
    return changed


def test_verify_refuses_a_joliet_record_beside_the_fat_file(
    built: iso.IsoReport, tmp_path: Path
) -> None:
    """Joliet's grubx64.efi one block past the FAT file's start: still inside the FAT image,
    not its file. pycdlib and the build record read the ISO 9660 record, which is intact;
    Linux without Rock Ridge, or Windows, would read this one."""
    _, records = _efi_layout(built.path)
    block, _ = records[("Joliet", "/EFI/BOOT/grubx64.efi")]
    changed = _aimed(built, tmp_path, "Joliet", "/EFI/BOOT/grubx64.efi", block + 1)
    failed = {check.name: check.detail for check in verify.verify_iso(changed) if not check.ok}
    assert list(failed) == ["EFI files in the tree"], failed
    assert failed["EFI files in the tree"] == (
        "the Joliet record of /EFI/BOOT/grubx64.efi points into the EFI image, not at its "
        "EFI/BOOT/grubx64.efi")


def test_verify_refuses_a_record_across_the_fat_images_end(
    built: iso.IsoReport, tmp_path: Path
) -> None:
    fat_blocks, _ = _efi_layout(built.path)
    changed = _aimed(built, tmp_path, "ISO 9660", "/EFI/BOOT/BOOTX64.EFI", fat_blocks.stop - 1)
    failed = {check.name: check.detail for check in verify.verify_iso(changed) if not check.ok}
    assert failed["EFI files in the tree"] == (
        "the ISO 9660 record of /EFI/BOOT/BOOTX64.EFI points into the EFI image, not at its "
        "EFI/BOOT/BOOTX64.EFI")
    assert "build record" in failed  # it reads the ISO 9660 record: other bytes


def test_verify_refuses_a_record_outside_the_fat_image_with_other_bytes(
    built: iso.IsoReport, tmp_path: Path
) -> None:
    """The ISO 9660 record of shim aimed into the kernel's blocks, outside the FAT image (one
    block in: at the kernel's first block pycdlib would take it for the kernel's hard link)."""
    reopened = pycdlib.PyCdlib()
    reopened.open(str(built.path))
    kernel_block = reopened.get_record(rr_path="/mbrescue/vmlinuz").extent_location()
    reopened.close()
    changed = _aimed(built, tmp_path, "ISO 9660", "/EFI/BOOT/BOOTX64.EFI", kernel_block + 1)
    failed = {check.name: check.detail for check in verify.verify_iso(changed) if not check.ok}
    assert failed["EFI files in the tree"] == (
        "the ISO 9660 record of /EFI/BOOT/BOOTX64.EFI holds other bytes than "
        "EFI/BOOT/BOOTX64.EFI in the EFI image")


# A FAT image whose files cannot be shared: 512-byte clusters, and a small file first, so shim
# starts off a 2048-byte block. The ISO must then carry copies, as before, and still verify.


def _unaligned_fat(images: grub.GrubImages, out: Path) -> Path:
    env = {"SOURCE_DATE_EPOCH": EPOCH, "MTOOLS_SKIP_CHECK": "1"}
    run(["mkfs.vfat", "--invariant", "-i", grub.FAT_VOLUME_ID, "-n", grub.FAT_LABEL, "-S", "512",
         "-s", "1", "-C", out, "8192"], env=env)  # fmt: skip
    run(["mmd", "-i", out, "::EFI", "::EFI/BOOT", "::EFI/debian", "::boot", "::boot/grub"],
        env=env)  # fmt: skip
    for source, target in (
        (images.efi_loader_cfg, "::boot/grub/grub.cfg"),
        (images.efi_shim, "::EFI/BOOT/BOOTX64.EFI"),
        (images.efi_grub, "::EFI/BOOT/grubx64.efi"),
        (images.efi_loader_cfg, "::EFI/debian/grub.cfg"),
    ):
        run(["mcopy", "-i", out, source, target], env=env)
    shim = verify.fat_file(out.read_bytes(), "EFI/BOOT/BOOTX64.EFI").contiguous_at()
    assert shim is not None and shim % 2048, shim  # what makes it unshareable
    return out


@pytest.fixture(scope="module")
def with_copies(tmp_path_factory: pytest.TempPathFactory, epoch: None, capture_file: Path
                ) -> iso.IsoReport:  # fmt: skip
    work = tmp_path_factory.mktemp("iso-copies")
    images = grub.make_grub_images(work / "g", medium_id=MEDIUM_ID)
    fat = _unaligned_fat(images, work / "unaligned-efi.img")
    return build_iso(work, work / "out" / "copies.iso", capture_file, efi_fat=fat,
                     **TEST_TIMEOUTS)  # fmt: skip


def test_unshareable_fat_gives_copies_that_verify(with_copies: iso.IsoReport) -> None:
    fat_blocks, records = _efi_layout(with_copies.path)
    for (kind, rr_path), (block, _length) in records.items():
        assert block not in fat_blocks, (kind, rr_path)
    checks = verify.verify_iso(with_copies.path)
    assert all(check.ok for check in checks), verify.format_checks(checks)
    tree = next(check for check in checks if check.name == "EFI files in the tree")
    assert tree.detail.count(": copies") == 2, tree.detail


# Linux itself: the tree's files as the kernel's isofs reads them (Rock Ridge, Joliet, plain
# ISO 9660), the ISO mounted read-only through a loop device in a VM (this machine's own
# kernel has no iso9660).
MOUNT_MODULES = ("virtio_pci", "virtio_blk", "isofs", "loop")  # and what they depend on
MOUNT_MARKER = "MBRESCUE-TEST-MOUNT"
MOUNT_INIT = f"""#!/bin/sh
/bin/busybox mkdir -p /proc /dev /mnt
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
for module in /modules/*.ko; do /bin/busybox insmod $module; done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; /bin/busybox sleep 1; done
for options in ro,loop ro,loop,norock ro,loop,norock,nojoliet; do
  /bin/busybox mount -t iso9660 -o $options /dev/vda /mnt || echo "{MOUNT_MARKER} $options failed"
  for file in $(/bin/busybox find /mnt/ -type f -iname '*x64.efi'); do
    echo "{MOUNT_MARKER} $options $(/bin/busybox sha256sum $file)"
  done
  /bin/busybox umount /mnt
done
echo "{MOUNT_MARKER} done"
/bin/busybox poweroff -f
"""


@pytest.mark.qemu
def test_linux_mount_reads_the_shared_files(built: iso.IsoReport, tmp_path: Path) -> None:
    the_kit = kit.ensure_kit()
    tree = cpio.Tree()
    tree.file_from("bin/busybox", the_kit.busybox, 0o755)
    tree.symlink("bin/sh", "busybox")
    tree.file("init", MOUNT_INIT.encode(), 0o755)
    for index, rel in enumerate(kit.select_modules(the_kit.modules_root, MOUNT_MODULES)):
        tree.file_from(f"modules/{index:02d}-{Path(rel).name}", the_kit.modules_root / rel,
                       0o644)  # fmt: skip
    initrd = _cpio(tree, tmp_path / "mount-initrd.img")
    config = VmConfig(kernel=the_kit.kernel, initrd=initrd, append="console=ttyS0 quiet",
                      disks=[Disk(built.path, interface="virtio", readonly=True)])  # fmt: skip
    with Vm(config, tmp_path / "serial.log") as vm:
        vm.expect(f"{MOUNT_MARKER} done", timeout=240)
        text = vm.output
    loaders = kit.ensure_efi_loaders()
    shim, grub_efi = (debs.sha256_file(path) for path in (loaders.shim, loaders.grub_removable))
    for options, names in (
        ("ro,loop", ("BOOTX64.EFI", "grubx64.efi")),  # Rock Ridge
        ("ro,loop,norock", ("BOOTX64.EFI", "grubx64.efi")),  # Joliet
        ("ro,loop,norock,nojoliet", ("bootx64.efi", "grubx64.efi")),  # ISO 9660, map=normal
    ):
        assert f"{MOUNT_MARKER} {options} failed" not in text
        for name, digest in zip(names, (shim, grub_efi), strict=True):
            assert f"{MOUNT_MARKER} {options} {digest}  /mnt/EFI/BOOT/{name}" in text or (
                f"{MOUNT_MARKER} {options} {digest}  /mnt/efi/boot/{name}" in text), (
                options, name, text[-2000:])
