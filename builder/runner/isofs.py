"""ISO 9660 directory records, walked the one way every reader here needs.

A directory's extent holds records one after another; a record never crosses a block
(2048 bytes on a CD), so a zero length byte means the rest of the block is padding.
"""

from __future__ import annotations

from collections.abc import Iterator

ISO_BLOCK = 2048


class BadRecord(ValueError):
    """A directory record that is cut short or runs past the extent."""


def directory_records(data: bytes, block_bytes: int = ISO_BLOCK) -> Iterator[tuple[int, bytes]]:
    """(offset, record) of each directory record in the extent `data`; BadRecord for a
    record shorter than 34 bytes, running past the extent or past its own name."""
    at = 0
    while at < len(data):
        size = data[at]
        if size == 0:
            at = (at // block_bytes + 1) * block_bytes
            continue
        record = data[at : at + size]
        if size < 34 or len(record) < size or 33 + record[32] > size:
            raise BadRecord(f"directory record at byte {at} is malformed")
        yield at, record
        at += size


def record_name(record: bytes) -> bytes:
    """The record's file identifier, as stored (`NAME.EXT;1`, or UCS-2 on Joliet)."""
    return record[33 : 33 + record[32]]
