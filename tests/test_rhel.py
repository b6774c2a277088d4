"""A RHEL-family host (fixture R): XFS /boot of 1 GiB at 2048, swap, GRUB 2 for BIOS in the
post-MBR gap with Red Hat's `/grub2` prefix, grubenv and BLS entries, made with the real
tools (builder/fixtures/rhel). Captured unmounted; restored by the region path onto a disk
of the same size and a larger one, by the file-level path onto a smaller one: each boots
in QEMU to its marker. And the places that read GRUB's config understand Red Hat's layout:
the ISO's healthy default falls back to `grub2/grub.cfg`, the plan lists BLS entries.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from builder.fixtures import boot_to_marker
from builder.runner import bootfiles

from .conftest import capture_mounted, mbrescue, sh

MiB = 1 << 20


@pytest.fixture(scope="module")
def fixture_r():
    from builder.fixtures.rhel import ensure_rhel_fixture

    return ensure_rhel_fixture()


@pytest.fixture(scope="module")
def capture_r(fixture_r, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rhel-capture") / "r.mbrescue"
    result = mbrescue("capture", fixture_r.path, "-o", out, "--hostname", "rocky")
    assert result.returncode == 0, result.stderr
    return out


def blank(path: Path, size_bytes: int) -> Path:
    with open(path, "wb") as stream:
        stream.truncate(size_bytes)
    return path


def restore(capture: Path, target: Path, *options: str) -> str:
    started = time.monotonic()
    result = mbrescue("restore", "--yes", *options, capture, target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mbrescue: restore complete" in result.stdout, result.stdout
    print(f"restore took {time.monotonic() - started:.1f} s")
    return result.stdout


def test_fixture_r_is_laid_out_as_rhel(fixture_r):
    """XFS /boot at 2048 with the fixed UUID; GRUB's files under grub2/ only (grub-install
    wrote them there through the --boot-directory link); grubenv and one BLS entry."""
    assert fixture_r.region_end_sectors == 2048 + 1024 * MiB // 512
    found = sh("blkid", "-p", "-o", "export", "-O", str(2048 * 512), fixture_r.path)
    assert "TYPE=xfs" in found.splitlines()
    assert f"UUID={fixture_r.boot_fs_uuid}" in found.splitlines()
    loop = sh("losetup", "--find", "--show", "--read-only", "--offset", str(2048 * 512),
              "--sizelimit", str(1024 * MiB), fixture_r.path).strip()
    try:
        listing = sh("xfs_db", "-r", "-c", "ls /", "-c", "ls /grub2", "-c", "ls /grub2/i386-pc",
                     "-c", "ls /loader/entries", loop)
    finally:
        sh("losetup", "--detach", loop)
    # xfs_db's lines: inode, inode number, type, hash, name length, name, "(good)".
    names = {line.split()[-2] for line in listing.splitlines() if line.endswith("(good)")}
    assert {"grub2", "loader", "grubenv", "grub.cfg", "core.img", "xfs.mod"} <= names
    assert "grub" not in names
    assert any(name.endswith(".conf") for name in names)


def test_parse_bls_entry():
    entry = bootfiles.parse_bls_entry(
        "loader/entries/abc-5.14.0.conf",
        "# made by kernel-install\ntitle Rocky Linux (5.14.0) 9.4\nversion 5.14.0\n"
        "linux /vmlinuz-5.14.0\ninitrd /initramfs-5.14.0.img /extra.img\n"
        "initrd\t/microcode.img\noptions $kernelopts\n\nbogus\n")
    assert entry.title == "Rocky Linux (5.14.0) 9.4"
    assert entry.version == "5.14.0"
    assert entry.linux == "/vmlinuz-5.14.0"
    assert entry.initrd == ("/initramfs-5.14.0.img", "/extra.img", "/microcode.img")
    hostile = bootfiles.parse_bls_entry("loader/entries/x.conf",
                                        "title \x1b[2Jgone\x07\nlinux /vmlinuz-x\n")
    assert hostile.title is not None and "\x1b" not in hostile.title
    assert "\x07" not in hostile.title
    empty = bootfiles.parse_bls_entry("loader/entries/y.conf", "")
    assert (empty.title, empty.version, empty.linux, empty.initrd) == (None, None, None, ())


def test_kernels_follow_bls_entries():
    """A kernel named by a BLS entry carries its title and initrd; an entry's kernel outside
    /boot's top level is listed too."""
    files = [{"path": "vmlinuz-5.14.0", "type": "file"}, {"path": "vmlinuz-old", "type": "file"}]
    entries = [bootfiles.parse_bls_entry("loader/entries/a.conf",
                                         "title Rocky 9\nversion 5.14.0\nlinux /vmlinuz-5.14.0\n"
                                         "initrd /initramfs-5.14.0.img\n"),
               bootfiles.parse_bls_entry("loader/entries/b.conf",
                                         "title Other\nversion 6.0\nlinux /m/6.0/linux\n")]
    found = {k["file"]: k for k in bootfiles.kernels(files, False, bls=entries)}
    assert found["vmlinuz-5.14.0"]["title"] == "Rocky 9"
    assert found["vmlinuz-5.14.0"]["entry"] == "loader/entries/a.conf"
    assert found["vmlinuz-5.14.0"]["initrd"] == ["/initramfs-5.14.0.img"]
    assert found["vmlinuz-old"]["title"] is None
    assert found["m/6.0/linux"]["version"] == "6.0"


def test_the_unmounted_xfs_capture_has_its_file_level_copy(capture_r):
    shown = mbrescue("inspect", capture_r).stdout
    assert re.search(r"copy\s+partition 1 \(xfs\)", shown), shown


def test_the_plan_lists_bls_entries(fixture_r, tmp_path):
    """Captured mounted (the fingerprint lists /boot's files): the plan names the kernel with
    its BLS entry's title."""
    image = tmp_path / "mounted.img"
    sh("cp", "--sparse=always", fixture_r.path, image)
    out = tmp_path / "mounted.mbrescue"
    result = capture_mounted(image, 2048 * 512, 1024 * MiB, out, "rocky")
    assert result.returncode == 0, result.stderr
    # The plan, then "no": nothing is written.
    declined = mbrescue("restore", out, blank(tmp_path / "declined.img", 800 * MiB),
                        input_text="no\n")
    text = declined.stdout + declined.stderr
    assert re.search(r"kernels in the captured /boot \(what comes back\): 6\.\S+ "
                     r"\(Rocky Linux \(6\.\S+\) 9\.4 \(Blue Onyx\), mbrescue fixture R\)",
                     text), text


@pytest.mark.qemu
def test_region_path_same_size_boots(fixture_r, capture_r, tmp_path):
    target = blank(tmp_path / "same.img", fixture_r.path.stat().st_size)
    text = restore(capture_r, target)
    assert "region path" in text, text
    print(f"boot to marker: {boot_to_marker(target, fixture_r):.1f} s")


@pytest.mark.qemu
def test_region_path_larger_disk_boots(fixture_r, capture_r, tmp_path):
    target = blank(tmp_path / "larger.img", fixture_r.path.stat().st_size + 512 * MiB)
    text = restore(capture_r, target)
    assert "region path" in text, text
    print(f"boot to marker: {boot_to_marker(target, fixture_r):.1f} s")


@pytest.mark.qemu
def test_file_level_path_smaller_disk_boots(fixture_r, capture_r, tmp_path):
    """700 MiB: less than the 1 GiB region. /boot is made again as XFS (same UUID), the
    core in the gap stays and finds it by partition number, under /grub2."""
    target = blank(tmp_path / "small.img", 700 * MiB)
    text = restore(capture_r, target)
    assert "file-level path" in text, text
    found = sh("blkid", "-p", "-o", "export", "-O", str(2048 * 512), target)
    assert "TYPE=xfs" in found.splitlines()
    assert f"UUID={fixture_r.boot_fs_uuid}" in found.splitlines()
    print(f"boot to marker: {boot_to_marker(target, fixture_r):.1f} s")


def test_healthy_default_falls_back_to_red_hat_menus():
    """No boot code to hand over to: the host's own menu is read from Red Hat's `grub2`
    folder too, on a separate /boot and inside a root file system; the ISO's GRUB reads XFS,
    or an XFS /boot is never found and the default is never the local disk."""
    from builder import grub

    text = grub.render_grub_cfg(host="rocky", captured_at="2026-01-01 00:00 UTC",
                                region_size="1.0 GiB", boot_fs_uuid="7e7e7e7e-b007",
                                medium_id="0123456789abcdef")
    menus = re.findall(r'configfile "\(\$hostboot\)/([^"]+)"', text)
    assert menus == ["grub/grub.cfg", "grub2/grub.cfg", "boot/grub/grub.cfg",
                     "boot/grub2/grub.cfg"]
    assert "xfs" in grub.BIOS_MODULES
