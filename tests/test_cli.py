"""The CLI's own contracts: one-line errors, progress only on a terminal, and `burn`."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest

from .conftest import MBRESCUE, ROOT, mbrescue, one_error_line, read_until, sh, sha256_of
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
    piped = mbrescue("capture", image, "-o", tmp_path / "pipe.mbrescue")
    assert piped.returncode == 0
    assert "\r" not in piped.stderr  # a log gets plain lines (tests/test_messages.py), no redraws


# -- unexpected failures and Ctrl-C ------------------------------------------------------------

# A stack limit larger than the address space can hold: every new thread's stack fails to map,
# so Python raises RuntimeError("can't start new thread") where capture starts its writer
# thread. A real fault of the environment that no parser can turn into the project's error.
HUGE_STACK_LIMIT = ["prlimit", f"--stack={1 << 40}", "--"]


def _capture_with_a_huge_stack_limit(image, out, *, debug: bool):
    command = [*HUGE_STACK_LIMIT, *MBRESCUE, *(["--debug"] if debug else []),
               "capture", os.fspath(image), "-o", os.fspath(out)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_an_unexpected_exception_is_one_line_naming_the_rerun(tmp_path):
    image = small_msdos_image(tmp_path / "host.img")
    out = tmp_path / "x.mbrescue"
    line = one_error_line(_capture_with_a_huge_stack_limit(image, out, debug=False))
    assert line.startswith("mbrescue: error: RuntimeError: can't start new thread (this is a bug;")
    assert line.endswith(
        f"rerun with --debug for the traceback: mbrescue --debug capture {image} -o {out})"
    )
    shown = _capture_with_a_huge_stack_limit(image, out, debug=True)
    assert shown.returncode != 0
    assert "Traceback (most recent call last)" in shown.stderr
    assert shown.stderr.rstrip().splitlines()[-1].startswith("mbrescue: error: RuntimeError: ")


def test_ctrl_c_at_the_prompt_is_one_line_and_exit_130(tmp_path):
    """SIGINT while restore waits for its typed yes: status 130, one line, nothing written."""
    image = small_msdos_image(tmp_path / "host.img")
    capture = tmp_path / "host.mbrescue"
    assert mbrescue("capture", image, "-o", capture).returncode == 0
    target = tmp_path / "target.img"
    with open(target, "wb") as blank:
        blank.truncate(os.path.getsize(image))
    process = subprocess.Popen([*MBRESCUE, "restore", os.fspath(capture), os.fspath(target)],
                               cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout is not None
    read_until(process.stdout.fileno(), b"Type yes", timeout=60)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr.decode())
    assert one_error_line(result).startswith("mbrescue: error: interrupted")
    assert result.returncode == 130
    assert sha256_of(target) == sha256_of_zeros(os.path.getsize(image))


def sha256_of_zeros(length: int) -> str:
    digest = hashlib.sha256()
    digest.update(bytes(length))
    return digest.hexdigest()


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

def _two_captures(tmp_path: Path) -> list[Path]:
    captures = []
    for host in ("alpha", "bravo"):
        image = small_msdos_image(tmp_path / f"{host}.img")
        capture = tmp_path / f"{host}.mbrescue"
        assert mbrescue("capture", image, "-o", capture, "--hostname", host).returncode == 0
        captures.append(capture)
    return captures


def test_build_several_captures_in_parallel(tmp_path):
    """Two captures, `--jobs 2`: one ISO per host, named after it, each passing `verify`."""
    captures = _two_captures(tmp_path)
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


def test_a_damaged_capture_leaves_no_iso_of_any_host(tmp_path):
    """The captures' data are checked while the ISOs are written: one capture with a damaged
    region chunk fails the build in one line, and no ISO, of it or of the sound capture
    beside it, nor any temporary file, is left (none got its name before the check)."""
    captures = _two_captures(tmp_path)
    with tarfile.open(captures[1]) as archive:
        at = archive.getmember("region.img.gz").offset_data + 200
    with open(captures[1], "r+b") as stream:
        stream.seek(at)
        byte = stream.read(1)
        stream.seek(at)
        stream.write(bytes([byte[0] ^ 0xFF]))
    out = tmp_path / "isos"
    out.mkdir()
    result = mbrescue("build", *captures, "-o", out, "--jobs", "2")
    assert "checksum mismatch in region chunk 0" in one_error_line(result)
    assert list(out.iterdir()) == []


def test_make_install_puts_mbrescue_on_path(tmp_path):
    """`make install` (issue 17): the README's bare `mbrescue` works from PATH, through a
    link to this checkout's virtualenv."""
    done = subprocess.run(["make", "-s", "-C", ROOT, "install", f"PREFIX={tmp_path}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    linked = tmp_path / "bin" / "mbrescue"
    assert linked.is_symlink() and linked.resolve() == (ROOT / ".venv/bin/mbrescue").resolve()
    found = subprocess.run(["mbrescue", "--help"], capture_output=True, text=True,
                           env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"})
    assert found.returncode == 0 and "Usage: mbrescue" in found.stdout
