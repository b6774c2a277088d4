"""An XFS /boot (RHEL-family hosts make one by default): the capture keeps a file-level
copy of it, read through a read-only loop mount that replays nothing (`norecovery`), and
the file-level path makes it again with mkfs.xfs (the captured UUID, label, sizes and
features), fills it through a writable loop mount, checks it with `xfs_repair -n` and reads
it back. The image is made here with the real tools (sfdisk, mkfs.xfs, mkswap, a loop
mount); blkid, xfs_db and xfs_repair judge the result.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from builder.runner.filecopy import xfs_params

from .conftest import capture_mounted, mbrescue, sh

MiB = 1 << 20
BOOT_START = 2048
BOOT_BYTES = 1024 * MiB
SWAP_BYTES = 64 * MiB
XFS_UUID = "7f7f7f7f-0000-4000-8000-000000000020"
BLS_ENTRY = ("title Rocky Linux (5.14.0-427.el9.x86_64) 9.4 (Blue Onyx)\n"
             "version 5.14.0-427.el9.x86_64\nlinux /vmlinuz-5.14.0-427.el9.x86_64\n"
             "initrd /initramfs-5.14.0-427.el9.x86_64.img\noptions $kernelopts\n"
             "grub_users $grub_users\ngrub_arg --unrestricted\ngrub_class rocky\n")


def loop_at(image: Path, offset: int, size: int) -> str:
    return sh("losetup", "--find", "--show", "--offset", str(offset), "--sizelimit",
              str(size), image).strip()


@pytest.fixture(scope="module")
def xfs_host(tmp_path_factory) -> Path:
    """msdos: an XFS /boot of 1 GiB at 2048 (mkfs.xfs defaults: crc, finobt, reflink,
    bigtime, inobtcount, sparse inodes), RHEL's layout inside (grub2/, loader/entries/),
    swap after it."""
    folder = tmp_path_factory.mktemp("xfs-host")
    image = folder / "host.img"
    with open(image, "wb") as stream:
        stream.truncate(BOOT_START * 512 + BOOT_BYTES + SWAP_BYTES + MiB)
    sh("sfdisk", "-q", image, input_bytes=f"label: dos\n{BOOT_START},{BOOT_BYTES // 512},83,*\n"
       ",,82\n".encode())
    loop = loop_at(image, BOOT_START * 512, BOOT_BYTES)
    try:
        sh("mkfs.xfs", "-q", "-m", f"uuid={XFS_UUID}", "-L", "boot", loop)
        where = folder / "mnt"
        where.mkdir()
        sh("mount", loop, where)
        try:
            (where / "grub2").mkdir()
            (where / "grub2" / "grub.cfg").write_text("set default=0\nblscfg\n")
            (where / "grub2" / "grubenv").write_bytes(
                b"# GRUB Environment Block\nsaved_entry=abc-5.14.0-427.el9.x86_64\n"
                b"kernelopts=root=UUID=1 ro\n".ljust(1024, b"#"))
            (where / "loader" / "entries").mkdir(parents=True)
            (where / "loader" / "entries" / "abc-5.14.0-427.el9.x86_64.conf").write_text(
                BLS_ENTRY)
            (where / "vmlinuz-5.14.0-427.el9.x86_64").write_bytes(os.urandom(3 * MiB))
            (where / "initramfs-5.14.0-427.el9.x86_64.img").write_bytes(os.urandom(5 * MiB))
            os.link(where / "vmlinuz-5.14.0-427.el9.x86_64", where / "vmlinuz-hardlink")
            (where / "vmlinuz").symlink_to("vmlinuz-5.14.0-427.el9.x86_64")
            os.setxattr(where / "grub2" / "grub.cfg", "user.mbrescue", b"kept")
            os.chown(where / "grub2" / "grubenv", 0, 10)
            (where / "grub2" / "grubenv").chmod(0o600)
        finally:
            sh("umount", where)
    finally:
        sh("losetup", "--detach", loop)
    swap = loop_at(image, BOOT_START * 512 + BOOT_BYTES, SWAP_BYTES)
    try:
        sh("mkswap", "-q", "-L", "SWAP-r", swap)
    finally:
        sh("losetup", "--detach", swap)
    return image


@pytest.fixture(scope="module")
def xfs_capture(xfs_host, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("xfs-capture") / "r.mbrescue"
    result = mbrescue("capture", xfs_host, "-o", out, "--hostname", "rocky")
    assert result.returncode == 0, result.stderr
    return out


def manifest_of(capture: Path) -> dict:
    inspected = mbrescue("inspect", "--json", capture)
    assert inspected.returncode == 0, inspected.stderr
    return json.loads(inspected.stdout)


def test_superblock_reader_agrees_with_xfs_db(xfs_host):
    """filecopy.xfs_params reads the superblock as xfs_db does."""
    loop = loop_at(xfs_host, BOOT_START * 512, BOOT_BYTES)
    try:
        printed = sh("xfs_db", "-r", "-c", "sb 0", "-c", "print uuid blocksize sectsize "
                     "inodesize features_ro_compat features_incompat", loop)
        with open(loop, "rb") as stream:
            params = xfs_params(stream.read(512))
    finally:
        sh("losetup", "--detach", loop)
    fields = dict(line.split(" = ", 1) for line in printed.splitlines())
    assert params["uuid"] == fields["uuid"] == XFS_UUID
    assert params["block_bytes"] == int(fields["blocksize"])
    assert params["sector_bytes"] == int(fields["sectsize"])
    assert params["inode_bytes"] == int(fields["inodesize"])
    assert params["label"] == "boot"
    ro_compat, incompat = int(fields["features_ro_compat"], 16), int(fields["features_incompat"], 16)
    assert ("finobt" in params["features"]) == bool(ro_compat & 1)
    assert ("reflink" in params["features"]) == bool(ro_compat & 4)
    assert ("bigtime" in params["features"]) == bool(incompat & 8)
    assert {"crc", "ftype"} <= set(params["features"])


def test_an_unmounted_xfs_boot_gets_a_file_level_copy(xfs_capture):
    manifest = manifest_of(xfs_capture)
    [copy] = manifest["file_copies"]
    assert copy["fs"]["type"] == "xfs" and copy["fs"]["uuid"] == XFS_UUID
    assert copy["fs"]["read_with"] == "ro,norecovery,nouuid loop mount"
    assert copy["file_count"] >= 8
    shown = mbrescue("inspect", xfs_capture).stdout
    assert re.search(r"copy\s+partition 1 \(xfs\)", shown), shown


def test_a_mounted_xfs_boot_is_frozen_and_copied(xfs_host, tmp_path):
    """Mounted: the capture freezes the XFS /boot (fsfreeze) and reads its copy from the
    frozen region."""
    image = tmp_path / "mounted.img"
    sh("cp", "--sparse=always", xfs_host, image)
    out = tmp_path / "mounted.mbrescue"
    result = capture_mounted(
        image, BOOT_START * 512, BOOT_BYTES, out, "rocky",
        before=lambda where: (where / "written-before-capture").write_bytes(b"unsynced\n"))
    assert result.returncode == 0, result.stderr
    [copy] = manifest_of(out)["file_copies"]
    assert copy["fs"]["type"] == "xfs"


@pytest.mark.parametrize("size_mib", [700, 1200])
def test_xfs_boot_restores_by_the_file_level_path(xfs_host, xfs_capture, tmp_path, size_mib):
    """Onto a smaller disk (the region path cannot) and, asked for, onto a larger one: the
    same UUID, label and features, xfs_repair -n clean, every file read back."""
    target = tmp_path / "target.img"
    with open(target, "wb") as stream:
        stream.truncate(size_mib * MiB)
    files = ["--files"] if size_mib > 1100 else []
    result = mbrescue("restore", "--yes", *files, xfs_capture, target)
    assert result.returncode == 0, result.stderr
    assert "file-level path" in result.stdout
    assert re.search(r"verified: \d+ files read back", result.stdout), result.stdout
    start = BOOT_START * 512
    found = sh("blkid", "-p", "-o", "export", "-O", str(start), target)
    assert f"UUID={XFS_UUID}" in found.splitlines() and "LABEL=boot" in found.splitlines()
    loop = sh("losetup", "--find", "--show", "--read-only", "--offset", str(start),
              target).strip()
    try:
        sh("xfs_repair", "-n", loop)
        before = sh("xfs_db", "-r", "-c", "sb 0", "-c", "print features_ro_compat "
                    "features_incompat inodesize blocksize", loop)
    finally:
        sh("losetup", "--detach", loop)
    source = loop_at(xfs_host, start, BOOT_BYTES)
    try:
        captured = sh("xfs_db", "-r", "-c", "sb 0", "-c", "print features_ro_compat "
                      "features_incompat inodesize blocksize", source)
    finally:
        sh("losetup", "--detach", source)
    assert before == captured


def test_xfs_needs_300_mib(xfs_capture, tmp_path):
    """mkfs.xfs makes nothing under 300 MiB: a disk that leaves less is refused, naming the
    smallest disk that fits."""
    target = tmp_path / "small.img"
    with open(target, "wb") as stream:
        stream.truncate(200 * MiB)
    result = mbrescue("restore", "--yes", xfs_capture, target)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the smallest disk this capture fits is" in result.stderr, result.stderr


@pytest.mark.parametrize("mounted", [False, True])
def test_check_sees_a_new_bls_entry_and_kernel_on_xfs(xfs_host, tmp_path, mounted):
    """A kernel update on an XFS /boot (a new kernel and its BLS entry): `check` names both,
    the /boot mounted (and frozen at capture) or not (issue 20)."""
    image = tmp_path / "host.img"
    sh("cp", "--sparse=always", xfs_host, image)
    loop = loop_at(image, BOOT_START * 512, BOOT_BYTES)
    where = tmp_path / "boot"
    where.mkdir()
    capture = tmp_path / "before.mbrescue"
    try:
        sh("mount", loop, where)
        try:
            if not mounted:
                sh("umount", where)
            made = mbrescue("capture", image, "-o", capture, "--hostname", "rocky")
            assert made.returncode == 0, made.stderr
            assert mbrescue("check", capture, image).returncode == 0
            if not mounted:
                sh("mount", loop, where)
            (where / "vmlinuz-5.14.0-503.el9.x86_64").write_bytes(os.urandom(MiB))
            (where / "loader" / "entries" / "abc-5.14.0-503.el9.x86_64.conf").write_text(
                BLS_ENTRY.replace("427", "503"))
            if not mounted:
                sh("umount", where)
            drifted = mbrescue("check", capture, image)
        finally:
            if mounted:
                sh("umount", where)
    finally:
        sh("losetup", "--detach", loop)
    assert drifted.returncode == 1, (drifted.stdout, drifted.stderr)
    assert "vmlinuz-5.14.0-503.el9.x86_64 added" in drifted.stdout
    assert "loader/entries/abc-5.14.0-503.el9.x86_64.conf added" in drifted.stdout
