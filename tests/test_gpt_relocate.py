"""GPT relocation for restore onto a disk of another size, judged by `sgdisk -v` and `sgdisk -e`.

A GPT image made by sgdisk is copied (its region only, as restore writes it) onto
larger, smaller and same-size targets whose tail is blank or random; after the
writes `relocate` returns, sgdisk must find no problem, and where sgdisk can do
the same job (`-e`) the bytes must be the same as its.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.run import output, run
from builder.runner.errors import MbrescueError
from builder.runner.gpt import relocate
from builder.runner.layout import read_layout

MIB = 1 << 20
# The source's partitions end before 34 MiB; restore copies the region up to there.
REGION_BYTES = 34 * MIB


def sparse_file(path: Path, size_bytes: int) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size_bytes)
    return path


def assert_sgdisk_clean(path: Path | str) -> None:
    report = output(["sgdisk", "-v", path])
    assert "No problems found" in report, report
    for word in ("Problem", "Caution", "Warning", "ERROR"):
        assert word not in report, report


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = sparse_file(tmp_path_factory.mktemp("gpt") / "source.img", 64 * MIB)
    run(
        ["sgdisk", "-n1:2048:+1M", "-t1:ef02", "-n2:0:+16M", "-t2:ef00", "-c2:ESP",
         "-n3:0:+15M", "-t3:8300", "-c3:boot", image]
    )  # fmt: skip
    return image


def captured(image: Path | str, sector_bytes: int = 512) -> tuple[bytes, bytes, bytes]:
    """(MBR sector, primary header sector, primary entry array) as capture keeps them."""
    with open(image, "rb") as handle:
        head = handle.read(34 * sector_bytes)
    return head[:sector_bytes], head[sector_bytes : 2 * sector_bytes], head[2 * sector_bytes :]


def restore_onto(source: Path, target: Path, sector_bytes: int = 512) -> None:
    """Copy the region as restore does, then apply the relocation writes."""
    with open(source, "rb") as src, open(target, "r+b") as dst:
        dst.write(src.read(REGION_BYTES))
    mbr, header, entries = captured(source, sector_bytes)
    disk_sectors = target.stat().st_size // sector_bytes
    with open(target, "r+b") as dst:
        for lba, data in relocate(header, entries, disk_sectors, sector_bytes, mbr_sector=mbr):
            dst.seek(lba * sector_bytes)
            dst.write(data)


def make_target(path: Path, size_bytes: int, tail: str) -> Path:
    sparse_file(path, size_bytes)
    if tail == "random":
        with open(path, "r+b") as handle:
            handle.seek(size_bytes - 4 * MIB)
            handle.write(os.urandom(4 * MIB))
    return path


@pytest.mark.parametrize(
    ("size_mib", "tail"),
    [(100, "zero"), (100, "random"), (40, "zero"), (40, "random"), (64, "random")],
)
def test_relocated_gpt_passes_sgdisk(
    source: Path, tmp_path: Path, size_mib: int, tail: str
) -> None:
    target = make_target(tmp_path / "target.img", size_mib * MIB, tail)
    restore_onto(source, target)
    assert_sgdisk_clean(target)
    layout = read_layout(str(target))
    gpt = layout.gpt
    assert gpt is not None and (gpt.primary_valid, gpt.backup_valid) == (True, True)
    sectors = size_mib * MIB // 512
    assert (gpt.backup_lba, gpt.backup_entries_lba) == (sectors - 1, sectors - 33)
    assert gpt.last_usable_lba == sectors - 34 and layout.warnings == []
    original = read_layout(str(source))
    assert layout.partitions == original.partitions and layout.disk_id == original.disk_id
    # The protective entry covers the new disk.
    assert layout.mbr.entries[0].size_sectors == sectors - 1


def test_same_bytes_as_sgdisk_e(source: Path, tmp_path: Path) -> None:
    # sgdisk -e starts from a plain copy (the old backup inside the disk) and moves it.
    plain = sparse_file(tmp_path / "plain.img", 100 * MIB)
    ours = sparse_file(tmp_path / "ours.img", 100 * MIB)
    for copy in (plain, ours):
        # Region plus the old backup (the last 33 sectors), which stays where it was.
        with open(source, "rb") as src, open(copy, "r+b") as dst:
            dst.write(src.read(REGION_BYTES))
            src.seek(64 * MIB - 33 * 512)
            dst.seek(64 * MIB - 33 * 512)
            dst.write(src.read())
    run(["sgdisk", "-e", plain])
    mbr, header, entries = captured(source)
    with open(ours, "r+b") as dst:
        for lba, data in relocate(header, entries, 100 * MIB // 512, 512, mbr_sector=mbr):
            dst.seek(lba * 512)
            dst.write(data)
    assert plain.read_bytes() == ours.read_bytes()


def test_huge_disk_caps_protective_size(source: Path, tmp_path: Path) -> None:
    size_bytes = 3 << 40  # 3 TiB, sparse: past what 32-bit MBR sizes can say
    target = make_target(tmp_path / "huge.img", size_bytes, "zero")
    restore_onto(source, target)
    assert_sgdisk_clean(target)
    layout = read_layout(str(target))
    assert layout.mbr.entries[0].size_sectors == 0xFFFFFFFF
    assert layout.mbr.entries[0].chs_end == [1023, 254, 63]


def test_refusals(source: Path) -> None:
    mbr, header, entries = captured(source)
    # Partition 3 ends at 33 MiB; a 33 MiB disk leaves no room for the backup behind it.
    with pytest.raises(MbrescueError, match="past the last usable LBA"):
        relocate(header, entries, 33 * MIB // 512, 512, mbr_sector=mbr)
    broken = bytearray(header)
    broken[40] ^= 0xFF
    with pytest.raises(MbrescueError, match="CRC32"):
        relocate(bytes(broken), entries, 100 * MIB // 512, 512)
    changed = bytearray(entries)
    changed[300] ^= 0xFF
    with pytest.raises(MbrescueError, match="entry array fails"):
        relocate(header, bytes(changed), 100 * MIB // 512, 512)
    with pytest.raises(MbrescueError, match="not a GPT header"):
        relocate(bytes(512), entries, 100 * MIB // 512, 512)
    # Without the MBR sector the caller gets the three GPT writes only.
    writes = relocate(header, entries, 100 * MIB // 512, 512)
    assert [lba for lba, _ in writes] == [100 * MIB // 512 - 33, 100 * MIB // 512 - 1, 1]


@pytest.fixture
def loop_devices() -> Iterator[list[str]]:
    attached: list[str] = []
    yield attached
    for device in attached:
        run(["losetup", "-d", device], check=False)


def test_4096_byte_sectors(tmp_path: Path, loop_devices: list[str]) -> None:
    source = sparse_file(tmp_path / "src4k.img", 64 * MIB)
    device = output(["losetup", "-f", "--show", "-b", "4096", source]).strip()
    loop_devices.append(device)
    run(["sgdisk", "-n1:256:+8M", "-t1:8300", "-n2:0:+8M", "-t2:8200", device])
    target = make_target(tmp_path / "dst4k.img", 96 * MIB, "random")
    with open(source, "rb") as src, open(target, "r+b") as dst:
        dst.write(src.read(20 * MIB))
    with open(source, "rb") as handle:
        head = handle.read(6 * 4096)
    # 128 entries of 128 bytes fill four 4096-byte sectors: the backup array is at last - 4.
    writes = relocate(head[4096:8192], head[8192:], 96 * MIB // 4096, 4096, mbr_sector=head[:4096])
    with open(target, "r+b") as dst:
        for lba, data in writes:
            dst.seek(lba * 4096)
            dst.write(data)
    assert writes[0][0] == 96 * MIB // 4096 - 5
    target_device = output(["losetup", "-f", "--show", "-b", "4096", target]).strip()
    loop_devices.append(target_device)
    assert_sgdisk_clean(target_device)
    layout = read_layout(target_device)
    assert layout.gpt is not None and layout.gpt.backup_lba == 96 * MIB // 4096 - 1
