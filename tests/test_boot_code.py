"""A disk that cannot boot is flagged where it is captured and built, not only at restore
time: `capture` and `build` warn when the source has no boot code, `inspect` shows the boot
loader, and `--boot-partition` naming a swap partition is refused (issue 17)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .conftest import mbrescue, one_error_line, sha256_of


@pytest.fixture
def no_boot_code(fixtures, tmp_path) -> Path:
    """Fixture A with sector 0's boot code zeroed (the table kept): nothing boots it."""
    image = tmp_path / "noboot.img"
    shutil.copyfile(fixtures["A"].path, image)
    with open(image, "r+b") as stream:
        stream.write(bytes(440))
    return image


def test_capture_and_build_warn_about_a_disk_without_boot_code(no_boot_code, tmp_path):
    out = tmp_path / "noboot.mbrescue"
    captured = mbrescue("capture", no_boot_code, "-o", out, "--hostname", "noboot")
    assert captured.returncode == 0, captured.stderr
    warnings = [line for line in captured.stderr.splitlines() if "warning:" in line]
    assert any("no boot code" in line and "will not boot" in line for line in warnings), (
        captured.stderr)
    shown = mbrescue("inspect", out)
    assert "boot loader  none (no boot code)" in shown.stdout, shown.stdout
    built = mbrescue("build", out, "-o", tmp_path / "noboot.iso")
    assert built.returncode == 0, built.stderr
    assert any("warning:" in line and "no boot code" in line
               for line in built.stderr.splitlines()), built.stderr


def test_a_bootable_capture_gets_no_warning_and_inspect_names_its_loader(fixtures, tmp_path):
    out = tmp_path / "a.mbrescue"
    captured = mbrescue("capture", fixtures["A"].path, "-o", out, "--hostname", "a")
    assert captured.returncode == 0, captured.stderr
    assert "no boot code" not in captured.stderr
    shown = mbrescue("inspect", out).stdout
    assert "boot loader  grub2-embedded-gap" in shown, shown


def test_boot_partition_naming_swap_is_refused(fixtures, tmp_path):
    fx = fixtures["A"]
    before = sha256_of(fx.path)
    out = tmp_path / "swap.mbrescue"
    line = one_error_line(mbrescue("capture", fx.path, "-o", out, "--boot-partition",
                                   str(fx.swap_partition)))
    assert f"--boot-partition {fx.swap_partition}" in line and "swap" in line, line
    assert not out.exists()
    assert sha256_of(fx.path) == before
