"""The rescue system opens an encrypted capture (`build --encrypt`) before anything else.

The plan needs the manifest, and the manifest is inside the encryption: so the passphrase
comes first, typed on any console with the echo off, three tries, each wrong one a line of
its own and the third an error (nothing written: no disk was even looked at for writing).
age decrypts the capture from where it lies (the payload cpio on the medium, read in place,
or the payload in memory) into a tmpfs of its own, sized for it, after checking that RAM
holds it and scrypt's working memory: a capture that cannot fit is refused with how much RAM
it needs. The plaintext is then an ordinary capture: the restore verifies it against the
build's seal (options.json's manifest SHA-256) before its first write, as always.

Why not stream the decryption into the write: every byte that steers a write is verified
before the first one is written (DESIGN.md, rule 2), and the whole-capture check needs the
whole capture; decrypting twice (once to check, once to write) would cost a second scrypt
and a second pass over slow media, and a hostile medium could serve other bytes the second
time. RAM is the bound; the refusal says how much is missing.
"""

from __future__ import annotations

import os
import subprocess

from .agecrypt import (
    AGE,
    WrongPassphrase,
    decrypt,
    plaintext_bytes_at_most,
    scrypt_bytes,
    scrypt_work_factor,
)
from .capfile import NEWC_MAGIC, PAYLOAD_CAPTURE_MEMBER, newc_member
from .console import Console, human_bytes
from .errors import MbrescueError
from .outputs import open_input

PLAIN_DIR = "/run/mbrescue-plain"
PLAIN_NAME = "capture.mbrescue"
MEMINFO = "/proc/meminfo"
TRIES = 3
# What the runner and the tools need beside the capture and scrypt while it works.
MARGIN_BYTES = 48 << 20
HEADER_BYTES = 256
PROMPT = "Passphrase of this host's encrypted capture (typing is not shown): "


def mem_available_bytes(meminfo: str = MEMINFO) -> int | None:
    try:
        with open(meminfo, encoding="ascii", errors="replace") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name == "MemAvailable" and value.split()[1:2] == ["kB"]:
                    return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _mount_tmpfs(where: str, size_bytes: int) -> None:
    """A tmpfs of its own for the plaintext: sized for it (the rootfs may be capped at half
    of RAM), private (mode 0700)."""
    os.makedirs(where, mode=0o700, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700,nodev,nosuid,noexec",
         "tmpfs", where], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        raise MbrescueError(f"cannot mount a tmpfs at {where} for the decrypted capture: "
                            f"{result.stderr.strip() or result.returncode}; nothing written")


def unlock(capture_path: str, console: Console, plain_dir: str = PLAIN_DIR,
           meminfo: str = MEMINFO, mount: bool = True, age: str = AGE) -> str:
    """Ask for the passphrase and decrypt the capture; the plain capture's path."""
    fd = open_input(capture_path, allow_block=False)
    try:
        base, size = 0, os.fstat(fd).st_size
        if os.pread(fd, 6, 0) in NEWC_MAGIC:
            base, size = newc_member(fd, 0, size, PAYLOAD_CAPTURE_MEMBER)
        work_factor = scrypt_work_factor(os.pread(fd, min(size, HEADER_BYTES), base))
        if work_factor is None:
            raise MbrescueError("the build says the capture is encrypted, but it is no "
                                "passphrase-encrypted age file; nothing written")
        plain_bytes = plaintext_bytes_at_most(size)
        need_bytes = plain_bytes + scrypt_bytes(work_factor) + MARGIN_BYTES
        available = mem_available_bytes(meminfo)
        if available is not None and available < need_bytes:
            raise MbrescueError(
                f"the encrypted capture needs {human_bytes(need_bytes)} of free RAM to be "
                f"decrypted ({human_bytes(plain_bytes)} capture, "
                f"{human_bytes(scrypt_bytes(work_factor))} for scrypt); this machine has "
                f"{human_bytes(available)} free: give it at least "
                f"{human_bytes(need_bytes - available)} more RAM; nothing written")
        if mount:
            _mount_tmpfs(plain_dir, plain_bytes + (1 << 20))
        out = os.path.join(plain_dir, PLAIN_NAME)
        console.say("mbrescue: this host's capture is encrypted (age, scrypt passphrase)")
        for attempt in range(1, TRIES + 1):
            answer = console.ask_secret(PROMPT)
            if answer is None:
                raise MbrescueError("no passphrase given; nothing written")
            try:
                if not answer:
                    raise WrongPassphrase("empty passphrase")
                console.say("mbrescue: decrypting the capture ...")
                seconds = decrypt(fd, base, size, out, answer.encode(), age)
            except WrongPassphrase:
                if attempt < TRIES:
                    left = TRIES - attempt
                    tries = "try" if left == 1 else "tries"
                    console.say(f"mbrescue: wrong passphrase, {left} {tries} left")
                continue
            console.say(f"mbrescue: capture decrypted in {seconds:.0f} s "
                        f"({human_bytes(os.path.getsize(out))} in RAM)")
            return out
        raise MbrescueError(f"wrong passphrase {TRIES} times; nothing written")
    finally:
        os.close(fd)
