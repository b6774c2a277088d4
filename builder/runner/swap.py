"""Write a Linux swap header (format v1, "SWAPSPACE2") the way mkswap does.

Swap is not part of the captured region (its contents are worthless after a
reboot), but fstab names it by LABEL= or UUID=, so restore recreates it with the
captured label and UUID. Doing it here rather than calling mkswap keeps the
rescue system free of util-linux and lets a test compare bytes with mkswap's.

Layout of the first page: 1024 bytes of boot-block space, then version (1),
last_page, nr_badpages (0), a 16-byte UUID, a 16-byte label, and the magic
`SWAPSPACE2` in the page's last 10 bytes. The page size is the kernel's, and
where the magic sits is how readers learn it.
"""

from __future__ import annotations

import struct

from .errors import MbrescueError

MAGIC = b"SWAPSPACE2"
LABEL_BYTES = 16
# mkswap refuses fewer than 10 pages; the kernel would have nothing to use anyway.
MIN_PAGES = 10


def uuid_bytes(uuid: str) -> bytes:
    """The 16 stored bytes of a UUID in blkid's text form (stored in text order)."""
    digits = uuid.replace("-", "")
    # bytes.fromhex skips whitespace: "00 " * 10 would give 11 bytes, not an error.
    if len(digits) != 32 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise MbrescueError(f"not a UUID: {uuid!r}")
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise MbrescueError(f"not a UUID: {uuid!r}") from None


def make_swap_header(size_bytes: int, page_bytes: int, uuid: str, label: str | None) -> bytes:
    """One page holding a v1 swap header for a swap area of `size_bytes`."""
    if page_bytes < 4096 or page_bytes > 65536 or page_bytes & (page_bytes - 1):
        raise MbrescueError(f"unsupported swap page size {page_bytes}")
    pages = size_bytes // page_bytes
    if pages < MIN_PAGES:
        raise MbrescueError(
            f"a swap area of {size_bytes} bytes is too small (at least {MIN_PAGES} pages)"
        )
    # last_page is a 32-bit field; mkswap caps the usable area there as well.
    last_page = min(pages - 1, 0xFFFFFFFF)
    label_raw = (label or "").encode()
    if len(label_raw) > LABEL_BYTES:
        raise MbrescueError(f"swap label {label!r} is longer than {LABEL_BYTES} bytes")
    page = bytearray(page_bytes)
    struct.pack_into("<III", page, 1024, 1, last_page, 0)
    page[1036:1052] = uuid_bytes(uuid)
    page[1052 : 1052 + len(label_raw)] = label_raw
    page[page_bytes - len(MAGIC) :] = MAGIC
    return bytes(page)
