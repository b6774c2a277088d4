"""The file-level restore path on image files: fixture A onto a disk smaller than its region
(SeaBIOS boots it), fixture D onto a blank 4Kn disk (OVMF boots it from a 4Kn virtio disk),
judged by sfdisk, sgdisk, blkid and e2fsck; refusals leave the target untouched."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from builder.fixtures import boot_to_marker
from builder.runner import filecopy, files_restore
from builder.runner import restore as runner
from builder.runner.capfile import Capture
from builder.runner.console import Console, Terminal
from builder.runner.disk import disk_info
from builder.runner.errors import MbrescueError
from builder.runner.manifest import parse_manifest

from .conftest import ROOT, sh, sha256_of

MiB = 1 << 20


def quiet_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console([Terminal("test", -1, None, False, out_stream=out)],
                   error_stream=io.StringIO()), out


def make_target(path: Path, size_bytes: int, fill: str = "zero") -> Path:
    with open(path, "wb") as stream:
        if fill == "random":
            stream.write(os.urandom(size_bytes))
        else:
            stream.truncate(size_bytes)
    return path


def restore_files(capture: Path, target: Path, **kwargs) -> str:
    console, out = quiet_console()
    assert runner.restore(str(capture), str(target), console=console, assume_yes=True,
                          **kwargs) == 0
    text = out.getvalue()
    assert "mbrescue: restore complete" in text.splitlines()[-1], text
    return text


def runner_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.runner", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)


def blkid_at(image: Path, offset: int) -> dict[str, str]:
    out = sh("blkid", "-p", "-o", "export", "-O", str(offset), image)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_capture_holds_a_file_copy_of_each_boot_chain_file_system(captures):
    manifest = Capture.open(str(captures["D"])).manifest
    by_partition = {c.partition: c for c in manifest.file_copies}
    assert set(by_partition) == {1, 2}
    esp, boot = by_partition[1].fs, by_partition[2].fs
    assert (esp.type, esp.volume_id, esp.label, esp.fat_bits) == ("vfat", "5CA1AB1D", "ESP", 32)
    assert (boot.type, boot.uuid, boot.label) == ("ext4", "0d0d0d0d-b007-4d00-8000-00000000000d",
                                                  "boot")
    assert "metadata_csum" in boot.features and boot.inode_bytes == 256
    assert by_partition[2].file_count > 100


def test_old_manifest_without_file_copies_still_parses(captures):
    raw = json.loads(json.dumps(Capture.open(str(captures["A"])).manifest.raw))
    del raw["file_copies"]
    assert parse_manifest(raw).file_copies == ()


def test_a_onto_a_disk_smaller_than_its_region_boots(fixtures, captures, tmp_path):
    fx = fixtures["A"]
    target = make_target(tmp_path / "small.img", 56 * MiB, "random")
    assert target.stat().st_size < fx.region_end_sectors * 512
    text = restore_files(captures["A"], target)
    assert "Restore path: file-level path, because the target (56.0 MiB) is smaller than the " \
           "region" in text
    dump = sh("sfdisk", "--dump", target)
    assert "label-id: 0x5ca1ab1a" in dump
    assert "start=          63" in dump and "bootable" in dump
    boot = blkid_at(target, 63 * 512)
    assert (boot["UUID"], boot["LABEL"], boot["TYPE"]) == (fx.boot_fs_uuid, "/boot", "ext3")
    sh("e2fsck", "-fn", f"{target}?offset={63 * 512}")
    swap_start = int(dump.split("img2 : start=")[1].split(",")[0])
    swap = blkid_at(target, swap_start * 512)
    assert (swap["UUID"], swap["LABEL"], swap["TYPE"]) == (fx.swap_uuid, fx.swap_label, "swap")
    # The MBR boot code and GRUB's core in the gap, as captured.
    assert sha256_of(target, 440) == sha256_of(fx.path, 440)
    assert sha256_of(target, 62 * 512, 512) == sha256_of(fx.path, 62 * 512, 512)
    boot_to_marker(target, fx)


def test_d_onto_a_blank_4kn_disk_boots_under_ovmf(fixtures, captures, tmp_path):
    fx = fixtures["D"]
    target = make_target(tmp_path / "4kn.img", fx.path.stat().st_size)
    text = restore_files(captures["D"], target, sector_bytes=4096)
    assert "file-level path, because the target has 4096-byte logical sectors" in text
    assert "FAT32 -> FAT16" in text
    loop = sh("losetup", "-f", "--show", "-b", "4096", target).strip()
    try:
        verify = sh("sgdisk", "-v", loop)
        dump = sh("sfdisk", "--dump", loop)
    finally:
        sh("losetup", "-d", loop)
    assert "No problems found" in verify, verify
    assert "label-id: 0D0D0D0D-0000-4D00-8000-00000000000D" in dump
    assert "sector-size: 4096" in dump
    starts = {int(line.split(" : ")[0][-1]): int(line.split("start=")[1].split(",")[0])
              for line in dump.splitlines() if " : start=" in line}
    assert "uuid=0D000002-0000-4D00-8000-00000000000D" in dump
    # Byte offsets kept: 1 MiB and 41 MiB as on the 512-byte source.
    assert starts[1] * 4096 == 2048 * 512 and starts[2] * 4096 == 83968 * 512
    esp = blkid_at(target, starts[1] * 4096)
    assert (esp["UUID"], esp["TYPE"]) == ("5CA1-AB1D", "vfat")
    boot = blkid_at(target, starts[2] * 4096)
    assert boot["UUID"] == fx.boot_fs_uuid
    swap = blkid_at(target, starts[3] * 4096)
    assert (swap["UUID"], swap["LABEL"]) == (fx.swap_uuid, fx.swap_label)
    boot_to_marker(target, fx, logical_block_bytes=4096)


def test_refuses_when_the_files_do_not_fit(captures, tmp_path):
    target = make_target(tmp_path / "tiny.img", 24 * MiB, "random")
    before = sha256_of(target)
    result = runner_cli("restore", "--yes", captures["A"], target)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("mbrescue: error: refusing"), result.stderr
    assert "do not fit" in result.stderr and "nothing written" in result.stderr
    assert sha256_of(target) == before


def test_refuses_a_bios_only_capture_onto_4kn(captures, tmp_path):
    target = make_target(tmp_path / "4kn.img", 100 * MiB, "random")
    before = sha256_of(target)
    result = runner_cli("restore", "--yes", "--sector-bytes", "4096", captures["A"], target)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "BIOS cannot boot a 4Kn disk" in result.stderr, result.stderr
    assert sha256_of(target) == before


def test_refuses_a_capture_without_a_file_level_copy(captures, tmp_path):
    target = make_target(tmp_path / "small.img", 56 * MiB, "random")
    capture = Capture.open(str(captures["A"]))
    capture.manifest = dataclasses.replace(capture.manifest, file_copies=())
    with pytest.raises(MbrescueError, match="no file-level copy of partition 1"):
        files_restore.plan_files(capture, disk_info(str(target)), "test")


@pytest.mark.parametrize("name", ["A", "D"])
def test_forced_files_onto_a_same_size_disk_boots(fixtures, captures, tmp_path, name):
    fx = fixtures[name]
    target = make_target(tmp_path / "same.img", fx.path.stat().st_size, "random")
    text = restore_files(captures[name], target, files=True)
    assert "file-level path, because asked for (--files)" in text
    assert "Will adjust" not in text  # same disk size and sectors: nothing moves
    if fx.table == "gpt":
        assert "No problems found" in sh("sgdisk", "-v", target)
    boot_to_marker(target, fx)


def test_cli_files_switch_reaches_the_file_level_path(captures, tmp_path):
    target = make_target(tmp_path / "same.img", 100 * MiB)
    result = subprocess.run([sys.executable, "-m", "builder.cli", "restore", "--files",
                             str(captures["A"]), str(target)], cwd=ROOT, capture_output=True,
                            text=True, input="no\n", check=False)
    assert "Restore path: file-level path, because asked for (--files)" in result.stdout, result
    assert "mbrescue: error: aborted, nothing written" in result.stderr
    assert sha256_of(target) == sha256_of(make_target(tmp_path / "blank.img", 100 * MiB))


def test_file_copy_keeps_hard_links_and_extended_attributes(tmp_path):
    """An ext4 image holding a hard link and a security.selinux label, read by the ro,noload
    loop mount: the tar keeps both, and mke2fs -d from the unpacked tree keeps the label."""
    from builder.runner import filecopy

    tree = tmp_path / "tree"
    (tree / "grub").mkdir(parents=True)
    (tree / "vmlinuz").write_bytes(b"kernel" * 1000)
    os.link(tree / "vmlinuz", tree / "vmlinuz.old")
    (tree / "grub" / "grub.cfg").write_text("menuentry x {}\n")
    os.setxattr(tree / "vmlinuz", "security.selinux", b"system_u:object_r:boot_t:s0\0")
    os.symlink("vmlinuz", tree / "vmlinuz.link")
    image = tmp_path / "fs.img"
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, image, "8M")
    before = sha256_of(image)
    record, packed = filecopy.read_copy(os.fspath(image), 1, 0, "ext4", tmp_path)
    assert sha256_of(image) == before  # read without changing it
    assert record["fs"]["read_with"] == "ro,noload loop mount"
    with tarfile.open(packed) as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert members["vmlinuz.old"].islnk() and members["vmlinuz.old"].linkname == "vmlinuz"
        assert members["vmlinuz.link"].issym()
        assert filecopy.xattrs_of(members["vmlinuz"]) == {
            "security.selinux": b"system_u:object_r:boot_t:s0\0"}
        assert "lost+found" not in members
        unpacked = tmp_path / "unpacked"
        archive.extractall(unpacked, numeric_owner=True, filter="fully_trusted")
        for info in archive.getmembers():
            for key, value in filecopy.xattrs_of(info).items():
                os.setxattr(unpacked / info.name, key, value, follow_symlinks=False)
    again = tmp_path / "again.img"
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-d", unpacked, again, "8M")
    listed = sh("debugfs", "-R", "ea_list /vmlinuz", again)
    assert "selinux" in listed and "boot_t" in listed
    assert "Links: 2" in sh("debugfs", "-R", "stat /vmlinuz", again)


def test_read_back_comparison_finds_a_changed_file(captures, tmp_path):
    """verify_files compares the target's files with the capture: a mode changed on the
    restored /boot afterwards is named."""
    target = make_target(tmp_path / "small.img", 56 * MiB)
    text = restore_files(captures["A"], target)
    assert re.search(r"mbrescue: verified: \d+ files read back", text), text
    capture = Capture.open(str(captures["A"]))
    plan = files_restore.plan_files(capture, disk_info(str(target)), "test")
    loop = sh("losetup", "-f", "--show", "-o", str(63 * 512), target).strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        sh("mount", loop, mnt)
        try:
            os.chmod(mnt / "grub" / "grub.cfg", 0o666)
        finally:
            sh("umount", mnt)
    finally:
        sh("losetup", "-d", loop)
    with pytest.raises(MbrescueError, match=re.escape("grub/grub.cfg: mode, owner or time differs")):
        files_restore.verify_files(capture, plan)


def test_d_onto_a_smaller_4kn_disk_shrinks_and_boots(fixtures, captures, tmp_path):
    """96 MiB of 4096-byte sectors against D's 105 MiB region: ESP and /boot shrink (never
    below their files plus headroom), /boot moves up, swap takes the rest; OVMF boots it."""
    fx = fixtures["D"]
    target = make_target(tmp_path / "small-4kn.img", 96 * MiB, "random")
    text = restore_files(captures["D"], target, sector_bytes=4096)
    assert "partition 2 shrunk from 64.0 MiB" in text and "partition 2 moved" in text
    loop = sh("losetup", "-f", "--show", "-b", "4096", target).strip()
    try:
        assert "No problems found" in sh("sgdisk", "-v", loop)
    finally:
        sh("losetup", "-d", loop)
    boot_to_marker(target, fx, logical_block_bytes=4096)


def test_c_onto_a_disk_smaller_than_its_region_boots(fixtures, captures, tmp_path):
    """GPT + BIOS boot partition: the core stays at its sectors (copied as captured), /boot
    is made again smaller; SeaBIOS boots it."""
    fx = fixtures["C"]
    target = make_target(tmp_path / "small.img", 64 * MiB, "random")
    text = restore_files(captures["C"], target)
    assert "Will write back: the MBR boot code" in text
    assert "No problems found" in sh("sgdisk", "-v", target)
    assert sha256_of(target, MiB, MiB) == sha256_of(fx.path, MiB, MiB)  # BIOS boot partition
    boot_to_marker(target, fx)


@pytest.mark.parametrize("size_mib", [39, 48, 66])
def test_c_onto_a_tight_disk_restores_and_boots(fixtures, captures, tmp_path, size_mib):
    """Fixture C's layout (GPT, 1 MiB BIOS boot partition, 64 MiB /boot, swap) onto disks
    with room for its files but not for a quarter-disk swap (39, 48 MiB), and onto one of
    exactly the region's size (66 MiB), where the region path cannot fit the backup GPT:
    the file-level path takes each, swap gets what is left, SeaBIOS boots it (issue 17)."""
    fx = fixtures["C"]
    target = make_target(tmp_path / "tight.img", size_mib * MiB, "random")
    text = restore_files(captures["C"], target)
    if size_mib == 66:
        assert "the region path cannot lay the captured layout on this disk" in text
    assert "No problems found" in sh("sgdisk", "-v", target)
    assert sha256_of(target, MiB, MiB) == sha256_of(fx.path, MiB, MiB)  # BIOS boot partition
    boot_to_marker(target, fx)


def test_too_small_a_disk_is_told_the_smallest_that_fits(captures, tmp_path):
    """The refusal names the smallest disk that fits, and that size really does (planned)."""
    target = make_target(tmp_path / "tiny.img", 20 * MiB, "random")
    before = sha256_of(target)
    result = runner_cli("restore", "--yes", captures["C"], target)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    found = re.search(r"the smallest disk this capture fits is [^(]*\((\d+) bytes\)",
                      result.stderr)
    assert found, result.stderr
    assert sha256_of(target) == before
    smallest = int(found.group(1))
    assert 20 * MiB < smallest < 39 * MiB
    with Capture.open(str(captures["C"])) as capture:
        disk = disk_info(os.fspath(make_target(tmp_path / "just.img", smallest)))
        files_restore.plan_files(capture, disk, "test")
        short = disk_info(os.fspath(make_target(tmp_path / "short.img", smallest - MiB)))
        with pytest.raises(MbrescueError, match="smallest disk"):
            files_restore.plan_files(capture, short, "test")


def test_mounted_boot_file_copy_is_read_from_the_frozen_region(tmp_path):
    """A mounted /boot: the file copy comes from the spool of the frozen region, so a file
    written but not synced before the capture is in it, and the live /boot is not read."""
    from .test_capture import capture_of_mounted_boot

    payload = os.urandom(300_000)
    out, _ = capture_of_mounted_boot(
        tmp_path, lambda mnt: (mnt / "initrd.img-new").write_bytes(payload))
    (record,) = out.manifest["file_copies"]
    assert record["fs"]["read_with"] == "ro,noload loop mount"
    assert record["referenced_files"] >= 1
    with Capture.open(str(out.path)) as opened:
        packed = opened.read_member(record["member"])
        with tarfile.open(fileobj=io.BytesIO(packed)) as archive:
            info = archive.getmember("initrd.img-new")
            # Its bytes are the region's: the member is a reference, proven at capture.
            ref = filecopy.reference_of(info, opened.region.length_bytes)
            assert ref is not None and info.size == 0
            assert ref.size == len(payload)
            assert ref.sha256 == hashlib.sha256(payload).hexdigest()
            assert b"".join(opened.read_region(offset, length)
                            for _, offset, length in ref.extents) == payload


def test_d_onto_a_4kn_loop_device(captures, tmp_path):
    """A real block device with 4096-byte logical sectors (no --sector-bytes needed)."""
    backing = make_target(tmp_path / "4kn.img", 144 * MiB, "random")
    loop = sh("losetup", "-f", "--show", "-b", "4096", backing).strip()
    try:
        text = restore_files(captures["D"], Path(loop))
        assert "because the target has 4096-byte logical sectors" in text
        assert "No problems found" in sh("sgdisk", "-v", loop)
    finally:
        sh("losetup", "-d", loop)


def test_b_files_onto_a_disk_smaller_than_its_layout_boots(fixtures, captures, tmp_path):
    """Logical partitions: the EBR chain is made again behind the shrunk /boot, swap (logical
    6) recreated with its label and UUID; SeaBIOS boots it."""
    fx = fixtures["B"]
    # Larger than the region but not than B's layout: the region path refuses (its data
    # logical 5 would run past the end), --files lays it out anew.
    target = make_target(tmp_path / "small.img", 72 * MiB, "random")
    text = restore_files(captures["B"], target, files=True)
    assert "partition 1 shrunk from 64.0 MiB" in text
    assert "partition 5: entry only" in text
    assert "Will write back: the MBR boot code" in text
    sh("sfdisk", "--verify", target)
    dump = sh("sfdisk", "--dump", target)
    assert "label-id: 0x5ca1ab1b" in dump and "img5 : start=" in dump and "img6 : start=" in dump
    swap_start = int(dump.split("img6 : start=")[1].split(",")[0])
    swap = blkid_at(target, swap_start * 512)
    assert (swap["UUID"], swap["LABEL"]) == (fx.swap_uuid, fx.swap_label)
    boot_to_marker(target, fx)


def test_unpack_refuses_a_member_written_through_a_symlink(captures, tmp_path):
    """A capture whose file copy holds a symlink pointing outside and a later member written
    through it (the classic tar escape) is refused: nothing lands outside, target unchanged."""
    from builder.runner import capfile

    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        link = tarfile.TarInfo("grub")
        link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path / "outside")
        archive.addfile(link)
        member = tarfile.TarInfo("grub/grub.cfg")
        member.size = 3
        archive.addfile(member, io.BytesIO(b"bad"))
    source = Capture.open(str(captures["A"]))
    manifest = json.loads(json.dumps(source.manifest.raw))
    manifest["file_copies"][0]["sha256"] = hashlib.sha256(evil.getvalue()).hexdigest()
    forged = tmp_path / "forged.mbrescue"
    with open(forged, "wb") as out:
        tar = capfile.TarWriter(out)
        for name in ("region.img.gz", "files-p1.tar.gz"):
            data = evil.getvalue() if name == "files-p1.tar.gz" else source.pread(
                source.members[name].size, source.members[name].offset)
            tar.add_bytes(name, data, 0)
        capfile.write_manifest(tar, manifest, 0)
        tar.close()
    (tmp_path / "outside").mkdir()
    target = make_target(tmp_path / "small.img", 56 * MiB, "random")
    before = sha256_of(target)
    result = runner_cli("restore", "--yes", forged, target)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "/grub/grub.cfg: its folder 'grub' is not a directory" in result.stderr, result.stderr
    assert not (tmp_path / "outside" / "grub.cfg").exists()
    assert sha256_of(target) == before


def test_xattrs_the_scratch_cannot_hold_still_reach_the_new_file_system(tmp_path):
    """The rescue system builds the file systems from a tree in its tmpfs, and Debian 12's
    kernel (6.1) keeps no user.* attributes there: os.setxattr failed with EOPNOTSUPP and
    the file-level restore ended in a traceback. Here the scratch is a ramfs (no extended
    attributes at all): every captured attribute still reaches the new ext4, through the
    made file system itself, and the plan says so."""
    from .test_capture import small_msdos_image

    image = small_msdos_image(tmp_path / "host.img")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "vmlinuz").write_bytes(b"kernel" * 1000)
    os.setxattr(tree / "vmlinuz", "user.mbrescue.test", b"kept")
    os.setxattr(tree / "vmlinuz", "security.selinux", b"system_u:object_r:boot_t:s0\0")
    part = tmp_path / "p1.img"
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-L", "tboot", "-U",
       "11111111-2222-3333-4444-555555555555", "-d", tree, part, "16M")
    sh("dd", f"if={part}", f"of={image}", "bs=512", "seek=2048", "conv=notrunc", "status=none")
    capture_path = tmp_path / "host.mbrescue"
    result = subprocess.run([sys.executable, "-m", "builder.cli", "capture", str(image), "-o",
                             str(capture_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    capture = Capture.open(str(capture_path))
    target = make_target(tmp_path / "target.img", 24 * MiB)
    plan = files_restore.plan_files(capture, disk_info(str(target)), "test")
    scratch = tmp_path / "ramfs"
    scratch.mkdir()
    sh("mount", "-t", "ramfs", "ramfs", scratch)
    try:
        with pytest.raises(OSError):  # the premise: this scratch holds no attributes
            os.setxattr(scratch, "user.x", b"1")
        files_restore.build_images(capture, plan, scratch)
        made = next(path for _, path in plan.images)
        listed = sh("debugfs", "-R", "ea_list /vmlinuz", made)
        assert "user.mbrescue.test" in listed and "kept" in listed, listed
        assert "selinux" in listed and "boot_t" in listed, listed
        sh("e2fsck", "-fn", made)
    finally:
        sh("umount", "-l", scratch)
    assert any("extended attributes" in line for line in plan.adjusted), plan.adjusted
