"""grub.cfg from templates/grub.cfg.j2: golden files, GRUB's own syntax check, strictness."""

from __future__ import annotations

import os
from pathlib import Path

import jinja2
import pytest

from builder import grub
from builder.errors import MbrescueError
from builder.run import run

GOLDEN = Path(__file__).parent / "golden"
VALUES = {
    "host": "srv-db01.example.org",
    "captured_at": "2026-11-20 03:14 UTC",
    "region_size": "259.0 MiB",
    "boot_fs_uuid": "5b0c4c8e-3f0a-4e57-9c1e-2a4d5e6f7a8b",
    "medium_id": "0123456789abcdef",
}


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MBRESCUE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; MBRESCUE_UPDATE_GOLDEN=1 rewrites it"


def test_golden_default_timeouts() -> None:
    _golden("grub.cfg", grub.render_grub_cfg(**VALUES))


def test_golden_short_timeouts() -> None:
    _golden(
        "grub.cfg.short-timeouts",
        grub.render_grub_cfg(**VALUES, local_timeout_s=2, restore_timeout_s=1),
    )


def test_grub_accepts_the_syntax(tmp_path: Path) -> None:
    cfg = tmp_path / "grub.cfg"
    cfg.write_text(grub.render_grub_cfg(**VALUES))
    run(["grub-script-check", cfg])


def test_entries_and_kernel_args() -> None:
    text = grub.render_grub_cfg(**VALUES)
    assert 'menuentry "Restore srv-db01.example.org boot disk (screen)" --id restore' in text
    assert '"Restore srv-db01.example.org boot disk (serial console)"' in text
    assert 'menuentry "Rescue shell"' in text and 'menuentry "Boot the first local disk"' in text
    assert f"search --no-floppy --fs-uuid --set=hostboot {VALUES['boot_fs_uuid']}" in text
    # The last console= is /dev/console: the screen for the screen entry, serial for the other.
    assert grub.kernel_args("abcd", serial_console=False) == (
        "console=ttyS0,115200n8 console=tty0 mbrescue.medium=abcd"
    )
    assert grub.kernel_args("abcd", serial_console=True) == (
        "console=tty0 console=ttyS0,115200n8 mbrescue.medium=abcd"
    )
    assert "mbrescue.shell=1" in grub.kernel_args("abcd", serial_console=False, shell=True)
    assert "quiet" not in text


@pytest.mark.parametrize(
    "field,value",
    [
        ("host", 'evil" ; reboot ; "'),
        ("boot_fs_uuid", "x y"),
        ("medium_id", "a$b"),
        ("captured_at", "now\nreboot"),
    ],
)
def test_unsafe_values_refused(field: str, value: str) -> None:
    with pytest.raises(MbrescueError, match=r"cannot go into grub\.cfg"):
        grub.render_grub_cfg(**{**VALUES, field: value})


def test_missing_value_fails_the_build() -> None:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(grub.TEMPLATES), undefined=jinja2.StrictUndefined
    )
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("grub.cfg.j2").render(host="x")
