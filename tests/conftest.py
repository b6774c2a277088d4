"""Shared test helpers: the CLI as a user runs it, small images made by real tools."""

from __future__ import annotations

import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MBRESCUE = [sys.executable, "-m", "builder.cli"]


def mbrescue(
    *args: str | os.PathLike[str],
    input_text: str | None = None,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run(
        [*MBRESCUE, *map(os.fspath, args)],
        cwd=ROOT,
        text=True,
        capture_output=True,
        input=input_text,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=None if input_text is not None else subprocess.DEVNULL,
    )


def sh(*args: str | os.PathLike[str], input_bytes: bytes | None = None) -> str:
    """Run an independent tool; fail the test with its stderr if it fails."""
    result = subprocess.run([os.fspath(a) for a in args], capture_output=True, input=input_bytes)
    if result.returncode != 0:
        raise AssertionError(f"{args} failed: {result.stderr.decode()}")
    return result.stdout.decode()


@contextmanager
def loop_device(path: Path, *options: str) -> Iterator[str]:
    """A loop device on an image file (losetup options such as `-b 4096`), detached after."""
    device = sh("losetup", "--find", "--show", *options, path).strip()
    try:
        yield device
    finally:
        sh("losetup", "--detach", device)


def memory_initrd(capture: Path, folder: Path, name: str = "initrd.img",
                  extra: dict[str, bytes] | None = None) -> Path:
    """The rescue system with the capture in memory, in one file: the base initramfs, then
    the capture's payload, as GRUB's memory entry and a network boot hand them over (the
    kernel unpacks both)."""
    from builder.build import OVERLAYS_DIR, RUNNER_DIR
    from builder.initramfs import make_base_initramfs, make_payload_initramfs
    from builder.kit import ensure_kit

    base = make_base_initramfs(ensure_kit(), RUNNER_DIR, OVERLAYS_DIR)
    payload = make_payload_initramfs(capture, folder / f"{name}.payload", extra=extra)
    initrd = folder / name
    initrd.write_bytes(base.read_bytes() + payload.read_bytes())
    payload.unlink()
    return initrd


def sha256_of(path: Path, length: int | None = None, offset: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        stream.seek(offset)
        left = length if length is not None else os.path.getsize(path) - offset
        while left > 0:
            chunk = stream.read(min(1 << 20, left))
            if not chunk:
                raise AssertionError(f"{path} is shorter than expected")
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's failure contract: non-zero, exactly one `mbrescue: error:` line, no traceback."""
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("mbrescue: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def read_until(master: int, needle: bytes, timeout: float = 60) -> bytes:
    """Read a pseudo-terminal's output until needle appears (or fail with what came)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not seen; got {seen[-2000:]!r}"
        ready, _, _ = select.select([master], [], [], left)
        if ready:
            seen += os.read(master, 65536)
    return seen


@pytest.fixture(scope="session")
def fixtures():
    """The four host-disk fixtures (built once per machine, cached by recipe)."""
    from builder.fixtures import ensure_all

    return ensure_all()


# Property tests (hypothesis): a fixed, reproducible budget. "ci" is what `make test` runs:
# derandomized (the same examples every run, so a failure reproduces anywhere), no deadline
# per example (the parsers' own hang guards in the tests bound the time), no example database
# in the checkout. `HYPOTHESIS_PROFILE=long` searches 20x more, randomly, for a deeper run
# by hand (its database goes to .hypothesis/, which git ignores).
# A test suite started in the background by a shell without job control inherits SIGINT
# ignored, and so would every runner the Ctrl-C tests start (an ignored disposition survives
# exec; a handler does not): those tests would fail for the launcher's sake. Take SIGINT back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, database=None)
settings.register_profile("long", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def captures(fixtures, tmp_path_factory) -> dict[str, Path]:
    """One capture per fixture, made by the real `capture()`, once per session."""
    from builder.capture import CaptureOptions, capture

    folder = tmp_path_factory.mktemp("captures")
    made = {}
    for name, fx in fixtures.items():
        result = capture(CaptureOptions(source=fx.path, output=folder / f"{name}.mbrescue",
                                        progress=False))
        assert result.manifest["region"]["end_lba"] == fx.region_end_sectors
        made[name] = result.path
    return made


@pytest.fixture(scope="session")
def far_boot_fixture():
    """Fixture E (msdos, BIOS, /boot at 32 MiB): its own cache entry, built once per machine."""
    from builder.fixtures.farboot import ensure_far_boot_fixture

    return ensure_far_boot_fixture()


def capture_mounted(image: Path, offset: int, size: int, out: Path, hostname: str,
                    before: Callable[[Path], None] | None = None
                    ) -> subprocess.CompletedProcess[str]:
    """`mbrescue capture IMAGE` while the file system at offset (size bytes) is mounted
    from a loop device, as a host's /boot is (the capture freezes it); `before(mountpoint)`
    runs first. The mount and the loop device are undone after, a freeze left behind too."""
    where = out.parent / f"{out.stem}-mnt"
    where.mkdir()
    with loop_device(image, "--offset", str(offset), "--sizelimit", str(size)) as loop:
        sh("mount", loop, where)
        try:
            if before is not None:
                before(where)
            return mbrescue("capture", image, "-o", out, "--hostname", hostname)
        finally:
            subprocess.run(["fsfreeze", "--unfreeze", where], capture_output=True)
            sh("umount", where)
