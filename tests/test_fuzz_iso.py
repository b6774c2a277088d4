"""Property tests of the ISO side's readers: the newc cpio reader, the payload check, the
sums parser and the El Torito catalog reader.

Any bytes (and valid archives with bytes changed, cut or dropped) give a result or
MbrescueError: never another exception, never a hang, and a header that claims a 4 GiB
member or name is refused without reading it. The budget is the 'ci' profile of
tests/conftest.py (derandomized); every test also bounds each example's time.
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder import cpio, verify
from builder.errors import MbrescueError

EXAMPLE_SECONDS = 2.0
SMALL_HEAP_BYTES = 16 << 20
CAPTURE_BYTES = b"not a real capture, only its bytes matter here\n" * 20


def _bounded(func: Callable[[], object]) -> object:
    """Run one example: a value or MbrescueError, and quickly."""
    started = time.monotonic()
    try:
        return func()
    except MbrescueError:
        return None
    finally:
        assert time.monotonic() - started < EXAMPLE_SECONDS, "reader took too long"


def _archive(entries: list[cpio.Entry]) -> bytes:
    out = io.BytesIO()
    cpio.write(entries, out)
    return out.getvalue()


def _walk(data: bytes) -> list[tuple[str, int, int]]:
    """Every member, reading each one's data as the payload check does."""
    stream = io.BytesIO(data)
    members = []
    for name, mode, size in cpio.iter_newc(stream):
        members.append((name, mode, size))
        assert len(stream.read(size)) == size  # the reader promised it is all there
    return members


VALID = _archive(
    [
        cpio.Entry("mbrescue", stat.S_IFDIR | 0o755),
        cpio.Entry(verify.CAPTURE_MEMBER, stat.S_IFREG | 0o600, CAPTURE_BYTES),
        cpio.Entry("mbrescue/options.json", stat.S_IFREG | 0o644, b'{"unattended_allowed": false}'),
    ]
)


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """A valid archive with some bytes replaced, then maybe cut or spliced."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    how = draw(st.sampled_from(["as is", "cut", "splice"]))
    if how == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=64))
    return bytes(data)


# --- cpio -------------------------------------------------------------------------------------


def test_valid_archive_reads_back() -> None:
    assert [name for name, _, _ in _walk(VALID)] == [
        "mbrescue",
        verify.CAPTURE_MEMBER,
        "mbrescue/options.json",
    ]


@given(st.binary(max_size=2048))
def test_cpio_reader_any_bytes(data: bytes) -> None:
    _bounded(lambda: _walk(data))


@given(st.binary(max_size=600).map(lambda tail: b"070701" + tail))
def test_cpio_reader_bytes_after_the_magic(data: bytes) -> None:
    _bounded(lambda: _walk(data))


@given(mutated(VALID))
def test_cpio_reader_mutated_archive(data: bytes) -> None:
    _bounded(lambda: _walk(data))


def _header(size: int, name_bytes: int) -> bytes:
    fields = [1, stat.S_IFREG | 0o644, 0, 0, 1, 0, size, 0, 0, 0, 0, name_bytes, 0]
    return b"070701" + b"".join(b"%08X" % value for value in fields)


@pytest.mark.parametrize(
    ("size", "name_bytes", "message"),
    [(0xFFFFFFFF, 2, "claims 4294967295 bytes"), (4, 0xFFFFFFFF, "name of 4294967295 bytes")],
)
def test_cpio_header_claiming_4_gib_is_refused_unread(
    size: int, name_bytes: int, message: str
) -> None:
    data = _header(size, name_bytes) + b"x\0" + bytes(64)
    tracemalloc.start()
    try:
        with pytest.raises(MbrescueError, match=message):
            _walk(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < SMALL_HEAP_BYTES, peak


@given(st.sampled_from([b"+0000001", b" 0000001", b"0000_001", b"-0000001", b"0x000001"]))
def test_cpio_fields_must_be_plain_hex(field: bytes) -> None:
    # int(x, 16) takes all of these; the kernel's cpio does not.
    data = bytearray(VALID)
    data[6 + 8 * 6 : 14 + 8 * 6] = field
    with pytest.raises(MbrescueError, match="not hex"):
        _walk(bytes(data))


# --- the payload check --------------------------------------------------------------------------


def _sums(payload: bytes, capture: bytes = CAPTURE_BYTES) -> str:
    return (
        f"{hashlib.sha256(payload).hexdigest()}  payload.img\n"
        f"{hashlib.sha256(capture).hexdigest()}  capture.mbrescue\n"
    )


CAPTURE_SHA256 = hashlib.sha256(CAPTURE_BYTES).hexdigest()


def test_payload_check_of_a_valid_payload(tmp_path: Path) -> None:
    detail = verify.check_payload(
        io.BytesIO(VALID), _sums(VALID), tmp_path, capture_sha256=CAPTURE_SHA256
    )
    assert "the checked capture" in detail and "3 member(s)" in detail
    assert list(tmp_path.iterdir()) == []


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated(VALID))
def test_payload_check_mutated_payload(tmp_path: Path, data: bytes) -> None:
    # The sums match the changed payload, so the check reaches the cpio walk every time.
    _bounded(
        lambda: verify.check_payload(
            io.BytesIO(data), _sums(data), tmp_path, capture_sha256=CAPTURE_SHA256
        )
    )
    assert list(tmp_path.iterdir()) == []  # no copy of a capture left behind


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=1500))
def test_payload_check_deep_any_capture_bytes(tmp_path: Path, capture: bytes) -> None:
    # The whole check, capture reader included, on a payload holding arbitrary capture bytes.
    payload = _archive([cpio.Entry(verify.CAPTURE_MEMBER, stat.S_IFREG | 0o600, capture)])
    _bounded(lambda: verify.check_payload(io.BytesIO(payload), _sums(payload, capture), tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_payload_without_capture_fails(tmp_path: Path) -> None:
    payload = _archive([cpio.Entry("mbrescue/marker", stat.S_IFREG | 0o644, b"x\n")])
    sums = f"{hashlib.sha256(payload).hexdigest()}  payload.img\n"
    with pytest.raises(MbrescueError, match="no capture"):
        verify.check_payload(io.BytesIO(payload), sums, tmp_path)
    # Sums that name a capture the cpio lacks: still no capture.
    with pytest.raises(MbrescueError, match="no capture"):
        verify.check_payload(io.BytesIO(payload), _sums(payload), tmp_path)


def test_payload_with_two_captures_fails(tmp_path: Path) -> None:
    member = cpio.Entry(verify.CAPTURE_MEMBER, stat.S_IFREG | 0o600, CAPTURE_BYTES)
    payload = _archive([member, member])
    with pytest.raises(MbrescueError, match="twice"):
        verify.check_payload(
            io.BytesIO(payload), _sums(payload), tmp_path, capture_sha256=CAPTURE_SHA256
        )


def _with_options(sums: str, options: bytes) -> str:
    return sums + f"{hashlib.sha256(options).hexdigest()}  options.json\n"


def test_payload_whose_options_name_another_capture_fails(tmp_path: Path) -> None:
    # The rescue system reading the capture from the medium checks it against the medium's
    # options.json: one naming another capture would refuse it on the worst day.
    options = json.dumps({"capture_sha256": "0" * 64}).encode()
    with pytest.raises(MbrescueError, match="another capture"):
        verify.check_payload(io.BytesIO(VALID), _with_options(_sums(VALID), options), tmp_path,
                             capture_sha256=CAPTURE_SHA256, options_json=options)


def test_payload_with_matching_options_passes_and_its_copy_must_match(tmp_path: Path) -> None:
    options = json.dumps({"capture_sha256": CAPTURE_SHA256}).encode()
    payload = _archive([
        cpio.Entry(verify.CAPTURE_MEMBER, stat.S_IFREG | 0o600, CAPTURE_BYTES),
        cpio.Entry(verify.OPTIONS_MEMBER, stat.S_IFREG | 0o600, options),
    ])
    detail = verify.check_payload(io.BytesIO(payload), _with_options(_sums(payload), options),
                                  tmp_path, capture_sha256=CAPTURE_SHA256, options_json=options)
    assert "the checked capture" in detail
    # VALID's own options.json is another file: the two copies must be the same bytes.
    with pytest.raises(MbrescueError, match="differs from the medium's"):
        verify.check_payload(io.BytesIO(VALID), _with_options(_sums(VALID), options), tmp_path,
                             capture_sha256=CAPTURE_SHA256, options_json=options)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600))
def test_payload_check_any_options_bytes(tmp_path: Path, options: bytes) -> None:
    _bounded(lambda: verify.check_payload(
        io.BytesIO(VALID), _with_options(_sums(VALID), options), tmp_path,
        capture_sha256=CAPTURE_SHA256, options_json=options))
    assert list(tmp_path.iterdir()) == []


@given(st.text(max_size=400))
def test_parse_sums_any_text(text: str) -> None:
    sums = verify.parse_sums(text)
    assert all(len(digest) == 64 for digest in sums.values())


# --- the El Torito catalog ----------------------------------------------------------------------

BLOCK = 2048


def _iso_head() -> bytes:
    """Blocks 0..19 of an ISO: boot record (16), terminator (17), catalog (19)."""
    data = bytearray(20 * BLOCK)
    record = bytearray(BLOCK)
    record[0:7] = b"\x00CD001\x01"
    record[7:30] = b"EL TORITO SPECIFICATION"
    struct.pack_into("<I", record, 0x47, 19)
    data[16 * BLOCK : 17 * BLOCK] = record
    data[17 * BLOCK : 17 * BLOCK + 7] = b"\xffCD001\x01"
    validation = bytearray(32)
    validation[0], validation[30:32] = 1, b"\x55\xaa"
    struct.pack_into("<H", validation, 28, (-sum(struct.unpack("<16H", validation))) & 0xFFFF)
    catalog = bytearray(BLOCK)
    catalog[0:32] = validation
    catalog[32:64] = struct.pack("<BBHBBHI20x", 0x88, 0, 0, 0, 0, 4, 40)
    catalog[64:96] = struct.pack("<BBH28x", 0x91, 0xEF, 1)
    catalog[96:128] = struct.pack("<BBHBBHI20x", 0x88, 0, 0, 0, 0, 2880, 50)
    data[19 * BLOCK : 20 * BLOCK] = catalog
    return bytes(data)


ISO_HEAD = _iso_head()


def test_catalog_reader_reads_the_synthetic_head() -> None:
    entries = verify.read_boot_catalog(io.BytesIO(ISO_HEAD))
    assert [(e.platform, e.load_block) for e in entries] == [(0, 40), (0xEF, 50)]


@given(st.binary(max_size=4096))
def test_catalog_reader_any_bytes(data: bytes) -> None:
    _bounded(lambda: verify.read_boot_catalog(io.BytesIO(bytes(16 * BLOCK) + data)))


@st.composite
def mutated_head(draw: st.DrawFn) -> bytes:
    data = bytearray(ISO_HEAD)
    # Changes where the structures are: the boot record, the terminator, the catalog.
    for _ in range(draw(st.integers(1, 6))):
        block = draw(st.sampled_from([16, 17, 19]))
        at = block * BLOCK + draw(st.integers(0, 160))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@given(mutated_head())
def test_catalog_reader_mutated_head(data: bytes) -> None:
    _bounded(lambda: verify.read_boot_catalog(io.BytesIO(data)))


def test_sha256_stream_of_a_short_stream_fails() -> None:
    with pytest.raises(MbrescueError, match="ends early"):
        verify.sha256_stream(io.BytesIO(b"abc"), 4 << 30)
