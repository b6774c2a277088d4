"""A reused disk carries nothing of its past (safety rule 9): an msdos capture restored onto a
disk that held GPT, RAID and LVM leaves no GPT header, no md superblock and no LVM label that
a tool could later act on, by the region path and by the file-level path. Judged by wipefs
and sgdisk."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import mbrescue, sh, sha256_of

MiB = 1 << 20
SECTOR = 512
MD_MAGIC = (0xA92B4EFC).to_bytes(4, "little")


def used_gpt_disk(path: Path, size_bytes: int) -> Path:
    """A disk that was GPT (one partition across it), random bytes elsewhere."""
    with open(path, "wb") as stream:
        stream.truncate(size_bytes)
    sh("sgdisk", "-o", "-n", "1:2048:0", "-t", "1:fd00", path)
    return path


def plant_raid_and_lvm(path: Path) -> None:
    """An md 1.0 superblock 8 KiB before the end and an LVM label in sector 1 (as mdadm and
    pvcreate put them on a whole disk)."""
    size = path.stat().st_size
    with open(path, "r+b") as stream:
        stream.seek((size - 8192) & ~4095)
        stream.write(MD_MAGIC + (1).to_bytes(4, "little") + bytes(248))
        stream.seek(SECTOR)
        stream.write(b"LABELONE" + (1).to_bytes(8, "little") + bytes(8) + b"LVM2 001")


def sgdisk_verdict(target: Path) -> str:
    """`sgdisk -v`'s whole say (its warnings go to stderr), whatever its exit status."""
    result = subprocess.run(["sgdisk", "-v", os.fspath(target)], capture_output=True, text=True)
    return result.stdout + result.stderr


def restore(capture: Path, target: Path, *extra: str) -> str:
    result = mbrescue("restore", capture, target, *extra, input_text="yes\n")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("path", ["region", "files"])
def test_msdos_onto_a_used_gpt_disk_leaves_no_gpt(fixtures, captures, tmp_path, path):
    fx = fixtures["A"]
    target = used_gpt_disk(tmp_path / "used.img", fx.path.stat().st_size)
    assert "gpt" in sh("wipefs", "-n", target)
    out = restore(captures["A"], target, *(["--files"] if path == "files" else []))
    # The plan says what is erased before `yes`.
    assert "Will erase: stale" in out and "backup GPT header" in out, out
    listed = sh("wipefs", "-n", target)
    assert "gpt" not in listed.lower() and "PMBR" not in listed, listed
    assert "dos" in listed, listed
    # sgdisk reads the MBR as the table it is: no header, main or backup, to recover from.
    verdict = sgdisk_verdict(target)
    assert "invalid GPT and valid MBR" in verdict and "No problems found" in verdict, verdict
    assert "backup" not in verdict.lower() and "regenerating" not in verdict, verdict
    assert "mbrescue: erased:" in out, out


@pytest.mark.parametrize("path", ["region", "files"])
def test_raid_and_lvm_labels_outside_the_layout_are_erased(fixtures, captures, tmp_path, path):
    fx = fixtures["A"]
    target = used_gpt_disk(tmp_path / "used.img", fx.path.stat().st_size)
    plant_raid_and_lvm(target)
    out = restore(captures["A"], target, *(["--files"] if path == "files" else []))
    assert "md RAID superblock" in out, out
    data = target.read_bytes()
    size = len(data)
    assert MD_MAGIC not in data[size - 128 * 1024 :]
    assert b"LABELONE" not in data[: 4 * SECTOR]
    assert "linux_raid_member" not in sh("wipefs", "-n", target)


def test_a_blank_disk_gets_no_erase_line(fixtures, captures, tmp_path):
    target = tmp_path / "blank.img"
    with open(target, "wb") as stream:
        stream.truncate(fixtures["A"].path.stat().st_size)
    out = restore(captures["A"], target)
    assert "Will erase" not in out, out
    assert os.path.getsize(target) == fixtures["A"].path.stat().st_size


def test_a_signature_inside_a_kept_partition_is_left_alone():
    """A RAID member superblock at the disk's end that lies inside a partition the restore
    keeps (a data partition past the region) belongs to it: not erased, not reported."""
    from builder.runner import stale

    size = 64 * MiB
    disk = bytearray(size)
    at = (size - 8192) & ~4095
    disk[at : at + 8] = MD_MAGIC + (1).to_bytes(4, "little")

    def read(offset: int, length: int) -> bytes:
        return bytes(disk[offset : offset + length])

    found = stale.find_stale(read, size, SECTOR)
    assert [item.what for item in found] == ["md RAID superblock (metadata 1.0)"]
    assert stale.to_erase(found, [(0, MiB)], [(32 * MiB, 32 * MiB)]) == []
    assert stale.to_erase(found, [(0, MiB)], []) == found


# -- what the region path's question names (issue 17: the prompt understated the loss) ----------


def test_region_prompt_names_what_is_lost(fixtures, captures, tmp_path):
    """A used disk whose one partition runs far past the region: the question names that
    partition (it leaves the table) and the swap header written past the region."""
    fx = fixtures["A"]
    target = used_gpt_disk(tmp_path / "used.img", fx.path.stat().st_size)
    before = sha256_of(target)
    result = mbrescue("restore", captures["A"], target, input_text="no\n")
    assert "aborted, nothing written" in result.stderr
    prompt = next(line for line in result.stdout.splitlines() if "Type yes" in line)
    swap_lba = fx.region_end_sectors
    assert f"sectors 0..{swap_lba - 1}" in prompt, prompt
    assert f"swap header of partition 2 at sector {swap_lba}" in prompt, prompt
    assert "partition 1 it holds now (sectors 2048..204766" in prompt, prompt
    assert "Will lose: partition 1 (sectors 2048..204766" in result.stdout, result.stdout
    assert sha256_of(target) == before


def test_region_prompt_on_a_blank_disk_names_no_lost_partition(fixtures, captures, tmp_path):
    target = tmp_path / "blank.img"
    with open(target, "wb") as stream:
        stream.truncate(fixtures["A"].path.stat().st_size)
    result = mbrescue("restore", captures["A"], target, input_text="no\n")
    prompt = next(line for line in result.stdout.splitlines() if "Type yes" in line)
    assert "it holds now" not in prompt and "Will lose" not in result.stdout, result.stdout
