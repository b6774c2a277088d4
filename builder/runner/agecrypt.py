"""A capture encrypted at rest: age (https://age-encryption.org/v1) with a passphrase.

The cryptography is age's, never ours: the build encrypts with `age -p` (scrypt passphrase
stanza, ChaCha20-Poly1305 STREAM payload), the rescue system decrypts with `age -d`
(the kit carries Debian's age 1.1.1). age reads a passphrase only from a terminal, never
from a pipe or an argument (so it never shows in `ps` or an environment): it is driven here
through a pseudo-terminal of its own. The child gets a new session (no controlling terminal,
so age's /dev/tty fails and it falls back to its standard input, the pseudo-terminal), not
the rescue console's: what it prompts is read here and never reaches a screen.

The plaintext travels through a pipe from a descriptor (pread), in both directions: the
build encrypts the very bytes its check hashed (the capture's descriptor), and the rescue
system decrypts the capture member in place inside the payload cpio on the medium.
age's STREAM authenticates every 64 KiB chunk and the header's MAC proves the passphrase:
a wrong passphrase fails before any plaintext exists, a damaged ciphertext fails where it
is damaged; the decrypted capture is then verified against the build's seal as a plain one.

Standard library only (the rescue side).
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import threading
import time

from .console import echo_is_off
from .errors import MbrescueError

AGE = "age"
MAGIC = b"age-encryption.org/v1\n"
SCRYPT_STANZA = b"-> scrypt "
# age's STREAM: 16 bytes of Poly1305 tag per 64 KiB of plaintext, a 16-byte nonce up front.
STREAM_CHUNK_BYTES = 64 << 10
TAG_BYTES = 16
# scrypt's memory: 128 * r * N bytes (r = 8); age 1.1.1 encrypts with log2(N) = 18 and
# decrypts what the header names (this many bytes for the work factor it says).
SCRYPT_R = 8
READ_BLOCK = 1 << 20
# age prompts "Enter passphrase:" (decrypt), "Enter passphrase (leave empty ...):" and
# "Confirm passphrase:" (encrypt); each ends with ": ".
PROMPT_RE = re.compile(rb"passphrase[^\n]*: $", re.IGNORECASE)
ANSI_RE = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")
WRONG_PASSPHRASE = "incorrect passphrase"
ECHO_OFF_WAIT_S = 10.0


class WrongPassphrase(MbrescueError):
    """age said the passphrase does not open the header."""


def check_passphrase(passphrase: bytes) -> None:
    """What a passphrase may be: age would generate one for an empty answer, and a line end
    would end the typed line early."""
    if not passphrase:
        raise MbrescueError("the passphrase is empty")
    if b"\n" in passphrase or b"\r" in passphrase:
        raise MbrescueError("the passphrase holds a line end: give one line")


def scrypt_work_factor(header: bytes) -> int | None:
    """log2(N) of the header's scrypt stanza; None when it is not a passphrase-encrypted
    age file (another stanza, or not age at all)."""
    if not header.startswith(MAGIC):
        return None
    first = header[len(MAGIC):].split(b"\n", 1)[0]
    if not first.startswith(SCRYPT_STANZA):
        return None
    words = first.split()
    if len(words) != 4 or not words[3].isdigit() or not 1 <= int(words[3]) <= 30:
        return None
    return int(words[3])


def scrypt_bytes(work_factor: int) -> int:
    return 128 * SCRYPT_R * (1 << work_factor)


def plaintext_bytes_at_most(ciphertext_bytes: int) -> int:
    """An upper bound of the plaintext's size (the header and the tags subtract)."""
    return max(ciphertext_bytes - TAG_BYTES, 0)


def _feed(source_fd: int, offset: int, length: int, sink_fd: int, errors: list[BaseException]
          ) -> None:
    """source's bytes offset..offset+length into the pipe; a closed pipe (age stopped) ends it."""
    try:
        at, left = offset, length
        while left > 0:
            block = os.pread(source_fd, min(READ_BLOCK, left), at)
            if not block:
                raise MbrescueError(f"the input ended {left} bytes early")
            view = memoryview(block)
            while view:
                view = view[os.write(sink_fd, view):]
            at += len(block)
            left -= len(block)
    except BrokenPipeError:
        pass
    except (OSError, MbrescueError) as exc:
        errors.append(exc)
    finally:
        os.close(sink_fd)


def run_age(arguments: list[str], passphrase: bytes, source_fd: int, offset: int,
            length: int, age: str = AGE) -> None:
    """`age ARGUMENTS /proc/self/fd/N`, N a pipe carrying source's bytes, every passphrase
    prompt answered on age's pseudo-terminal. Raises WrongPassphrase or MbrescueError (age's
    own error line)."""
    check_passphrase(passphrase)
    master, slave = os.openpty()
    read_end, write_end = os.pipe()
    errors: list[BaseException] = []
    try:
        try:
            process = subprocess.Popen(
                [age, *arguments, f"/proc/self/fd/{read_end}"],
                stdin=slave, stdout=subprocess.DEVNULL, stderr=slave, pass_fds=(read_end,),
                start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            raise MbrescueError(f"cannot run {age}: {exc.strerror}") from exc
        finally:
            os.close(slave)
            os.close(read_end)
        feeder = threading.Thread(target=_feed, name="age-input", daemon=True,
                                  args=(source_fd, offset, length, write_end, errors))
        write_end = -1  # the feeder closes it
        feeder.start()
        said = _answer_prompts(master, passphrase)
        status = process.wait()
        feeder.join()
    finally:
        os.close(master)
        if write_end >= 0:
            os.close(write_end)
    if status != 0:
        lines = [line.strip() for line in said.splitlines() if line.strip()]
        first = next((line for line in lines if line.startswith("age: error:")),
                     lines[0] if lines else f"exit status {status}")
        if WRONG_PASSPHRASE in first:
            raise WrongPassphrase("wrong passphrase")
        # The echo was off when it was typed; should age ever print it, it is not repeated.
        first = first.replace(passphrase.decode("utf-8", errors="replace"), "(passphrase)")
        raise MbrescueError(f"age failed: {first.removeprefix('age: error: ')}")
    if errors:
        raise MbrescueError(f"reading the input for age failed: {errors[0]}")


def _answer_prompts(master: int, passphrase: bytes) -> str:
    """Read age's terminal until it closes, typing the passphrase at each prompt; what it
    said besides the prompts (its error lines), as text."""
    pending = b""
    said = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            continue
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: every descriptor of the slave side is closed (age ended)
            break
        if not data:
            break
        pending += data
        if PROMPT_RE.search(pending):
            # age prints the prompt, then turns the echo off (x/term's ReadPassword): type
            # only once it is off, so the passphrase is never echoed back here.
            deadline = time.monotonic() + ECHO_OFF_WAIT_S
            while not echo_is_off(master) and time.monotonic() < deadline:
                time.sleep(0.01)
            os.write(master, passphrase + b"\n")
            pending = b""
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            said += ANSI_RE.sub(b"", line).replace(b"\r", b"") + b"\n"
    said += ANSI_RE.sub(b"", pending).replace(b"\r", b"")
    return said.decode("utf-8", errors="replace")


def encrypt(source_fd: int, offset: int, length: int, out_path: str, passphrase: bytes,
            age: str = AGE) -> float:
    """source's bytes offset..offset+length, age-encrypted with the passphrase into
    out_path; the seconds it took."""
    started = time.monotonic()
    run_age(["--encrypt", "--passphrase", "--output", out_path], passphrase, source_fd,
            offset, length, age)
    return time.monotonic() - started


def decrypt(source_fd: int, offset: int, length: int, out_path: str, passphrase: bytes,
            age: str = AGE) -> float:
    """The age file at source offset..offset+length decrypted into out_path (removed when
    age fails); the seconds it took."""
    started = time.monotonic()
    try:
        run_age(["--decrypt", "--output", out_path], passphrase, source_fd, offset, length,
                age)
    except BaseException:
        try:
            os.unlink(out_path)
        except FileNotFoundError:
            pass
        raise
    return time.monotonic() - started
