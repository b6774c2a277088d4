"""Issue 17 section 3: both command lines agree, Ctrl-C is 130, errors name their cause and
the next step, progress reaches logs, netboot trees stay readable by the TFTP server."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
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
