"""Secrets at rest (issue 21): the capture encrypted with age and a passphrase.

Cheapest first: age driven through its pseudo-terminal (runner/agecrypt.py) with the host's
age, the console's passphrase prompt on a real pseudo-terminal (no echo), then `build
--encrypt` with a /boot holding a marker secret (grep finds it in a plain build's ISO and
nowhere in the encrypted one), then the rescue system under QEMU.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from builder.runner import agecrypt
from builder.runner.console import Console, echo_is_off
from builder.runner.errors import MbrescueError

from .conftest import read_until

PASSPHRASE = b"correct horse battery staple"


def _encrypted(tmp_path: Path, plain: bytes, offset: int = 0) -> Path:
    source = tmp_path / "plain.bin"
    source.write_bytes(bytes(offset) + plain + b"trailing bytes not encrypted")
    out = tmp_path / "plain.age"
    fd = os.open(source, os.O_RDONLY)
    try:
        agecrypt.encrypt(fd, offset, len(plain), os.fspath(out), PASSPHRASE)
    finally:
        os.close(fd)
    return out


def test_age_round_trip_through_its_terminal(tmp_path: Path) -> None:
    plain = os.urandom(300_000) + b"CHAP-SECRET-MARKER" * 100
    encrypted = _encrypted(tmp_path, plain, offset=4096)
    data = encrypted.read_bytes()
    assert agecrypt.scrypt_work_factor(data[:200]) == 18
    assert b"CHAP-SECRET-MARKER" not in data and PASSPHRASE not in data
    assert agecrypt.plaintext_bytes_at_most(len(data)) >= len(plain)
    # decrypted from inside a larger file, as the rescue system reads the payload cpio
    wrapped = tmp_path / "wrapped.bin"
    wrapped.write_bytes(b"x" * 110 + data + b"y" * 7)
    fd = os.open(wrapped, os.O_RDONLY)
    try:
        agecrypt.decrypt(fd, 110, len(data), os.fspath(tmp_path / "out"), PASSPHRASE)
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == plain


def test_wrong_passphrase_is_one_error_and_no_output(tmp_path: Path) -> None:
    data = _encrypted(tmp_path, b"secret" * 1000)
    fd = os.open(data, os.O_RDONLY)
    try:
        with pytest.raises(agecrypt.WrongPassphrase, match=r"^wrong passphrase$"):
            agecrypt.decrypt(fd, 0, data.stat().st_size, os.fspath(tmp_path / "out"),
                             b"not the passphrase")
    finally:
        os.close(fd)
    assert not (tmp_path / "out").exists()


def test_damaged_ciphertext_fails_and_leaves_nothing(tmp_path: Path) -> None:
    data = bytearray(_encrypted(tmp_path, os.urandom(200_000)).read_bytes())
    data[-5000] ^= 1
    damaged = tmp_path / "damaged.age"
    damaged.write_bytes(data)
    fd = os.open(damaged, os.O_RDONLY)
    try:
        with pytest.raises(MbrescueError, match=r"^age failed: ") as caught:
            agecrypt.decrypt(fd, 0, len(data), os.fspath(tmp_path / "out"), PASSPHRASE)
    finally:
        os.close(fd)
    assert not isinstance(caught.value, agecrypt.WrongPassphrase)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [b"", b"two\nlines", b"cr\r"])
def test_passphrases_age_would_misread_are_refused(bad: bytes) -> None:
    with pytest.raises(MbrescueError, match="passphrase"):
        agecrypt.check_passphrase(bad)


def test_header_that_is_not_a_passphrase_file() -> None:
    assert agecrypt.scrypt_work_factor(b"age-encryption.org/v1\n-> X25519 abc\n") is None
    assert agecrypt.scrypt_work_factor(b"ustar stuff") is None
    assert agecrypt.scrypt_work_factor(b"age-encryption.org/v1\n-> scrypt salt 99\n") is None


def test_secret_prompt_does_not_echo(tmp_path: Path) -> None:
    """The console's passphrase prompt turns the terminal's echo off while it waits and
    back on after; what is typed never comes back on the screen."""
    master, slave = os.openpty()
    console = Console.from_fds([slave])
    answer: list[str | None] = []
    asking = threading.Thread(target=lambda: answer.append(console.ask_secret("Passphrase: ")))
    try:
        asking.start()
        read_until(master, b"Passphrase: ", timeout=10)
        assert echo_is_off(master)
        os.write(master, b"hunter2-typed\n")
        asking.join(10)
        assert answer == ["hunter2-typed"]
        assert not echo_is_off(master)
        os.write(master, b"x")  # echo is back: the next key shows
        shown = read_until(master, b"x", timeout=10)
        assert b"hunter2" not in shown
    finally:
        os.close(master)
        os.close(slave)
