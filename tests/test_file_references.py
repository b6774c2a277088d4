"""The file-level copy stores regular files as references into the region (filecopy.py):
which files qualify, that the file-level restore rebuilds them exactly, and that a
reference that is wrong, or whose bytes are not the captured file's, writes nothing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import tarfile
from pathlib import Path

import pytest

from builder.inspect import describe
from builder.runner import filecopy
from builder.runner import restore as runner
from builder.runner.capfile import MANIFEST_MEMBER, Capture
from builder.runner.errors import MbrescueError

from .conftest import sh, sha256_of
from .test_capture import capture_of_mounted_boot
from .test_files_restore import make_target, quiet_console, restore_files
from .test_manifest import members_of, repack

MiB = 1 << 20
BOOT_AT = 2048 * 512  # where small_msdos_image puts /boot


def _write_kinds(root: Path) -> dict[str, bytes]:
    """Files of every kind a /boot can hold, written through a mount; their contents."""
    plain = os.urandom(300_000)
    (root / "vmlinuz-1").write_bytes(plain)
    os.link(root / "vmlinuz-1", root / "vmlinuz-1.hard")
    with open(root / "sparse", "wb") as out:  # data, a 2 MiB hole, data, a hole at the end
        out.write(os.urandom(70_000))
        out.seek(2 * MiB)
        out.write(os.urandom(5_000))
        out.truncate(3 * MiB)
    with open(root / "fallocated", "wb") as out:  # written head, unwritten extent after it
        out.write(os.urandom(4096))
        os.posix_fallocate(out.fileno(), 0, MiB)
    (root / "small.cfg").write_text("set default=0\n")
    (root / "empty").write_bytes(b"")
    os.symlink("vmlinuz-1", root / "vmlinuz")
    return {path.name: path.read_bytes() for path in root.iterdir()
            if path.is_file() and not path.is_symlink()}


@pytest.fixture(scope="module")
def mounted_capture(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A capture of a mounted (so frozen) ext4 /boot holding _write_kinds' files."""
    out, contents = capture_of_mounted_boot(tmp_path_factory.mktemp("refs"), _write_kinds)
    return out.path, contents


def _members(path: Path) -> dict[str, tarfile.TarInfo]:
    with Capture.open(str(path)) as opened:
        (copy,) = opened.manifest.file_copies
        packed = opened.read_member(copy.member)
    with tarfile.open(fileobj=io.BytesIO(packed)) as archive:
        return {info.name: info for info in archive.getmembers()}


def test_plain_and_sparse_files_are_references_the_rest_stored_whole(mounted_capture):
    path, contents = mounted_capture
    members = _members(path)
    with Capture.open(str(path)) as opened:
        region = opened.region.length_bytes
        referenced = {name for name, info in members.items()
                      if filecopy.reference_of(info, region) is not None}
        (copy,) = opened.manifest.file_copies
        assert copy.referenced_files == len(referenced)
        assert (f"copy      partition 1 (ext4): {copy.file_count} files in files-p1.tar.gz, "
                f"{len(referenced)} of them as references into the region") in describe(opened)
        for name in referenced:
            ref = filecopy.reference_of(members[name], region)
            assert ref is not None and members[name].size == 0
            assert ref.sha256 == hashlib.sha256(contents[name]).hexdigest()
            # The extents are the region's bytes of the file, at its logical offsets.
            rebuilt = bytearray(ref.size)
            for logical, offset, length in ref.extents:
                rebuilt[logical : logical + length] = opened.read_region(offset, length)
            assert bytes(rebuilt) == contents[name]
    assert referenced == {"vmlinuz-1", "sparse", "small.cfg"}
    # The hole is not an extent; the unwritten extent is not region bytes: stored whole.
    sparse = filecopy.reference_of(members["sparse"], region)
    assert sparse is not None and len(sparse.extents) == 2
    assert members["fallocated"].size == MiB and members["vmlinuz-1.hard"].islnk()
    assert members["empty"].size == 0 and not members["empty"].pax_headers.get(
        filecopy.REF_EXTENTS)


def test_inline_data_is_stored_whole(tmp_path):
    """ext4's inline_data keeps a small file in its inode (FIEMAP: DATA_INLINE): not region
    bytes at an offset of their own, so the file is stored whole."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "grub.cfg").write_text("menuentry x {}\n")
    (tree / "vmlinuz").write_bytes(os.urandom(100_000))
    image = tmp_path / "fs.img"
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-O", "inline_data", "-d", tree, image, "8M")
    fd = os.open(image, os.O_RDONLY)
    try:
        record, packed = filecopy.read_copy(os.fspath(image), 1, 0, "ext4", tmp_path,
                                            region_fd=fd)
    finally:
        os.close(fd)
    assert record["referenced_files"] == 1
    with tarfile.open(packed) as archive:
        assert archive.extractfile("grub.cfg").read() == b"menuentry x {}\n"  # type: ignore[union-attr]
        vmlinuz = archive.getmember("vmlinuz")
        assert vmlinuz.size == 0 and filecopy.REF_EXTENTS in vmlinuz.pax_headers


def test_file_level_restore_rebuilds_referenced_files_exactly(mounted_capture, tmp_path):
    path, contents = mounted_capture
    target = make_target(tmp_path / "target.img", 24 * MiB, "random")
    text = restore_files(path, target, files=True)
    assert "file-level path" in text
    loop = sh("losetup", "-f", "--show", "-r", "-o", str(BOOT_AT), target).strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        sh("mount", "-o", "ro,noload", loop, mnt)
        try:
            for name, data in contents.items():
                assert (mnt / name).read_bytes() == data, name
            assert os.path.samefile(mnt / "vmlinuz-1", mnt / "vmlinuz-1.hard")
            # The hole stays a hole (the tree is unpacked sparse, mke2fs -d keeps it).
            assert os.stat(mnt / "sparse").st_blocks * 512 < 2 * MiB
        finally:
            sh("umount", mnt)
    finally:
        sh("losetup", "-d", loop)


def _with_files_member(path: Path, out: Path, change) -> Path:
    """The capture with its file-level copy's tar rewritten by `change(info)` for each
    member, the copy's checksum and the manifest's seal made anew (a hostile writer)."""
    members = members_of(path)
    manifest = json.loads(dict(members)[MANIFEST_MEMBER])
    (copy,) = manifest["file_copies"]
    with tarfile.open(fileobj=io.BytesIO(dict(members)[copy["member"]])) as archive:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as rewritten:
            for info in archive.getmembers():
                data = archive.extractfile(info).read() if info.isreg() else None  # type: ignore[union-attr]
                change(info)
                rewritten.addfile(info, io.BytesIO(data) if data is not None else None)
    packed = buffer.getvalue()
    copy["sha256"] = hashlib.sha256(packed).hexdigest()
    members = [(name, packed if name == copy["member"] else data) for name, data in members]
    return repack(members, out, manifest=json.dumps(manifest).encode(), reseal=True)


def _shift_extent(by: int):
    def change(info: tarfile.TarInfo) -> None:
        if info.name == "vmlinuz-1":
            logical, offset, length = info.pax_headers[filecopy.REF_EXTENTS].split()[0].split(":")
            info.pax_headers[filecopy.REF_EXTENTS] = f"{logical}:{int(offset) + by}:{length}"
    return change


@pytest.mark.parametrize(("change", "error"), [
    (_shift_extent(4096), "vmlinuz-1: filled from the region, it differs from the captured file"),
    (_shift_extent(1 << 40), "/vmlinuz-1: its reference into the region is not well-formed"),
], ids=["other-region-bytes", "outside-the-region"])
def test_a_wrong_reference_writes_nothing(mounted_capture, tmp_path, change, error):
    path, _ = mounted_capture
    hostile = _with_files_member(path, tmp_path / "hostile.mbrescue", change)
    target = make_target(tmp_path / "target.img", 24 * MiB, "random")
    before = sha256_of(target)
    console, _ = quiet_console()
    with pytest.raises(MbrescueError, match=error):
        runner.restore(str(hostile), str(target), console=console, assume_yes=True, files=True)
    assert sha256_of(target) == before


@pytest.mark.parametrize("extents", [
    "0:0:10 5:100:10",  # overlapping
    "0:0:0",  # empty
    "0:-1:10",
    "0:0:999999",  # longer than the file
    "0:0",
    "a:b:c",
])
def test_malformed_references_are_refused(extents):
    info = tarfile.TarInfo("vmlinuz")
    info.pax_headers = {filecopy.REF_EXTENTS: extents, filecopy.REF_SIZE: "1000",
                        filecopy.REF_SHA256: "0" * 64}
    with pytest.raises(MbrescueError, match="not well-formed"):
        filecopy.reference_of(info, 1 << 20)


def test_format_version_2_is_still_read_a_later_one_refused(captures, tmp_path):
    """Captures taken before references (format version 2) are still read; a version this
    mbrescue does not know is refused in one line."""
    members = members_of(captures["A"])
    manifest = json.loads(dict(members)[MANIFEST_MEMBER])
    manifest["format_version"] = 2
    for copy in manifest.get("file_copies", []):
        copy.pop("referenced_files", None)
    older = repack(members, tmp_path / "v2.mbrescue", manifest=json.dumps(manifest).encode(),
                   reseal=True)
    with Capture.open(str(older)) as opened:
        opened.verify()
    manifest["format_version"] = 4
    newer = repack(members, tmp_path / "v4.mbrescue", manifest=json.dumps(manifest).encode(),
                   reseal=True)
    with pytest.raises(MbrescueError, match="capture format version 4 is not supported"):
        Capture.open(str(newer))


def test_an_unmounted_source_gets_references_too(captures):
    """A disk or image whose /boot is not mounted is not frozen: its region is spooled all
    the same, and the file-level copy is read from that spool, so its files are references
    (fixture A: a real Debian-style /boot made by grub-install in a VM)."""
    with Capture.open(str(captures["A"])) as opened:
        assert not opened.manifest.frozen
        (copy,) = [c for c in opened.manifest.file_copies if c.fs.type != "vfat"]
        assert copy.referenced_files >= 2  # the kernel and the initrd at least
        packed = opened.read_member(copy.member)
    assert len(packed) < 1 << 20  # names and headers: the bytes are the region's


def test_many_referenced_files_fill_within_a_small_descriptor_limit(tmp_path):
    """A /boot of many files (GRUB's modules, fonts, locales run to hundreds): the fill keeps
    a file open only while its pieces come, so the rescue system's 1024-descriptor limit
    (here lowered to 100 above what the test process holds) never ends a restore."""
    def many(root: Path) -> dict[str, bytes]:
        (root / "grub").mkdir()
        return {f"grub/m{index:03}.mod": _write(root / f"grub/m{index:03}.mod", 3000 + index)
                for index in range(300)}

    out, contents = capture_of_mounted_boot(tmp_path, many)
    target = make_target(tmp_path / "target.img", 24 * MiB, "random")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for what this process holds already and what a restore opens, not for 300 more.
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 100, hard))
    try:
        restore_files(out.path, target, files=True)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with Capture.open(str(out.path)) as opened:
        assert opened.manifest.file_copies[0].referenced_files >= 300
    assert len(contents) == 300


def _write(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data
