"""The swap header writer against mkswap (bytes) and blkid (what fstab's LABEL=/UUID= see)."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.run import run
from builder.runner.errors import MbrescueError
from builder.runner.probe import probe
from builder.runner.swap import make_swap_header

MIB = 1 << 20
UUID = "0f0e0d0c-1234-4abc-8def-0123456789ab"


def blkid(path: Path) -> dict[str, str]:
    text = run(["blkid", "-p", "-o", "export", path]).stdout.decode()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def sparse_file(path: Path, size_bytes: int) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size_bytes)
    return path


@pytest.mark.parametrize(
    ("size_bytes", "page_bytes", "label"),
    [
        (9 * MIB, 4096, "SWAP-sda2"),
        (32 * MIB + 1234, 4096, None),  # a partition not a whole number of pages
        (16 * MIB, 65536, "fifteen-bytes!!"),  # mkswap keeps at most 15 (and a NUL)
    ],
)
def test_same_bytes_as_mkswap(
    tmp_path: Path, size_bytes: int, page_bytes: int, label: str | None
) -> None:
    reference = sparse_file(tmp_path / "mkswap.img", size_bytes)
    args = ["mkswap", "-p", str(page_bytes), "-U", UUID]
    if label is not None:
        args += ["-L", label]
    run([*args, reference])
    header = make_swap_header(size_bytes, page_bytes, UUID, label)
    assert len(header) == page_bytes
    assert header == reference.read_bytes()[:page_bytes]


def test_blkid_and_probe_see_label_and_uuid(tmp_path: Path) -> None:
    # Over old contents, as restore writes it onto a disk that held something else.
    target = tmp_path / "swap.img"
    with open(target, "wb") as handle:
        handle.write(b"\xa5" * 4096 * 4)
        handle.truncate(24 * MIB)
    with open(target, "r+b") as handle:
        handle.write(make_swap_header(24 * MIB, 4096, UUID, "SWAP-sda2"))
    found = blkid(target)
    assert (found["TYPE"], found["LABEL"], found["UUID"], found["VERSION"]) == (
        "swap", "SWAP-sda2", UUID, "1",
    )  # fmt: skip
    info = probe(str(target), 0, 24 * MIB)
    assert info is not None
    assert (info.type, info.label, info.uuid, info.swap_page_bytes) == (
        "swap", "SWAP-sda2", UUID, 4096,
    )  # fmt: skip
    assert info.swap_last_page == 24 * MIB // 4096 - 1
    # swapon's own check of the header (without activating it: a file with holes is refused
    # by the kernel, and the test machine's swap is not ours to touch).
    run(["swaplabel", target])
    # A 16-byte label (older mkswap wrote those; the field has room) is kept whole.
    with open(target, "r+b") as handle:
        handle.write(make_swap_header(24 * MIB, 4096, UUID, "sixteen-bytes-16"))
    assert blkid(target)["LABEL"] == "sixteen-bytes-16"


def test_bad_arguments() -> None:
    with pytest.raises(MbrescueError, match="too small"):
        make_swap_header(9 * 4096, 4096, UUID, None)
    with pytest.raises(MbrescueError, match="longer than 16"):
        make_swap_header(MIB, 4096, UUID, "a" * 17)
    with pytest.raises(MbrescueError, match="not a UUID"):
        make_swap_header(MIB, 4096, "not-a-uuid", None)
    with pytest.raises(MbrescueError, match="page size"):
        make_swap_header(MIB, 3000, UUID, None)


def test_uuid_with_spaces_is_not_a_uuid():
    """bytes.fromhex skips whitespace: this once gave an 11-byte 'UUID'."""
    from builder.runner.errors import MbrescueError
    from builder.runner.swap import uuid_bytes

    with pytest.raises(MbrescueError, match="not a UUID"):
        uuid_bytes("00 " * 10 + "00")  # 32 characters, 11 bytes of hex
