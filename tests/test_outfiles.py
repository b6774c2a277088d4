"""Files the tool writes and reads, when someone else shares the machine or wrote the capture.

Issue 16, section 3: temporary outputs that another user cannot plant or swap, netboot
payloads that are private while written and never replaced by a refused build, an input
that is never its own output, inputs that never hang (FIFOs), capture strings printed
escaped, and tar headers bounded before tarfile parses them. Files are planted as user
`nobody` (runuser), as another user of the machine would.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.runner import capfile
from builder.runner.outputs import check_output_dir, create_temporary, refuse_same_file

from .conftest import loop_device, mbrescue, one_error_line, sh

MiB = 1 << 20


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def as_nobody(*args: str | os.PathLike[str]) -> None:
    sh("runuser", "-u", "nobody", "--", *map(os.fspath, args))


def forge(seed: Path, out: Path, edit: Callable[[dict[str, Any]], None] | None = None,
          first: bytes = b"") -> Path:
    """A resealed copy of a capture: the manifest changed by edit, raw tar bytes (a
    member with a huge PAX header) before the members, every member as captured."""
    with tarfile.open(seed, "r:") as archive:
        members = [info for info in archive if info.isfile()]
        manifest = json.loads(archive.extractfile(capfile.MANIFEST_MEMBER).read())  # type: ignore[union-attr]
        if edit is not None:
            edit(manifest)
        with open(out, "wb") as stream:
            stream.write(first)
            tar = capfile.TarWriter(stream)
            for info in members:
                if info.name in (capfile.MANIFEST_MEMBER, capfile.MANIFEST_SEAL_MEMBER):
                    continue
                source = archive.extractfile(info)
                assert source is not None
                with tar.member(info.name, 0) as member:
                    shutil.copyfileobj(source, member, 4 * MiB)
            capfile.write_manifest(tar, manifest, 0)
            tar.close()
    os.chmod(out, 0o600)
    return out


# ---- temporary outputs ---------------------------------------------------------------------


def test_a_directory_others_may_write_to_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(Exception, match="anybody may write"):
        create_temporary(shared / "out.iso")
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    check_output_dir(sticky)  # like /tmp: others cannot rename or remove what is ours
    fd, tmp = create_temporary(sticky / "out.iso", 0o600)
    os.close(fd)
    assert stat.S_IMODE(tmp.lstat().st_mode) == 0o600 and tmp.name.startswith(".out.iso.tmp-")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder user nobody can reach (pytest's own are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="mbrescue-outfiles-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_netboot_into_a_tree_others_may_write_follows_no_planted_link(captures, shared_dir,
                                                                       tmp_path):
    """A tree anybody may write to: `nobody` plants the temporary names the tree's files
    were written under; the build is refused and the root-only file is untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's secret\n")
    victim.chmod(0o600)
    tree = shared_dir / "tree"
    for folder in ("", "boot", "boot/grub", "boot/grub/hosts", "mbrescue", "mbrescue/hosts",
                   "mbrescue/hosts/fixture-a"):
        (tree / folder).mkdir(exist_ok=True)
        (tree / folder).chmod(0o777)
    for planted in ("boot/grub/hosts/.fixture-a.cfg.tmp", "mbrescue/hosts/fixture-a/.payload.img.tmp",
                    "mbrescue/.vmlinuz.tmp", ".netboot.json.tmp"):
        as_nobody("ln", "-s", victim, tree / planted)
    copy = forge(captures["A"], tmp_path / "a.mbrescue", lambda m: m.update(hostname="fixture-a"))
    result = mbrescue("build", "--netboot", tree, copy)
    line = one_error_line(result)
    assert "anybody may write" in line, line
    assert victim.read_bytes() == b"root's secret\n"
    assert not (tree / "mbrescue/hosts/fixture-a/payload.img").exists()


def test_a_refused_netboot_build_keeps_the_hosts_payload(captures, tmp_path):
    tree = tmp_path / "tree"
    first = forge(captures["A"], tmp_path / "a1.mbrescue", lambda m: m.update(hostname="host-a"))
    assert mbrescue("build", "--netboot", tree, first).returncode == 0
    payload = tree / "mbrescue/hosts/host-a/payload.img"
    before = digest(payload)
    assert stat.S_IMODE(payload.stat().st_mode) & 0o077 == 0  # never world-readable
    again = forge(captures["A"], tmp_path / "a2.mbrescue",
                  lambda m: m.update(hostname="host-a", created="2030-01-01T00:00:00Z"))
    # The second host's capture is refused only after host-a's payload is made.
    broken = forge(captures["D"], tmp_path / "b.mbrescue",
                   lambda m: m.update(hostname="host-b", boot_fs=None))
    result = mbrescue("build", "--netboot", tree, again, broken)
    one_error_line(result)
    assert digest(payload) == before
    assert not (tree / "mbrescue/hosts/host-b").exists() or not any(
        (tree / "mbrescue/hosts/host-b").iterdir())
    leftovers = [p for p in tree.rglob(".*") if ".tmp" in p.name]
    assert leftovers == []


# ---- an input is never its own output ------------------------------------------------------


@pytest.fixture
def image_copy(fixtures, tmp_path) -> Path:
    image = tmp_path / "disk.img"
    shutil.copyfile(fixtures["A"].path, image)
    return image


def _alias(path: Path, how: str) -> Path:
    if how == "itself":
        return path
    other = path.with_name(f"{how}-{path.name}")
    if how == "symlink":
        other.symlink_to(path)
    else:
        os.link(path, other)
    return other


@pytest.mark.parametrize("how", ["itself", "symlink", "hardlink"])
def test_capture_onto_its_source_is_refused(image_copy, how):
    before = digest(image_copy)
    result = mbrescue("capture", image_copy, "-o", _alias(image_copy, how))
    assert "its input" in one_error_line(result)
    assert digest(image_copy) == before


def test_capture_of_a_loop_device_onto_its_backing_file_is_refused(image_copy):
    before = digest(image_copy)
    with loop_device(image_copy, "--read-only") as device:
        result = mbrescue("capture", device, "-o", image_copy)
    assert "its input" in one_error_line(result)
    assert digest(image_copy) == before


@pytest.mark.parametrize("how", ["itself", "symlink", "hardlink"])
def test_build_onto_its_capture_is_refused(captures, tmp_path, how):
    capture = tmp_path / "a.mbrescue"
    shutil.copyfile(captures["A"], capture)
    before = digest(capture)
    result = mbrescue("build", capture, "-o", _alias(capture, how))
    assert "its input" in one_error_line(result)
    assert digest(capture) == before


@pytest.mark.parametrize("how", ["itself", "symlink", "hardlink"])
def test_restore_onto_its_capture_is_refused(captures, tmp_path, how):
    capture = tmp_path / "a.mbrescue"
    shutil.copyfile(captures["A"], capture)
    before = digest(capture)
    result = mbrescue("restore", capture, _alias(capture, how), input_text="yes\n", timeout=120)
    assert "its input" in one_error_line(result)
    assert digest(capture) == before


def test_restore_onto_a_loop_device_on_its_capture_is_refused(captures, tmp_path):
    capture = tmp_path / "a.mbrescue"
    shutil.copyfile(captures["A"], capture)
    with loop_device(capture) as device:
        with pytest.raises(Exception, match="its input"):
            refuse_same_file(capture, device)


def test_a_hard_link_to_a_mounted_loops_file_is_busy(captures, image_copy, tmp_path):
    """`restore` onto an image file refuses a file a mounted loop device reads; a second
    name for that file (a hard link) is the same file."""
    link = tmp_path / "other-name.img"
    os.link(image_copy, link)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    before = digest(image_copy)
    boot = json.loads(sh("sfdisk", "--json", image_copy))["partitiontable"]["partitions"][0]
    with loop_device(image_copy, "-o", str(boot["start"] * 512), "--sizelimit",
                     str(boot["size"] * 512)) as device:
        sh("mount", "-o", "ro", device, mountpoint)
        try:
            result = mbrescue("restore", captures["A"], link, "--yes", timeout=120)
        finally:
            sh("umount", mountpoint)
    assert "mounted" in one_error_line(result)
    assert digest(image_copy) == before


# ---- inputs never hang ---------------------------------------------------------------------


def test_check_of_a_fifo_is_one_line(tmp_path, image_copy, captures):
    fifo = tmp_path / "capture.fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    one_error_line(mbrescue("check", fifo, image_copy, timeout=30))
    one_error_line(mbrescue("inspect", fifo, timeout=30))
    one_error_line(mbrescue("check", captures["A"], fifo, timeout=30))
    assert time.monotonic() - started < 30


# ---- capture strings are printed escaped ---------------------------------------------------

ESCAPES = "\x1b]2;owned\x07\x1b[2J\x9b31m\r"


def _evil(manifest: dict[str, Any]) -> None:
    for disk in (manifest["source"], manifest["layout"]["disk"]):
        disk["model"] = "Disk" + ESCAPES
        disk["serial"] = "S" + ESCAPES
    manifest["boot_fs"]["label"] = "b\x1b[1m"
    for partition in manifest["layout"]["partitions"]:
        if partition.get("fs"):
            partition["fs"]["label"] = "p\x1b[1m"
    for swap in manifest["swap"]:
        swap["label"] = "s\x1b[1m"


def test_inspect_and_the_plan_print_capture_strings_escaped(captures, fixtures, tmp_path):
    evil = forge(captures["A"], tmp_path / "evil.mbrescue", _evil)
    shown = mbrescue("inspect", evil)
    assert shown.returncode == 0, shown.stderr
    assert "Disk\\x1b]2;owned\\x07" in shown.stdout
    for control in ("\x1b", "\x07", "\x9b", "\r"):
        assert control not in shown.stdout + shown.stderr
    target = tmp_path / "target.img"
    with open(target, "wb") as stream:
        stream.truncate(fixtures["A"].path.stat().st_size)
    plan = mbrescue("restore", evil, target, input_text="no\n", timeout=120)
    assert "\\x1b" in plan.stdout + plan.stderr, plan.stdout + plan.stderr
    for control in ("\x1b", "\x07", "\x9b"):
        assert control not in plan.stdout + plan.stderr


# ---- tar headers are bounded ---------------------------------------------------------------


def _huge_pax_member(size: int) -> bytes:
    info = tarfile.TarInfo("padding")
    info.pax_headers = {"comment": "x" * size}
    return info.tobuf(format=tarfile.PAX_FORMAT)


def test_a_huge_pax_header_is_refused_at_once(captures, tmp_path):
    evil = forge(captures["A"], tmp_path / "pax.mbrescue", first=_huge_pax_member(160 * 1024))
    started = time.monotonic()
    result = mbrescue("inspect", evil, timeout=30)
    seconds = time.monotonic() - started
    assert "header" in one_error_line(result)
    assert seconds < 10, seconds


def test_a_small_pax_header_is_read(captures, tmp_path):
    fine = forge(captures["A"], tmp_path / "pax.mbrescue", first=_huge_pax_member(200))
    assert mbrescue("inspect", fine).returncode == 0


def test_bounded_tar_reader_refuses_a_long_gnu_name():
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("n" * (64 * 1024))
        tar.addfile(info, io.BytesIO(b""))
    raw.seek(0)
    with pytest.raises(Exception, match="header"):
        with tarfile.open(fileobj=raw, mode="r:", tarinfo=capfile.BoundedTarInfo) as tar:
            list(tar)
