"""`verify --boot` passes only on a started kernel; a failure keeps the screen as a PNG.

The disk-boot stage (`bootcheck.check_disk_boots`) boots real fixture disks in QEMU: the
fixture as built (its kernel prints on the serial console), the same disk with GRUB and
the kernel kept off the serial console (only the CPU state can prove it), a disk whose GRUB
runs and talks on serial but whose kernel is gone (GRUB's "Booting" and its errors must not
count), and a disk stuck at `grub rescue>` (normal.mod gone). Each QEMU case boots once.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from builder import bootcheck
from builder.fixtures import Fixture
from builder.vm import ppm_to_png

# A failing disk is given this long: fixture A reaches its kernel in about 9 s under TCG.
FAIL_TIMEOUT_S = 45.0


# --- units --------------------------------------------------------------------------------------


def _decode_png(png: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB rows of a PNG this project wrote (filter 0, one IDAT)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, {}
    while position < len(png):
        (length,) = struct.unpack_from(">I", png, position)
        kind = png[position + 4 : position + 8]
        data = png[position + 8 : position + 8 + length]
        (crc,) = struct.unpack_from(">I", png, position + 8 + length)
        assert crc == zlib.crc32(kind + data), kind
        chunks[kind] = data
        position += 12 + length
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[r * (1 + width * 3) : (r + 1) * (1 + width * 3)] for r in range(height)]
    assert all(row[0] == 0 for row in rows)
    return width, height, b"".join(row[1:] for row in rows)


def test_ppm_to_png_keeps_every_pixel() -> None:
    width, height = 7, 3
    # Pixels that start with whitespace bytes: the header ends after exactly one.
    pixels = bytes([0x20, 0x0A, 0x09, *range(3, width * height * 3)])
    ppm = b"P6\n%d %d\n255\n" % (width, height) + pixels
    assert _decode_png(ppm_to_png(ppm)) == (width, height, pixels)


def test_kernel_cpu_state() -> None:
    # SeaBIOS/GRUB i386-pc (32-bit: EIP), OVMF/GRUB x86_64-efi and the kernel's decompressor
    # (identity-mapped long mode): not a started kernel.
    assert bootcheck.kernel_cpu_state("EAX=00000000 EIP=04f9801e EFL=00000046 CPL=0") is None
    assert bootcheck.kernel_cpu_state("RIP=0000000004f3a4d1 RFL=00000046 CPL=0 II=0") is None
    assert "kernel's half" in (bootcheck.kernel_cpu_state("RIP=ffffffff863edb89 CPL=0") or "")
    assert "user space" in (bootcheck.kernel_cpu_state("RIP=00007f1234567890 CPL=3") or "")


# --- disks made from fixture A ----------------------------------------------------------------


def _boot_fs_offset(image: Path, partition: int) -> int:
    table = json.loads(subprocess.run(["sfdisk", "--json", image], check=True,
                                      capture_output=True, text=True).stdout)  # fmt: skip
    for entry in table["partitiontable"]["partitions"]:
        if entry["node"].endswith(str(partition)):
            return int(entry["start"]) * 512
    raise AssertionError(f"no partition {partition} in {image}")


def _debugfs(image: Path, offset: int, *commands: str) -> str:
    """Run debugfs requests on the ext file system at `offset` of an image file."""
    result = subprocess.run(
        ["debugfs", "-w", "-f", "-", f"{image}?offset={offset}"],
        input="\n".join(commands) + "\n", capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout


def _copy(fixture: Fixture, tmp_path: Path, name: str) -> tuple[Path, int]:
    disk = tmp_path / name
    subprocess.run(["cp", "--sparse=always", fixture.path, disk], check=True)
    return disk, _boot_fs_offset(disk, fixture.boot_partition)


def _kernel_name(disk: Path, offset: int) -> str:
    listing = _debugfs(disk, offset, "ls -p /")
    return next(line.split("/")[5] for line in listing.splitlines()
                if "/vmlinuz-" in line)  # fmt: skip


@pytest.fixture
def fixture_a(fixtures: dict[str, Fixture]) -> Fixture:
    return fixtures["A"]


@pytest.mark.qemu
def test_disk_whose_kernel_prints_on_serial_passes(fixture_a: Fixture, tmp_path: Path) -> None:
    disk, _ = _copy(fixture_a, tmp_path, "good.img")
    result = bootcheck.check_disk_boots(disk, "bios", tmp_path / "serial.log", tmp_path / "s.png")
    print(f"good disk: {result}")
    assert result.started_kernel, result
    # Either proof may come first (the kernel runs `quiet`; its /init prints the marker).
    assert fixture_a.marker in result.evidence, result
    assert result.screenshot is None and not (tmp_path / "s.png").exists()


@pytest.mark.qemu
def test_disk_without_serial_console_passes_on_cpu_state(
    fixture_a: Fixture, tmp_path: Path
) -> None:
    disk, offset = _copy(fixture_a, tmp_path, "no-serial.img")
    kernel = _kernel_name(disk, offset)
    initrd = kernel.replace("vmlinuz-", "initrd.img-")
    # GRUB on the screen only; the kernel with no serial console, and `quiet`.
    cfg = tmp_path / "grub.cfg"
    cfg.write_text(
        "set default=0\nset timeout=0\ninsmod part_msdos\ninsmod ext2\n"
        f"search --no-floppy --fs-uuid --set=root {fixture_a.boot_fs_uuid}\n"
        f"menuentry 'no serial' {{\n  linux /{kernel} ro console=tty0 panic=-1 quiet\n"
        f"  initrd /{initrd}\n}}\n"
    )
    _debugfs(disk, offset, "rm /grub/grub.cfg", f"write {cfg} /grub/grub.cfg")
    serial_log = tmp_path / "serial.log"
    result = bootcheck.check_disk_boots(disk, "bios", serial_log, tmp_path / "s.png")
    print(f"disk without serial console: {result}")
    assert result.started_kernel, result
    assert "the CPU ran the kernel" in result.evidence, result
    assert "nothing of it on the serial console" in result.evidence, result
    # Truly nothing of the kernel on serial: the proof came from the CPU alone.
    assert fixture_a.marker not in serial_log.read_text(errors="replace")


@pytest.mark.qemu
def test_grub_without_its_kernel_fails(fixture_a: Fixture, tmp_path: Path) -> None:
    # GRUB starts, talks on the serial console ("Booting `...'", its error), and no kernel
    # follows: the old check passed this disk on GRUB's words.
    disk, offset = _copy(fixture_a, tmp_path, "no-kernel.img")
    _debugfs(disk, offset, f"rm /{_kernel_name(disk, offset)}")
    serial_log = tmp_path / "serial.log"
    shot = tmp_path / "screen.png"
    result = bootcheck.check_disk_boots(disk, "bios", serial_log, shot, FAIL_TIMEOUT_S)
    print(f"GRUB without a kernel: {result}")
    assert "Booting" in serial_log.read_text(errors="replace")  # GRUB did talk
    assert not result.started_kernel, result
    assert result.screenshot == shot
    width, height, pixels = _decode_png(shot.read_bytes())
    assert width >= 640 and height >= 400 and pixels.count(0) < len(pixels)  # not blank


@pytest.mark.qemu
def test_disk_stuck_at_grub_rescue_fails_with_screenshot(
    fixture_a: Fixture, tmp_path: Path
) -> None:
    disk, offset = _copy(fixture_a, tmp_path, "rescue.img")
    _debugfs(disk, offset, "rm /grub/i386-pc/normal.mod")
    shot = tmp_path / "screen.png"
    result = bootcheck.check_disk_boots(disk, "bios", tmp_path / "serial.log", shot,
                                        FAIL_TIMEOUT_S)  # fmt: skip
    print(f"grub rescue: {result}")
    assert not result.started_kernel, result
    assert "no kernel started" in result.evidence
    assert result.screenshot == shot and shot.stat().st_size > 0
    _decode_png(shot.read_bytes())
    os.replace(shot, tmp_path / "grub-rescue.png")  # kept in pytest's tmp for a look
