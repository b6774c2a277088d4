"""The CLI's own contracts: one-line errors, progress only on a terminal, and `burn`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import MBRESCUE, ROOT, mbrescue, one_error_line, sh, sha256_of
from .test_capture import small_msdos_image

MiB = 1 << 20


def test_usage_error_is_one_line():
    assert "Missing argument" in one_error_line(mbrescue("capture"))
    assert "No such command" in one_error_line(mbrescue("frobnicate"))


def test_help_lists_every_command():
    shown = mbrescue("--help")
    assert shown.returncode == 0
    for command in ("capture", "inspect", "build", "verify", "restore", "burn"):
        assert command in shown.stdout


def _in_a_terminal(args: list[str | os.PathLike[str]]) -> str:
    """Run the CLI with a pseudo-terminal as stdout/stderr (util-linux `script`)."""
    command = " ".join(subprocess.list2cmdline([os.fspath(a)]) for a in [*MBRESCUE, *args])
    result = subprocess.run(["script", "-qec", command, "/dev/null"], cwd=ROOT,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stdout
    return result.stdout


def test_progress_only_on_a_terminal(tmp_path):
    image = small_msdos_image(tmp_path / "host.img")
    shown = _in_a_terminal(["capture", image, "-o", tmp_path / "tty.mbrescue"])
    assert "reading boot region:" in shown and "MiB/s" in shown and "ETA" in shown
    quiet = mbrescue("capture", image, "-o", tmp_path / "pipe.mbrescue")
    assert quiet.returncode == 0
    assert "ETA" not in quiet.stderr


# -- burn ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_iso(tmp_path_factory) -> Path:
    """An ISO 9660 image made by xorriso: burn copies bytes, it does not need a rescue ISO."""
    work = tmp_path_factory.mktemp("iso")
    (work / "tree").mkdir()
    (work / "tree" / "hello.txt").write_bytes(os.urandom(3 * MiB))
    iso = work / "small.iso"
    sh("xorriso", "-as", "mkisofs", "-quiet", "-o", iso, work / "tree")
    return iso


def _loop(path: Path) -> str:
    return sh("losetup", "-f", "--show", path).strip()


def test_burn_to_a_stick_writes_and_verifies(small_iso, tmp_path):
    stick = tmp_path / "stick.img"
    stick.write_bytes(os.urandom(8 * MiB))
    loop = _loop(stick)
    try:
        result = mbrescue("burn", small_iso, loop, input_text="yes\n")
        assert result.returncode == 0, result.stderr
        assert "verified" in result.stderr
    finally:
        sh("losetup", "-d", loop)
    size = small_iso.stat().st_size
    assert sha256_of(stick, size) == sha256_of(small_iso)


def test_burn_asks_and_writes_nothing_without_yes(small_iso, tmp_path):
    stick = tmp_path / "stick.img"
    stick.write_bytes(os.urandom(8 * MiB))
    before = sha256_of(stick)
    result = mbrescue("burn", small_iso, stick, input_text="y\n")
    assert "aborted, nothing written" in one_error_line(result)
    assert "Type yes" in result.stderr
    assert sha256_of(stick) == before


def test_burn_refuses_a_device_too_small(small_iso, tmp_path):
    stick = tmp_path / "tiny.img"
    stick.write_bytes(b"\0" * MiB)
    assert "the ISO needs" in one_error_line(mbrescue("burn", small_iso, stick, "--yes"))
    assert stick.read_bytes() == b"\0" * MiB


def test_burn_refuses_a_mounted_device(small_iso, tmp_path):
    stick = tmp_path / "mounted.img"
    with open(stick, "wb") as f:
        f.truncate(16 * MiB)
    sh("mke2fs", "-q", "-F", "-t", "ext4", stick)
    loop = _loop(stick)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        sh("mount", loop, mnt)
        try:
            assert "mounted" in one_error_line(mbrescue("burn", small_iso, loop, "--yes"))
        finally:
            sh("umount", mnt)
    finally:
        sh("losetup", "-d", loop)
    with open(stick, "rb") as f:
        f.seek(0x8001)
        assert f.read(5) != b"CD001"  # the ISO's volume descriptor never reached it


def test_burn_refuses_what_is_not_an_iso(tmp_path):
    fake = tmp_path / "fake.iso"
    fake.write_bytes(os.urandom(64 * 1024))
    target = tmp_path / "t.img"
    target.write_bytes(b"\0" * MiB)
    assert "not an ISO 9660 image" in one_error_line(mbrescue("burn", fake, target, "--yes"))


# -- build several captures at once ---------------------------------------------------------------

def test_build_several_captures_in_parallel(tmp_path):
    """Two captures, `--jobs 2`: one ISO per host, named after it, each passing `verify`."""
    captures = []
    for host in ("alpha", "bravo"):
        image = small_msdos_image(tmp_path / f"{host}.img")
        capture = tmp_path / f"{host}.mbrescue"
        assert mbrescue("capture", image, "-o", capture, "--hostname", host).returncode == 0
        captures.append(capture)
    out = tmp_path / "isos"
    out.mkdir()
    result = mbrescue("build", *captures, "-o", out, "--jobs", "2")
    assert result.returncode == 0, result.stderr
    isos = sorted(out.iterdir())
    assert [iso.name for iso in isos] == ["alpha-rescue.iso", "bravo-rescue.iso"]
    for iso in isos:
        assert iso.stat().st_mode & 0o777 == 0o600
        checked = mbrescue("verify", iso)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert iso.stem.split("-")[0] in checked.stdout  # the payload's capture names its host
