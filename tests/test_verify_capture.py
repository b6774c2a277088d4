"""`mbrescue verify CAPTURE`: a capture file checked on its own (seal, every region chunk,
every file-level copy, bounds), exit 0 good, 1 damaged, one line; and `inspect` says what it
checked instead of vouching for a damaged capture."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.runner.capfile import Capture

from .conftest import mbrescue, one_error_line


def damaged(source: Path, folder: Path, member: str, where: str = "middle") -> Path:
    data = bytearray(source.read_bytes())
    with Capture.open(str(source)) as capture:
        found = capture.members[member]
    at = found.offset + (found.size // 2 if where == "middle" else found.size - 5)
    data[at] ^= 0x01
    broken = folder / f"broken-{member}.mbrescue"
    broken.write_bytes(bytes(data))
    return broken


def test_a_good_capture_passes_in_one_line(captures):
    result = mbrescue("verify", captures["A"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith(f"mbrescue: {captures['A']} is good: seal"), lines[0]
    assert "region chunks" in lines[0] and "file-level cop" in lines[0], lines[0]


@pytest.mark.parametrize("name", ["C", "D"])
def test_good_gpt_captures_pass(captures, name):
    assert mbrescue("verify", captures[name]).returncode == 0


def test_a_damaged_region_chunk_is_named(captures, tmp_path):
    broken = damaged(captures["A"], tmp_path, "region.img.gz", "end")
    result = mbrescue("verify", broken)
    assert result.returncode == 1
    line = one_error_line(result)
    assert "is damaged" in line and "region chunk" in line, line


def test_a_damaged_file_level_copy_is_named(captures, tmp_path):
    with Capture.open(str(captures["A"])) as capture:
        member = capture.manifest.file_copies[0].member
    broken = damaged(captures["A"], tmp_path, member)
    result = mbrescue("verify", broken)
    assert result.returncode == 1
    line = one_error_line(result)
    assert "is damaged" in line and member in line, line


def test_a_truncated_capture_is_damaged(captures, tmp_path):
    data = captures["A"].read_bytes()
    cut = tmp_path / "cut.mbrescue"
    cut.write_bytes(data[: len(data) * 2 // 3])
    result = mbrescue("verify", cut)
    assert result.returncode == 1
    assert "is damaged" in one_error_line(result)


def test_boot_is_for_isos_only(captures):
    line = one_error_line(mbrescue("verify", "--boot", captures["A"]))
    assert "--boot" in line and "ISO" in line, line


def test_inspect_of_a_damaged_capture_says_what_it_checked(captures, tmp_path):
    broken = damaged(captures["A"], tmp_path, "region.img.gz", "end")
    result = mbrescue("inspect", broken)
    seal = next(line for line in result.stdout.splitlines() if line.startswith("seal"))
    assert "mbrescue verify" in seal and "not checked" in seal, seal


def test_inspect_does_not_deny_the_file_level_copy_it_lists(captures):
    """An unmounted /boot has no live file list, but its file-level copy is there: inspect
    says so in one line instead of `files none: … no file-level copy` above `copy …`."""
    shown = mbrescue("inspect", captures["A"]).stdout
    assert "no file-level copy" not in shown, shown
    lines = [line for line in shown.splitlines() if line.startswith(("files ", "copy "))]
    assert len(lines) == 1 and lines[0].startswith("copy      partition 1 (ext3):"), lines
