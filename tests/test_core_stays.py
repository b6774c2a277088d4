"""GRUB 2's core embedded in the post-MBR gap stays at its sectors when /boot moves.

Fixture E (msdos, BIOS, real grub-install, /boot at 32 MiB) restored by the file-level path
onto a disk smaller than its region: /boot moves down to 1 MiB, the MBR boot code and the
core (gap sectors 1..106) are written back as captured — boot.img names the core's first
sector, diskboot's blocklist the core's own sectors, and the core finds /boot by partition
number (its prefix `(,msdos1)/grub`), none of which moved. sfdisk judges the table, and
SeaBIOS boots the restored disk to E's marker. A move onto the core's sectors is refused.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import pytest

from builder.fixtures import boot_to_marker
from builder.runner import bootloader, files_restore
from builder.runner import restore as runner
from builder.runner.capfile import Capture
from builder.runner.console import Console, Terminal
from builder.runner.disk import disk_info
from builder.runner.errors import MbrescueError

from .conftest import sh, sha256_of

MiB = 1 << 20
CORE_SECTORS = 106  # E's core: diskboot.img at sector 1, its blocklist 2+105


@pytest.fixture(scope="module")
def capture_e(far_boot_fixture, tmp_path_factory) -> Path:
    from builder.capture import CaptureOptions, capture

    out = tmp_path_factory.mktemp("capture-e") / "E.mbrescue"
    result = capture(CaptureOptions(source=far_boot_fixture.path, output=out, progress=False))
    assert result.manifest["region"]["end_lba"] == far_boot_fixture.region_end_sectors
    return result.path


def random_target(path: Path, size_bytes: int) -> Path:
    path.write_bytes(os.urandom(size_bytes))
    return path


def test_e_records_its_core_in_the_gap(capture_e):
    manifest = Capture.open(str(capture_e)).manifest
    assert manifest.boot_loader is not None
    disk = next(r for r in manifest.boot_loader if r.partition is None)
    assert (disk.method, disk.core_lba, disk.core_sectors) == (
        bootloader.GRUB2_EMBEDDED_GAP, 1, CORE_SECTORS)
    assert manifest.partition(1).start_lba == 32 * MiB // 512


def test_e_onto_a_smaller_disk_moves_boot_keeps_the_core_and_boots(far_boot_fixture, capture_e,
                                                                    tmp_path):
    fx = far_boot_fixture
    target = random_target(tmp_path / "small.img", 56 * MiB)
    assert target.stat().st_size < fx.region_end_sectors * 512
    out = io.StringIO()
    console = Console([Terminal("test", -1, None, False, out_stream=out)],
                      error_stream=io.StringIO())
    assert runner.restore(str(capture_e), str(target), console=console, assume_yes=True) == 0
    text = out.getvalue()
    assert "mbrescue: restore complete" in text.splitlines()[-1], text
    assert "file-level path, because the target (56.0 MiB) is smaller than the region" in text
    assert f"partition 1 moved from byte {32 * MiB} to {MiB}" in text
    assert (f"the MBR boot code and the core in the post-MBR gap kept at sectors "
            f"1..{CORE_SECTORS}; partition 1 moved, which the core finds by partition number"
            in text), text
    assert "Will write back: the MBR boot code and the boot loader's sectors" in text
    sh("sfdisk", "--verify", target)
    dump = sh("sfdisk", "--dump", target)
    assert "label-id: 0x5ca1ab1e" in dump
    assert "img1 : start=        2048" in dump and "bootable" in dump
    boot = dict(line.split("=", 1) for line in sh(
        "blkid", "-p", "-o", "export", "-O", str(MiB), target).splitlines() if "=" in line)
    assert (boot["UUID"], boot["TYPE"]) == (fx.boot_fs_uuid, "ext4")
    sh("e2fsck", "-fn", f"{target}?offset={MiB}")
    # boot.img and the core as captured; the core's sectors exactly, nothing past them.
    assert sha256_of(target, 440) == sha256_of(fx.path, 440)
    assert sha256_of(target, CORE_SECTORS * 512, 512) == \
        sha256_of(fx.path, CORE_SECTORS * 512, 512)
    with open(target, "rb") as stream:
        stream.seek((1 + CORE_SECTORS) * 512)
        after_core = stream.read(512)
    with open(fx.path, "rb") as stream:
        stream.seek((1 + CORE_SECTORS) * 512)
        assert after_core != stream.read(512)  # the target's own (random) bytes, not written
    boot_to_marker(target, fx)


def test_a_move_onto_the_core_is_refused(capture_e, tmp_path):
    """A core reaching past 1 MiB (a large embedded core): /boot, moved down to 1 MiB, would
    cover it; refused before anything is written."""
    capture = Capture.open(str(capture_e))
    manifest = capture.manifest
    assert manifest.boot_loader is not None
    big = tuple(dataclasses.replace(r, core_sectors=3000) if r.partition is None else r
                for r in manifest.boot_loader)
    capture.manifest = dataclasses.replace(manifest, boot_loader=big)
    target = random_target(tmp_path / "small.img", 56 * MiB)
    before = sha256_of(target)
    with pytest.raises(MbrescueError, match=(
            r"partition 1 would take sectors 2048\.\.\d+, over GRUB 2.s core in the post-MBR gap "
            r"\(sectors 1\.\.3000\)")):
        files_restore.plan_files(capture, disk_info(str(target)), "test")
    assert sha256_of(target) == before


def test_a_4kn_target_still_refuses_a_bios_only_capture(capture_e, tmp_path):
    target = random_target(tmp_path / "4kn.img", 128 * MiB)
    info = dataclasses.replace(disk_info(str(target)), logical_sector_bytes=4096)
    with pytest.raises(MbrescueError, match="BIOS cannot boot a 4Kn disk"):
        files_restore.plan_files(Capture.open(str(capture_e)), info, "test")


def test_the_gap_write_is_exactly_the_core(captures, tmp_path):
    """B's gap runs to sector 2047, its core to 106: only the core's sectors are written."""
    capture = Capture.open(str(captures["B"]))
    target = random_target(tmp_path / "same.img", 128 * MiB)
    plan = files_restore.plan_files(capture, disk_info(str(target)), "test")
    assert plan.keep_boot_code and plan.core is not None
    writes = files_restore._boot_loader_writes(capture, plan)
    assert [(offset, len(data)) for offset, data in writes] == [(512, 106 * 512)]
    assert writes[0][1] == capture.read_region(512, 106 * 512)
