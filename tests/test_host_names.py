"""One host cannot replace another host's outputs: `build --expect-host`, and the explicit
opt-in that unattended network boot needs.

A capture may come from a compromised host (docs/design.md, safety rule 8), and the host name
inside it names the ISO, the network-boot payload and the menu. The controller knows which
host it is building for: `--expect-host NAME` refuses a capture that claims another name, in
one line, before anything is written. Every case runs the real CLI on real captures of small
images made by sfdisk/mke2fs/mkswap.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import mbrescue, one_error_line
from .test_capture import small_msdos_image


def _capture(folder: Path, hostname: str, image_name: str | None = None) -> Path:
    image = small_msdos_image(folder / f"{image_name or hostname}.img")
    capture = folder / f"{image_name or hostname}.mbrescue"
    result = mbrescue("capture", image, "-o", capture, "--hostname", hostname)
    assert result.returncode == 0, result.stderr
    return capture


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under folder with mode, mtime and content: any write shows."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        seen[os.fspath(path.relative_to(folder))] = (st.st_mode, st.st_mtime_ns, content)
    return seen


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """alpha's and bravo's honest captures, and mallory's capture claiming to be alpha."""
    folder = tmp_path_factory.mktemp("names")
    return {"alpha": _capture(folder, "alpha"), "bravo": _capture(folder, "bravo"),
            "forged": _capture(folder, "alpha", image_name="mallory")}


def _refused(result: subprocess.CompletedProcess[str], *words: str) -> str:
    line = one_error_line(result)
    for word in words:
        assert word in line, line
    return line


# -- ISOs ---------------------------------------------------------------------------------------

def test_a_capture_for_another_host_is_refused_and_nothing_is_written(named, tmp_path):
    """alpha's ISO exists; mallory's capture claiming `alpha`, built for mallory, is refused
    in one line naming both names, and the output directory is untouched (no ISO, no
    temporary file): the same with -o FILE."""
    out = tmp_path / "iso"
    out.mkdir()
    (out / "alpha-rescue.iso").write_bytes(b"alpha's ISO, built earlier\n")
    before = _snapshot(out)
    _refused(mbrescue("build", named["forged"], "-o", out, "--expect-host", "mallory"),
             "'alpha'", "mallory")
    assert _snapshot(out) == before
    _refused(mbrescue("build", named["forged"], "-o", out / "mallory-rescue.iso",
                      "--expect-host", "mallory"), "'alpha'", "mallory")
    assert _snapshot(out) == before


def test_expect_host_is_one_per_capture_in_their_order(named, tmp_path):
    """Several captures: one --expect-host per capture, paired in order. Swapped names, a
    missing one, or a bad name are refused in one line, and nothing is written."""
    out = tmp_path / "iso"
    out.mkdir()
    captures = (named["alpha"], named["bravo"])
    for expect, words in (
        (("bravo", "alpha"), ("'alpha'", "bravo")),
        (("alpha",), ("--expect-host", "2 captures")),
        (("alpha", "bravo", "charlie"), ("--expect-host", "2 captures")),
        (("alpha", "../bravo"), ("../bravo",)),
    ):
        options = [word for name in expect for word in ("--expect-host", name)]
        _refused(mbrescue("build", *captures, "-o", out, *options), *words)
        assert list(out.iterdir()) == [], expect


def test_the_expected_host_is_built(named, tmp_path):
    """The capture names the host the controller expects: its ISO is built, under its name."""
    out = tmp_path / "iso"
    out.mkdir()
    result = mbrescue("build", named["bravo"], "-o", out, "--expect-host", "bravo")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == ["bravo-rescue.iso"]


# -- network boot -------------------------------------------------------------------------------

def test_netboot_refuses_a_capture_for_another_host(named, tmp_path):
    """No tree is made for a capture that claims another host's name; an existing tree (here
    with alpha's payload, menu and index) is left as it was."""
    fresh = tmp_path / "fresh"
    _refused(mbrescue("build", "--netboot", fresh, named["forged"], "--expect-host", "mallory"),
             "'alpha'", "mallory")
    assert not fresh.exists()
    tree = tmp_path / "tree"
    for name, data in (("mbrescue/hosts/alpha/payload.img", b"alpha's payload\n"),
                       ("boot/grub/hosts/alpha.cfg", b"alpha's menu\n")):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    before = _snapshot(tree)
    _refused(mbrescue("build", "--netboot", tree, named["forged"], "--expect-host", "mallory"),
             "'alpha'", "mallory")
    _refused(mbrescue("build", "--netboot", tree, named["alpha"], named["forged"],
                      "--expect-host", "alpha", "--expect-host", "mallory"), "'alpha'", "mallory")
    assert _snapshot(tree) == before


def test_unattended_network_boot_needs_its_own_option(named, tmp_path):
    """`--allow-unattended` on a network tree would let anyone answering DHCP there restore:
    refused in one line without `--allow-unattended-netboot` (nothing written), which in turn
    means nothing without --netboot or without --allow-unattended. Given both, the payload
    carries the opt-in."""
    tree = tmp_path / "tree"
    _refused(mbrescue("build", "--netboot", tree, named["alpha"], "--allow-unattended"),
             "--allow-unattended-netboot")
    assert not tree.exists()
    _refused(mbrescue("build", "--netboot", tree, named["alpha"], "--allow-unattended-netboot"),
             "--allow-unattended")
    assert not tree.exists()
    out = tmp_path / "iso"
    out.mkdir()
    _refused(mbrescue("build", named["alpha"], "-o", out, "--allow-unattended",
                      "--allow-unattended-netboot"), "--netboot")
    assert list(out.iterdir()) == []
    result = mbrescue("build", "--netboot", tree, named["alpha"], "--expect-host", "alpha",
                      "--allow-unattended", "--allow-unattended-netboot")
    assert result.returncode == 0, result.stderr
    payload = (tree / "mbrescue/hosts/alpha/payload.img").read_bytes()
    assert b'"unattended_allowed": true' in payload


def test_the_help_says_why_unattended_netboot_is_separate():
    result = mbrescue("build", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--allow-unattended-netboot" in text
    assert "DHCP" in text
    assert "--expect-host" in text
