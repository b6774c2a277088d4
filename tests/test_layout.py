"""The layout reader against independent tools: sfdisk, sgdisk and blkid judge every field.

Images are sparse files written by sfdisk/sgdisk/mke2fs/mkfs.vfat/mkswap/mkfs.xfs;
block-device paths go through losetup (we are root; CI runs as root too).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.run import output, run
from builder.runner.disk import disk_info, list_disks, read_at
from builder.runner.errors import MbrescueError
from builder.runner.layout import Layout, read_layout
from builder.runner.mbr import parse_mbr, resize_entry, walk_ebr_chain
from builder.runner.probe import probe

MIB = 1 << 20
SWAP_UUID = "5a3c1d2e-0b4f-4c6d-9e8f-7a6b5c4d3e2f"
BOOT_UUID = "0d3c0ffe-1234-4a5b-8c9d-0e1f2a3b4c5d"


def sfdisk_json(image: Path | str) -> dict:
    return json.loads(output(["sfdisk", "--json", image]))["partitiontable"]


def blkid(path: Path | str, offset_bytes: int = 0, size_bytes: int | None = None) -> dict[str, str]:
    args: list[str | Path] = ["blkid", "-p", "-o", "export", "-O", str(offset_bytes)]
    if size_bytes is not None:
        args += ["-S", str(size_bytes)]
    result = run([*args, path], check=False)
    pairs = (line.split("=", 1) for line in result.stdout.decode().splitlines() if "=" in line)
    return dict(pairs)


def sparse_file(path: Path, size_bytes: int) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size_bytes)
    return path


def place_swap(image: Path, offset_bytes: int, size_bytes: int, label: str, uuid: str) -> None:
    """mkswap cannot write at an offset: make the swap in its own file and copy its page in."""
    swap = sparse_file(image.with_suffix(".swap"), size_bytes)
    run(["mkswap", "-L", label, "-U", uuid, swap])
    with open(swap, "rb") as source, open(image, "r+b") as target:
        target.seek(offset_bytes)
        target.write(source.read(64 * 1024))
    swap.unlink()


def find(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text)
    assert match is not None, (pattern, text)
    return match


def assert_matches_sfdisk(layout: Layout, table: dict) -> None:
    expected = {int(find(r"(\d+)$", p["node"])[1]): p for p in table["partitions"]}
    assert {p.number: p for p in layout.partitions}.keys() == expected.keys()
    for partition in layout.partitions:
        want = expected[partition.number]
        assert partition.start_lba == want["start"]
        assert partition.size_sectors == want["size"]
        if layout.table == "msdos":
            assert partition.type == f"0x{int(want['type'], 16):02x}"
            assert partition.bootable == bool(want.get("bootable", False))
        else:
            assert partition.type == want["type"].lower()
            assert partition.guid == want["uuid"].lower()
            assert partition.name == want.get("name")
    if layout.table == "msdos":
        assert layout.disk_id == table["id"]
    else:
        assert layout.disk_id == table["id"].lower()


def assert_fs_matches_blkid(image: Path, layout: Layout) -> None:
    sector = layout.sector_bytes
    for partition in layout.partitions:
        if partition.is_extended:
            continue
        found = blkid(image, partition.start_lba * sector, partition.size_sectors * sector)
        fs = partition.fs
        if not found.get("TYPE"):
            assert fs is None, partition
            continue
        assert fs is not None, (partition.number, found)
        assert fs.type == found["TYPE"]
        assert fs.label == found.get("LABEL")
        assert fs.uuid == found.get("UUID")
        if fs.type.startswith("ext"):
            assert fs.block_bytes == int(found["BLOCK_SIZE"])
        if fs.type == "vfat":
            assert fs.version == found["VERSION"]
        if fs.type == "swap":
            assert fs.swap_version == int(found["VERSION"])


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layout")


@pytest.fixture(scope="module")
def msdos63(work: Path) -> Path:
    """The original story: /boot ext3 (1 KiB blocks, 128-byte inodes) at sector 63, then swap."""
    image = sparse_file(work / "msdos63.img", 64 * MIB)
    script = (
        "label: dos\nlabel-id: 0x1234abcd\nunit: sectors\n"
        "start=63, size=40950, type=83, bootable\nstart=41013, size=40960, type=82\n"
    )
    run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image], input_bytes=script.encode()
    )
    run(
        ["mke2fs", "-q", "-F", "-t", "ext3", "-b", "1024", "-I", "128", "-L", "boot",
         "-U", BOOT_UUID, "-E", f"offset={63 * 512}", image, str(40950 // 2)]
    )  # fmt: skip
    place_swap(image, 41013 * 512, 40960 * 512, "SWAP-sda2", SWAP_UUID)
    return image


@pytest.fixture(scope="module")
def extended(work: Path) -> Path:
    """msdos, 1 MiB aligned, an extended partition holding three logicals (ext4, swap, vfat)."""
    image = sparse_file(work / "extended.img", 128 * MIB)
    script = (
        "label: dos\nlabel-id: 0xdeadbeef\nunit: sectors\n"
        "x1 : start=2048, size=40960, type=83, bootable\n"
        "x2 : start=43008, size=200000, type=5\n"
        "x5 : start=45056, size=40960, type=83\n"
        "x6 : start=88064, size=40960, type=82\n"
        "x7 : start=131072, size=40960, type=c\n"
    )
    run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image], input_bytes=script.encode()
    )
    table = sfdisk_json(image)
    starts = {p["node"][-1]: p["start"] for p in table["partitions"]}
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-E", f"offset={starts['5'] * 512}",
         image, "20480"])  # fmt: skip
    place_swap(image, starts["6"] * 512, 40960 * 512, "swap-logical", SWAP_UUID)
    run(["mkfs.vfat", "--offset", str(starts["7"]), "-n", "DATA", "-i", "a1b2c3d4", image,
         str(40960 // 2)])  # fmt: skip
    run(["mke2fs", "-q", "-F", "-t", "ext2", "-E", "offset=1048576", image, "20480"])
    return image


@pytest.fixture(scope="module")
def gpt_image(work: Path) -> Path:
    """GPT: BIOS boot, ESP (FAT32), ext4 /boot, swap."""
    image = sparse_file(work / "gpt.img", 256 * MIB)
    run(
        ["sgdisk", "-U", "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9",
         "-n1:2048:+1M", "-t1:ef02", "-c1:bios", "-A1:set:2",
         "-n2:0:+64M", "-t2:ef00", "-c2:EFI system partition",
         "-n3:0:+64M", "-t3:8300", "-c3:boot",
         "-n4:0:+32M", "-t4:8200", "-c4:swap", image]
    )  # fmt: skip
    table = sfdisk_json(image)
    starts = {p["node"][-1]: p["start"] for p in table["partitions"]}
    run(["mkfs.vfat", "-F", "32", "--offset", str(starts["2"]), "-n", "ESP", "-i", "0badf00d",
         image, str(64 * 1024)])  # fmt: skip
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "boot", "-U", BOOT_UUID,
         "-E", f"offset={starts['3'] * 512}", image, str(64 * 1024)])  # fmt: skip
    place_swap(image, starts["4"] * 512, 32 * MIB, "SWAP-gpt", SWAP_UUID)
    return image


@pytest.fixture
def loop_devices() -> Iterator[list[str]]:
    attached: list[str] = []
    yield attached
    for device in attached:
        run(["losetup", "-d", device], check=False)


def attach(attached: list[str], image: Path, *extra: str) -> str:
    device = output(["losetup", "-f", "--show", *extra, image]).strip()
    attached.append(device)
    return device


def test_msdos_sector_63(msdos63: Path) -> None:
    layout = read_layout(str(msdos63))
    assert layout.table == "msdos"
    assert layout.disk.kind == "file"
    assert layout.disk.logical_sector_bytes == 512
    assert_matches_sfdisk(layout, sfdisk_json(msdos63))
    assert_fs_matches_blkid(msdos63, layout)
    boot, swap = layout.partitions
    assert (boot.start_lba, boot.type_name, boot.bootable) == (63, "Linux", True)
    assert boot.fs is not None and (boot.fs.type, boot.fs.label) == ("ext3", "boot")
    assert (boot.fs.block_bytes, boot.fs.inode_bytes) == (1024, 128)
    assert boot.fs.uuid == BOOT_UUID
    assert swap.type_name == "Linux swap" and swap.start_lba == boot.end_lba + 1
    assert swap.fs is not None
    assert (swap.fs.type, swap.fs.label, swap.fs.uuid) == ("swap", "SWAP-sda2", SWAP_UUID)
    assert (swap.fs.swap_page_bytes, swap.fs.swap_version) == (4096, 1)
    assert swap.fs.swap_last_page == 40960 * 512 // 4096 - 1
    assert layout.mbr.disk_signature == "0x1234abcd" and layout.mbr.has_boot_signature
    assert layout.gpt is None and layout.warnings == []


def test_mbr_fields_against_raw_bytes(msdos63: Path) -> None:
    sector = read_at(str(msdos63), 0, 512)
    mbr = parse_mbr(sector)
    first = mbr.entries[0]
    assert first.status == 0x80 and first.type == 0x83
    # 255/63 geometry, which sfdisk uses for the CHS fields: LBA 63 is C0 H1 S1.
    assert (first.chs_start.cylinder, first.chs_start.head, first.chs_start.sector) == (0, 1, 1)
    end = first.chs_end
    assert (end.cylinder * 255 + end.head) * 63 + end.sector - 1 == 63 + 40950 - 1
    assert [entry.is_empty for entry in mbr.entries] == [False, False, True, True]


def test_extended_with_three_logicals(extended: Path) -> None:
    layout = read_layout(str(extended))
    assert_matches_sfdisk(layout, sfdisk_json(extended))
    assert_fs_matches_blkid(extended, layout)
    numbers = [(p.number, p.is_extended, p.is_logical) for p in layout.partitions]
    assert numbers == [
        (1, False, False), (2, True, False), (5, False, True), (6, False, True), (7, False, True),
    ]  # fmt: skip
    by_number = {p.number: p for p in layout.partitions}
    assert by_number[2].type_name == "Extended" and by_number[2].fs is None
    assert by_number[1].fs is not None and by_number[1].fs.type == "ext2"
    assert by_number[5].fs is not None and by_number[5].fs.type == "ext4"
    assert by_number[6].fs is not None and by_number[6].fs.label == "swap-logical"
    vfat = by_number[7].fs
    assert vfat is not None and (vfat.type, vfat.label, vfat.uuid) == ("vfat", "DATA", "A1B2-C3D4")
    # Each logical's entry sits in its own EBR, which lies inside the extended partition.
    ebrs = [by_number[n].table_lba for n in (5, 6, 7)]
    assert ebrs[0] == by_number[2].start_lba and len(set(ebrs)) == 3
    assert layout.disk_id == "0xdeadbeef"


def test_ebr_chain_loop_is_refused(extended: Path, tmp_path: Path) -> None:
    image = tmp_path / "loop.img"
    image.write_bytes(b"")
    sparse_file(image, extended.stat().st_size)
    layout = read_layout(str(extended))
    ext = next(p for p in layout.partitions if p.is_extended)
    with open(extended, "rb") as source, open(image, "r+b") as target:
        target.write(source.read((ext.start_lba + 100_000) * 512))
    second_ebr = layout.partitions[3].table_lba
    assert second_ebr is not None
    with open(image, "r+b") as target:
        # The second EBR's link now points back to the first EBR (relative offset 0).
        target.seek(second_ebr * 512 + 0x1BE + 16 + 8)
        target.write((0).to_bytes(4, "little"))
    with pytest.raises(MbrescueError, match="loops back"):
        read_layout(str(image))

    def read_sector(lba: int) -> bytes:
        return read_at(str(image), lba * 512, 512)

    with pytest.raises(MbrescueError, match="loops back"):
        walk_ebr_chain(read_sector, ext.start_lba, ext.size_sectors)


def test_resize_entry_changes_only_that_entry(
    msdos63: Path, extended: Path, tmp_path: Path
) -> None:
    sector = read_at(str(msdos63), 0, 512)
    smaller = resize_entry(sector, 1, 20480)
    offset = 0x1BE + 16
    changed = [i for i in range(512) if sector[i] != smaller[i]]
    assert changed and all(
        offset + 5 <= i < offset + 8 or offset + 12 <= i < offset + 16 for i in changed
    )
    copy = tmp_path / "shrunk.img"
    sparse_file(copy, msdos63.stat().st_size)
    with open(copy, "r+b") as handle:
        handle.write(smaller)
    table = sfdisk_json(copy)
    assert [p["size"] for p in table["partitions"]] == [40950, 20480]
    run(["sfdisk", "--verify", copy])
    # A logical swap: its entry lives in an EBR.
    layout = read_layout(str(extended))
    swap = layout.partition(6)
    assert swap.table_lba is not None and swap.table_slot is not None
    ebr = read_at(str(extended), swap.table_lba * 512, 512)
    new_ebr = resize_entry(ebr, swap.table_slot, 10000)
    assert parse_mbr(new_ebr).entries[swap.table_slot].size_sectors == 10000
    assert new_ebr[:0x1BE] == ebr[:0x1BE] and new_ebr[0x1CE:] == ebr[0x1CE:]
    with pytest.raises(MbrescueError):
        resize_entry(sector, 3, 100)  # empty slot


def test_gpt(gpt_image: Path) -> None:
    layout = read_layout(str(gpt_image))
    assert layout.table == "gpt"
    assert layout.disk_id == "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
    assert_matches_sfdisk(layout, sfdisk_json(gpt_image))
    assert_fs_matches_blkid(gpt_image, layout)
    names = [(p.number, p.type_name, p.name) for p in layout.partitions]
    assert names == [
        (1, "BIOS boot", "bios"), (2, "EFI System", "EFI system partition"),
        (3, "Linux filesystem", "boot"), (4, "Linux swap", "swap"),
    ]  # fmt: skip
    assert layout.partitions[0].bootable and layout.partitions[0].attributes == 4
    esp = layout.partitions[1].fs
    assert esp is not None and (esp.type, esp.version, esp.label, esp.uuid) == (
        "vfat", "FAT32", "ESP", "0BAD-F00D",
    )  # fmt: skip
    gpt = layout.gpt
    assert gpt is not None
    assert (gpt.primary_valid, gpt.backup_valid, gpt.used) == (True, True, "primary")
    sectors = gpt_image.stat().st_size // 512
    assert (gpt.backup_lba, gpt.backup_entries_lba) == (sectors - 1, sectors - 33)
    assert layout.mbr.protective and layout.warnings == []
    # sgdisk's own view of one partition and of the usable range.
    info = output(["sgdisk", "-i", "3", gpt_image])
    assert find(r"Partition unique GUID: (\S+)", info)[1].lower() == layout.partitions[2].guid
    assert f"First sector: {layout.partitions[2].start_lba} " in info
    assert f"Last sector: {layout.partitions[2].end_lba} " in info
    printed = output(["sgdisk", "-p", gpt_image])
    usable = find(r"First usable sector is (\d+), last usable sector is (\d+)", printed)
    assert (gpt.first_usable_lba, gpt.last_usable_lba) == (int(usable[1]), int(usable[2]))


def corrupt(source: Path, target: Path, offsets: list[int]) -> None:
    target.write_bytes(b"")
    sparse_file(target, source.stat().st_size)
    size = source.stat().st_size
    with open(source, "rb") as src, open(target, "r+b") as dst:
        for start, length in ((0, 4 * MIB), (size - 64 * 1024, 64 * 1024)):
            src.seek(start)
            dst.seek(start)
            dst.write(src.read(length))
        for offset in offsets:
            src.seek(offset)
            dst.seek(offset)
            dst.write(bytes([src.read(1)[0] ^ 0xFF]))


def test_gpt_corrupt_primary_reads_backup(gpt_image: Path, tmp_path: Path) -> None:
    good = read_layout(str(gpt_image))
    for where, offset in (("header", 512 + 40), ("entries", 1024 + 200)):
        image = tmp_path / f"bad-{where}.img"
        corrupt(gpt_image, image, [offset])
        layout = read_layout(str(image))
        assert layout.gpt is not None
        assert (layout.gpt.primary_valid, layout.gpt.backup_valid, layout.gpt.used) == (
            False, True, "backup",
        )  # fmt: skip
        assert any("read from the backup" in warning for warning in layout.warnings)
        assert [(p.number, p.start_lba, p.guid) for p in layout.partitions] == [
            (p.number, p.start_lba, p.guid) for p in good.partitions
        ]


def test_gpt_both_copies_corrupt_is_refused(gpt_image: Path, tmp_path: Path) -> None:
    image = tmp_path / "bad-both.img"
    last_header = gpt_image.stat().st_size - 512
    corrupt(gpt_image, image, [512 + 40, last_header + 40])
    with pytest.raises(MbrescueError, match="both GPT copies are corrupt"):
        read_layout(str(image))


def test_bad_sources(tmp_path: Path) -> None:
    short = tmp_path / "short.img"
    short.write_bytes(b"\0" * 100)
    with pytest.raises(MbrescueError, match="shorter than one sector"):
        read_layout(str(short))
    blank = sparse_file(tmp_path / "blank.img", MIB)
    with pytest.raises(MbrescueError, match="no partition table"):
        read_layout(str(blank))
    with open(blank, "r+b") as handle:
        handle.seek(510)
        handle.write(b"\x55\xaa")
    with pytest.raises(MbrescueError, match="all four MBR entries are empty"):
        read_layout(str(blank))
    with pytest.raises(MbrescueError, match="directory"):
        read_layout(str(tmp_path))
    with pytest.raises(MbrescueError, match="no such file"):
        read_layout(str(tmp_path / "missing.img"))
    with pytest.raises(MbrescueError, match="short read"):
        read_at(str(short), 50, 100)
    # A bare file system (no table) is not a partition table either.
    fat = sparse_file(tmp_path / "fat.img", 8 * MIB)
    run(["mkfs.vfat", fat])
    with pytest.raises(MbrescueError, match="no partition table"):
        read_layout(str(fat))


def test_json_round_trip(gpt_image: Path, extended: Path) -> None:
    for image in (gpt_image, extended):
        layout = read_layout(str(image))
        data = json.loads(json.dumps(layout.to_json()))
        assert Layout.from_json(data) == layout
    with pytest.raises(MbrescueError, match="malformed"):
        Layout.from_json({"disk": {}})


def test_xfs_probe(work: Path) -> None:
    image = sparse_file(work / "xfs.img", 320 * MIB)
    run(["mkfs.xfs", "-q", "-L", "xlabel", "-m", f"uuid={BOOT_UUID}", image])
    found = probe(str(image), 0, image.stat().st_size)
    expected = blkid(image)
    assert found is not None
    assert (found.type, found.label, found.uuid) == ("xfs", expected["LABEL"], expected["UUID"])
    assert found.uuid == BOOT_UUID and found.block_bytes == 4096
    assert probe(str(image), 4096, MIB) is None  # inside, not at a superblock


def test_block_device_via_losetup(msdos63: Path, loop_devices: list[str]) -> None:
    device = attach(loop_devices, msdos63)
    info = disk_info(device)
    assert (info.kind, info.size_bytes) == ("block", msdos63.stat().st_size)
    assert (info.logical_sector_bytes, info.name) == (512, os.path.basename(device))
    from_device = read_layout(device)
    from_file = read_layout(str(msdos63))
    assert from_device.partitions == from_file.partitions
    assert from_device.disk_id == from_file.disk_id
    listed = {disk.path: disk for disk in list_disks()}
    assert device in listed and listed[device].size_bytes == info.size_bytes
    assert not any(
        name.startswith(("ram", "zram")) for name in (d.name or "" for d in listed.values())
    )
    with pytest.raises(MbrescueError, match="4096"):
        disk_info(device, sector_bytes=4096)


def test_4096_byte_sectors(work: Path, loop_devices: list[str]) -> None:
    image = sparse_file(work / "4kn.img", 64 * MIB)
    device = attach(loop_devices, image, "-b", "4096")
    run(["sgdisk", "-n1:256:+8M", "-t1:8300", "-c1:boot", "-n2:0:+8M", "-t2:8200", device])
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "boot4k",
         "-E", f"offset={256 * 4096}", image, "2048"])  # fmt: skip
    info = disk_info(device)
    assert (info.logical_sector_bytes, info.size_bytes) == (4096, 64 * MIB)
    layout = read_layout(device)
    assert layout.sector_bytes == 4096
    table = sfdisk_json(device)  # sfdisk learns the sector size from the device, too
    assert table["sectorsize"] == 4096
    assert_matches_sfdisk(layout, table)
    assert layout.partitions[0].start_lba == 256
    assert layout.partitions[0].fs is not None and layout.partitions[0].fs.label == "boot4k"
    assert layout.gpt is not None and layout.gpt.backup_lba == 64 * MIB // 4096 - 1
    # The same image read as a file needs the sector size told; 512 finds no valid GPT.
    assert read_layout(str(image), sector_bytes=4096).partitions == layout.partitions
    with pytest.raises(MbrescueError, match="both GPT copies"):
        read_layout(str(image))


def test_empty_extended_and_fat12(tmp_path: Path) -> None:
    image = sparse_file(tmp_path / "empty-ext.img", 32 * MIB)
    script = (
        "label: dos\nunit: sectors\n"
        "start=2048, size=8192, type=c\nstart=10240, size=20480, type=f\n"
    )
    run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image], input_bytes=script.encode()
    )
    run(["mkfs.vfat", "--offset", "2048", "-n", "SMALL", "-i", "00c0ffee", image, "4096"])
    layout = read_layout(str(image))
    assert_matches_sfdisk(layout, sfdisk_json(image))
    assert_fs_matches_blkid(image, layout)
    assert [(p.number, p.is_extended) for p in layout.partitions] == [(1, False), (2, True)]
    fat = layout.partitions[0].fs
    assert fat is not None and (fat.version, fat.label, fat.uuid) == ("FAT12", "SMALL", "00C0-FFEE")
