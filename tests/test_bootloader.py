"""How the boot loader was installed, found from the captured bytes (runner/bootloader.py).

The fixtures' GRUB 2 installs (grub-install in a VM) plus disks installed here by the real
tools of the other methods: GRUB 0.97's own shell (`setup`, and `install` without a
stage1.5), extlinux 6.04 on a loop-mounted ext4, and a GRUB 2 blocklist install made from
fixture A's own core.img (the pointer fields grub-bios-setup would fill; a SeaBIOS boot to
A's marker shows they are right). The file-level path refuses what it cannot re-make,
with the target unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from builder import debs
from builder.capture import CaptureOptions, capture
from builder.fixtures import boot_to_marker
from builder.runner import bootloader, files_restore
from builder.runner.capfile import Capture
from builder.runner.disk import disk_info
from builder.runner.errors import MbrescueError
from builder.runner.manifest import BootLoaderRecord, Manifest, parse_manifest

from .conftest import ROOT, mbrescue, one_error_line, sh, sha256_of

MiB = 1 << 20
SECTOR = 512


# --- disks installed by the other methods' own tools --------------------------------------


def _package(name: str) -> Path:
    return debs.fetch_extracted(name)[1]


def _msdos_image(path: Path, disk_id: str, boot_start: int, boot_sectors: int) -> None:
    with open(path, "wb") as stream:
        stream.truncate(64 * MiB)
    sh("sfdisk", "-q", path, input_bytes=(
        f"label: dos\nlabel-id: {disk_id}\n{boot_start},{boot_sectors},83,*\n,,82\n").encode())


def _grub_legacy_disk(path: Path, disk_id: str, commands: str) -> None:
    """/boot (ext3, 1 KiB blocks, 128-byte inodes, as GRUB 0.97 reads it) at sector 63 with
    GRUB 0.97's stage files, then its own shell (a 32-bit program: run by Debian's i386
    loader) installs it on the image file through a device map."""
    grub = _package("grub-legacy")
    libc32 = _package("libc6-i386") / "lib32"
    _msdos_image(path, disk_id, 63, 65536)
    with tempfile.TemporaryDirectory(prefix="mbrescue-legacy-") as scratch:
        tree = Path(scratch) / "tree"
        (tree / "grub").mkdir(parents=True)
        for name in ("stage1", "stage2", "e2fs_stage1_5"):
            shutil.copy(grub / "usr/lib/grub/x86_64-pc" / name, tree / "grub" / name)
        (tree / "grub/menu.lst").write_text("timeout 1\ntitle x\nroot (hd0,0)\nkernel /vmlinuz\n")
        sh("mke2fs", "-q", "-F", "-t", "ext3", "-I", "128", "-b", "1024", "-E",
           f"offset={63 * SECTOR}", "-d", tree, path, "32M")
        device_map = Path(scratch) / "device.map"
        device_map.write_text(f"(hd0) {path}\n")
        done = subprocess.run(
            [libc32 / "ld-linux.so.2", "--library-path", libc32, grub / "usr/sbin/grub",
             "--batch", "--no-floppy", f"--device-map={device_map}"],
            input=f"root (hd0,0)\n{commands}\nquit\n", capture_output=True, text=True,
            timeout=120, check=False)
        assert done.returncode == 0 and "Error" not in done.stdout, done.stdout + done.stderr


def _extlinux_disk(path: Path) -> None:
    """ext4 /boot at 1 MiB, active; `extlinux --install` on it mounted through a loop device
    at the partition's offset (this kernel has no partition support), syslinux's mbr.bin."""
    extlinux = _package("extlinux")
    _msdos_image(path, "0x1e9ac103", 2048, 65536)
    with tempfile.TemporaryDirectory(prefix="mbrescue-extlinux-") as scratch:
        tree = Path(scratch) / "tree"
        (tree / "extlinux").mkdir(parents=True)
        (tree / "extlinux/extlinux.conf").write_text("DEFAULT x\nLABEL x\n KERNEL /vmlinuz\n")
        sh("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={2048 * SECTOR}", "-d", tree, path,
           "32M")
        where = Path(scratch) / "mnt"
        where.mkdir()
        with contextlib.ExitStack() as stack:
            loop = sh("losetup", "--find", "--show", "--offset", str(2048 * SECTOR),
                      "--sizelimit", str(65536 * SECTOR), path).strip()
            stack.callback(sh, "losetup", "--detach", loop)
            sh("mount", "-t", "ext4", loop, where)
            stack.callback(sh, "umount", where)
            sh(extlinux / "usr/bin/extlinux", "--install", where / "extlinux")
    with open(path, "r+b") as stream:
        stream.write((extlinux / "usr/lib/EXTLINUX/mbr.bin").read_bytes()[:440])


def _grub2_blocklist_disk(fixture_a: Path, path: Path) -> tuple[int, int]:
    """Fixture A turned into a GRUB 2 blocklist install, as `grub-install --force` leaves a
    disk whose core cannot be embedded: boot.img's kernel sector points at the first sector
    of /boot/grub/i386-pc/core.img inside the file system, that sector's diskboot.img lists
    the file's other sectors, and the gap is empty. Returns (core LBA, core sectors)."""
    sh("cp", "--sparse=always", fixture_a, path)
    boot_at = 63  # A's /boot: ext3 with 1 KiB blocks
    fs = f"{path}?offset={boot_at * SECTOR}"
    size = int(sh("debugfs", "-c", "-R", "stat /grub/i386-pc/core.img", fs)
               .split("Size: ")[1].split()[0])
    # bmap per block of the file: `blocks` would list the indirect block among the data.
    commands = path.with_suffix(".bmap")
    commands.write_text("".join(f"bmap /grub/i386-pc/core.img {index}\n"
                                for index in range(-(-size // 1024))))
    listed = [line for line in sh("debugfs", "-c", "-f", commands, fs).splitlines()
              if line.strip().isdigit()]
    commands.unlink()
    sectors = [boot_at + 2 * int(block) + half for block in listed for half in (0, 1)]
    sectors = sectors[: -(-size // SECTOR)]
    runs: list[list[int]] = []
    for lba in sectors[1:]:
        if runs and runs[-1][0] + runs[-1][1] == lba:
            runs[-1][1] += 1
        else:
            runs.append([lba, 1])
    with open(path, "r+b") as disk:
        disk.seek(sectors[0] * SECTOR)
        diskboot = bytearray(disk.read(SECTOR))
        at, segment = bootloader.DISKBOOT_LIST_AT, bootloader.DISKBOOT_SEGMENT
        for start, count in runs:
            struct.pack_into("<QHH", diskboot, at, start, count, segment)
            segment += count * SECTOR // 16
            at -= bootloader.DISKBOOT_ENTRY_BYTES
        diskboot[at : at + bootloader.DISKBOOT_ENTRY_BYTES] = bytes(bootloader.DISKBOOT_ENTRY_BYTES)
        disk.seek(sectors[0] * SECTOR)
        disk.write(diskboot)
        disk.seek(bootloader.GRUB2_KERNEL_SECTOR_AT)
        disk.write(struct.pack("<Q", sectors[0]))
        disk.seek(SECTOR)
        disk.write(bytes((boot_at - 1) * SECTOR))  # nothing embedded any more
    return sectors[0], len(sectors)


@pytest.fixture(scope="session")
def installed(fixtures, tmp_path_factory) -> dict[str, tuple[Path, Path, object]]:
    """(image, capture, what its builder returned) of each hand-installed disk, made once
    per session."""
    folder = tmp_path_factory.mktemp("bootloaders")
    made: dict[str, tuple[Path, Path, object]] = {}
    builders = {
        "legacy": lambda p: _grub_legacy_disk(p, "0x1e9ac101", "setup (hd0)"),
        "legacy-blocklist": lambda p: _grub_legacy_disk(
            p, "0x1e9ac102", "install /grub/stage1 (hd0) /grub/stage2 p /grub/menu.lst"),
        "extlinux": _extlinux_disk,
        "grub2-blocklist": lambda p: _grub2_blocklist_disk(fixtures["A"].path, p),
    }
    for name, build in builders.items():
        image = folder / f"{name}.img"
        built = build(image)
        result = capture(CaptureOptions(source=image, output=folder / f"{name}.mbrescue",
                                        progress=False))
        made[name] = (image, result.path, built)
    return made


def records(capture_path: Path) -> dict[int | None, BootLoaderRecord]:
    manifest = Capture.open(str(capture_path)).manifest
    assert manifest.boot_loader is not None
    return {record.partition: record for record in manifest.boot_loader}


# --- each capture records the method it really has -------------------------------------


def test_a_records_grub2_embedded_in_the_gap(captures):
    disk = records(captures["A"])[None]
    assert disk.method == "grub2-embedded-gap"
    # A's gap is sectors 1..62; diskboot.img's blocklist says 2+61.
    assert (disk.core_lba, disk.core_sectors, disk.core_partition) == (1, 62, None)
    assert any("diskboot.img" in line for line in disk.evidence)
    assert records(captures["A"])[1].method == "none"


def test_b_records_grub2_embedded_in_its_1mib_gap(captures):
    assert records(captures["B"])[None].method == "grub2-embedded-gap"


def test_c_records_grub2_in_the_bios_boot_partition(captures):
    found = records(captures["C"])
    disk, bios_boot = found[None], found[1]
    assert disk.method == bios_boot.method == "grub2-bios-boot-partition"
    assert (disk.core_lba, disk.core_partition) == (2048, 1)
    assert found[2].method == "none"


def test_d_records_uefi_with_its_loader_paths(captures):
    found = records(captures["D"])
    assert found[None].method == "none"  # no BIOS boot code
    assert found[1].method == "uefi"
    assert "EFI/BOOT/BOOTX64.EFI" in found[1].loader_paths


def test_grub_legacy_with_stage1_5_in_the_gap(installed):
    disk = records(installed["legacy"][1])[None]
    assert disk.method == "grub-legacy-stage1.5"
    # The shell said: "embed /grub/e2fs_stage1_5 (hd0)... 19 sectors are embedded".
    assert (disk.core_lba, disk.core_sectors) == (1, 19)
    assert any("'/grub/stage2" in line for line in disk.evidence)


def test_grub_legacy_without_stage1_5_is_a_blocklist(installed):
    disk = records(installed["legacy-blocklist"][1])[None]
    assert disk.method == "grub-legacy-blocklist"
    assert disk.core_partition == 1 and (disk.core_lba or 0) > 63


def test_extlinux_in_the_volume_boot_record(installed):
    found = records(installed["extlinux"][1])
    assert found[None].method == found[1].method == "extlinux-vbr"
    assert any("ldlinux.sys" in line for line in found[1].evidence)
    assert any("mbr" in line.lower() or "MBR" in line for line in found[None].evidence)


def test_grub2_blocklist_install(installed):
    _image, capture_path, expected = installed["grub2-blocklist"]
    disk = records(capture_path)[None]
    assert disk.method == "grub2-blocklist"
    assert (disk.core_lba, disk.core_sectors, disk.core_partition) == (*expected, 1)


@pytest.mark.qemu
def test_the_hand_made_grub2_blocklist_install_boots(fixtures, installed):
    """The blocklist fields written above are what GRUB needs: SeaBIOS boots A's kernel."""
    boot_to_marker(installed["grub2-blocklist"][0], fixtures["A"])


# --- damaged bytes, the manifest record ------------------------------------------------


def _detect(manifest: Manifest, region: bytes) -> list[dict]:
    views = [bootloader.PartitionView(p.number, p.start_lba, p.size_sectors, p.type,
                                      p.fs.type if p.fs else None, p.bootable)
             for p in manifest.partitions if not p.is_extended]
    return bootloader.detect(lambda at, n: region[at : at + n], SECTOR, manifest.table, views,
                             manifest.boot_chain, {})


def test_a_damaged_signature_is_unknown(captures):
    capture_file = Capture.open(str(captures["A"]))
    region = bytearray(capture_file.read_region(0, 64 * SECTOR))
    manifest = capture_file.manifest
    assert _detect(manifest, bytes(region))[0]["method"] == "grub2-embedded-gap"
    damaged = bytearray(region)
    at = damaged.find(b"loading\0", SECTOR, 2 * SECTOR)
    damaged[at : at + 7] = b"LOADING"
    disk = _detect(manifest, bytes(damaged))[0]
    assert disk["method"] == "unknown" and "diskboot.img" in disk["evidence"][-1]
    pointing_elsewhere = bytearray(region)
    struct.pack_into("<Q", pointing_elsewhere, bootloader.GRUB2_KERNEL_SECTOR_AT, 40)
    assert _detect(manifest, bytes(pointing_elsewhere))[0]["method"] == "unknown"
    foreign = bytearray(region)
    foreign[0:440] = b"\xfa\x33\xc0" + bytes(437)  # some other boot code
    assert _detect(manifest, bytes(foreign))[0]["method"] == "unknown"
    foreign[0:440] = bytes(440)
    assert _detect(manifest, bytes(foreign))[0]["method"] == "none"


def test_old_manifest_without_boot_loader_still_parses(captures):
    raw = json.loads(json.dumps(Capture.open(str(captures["A"])).manifest.raw))
    del raw["boot_loader"]
    assert parse_manifest(raw).boot_loader is None


@pytest.mark.parametrize(("change", "field"), [
    (lambda r: r[0].update(method="grub3"), "boot_loader[0].method"),
    (lambda r: r[1].update(partition=7), "boot_loader[1].partition"),
    (lambda r: r[0].update(core_lba="1"), "boot_loader[0].core_lba"),
    (lambda r: r[0].update(loader_paths=["EFI/x.efi"]), "boot_loader[0].loader_paths"),
    (lambda r: r[1].update(method="uefi", loader_paths=["EFI/../x.efi"]),
     "boot_loader[1].loader_paths"),
    (lambda r: r[0].update(evidence=[1]), "boot_loader[0].evidence"),
    (lambda r: r.append(dict(r[0])), "boot_loader"),
])
def test_a_bad_boot_loader_record_names_its_field(captures, change, field):
    raw = json.loads(json.dumps(Capture.open(str(captures["A"])).manifest.raw))
    change(raw["boot_loader"])
    with pytest.raises(MbrescueError, match=re.escape(f"field {field} is invalid")):
        parse_manifest(raw)


# --- the plan names it; the file-level path refuses what it cannot re-make --------------


def random_target(path: Path, size_bytes: int) -> Path:
    with open(path, "wb") as stream:
        stream.write(os.urandom(size_bytes))
    return path


def test_the_plans_name_the_install_method(captures, tmp_path):
    target = random_target(tmp_path / "same.img", 100 * MiB)
    before = sha256_of(target)
    for switch in ((), ("--files",)):
        result = mbrescue("restore", *switch, captures["A"], target, input_text="no\n")
        assert "Boot loader: grub2-embedded-gap (GRUB 2, core image embedded in the post-MBR " \
               "gap, sectors 1..62" in result.stdout, result.stdout
        assert "mbrescue: error: aborted, nothing written" in result.stderr
    assert "the BIOS boot code written back at the same sectors" in result.stdout
    result = mbrescue("restore", "--files", captures["D"], target, input_text="no\n")
    assert "partition 1: uefi (UEFI loaders on the ESP: EFI/BOOT/BOOTX64.EFI)" in result.stdout
    assert "the ESP's files restored as they were" in result.stdout
    assert sha256_of(target) == before


def runner_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.runner", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize(("name", "reason"), [
    ("grub2-blocklist", "GRUB 2 was installed with a blocklist"),
    ("legacy-blocklist", "GRUB legacy's stage1 reads stage2 from fixed sectors"),
    ("extlinux", "syslinux/extlinux boots from partition 1's boot sector"),
])
def test_file_level_path_refuses_what_it_cannot_remake(installed, tmp_path, name, reason):
    image, capture_path, _ = installed[name]
    target = random_target(tmp_path / "target.img", image.stat().st_size)
    before = sha256_of(target)
    result = runner_cli("restore", "--yes", "--files", capture_path, target)
    line = one_error_line(result)
    assert line.startswith(f"mbrescue: error: refusing {target}: the file-level path cannot "
                           "re-make this boot loader: ")
    assert reason in line and line.endswith("can)"), line
    assert sha256_of(target) == before


def test_grub_legacy_stage1_5_is_written_back_only_where_it_was(installed, tmp_path):
    image, capture_path, _ = installed["legacy"]
    capture_file = Capture.open(str(capture_path))
    assert capture_file.manifest.boot_loader is not None
    target = random_target(tmp_path / "target.img", image.stat().st_size)
    before = sha256_of(target)
    plan = files_restore.plan_files(capture_file, disk_info(str(target)), "test")
    assert plan.keep_boot_code and plan.boot_loader.startswith("grub-legacy-stage1.5")
    assert "written back at the same sectors" in plan.boot_loader
    # Where the partitions cannot keep their sectors, it is refused with the reason.
    reason = bootloader.cannot_remake(capture_file.manifest.boot_loader, offsets_kept=False)
    assert reason is not None and "stage1.5" in reason and "same sectors" in reason
    assert sha256_of(target) == before


def test_any_bytes_give_a_method_never_an_exception():
    """The detection reads a host's disk: whatever the bytes, a record with a known method."""
    from hypothesis import given
    from hypothesis import strategies as st

    views = [bootloader.PartitionView(1, 63, 2000, "0x83", "ext3", True),
             bootloader.PartitionView(2, 2063, 64, BIOS_BOOT, None, False),
             bootloader.PartitionView(3, 2127, 64, "0xef", "vfat", False)]

    @given(st.binary(min_size=0, max_size=4 * SECTOR), st.integers(0, 2200),
           st.sampled_from([bootloader.GRUB2_STRINGS, bootloader.LEGACY_STRINGS, b""]))
    def check(noise: bytes, pointer: int, strings: bytes) -> None:
        region = bytearray(noise.ljust(2200 * SECTOR // 8, b"\0"))
        region[0x180 : 0x180 + len(strings)] = strings
        struct.pack_into("<H", region, bootloader.GRUB2_KERNEL_ADDRESS_AT, 0x8000)
        struct.pack_into("<Q", region, bootloader.GRUB2_KERNEL_SECTOR_AT, pointer)
        region[0x3E:0x40] = b"\x03\x02" if strings == bootloader.LEGACY_STRINGS else region[0x3E:0x40]
        struct.pack_into("<I", region, bootloader.LEGACY_STAGE2_SECTOR_AT, pointer)
        found = bootloader.detect(lambda at, n: bytes(region[at : at + n]), SECTOR, "msdos",
                                  views, [1, 2, 3], {3: ["EFI/x/y.efi"]})
        assert [r["partition"] for r in found] == [None, 1, 2, 3]
        assert all(r["method"] in bootloader.METHODS for r in found)

    check()


BIOS_BOOT = bootloader.BIOS_BOOT_GUID


def test_a_capture_without_the_record_is_judged_from_its_region(captures, installed, tmp_path):
    """Captures made before the record: the file-level path runs the same detection on the
    verified region, so an old blocklist capture is refused too."""
    image, capture_path, _ = installed["grub2-blocklist"]
    target = random_target(tmp_path / "target.img", image.stat().st_size)
    before = sha256_of(target)
    old = Capture.open(str(capture_path))
    old.manifest = dataclasses.replace(old.manifest, boot_loader=None)
    with pytest.raises(MbrescueError, match="GRUB 2 was installed with a blocklist"):
        files_restore.plan_files(old, disk_info(str(target)), "test")
    assert sha256_of(target) == before
    old_a = Capture.open(str(captures["A"]))
    old_a.manifest = dataclasses.replace(old_a.manifest, boot_loader=None)
    plan = files_restore.plan_files(old_a, disk_info(str(target)), "test")
    assert plan.boot_loader.startswith("grub2-embedded-gap") and "found now" in plan.boot_loader
