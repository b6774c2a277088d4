"""The host-disk fixtures are what their recipes say, judged by independent tools, and boot.

Layout: sfdisk, sgdisk, blkid, e2fsck (through a loop device at the partition's offset),
mtools for the ESP, GRUB's own boot images for the MBR and the post-MBR gap. Boot: QEMU
(TCG) reads each fixture's marker on the serial console.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from builder import fixtures
from builder.run import output, run

GRUB_I386 = Path("/usr/lib/grub/i386-pc")


@pytest.fixture(scope="session")
def all_fixtures() -> dict[str, fixtures.Fixture]:
    return fixtures.ensure_all()


def _partitions(image: Path) -> dict[int, dict[str, object]]:
    table = json.loads(output(["sfdisk", "--json", image]))["partitiontable"]
    found = {}
    for entry in table["partitions"]:
        number = int(entry["node"].removeprefix(os.fspath(image)).removeprefix("p"))
        found[number] = entry
    return found


def _blkid(image: Path, start_sector: int) -> dict[str, str]:
    text = output(["blkid", "-p", "-o", "export", "-O", str(start_sector * 512), image])
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@contextmanager
def _loop(image: Path, start_sector: int, size_sectors: int) -> Iterator[str]:
    device = output(["losetup", "--find", "--show", "--read-only", "-o", str(start_sector * 512),
                     "--sizelimit", str(size_sectors * 512), image]).strip()
    try:
        yield device
    finally:
        run(["losetup", "-d", device])


def _sectors(image: Path, first: int, count: int) -> bytes:
    with open(image, "rb") as stream:
        stream.seek(first * 512)
        return stream.read(count * 512)


@pytest.mark.qemu
@pytest.mark.parametrize("name", fixtures.FIXTURE_NAMES)
def test_fixture_boots_to_marker(all_fixtures: dict[str, fixtures.Fixture], name: str) -> None:
    fixture = all_fixtures[name]
    seconds = fixtures.boot_to_marker(fixture.path, fixture, timeout=240)
    print(f"fixture {name} ({fixture.firmware}) booted to its marker in {seconds:.1f} s")
    assert seconds < 240


def test_a_is_the_original_story(all_fixtures: dict[str, fixtures.Fixture]) -> None:
    fixture = all_fixtures["A"]
    parts = _partitions(fixture.path)
    assert sorted(parts) == [1, 2]
    assert parts[1]["start"] == 63 and parts[1]["type"] == "83" and parts[1].get("bootable")
    assert parts[2]["type"] == "82"
    assert parts[2]["start"] == parts[1]["start"] + parts[1]["size"]  # type: ignore[operator]
    # `dd count=<swap start>` is the whole boot region of the original story.
    assert fixture.region_end_sectors == parts[2]["start"]
    boot = _blkid(fixture.path, 63)
    assert boot["TYPE"] == "ext3" and boot["BLOCK_SIZE"] == "1024"
    assert boot["LABEL"] == "/boot" and boot["UUID"] == fixture.boot_fs_uuid
    with _loop(fixture.path, 63, 8) as device:
        superblock = Path(device).read_bytes()[1024:2048]
    inode_size, = struct.unpack_from("<H", superblock, 0x58)
    assert inode_size == 128


def test_a_grub_in_mbr_and_gap(all_fixtures: dict[str, fixtures.Fixture]) -> None:
    image = all_fixtures["A"].path
    mbr = _sectors(image, 0, 1)
    assert mbr[510:512] == b"\x55\xaa"
    boot_img = (GRUB_I386 / "boot.img").read_bytes()
    # grub-install patches a few bytes (boot drive, core's sector); the rest is boot.img.
    differing = sum(1 for a, b in zip(mbr[:440], boot_img[:440], strict=True) if a != b)
    assert differing <= 8 and b"GRUB \0Geom\0Hard Disk" in mbr
    kernel_sector, = struct.unpack_from("<Q", mbr, 0x5C)
    assert kernel_sector == 1
    gap = _sectors(image, 1, 62)
    # Sector 1 is diskboot.img (its block list at the end patched), then the LZMA core.
    assert gap[:256] == (GRUB_I386 / "diskboot.img").read_bytes()[:256]
    lzma = (GRUB_I386 / "lzma_decompress.img").read_bytes()[:512]
    same = sum(1 for a, b in zip(gap[512:1024], lzma, strict=True) if a == b)
    assert same >= 480
    used = [i for i in range(62) if gap[i * 512:(i + 1) * 512].count(0) != 512]
    assert len(used) >= 40


def test_b_ebr_chain(all_fixtures: dict[str, fixtures.Fixture]) -> None:
    fixture = all_fixtures["B"]
    parts = _partitions(fixture.path)
    assert sorted(parts) == [1, 2, 5, 6]
    assert parts[1]["start"] == 2048 and parts[1]["type"] == "83"
    assert parts[2]["type"] == "5"
    ext_start, ext_end = parts[2]["start"], parts[2]["start"] + parts[2]["size"]  # type: ignore[operator]
    for number in (5, 6):
        assert ext_start < parts[number]["start"] < ext_end  # type: ignore[operator]
        assert parts[number]["start"] % 2048 == 0  # type: ignore[operator]
    assert parts[6]["type"] == "82" and fixture.swap_partition == 6
    # The first EBR (at the extended partition's start) links to a second one.
    ebr = _sectors(fixture.path, ext_start, 1)  # type: ignore[arg-type]
    assert ebr[510:512] == b"\x55\xaa"
    assert ebr[446 + 4] == 0x83 and ebr[462 + 4] == 0x05
    next_ebr = ext_start + struct.unpack_from("<I", ebr, 462 + 8)[0]  # type: ignore[operator]
    second = _sectors(fixture.path, next_ebr, 1)
    assert second[446 + 4] == 0x82 and second[462 + 4] == 0
    assert fixture.region_end_sectors == parts[1]["start"] + parts[1]["size"]  # type: ignore[operator]
    data = _blkid(fixture.path, parts[5]["start"])  # type: ignore[arg-type]
    assert data["TYPE"] == "ext4" and data["LABEL"] == "data"


@pytest.mark.parametrize("name", ["C", "D"])
def test_gpt_clean(all_fixtures: dict[str, fixtures.Fixture], name: str) -> None:
    fixture = all_fixtures[name]
    report = output(["sgdisk", "-v", fixture.path])
    assert "No problems found" in report
    parts = _partitions(fixture.path)
    first_type = fixtures.GPT_BIOS_BOOT if name == "C" else fixtures.GPT_ESP
    assert parts[1]["type"] == first_type
    assert parts[fixture.boot_partition]["type"] == fixtures.GPT_LINUX
    assert parts[fixture.swap_partition]["type"] == fixtures.GPT_SWAP
    boot = parts[fixture.boot_partition]
    assert fixture.region_end_sectors == boot["start"] + boot["size"]  # type: ignore[operator]


def test_c_core_in_bios_boot_partition(all_fixtures: dict[str, fixtures.Fixture]) -> None:
    image = all_fixtures["C"].path
    start = _partitions(image)[1]["start"]
    core = _sectors(image, start, 1)  # type: ignore[arg-type]
    assert core[:256] == (GRUB_I386 / "diskboot.img").read_bytes()[:256]


def test_d_esp_holds_removable_grub(all_fixtures: dict[str, fixtures.Fixture]) -> None:
    fixture = all_fixtures["D"]
    esp_start = _partitions(fixture.path)[1]["start"]
    esp = _blkid(fixture.path, esp_start)  # type: ignore[arg-type]
    assert esp["TYPE"] == "vfat" and esp["VERSION"] == "FAT32"
    listing = output(["mdir", "-b", "-i", f"{fixture.path}@@{esp_start * 512}",  # type: ignore[operator]
                      "::/EFI/BOOT"])
    assert "BOOTX64.EFI" in listing.upper()
    efi = run(["mtype", "-i", f"{fixture.path}@@{esp_start * 512}",  # type: ignore[operator]
               "::/EFI/BOOT/BOOTX64.EFI"]).stdout
    assert efi[:2] == b"MZ"


@pytest.mark.parametrize("name", fixtures.FIXTURE_NAMES)
def test_labels_uuids_and_clean_boot_fs(all_fixtures: dict[str, fixtures.Fixture],
                                        name: str) -> None:
    fixture = all_fixtures[name]
    parts = _partitions(fixture.path)
    swap = _blkid(fixture.path, parts[fixture.swap_partition]["start"])  # type: ignore[arg-type]
    assert swap["TYPE"] == "swap"
    assert swap["LABEL"] == fixture.swap_label and swap["UUID"] == fixture.swap_uuid
    boot_part = parts[fixture.boot_partition]
    boot = _blkid(fixture.path, boot_part["start"])  # type: ignore[arg-type]
    assert boot["UUID"] == fixture.boot_fs_uuid
    with _loop(fixture.path, boot_part["start"], boot_part["size"]) as device:  # type: ignore[arg-type]
        run(["e2fsck", "-fn", device])
        listing = output(["debugfs", "-R", "ls -p /grub", device])
        root_listing = output(["debugfs", "-R", "ls -p /", device])
    assert "grub.cfg" in listing and "grubenv" in listing
    assert ("x86_64-efi" if fixture.firmware == "uefi" else "i386-pc") in listing
    assert "vmlinuz-" in root_listing and "initrd.img-" in root_listing


def test_cache_is_reused_and_names_checked(all_fixtures: dict[str, fixtures.Fixture]) -> None:
    again = fixtures.ensure_fixture("A")
    assert again == all_fixtures["A"] and again.path.exists()
    assert again.path.parent.name == fixtures.find_parts().recipe_hash
    with pytest.raises(fixtures.MbrescueError):
        fixtures.ensure_fixture("Z")


def test_module_prints_paths(all_fixtures: dict[str, fixtures.Fixture]) -> None:
    import sys

    text = output([sys.executable, "-m", "builder.fixtures", "a", "D"],
                  cwd=Path(__file__).resolve().parent.parent)
    assert text.splitlines() == [f"A {all_fixtures['A'].path}", f"D {all_fixtures['D'].path}"]
