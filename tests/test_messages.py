"""Issue 17 section 3: both command lines agree, Ctrl-C is 130, errors name their cause and
the next step, progress reaches logs, netboot trees stay readable by the TFTP server."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
import typer.main

from builder import __version__

from .conftest import MBRESCUE, ROOT, mbrescue, one_error_line, read_until, sh

MiB = 1 << 20


def _typer_options(name: str) -> set[tuple]:
    from builder.cli import app

    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    shown = set()
    for param in command.params:
        if param.param_type_name == "argument":
            shown.add(("argument", param.name))
        elif param.name != "help":
            shown.add((tuple(sorted(param.opts)), param.is_flag,  # type: ignore[attr-defined]
                       param.multiple))
    return shown


def _argparse_options(name: str) -> set[tuple]:
    from builder import host

    top = host.parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    shown = set()
    for action in sub.choices[name]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:
            shown.add(("argument", action.dest))
        else:
            shown.add((tuple(sorted(action.option_strings)), action.nargs == 0,
                       isinstance(action, argparse._AppendAction)))
    return shown


@pytest.mark.parametrize("name", ["restore", "capture"])
def test_both_command_lines_take_the_same_options(name):
    assert _typer_options(name) == _argparse_options(name)


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "mbrescue-host"
    result = mbrescue("bundle", "-o", out)
    assert result.returncode == 0, result.stderr
    return out


def test_the_bundles_restore_takes_files(bundle_file):
    shown = subprocess.run([bundle_file, "restore", "--help"], capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "--files" in shown.stdout


# -- Ctrl-C, --version, -h ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_image(tmp_path_factory) -> Path:
    """An msdos disk whose /boot is 1 GiB: a capture and a restore take seconds, time
    enough to interrupt them."""
    path = tmp_path_factory.mktemp("big") / "big.img"
    with open(path, "wb") as image:
        image.truncate(1100 * MiB)
    sh("sfdisk", "-q", path, input_bytes=b"label: dos\n2048,1GiB,83,*\n")
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={2048 * 512}", path, "1048576k")
    return path


def _interrupt_when(command: list[str | os.PathLike[str]], started, **popen) -> \
        subprocess.CompletedProcess[str]:
    process = subprocess.Popen([os.fspath(word) for word in command], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               **popen)
    try:
        deadline = time.monotonic() + 120
        while not started():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _temporary_in(folder: Path):
    return lambda: any(p.name.startswith(".") and ".tmp-" in p.name for p in folder.iterdir())


@pytest.mark.parametrize("side", ["cli", "bundle"])
def test_ctrl_c_in_capture_exits_130(side, big_image, tmp_path, request):
    program = [*MBRESCUE] if side == "cli" else [request.getfixturevalue("bundle_file")]
    out = tmp_path / "out"
    out.mkdir()
    result = _interrupt_when([*program, "capture", big_image, "-o", out / "x.mbrescue"],
                             _temporary_in(out), stdin=subprocess.DEVNULL)
    assert one_error_line(result).startswith("mbrescue: error: capture interrupted")
    assert result.returncode == 130
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def big_capture(big_image, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bigcap") / "big.mbrescue"
    made = mbrescue("capture", big_image, "-o", out)
    assert made.returncode == 0, made.stderr
    return out


def test_ctrl_c_in_the_bundles_restore_exits_130(bundle_file, big_capture, tmp_path):
    target = tmp_path / "target.img"
    with open(target, "wb") as blank:
        blank.truncate(1100 * MiB)
    process = subprocess.Popen([bundle_file, "restore", big_capture, target],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout is not None
    read_until(process.stdout.fileno(), b"Type yes", timeout=60)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr.decode())
    assert one_error_line(result).startswith("mbrescue: error: interrupted")
    assert result.returncode == 130


def test_the_bundles_resume_hint_names_the_bundle(bundle_file, big_capture, tmp_path):
    target = tmp_path / "target.img"
    with open(target, "wb") as blank:
        blank.truncate(1100 * MiB)
    result = _interrupt_when([bundle_file, "restore", big_capture, target, "--yes"],
                             lambda: os.stat(target).st_blocks > 0, stdin=subprocess.DEVNULL)
    line = one_error_line(result)
    assert result.returncode == 130
    assert "to finish it, run: " in line, line
    hint = line.split("to finish it, run: ", 1)[1]
    assert hint.startswith(f"{bundle_file} restore "), hint
    assert "mbrescue restore" not in line


def test_version_and_short_help():
    shown = mbrescue("--version")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip().startswith(f"mbrescue {__version__}")
    short = mbrescue("-h")
    assert short.returncode == 0, short.stderr
    assert "capture" in short.stdout and "restore" in short.stdout
    assert "--files" in mbrescue("restore", "-h").stdout


# -- errors that name their cause and the next step ----------------------------------------------


def test_check_of_a_directory_names_the_capture_to_give(captures, tmp_path):
    (tmp_path / "web01.mbrescue").write_bytes(captures["A"].read_bytes())
    line = one_error_line(mbrescue("check", tmp_path))
    assert f"{tmp_path} is a directory" in line
    assert f"hint: give a capture file, e.g. {tmp_path / 'web01.mbrescue'}" in line


def test_a_missing_output_directory_is_called_missing(tmp_path):
    from .test_capture import small_msdos_image

    image = small_msdos_image(tmp_path / "host.img")
    line = one_error_line(mbrescue("capture", image, "-o", tmp_path / "nope" / "x.mbrescue"))
    assert f"{tmp_path / 'nope'}: no such directory" in line and "mkdir -p" in line, line
    assert "not a directory" not in line
    line = one_error_line(mbrescue("capture", image, "-o", f"{tmp_path / 'newdir'}/"))
    assert "no such directory" in line, line
    assert not (tmp_path / "newdir").exists()
    line = one_error_line(mbrescue("capture", image, "-o", "-"))
    assert "-o -" in line and "stdout" in line, line
    assert not (ROOT / "-").exists()
    out = tmp_path / "out"
    out.mkdir()
    made = mbrescue("capture", image, "-o", f"{out}/", "--hostname", "web01")
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in out.iterdir()) == ["web01.mbrescue"]


def test_bundle_output_to_stdout_is_refused(tmp_path):
    line = one_error_line(mbrescue("bundle", "-o", "-"))
    assert "-o -" in line and "stdout" in line, line
    line = one_error_line(mbrescue("bundle", "-o", f"{tmp_path / 'newdir'}/"))
    assert "no such directory" in line, line


def test_a_partition_gets_the_whole_disk_hint(tmp_path):
    partition = tmp_path / "boot-partition.img"
    with open(partition, "wb") as image:
        image.truncate(20 * MiB)
    sh("mke2fs", "-q", "-F", "-t", "ext4", partition)
    line = one_error_line(mbrescue("capture", partition, "-o", tmp_path / "x.mbrescue"))
    assert "give the whole disk (e.g. /dev/sda)" in line, line


def test_a_truncated_iso_is_called_truncated(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "data").write_bytes(os.urandom(2 * MiB))
    iso = tmp_path / "x.iso"
    sh("xorriso", "-as", "mkisofs", "-quiet", "-o", iso, tmp_path / "tree")
    with open(iso, "r+b") as stream:
        stream.truncate(iso.stat().st_size - MiB)
    result = mbrescue("verify", iso)
    assert result.returncode == 1
    # (the test's own folder is named after it: look past the path)
    assert "truncated" in one_error_line(result).replace(str(iso), "ISO")
    assert "truncated" in result.stdout.replace(str(iso), "ISO")


# -- progress in logs ----------------------------------------------------------------------------


def test_capture_and_restore_print_progress_lines_into_a_log(big_image, big_capture, tmp_path):
    made = mbrescue("capture", big_image, "-o", tmp_path / "x.mbrescue")
    assert made.returncode == 0, made.stderr
    assert "\r" not in made.stderr
    lines = [line for line in made.stderr.splitlines() if line.startswith("reading boot region: ")]
    assert len(lines) >= 3, made.stderr
    assert all("MiB/s" in line and "of 1.0 GiB" in line for line in lines), lines
    target = tmp_path / "target.img"
    with open(target, "wb") as blank:
        blank.truncate(1100 * MiB)
    restored = mbrescue("restore", big_capture, target, "--yes")
    assert restored.returncode == 0, restored.stderr
    shown = restored.stdout + restored.stderr
    writing = [line for line in shown.splitlines() if line.startswith("writing: ")]
    assert len(writing) >= 3 and all("MiB/s" in line for line in writing), shown
    assert "MB/s" not in shown.replace("MiB/s", "")


def test_debug_logs_the_programs_capture_runs(fixtures, tmp_path):
    """`--debug` shows each program the capture side runs (losetup, mount …), as typed."""
    image = fixtures["A"].path
    result = mbrescue("--debug", "capture", image, "-o", tmp_path / "a.mbrescue")
    assert result.returncode == 0, result.stderr
    shown = [line for line in result.stderr.splitlines() if line.startswith("mbrescue: debug: ")]
    assert any(line.startswith("mbrescue: debug: losetup --find --show") for line in shown), shown
    assert any(line.startswith("mbrescue: debug: mount -t ") for line in shown), shown
    quiet = mbrescue("capture", image, "-o", tmp_path / "b.mbrescue")
    assert "mbrescue: debug:" not in quiet.stderr


# -- JSON for scripts, and verify as non-root ----------------------------------------------------


@pytest.fixture(scope="module")
def built_iso(captures, tmp_path_factory):
    """An ISO of fixture A built by the real CLI with --json: (path, that JSON)."""
    out = tmp_path_factory.mktemp("iso") / "a.iso"
    result = mbrescue("build", captures["A"], "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


def test_build_json_names_host_capture_digest_and_checks(built_iso, captures):
    from builder.runner.capfile import Capture

    path, built = built_iso
    assert built["isos"] == [str(path)]
    [one] = built["builds"]
    with Capture.open(str(captures["A"])) as capture:
        assert one["host"] == capture.manifest.hostname
        assert one["manifest_sha256"] == capture.manifest_sha256
    assert one["capture"] == str(captures["A"]) and one["iso"] == str(path)
    assert one["capture_sha256"] == hashlib.sha256(captures["A"].read_bytes()).hexdigest()
    assert one["verified"] and "BIOS CD" in one["boots"]


def test_verify_json_for_an_iso_and_a_capture(built_iso, captures, tmp_path):
    path, _ = built_iso
    result = mbrescue("verify", "--json", path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["error"] is None and data["iso"] == str(path)
    assert {"name", "ok", "detail"} <= set(data["checks"][0])
    good = json.loads(mbrescue("verify", "--json", captures["A"]).stdout)
    assert good["ok"] is True and good["chunks"] > 0 and good["manifest_sha256"]
    damaged = tmp_path / "damaged.mbrescue"
    data_bytes = bytearray(captures["A"].read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data_bytes))
    bad = mbrescue("verify", "--json", damaged)
    assert bad.returncode == 1
    failed = json.loads(bad.stdout)
    assert failed["ok"] is False and "damaged" in failed["error"]


def test_check_json_on_failure_and_capture_json(fixtures, tmp_path):
    missing = mbrescue("check", "--json", tmp_path / "none.mbrescue", fixtures["A"].path)
    assert missing.returncode == 2
    data = json.loads(missing.stdout)
    assert data["matches"] is False and data["exit_status"] == 2 and data["error"]
    out = tmp_path / "a.mbrescue"
    made = mbrescue("capture", fixtures["A"].path, "-o", out, "--json")
    assert made.returncode == 0, made.stderr
    captured = json.loads(made.stdout)
    assert captured["capture"] == str(out) and len(captured["manifest_sha256"]) == 64
    assert captured["region_bytes"] > 0
    same = json.loads(mbrescue("check", "--json", out, fixtures["A"].path).stdout)
    assert same["matches"] is True and same["error"] is None and same["exit_status"] == 0


def test_verify_as_non_root_skips_the_cache_comparison(built_iso, request):
    """The README: where the download cache cannot be read, that comparison is skipped."""
    path, _ = built_iso
    folder = Path(tempfile.mkdtemp(prefix="mbrescue-public-"))
    request.addfinalizer(lambda: shutil.rmtree(folder))
    folder.chmod(0o755)
    public = folder / "a.iso"
    shutil.copyfile(path, public)
    public.chmod(0o644)
    # The venv's interpreter lives under /root (0700): Debian's python3 with the venv's
    # packages, as user nobody (HOME=/nonexistent).
    site = sysconfig.get_paths()["purelib"]
    result = subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={ROOT}:{site}", "/usr/bin/python3",
         "-m", "builder.cli", "verify", public],
        cwd=folder, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Errno 13" not in result.stdout + result.stderr
    assert "download cache not readable" in result.stdout


def test_files_restore_refuses_a_scratch_too_small_up_front(captures, fixtures, tmp_path):
    """restore --files names where its scratch goes and what it needs, and refuses a $TMPDIR
    with less free space before the prompt (not a bare mke2fs `No space left on device`)."""
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small)
    try:
        target = tmp_path / "target.img"
        with open(target, "wb") as stream:
            stream.truncate(fixtures["A"].path.stat().st_size)
        result = mbrescue("restore", "--files", "--yes", captures["A"], target,
                          env={"TMPDIR": str(small)})  # fmt: skip
        line = one_error_line(result)
        assert f"in {small} ($TMPDIR): about " in line and "free there" in line, line
        assert "TMPDIR" in line and "nothing written" in line, line
        assert target.read_bytes().count(0) == target.stat().st_size  # untouched
    finally:
        sh("umount", small)


def test_build_and_bundle_say_what_they_do_before_they_do_it(captures, tmp_path):
    """`build` and `bundle` took 7-12 s with no word (issue 17): each says what it is doing
    at once, before its summary line."""
    built = mbrescue("build", captures["A"], "-o", tmp_path / "a.iso")
    assert built.returncode == 0, built.stderr
    lines = built.stderr.splitlines()
    first = next(i for i, line in enumerate(lines) if "building " in line)
    assert "checking the capture while the ISO is written" in lines[first]
    assert first < next(i for i, line in enumerate(lines) if "boots" in line)
    made = mbrescue("bundle", "-o", tmp_path / "host-side")
    assert made.returncode == 0, made.stderr
    said = made.stderr.splitlines()
    start = next(i for i, line in enumerate(said) if "building the host bundle" in line)
    assert start < next(i for i, line in enumerate(said) if "wrote" in line), said
