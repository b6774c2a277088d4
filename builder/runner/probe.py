"""Recognise file systems and swap by their own superblocks, as blkid does.

The partition type byte says what a partition was meant to hold, not what it
holds; the manifest and the restore plan want the truth (a swap's LABEL and
UUID are what fstab names). Labels and UUIDs are formatted exactly as
`blkid -p -o export` prints them, so the two can be compared in tests and by
administrators.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .disk import read_at
from .errors import MbrescueError

# ext feature bits (<ext2_fs.h>) that decide ext2 / ext3 / ext4 the way libblkid does.
EXT3_FEATURE_COMPAT_HAS_JOURNAL = 0x0004
EXT3_FEATURE_INCOMPAT_RECOVER = 0x0004
EXT3_FEATURE_INCOMPAT_JOURNAL_DEV = 0x0008
EXT2_FEATURE_INCOMPAT_FILETYPE = 0x0002
EXT2_FEATURE_INCOMPAT_META_BG = 0x0010
EXT2_FEATURE_RO_COMPAT_SUPP = 0x0001 | 0x0002 | 0x0004  # sparse_super, large_file, btree_dir
EXT2_FEATURE_INCOMPAT_SUPP = EXT2_FEATURE_INCOMPAT_FILETYPE | EXT2_FEATURE_INCOMPAT_META_BG
EXT3_FEATURE_INCOMPAT_SUPP = EXT2_FEATURE_INCOMPAT_SUPP | EXT3_FEATURE_INCOMPAT_RECOVER
EXT_MAGIC = 0xEF53

SWAP_PAGE_SIZES = (4096, 8192, 16384, 32768, 65536)
SUSPEND_SIGNATURES = (b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND", b"LINHIB0001")


@dataclass
class FsInfo:
    type: str  # "ext2", "ext3", "ext4", "vfat", "xfs", "swap", "swsuspend"
    label: str | None
    uuid: str | None
    block_bytes: int | None = None  # ext/xfs block, FAT cluster
    inode_bytes: int | None = None
    swap_page_bytes: int | None = None
    swap_version: int | None = None
    swap_last_page: int | None = None
    version: str | None = None  # "FAT12"/"FAT16"/"FAT32" for vfat, as blkid's VERSION


class _Window:
    """Reads inside (offset, length) of a source; past the window's end there is nothing."""

    def __init__(self, fd: int, offset_bytes: int, length_bytes: int) -> None:
        self.fd = fd
        self.offset_bytes = offset_bytes
        self.length_bytes = length_bytes

    def read(self, offset: int, length: int) -> bytes | None:
        if offset < 0 or offset + length > self.length_bytes:
            return None
        return read_at(self.fd, self.offset_bytes + offset, length)


def format_uuid(raw: bytes) -> str:
    """A 16-byte UUID as stored by ext/xfs/swap (big-endian fields): blkid's text."""
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _label(raw: bytes) -> str | None:
    text = raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return text or None


def _probe_ext(window: _Window) -> FsInfo | None:
    superblock = window.read(1024, 1024)
    if superblock is None or struct.unpack_from("<H", superblock, 0x38)[0] != EXT_MAGIC:
        return None
    log_block = struct.unpack_from("<I", superblock, 0x18)[0]
    rev_level = struct.unpack_from("<I", superblock, 0x4C)[0]
    inode_bytes = struct.unpack_from("<H", superblock, 0x58)[0] if rev_level >= 1 else 128
    compat, incompat, ro_compat = struct.unpack_from("<III", superblock, 0x5C)
    if incompat & EXT3_FEATURE_INCOMPAT_JOURNAL_DEV:
        fs_type = "jbd"
    elif compat & EXT3_FEATURE_COMPAT_HAS_JOURNAL:
        plain = not (ro_compat & ~EXT2_FEATURE_RO_COMPAT_SUPP) and not (
            incompat & ~EXT3_FEATURE_INCOMPAT_SUPP
        )
        fs_type = "ext3" if plain else "ext4"
    else:
        plain = not (ro_compat & ~EXT2_FEATURE_RO_COMPAT_SUPP) and not (
            incompat & ~EXT2_FEATURE_INCOMPAT_SUPP
        )
        fs_type = "ext2" if plain else "ext4"
    uuid_raw = superblock[0x68:0x78]
    return FsInfo(
        type=fs_type,
        label=_label(superblock[0x78:0x88]),
        uuid=format_uuid(uuid_raw) if any(uuid_raw) else None,
        block_bytes=1024 << log_block if log_block < 16 else None,
        inode_bytes=inode_bytes,
    )


def _probe_xfs(window: _Window) -> FsInfo | None:
    superblock = window.read(0, 512)
    if superblock is None or superblock[:4] != b"XFSB":
        return None
    block_bytes = struct.unpack_from(">I", superblock, 4)[0]
    inode_bytes = struct.unpack_from(">H", superblock, 104)[0]
    uuid_raw = superblock[32:48]
    return FsInfo(
        type="xfs",
        label=_label(superblock[108:120]),
        uuid=format_uuid(uuid_raw) if any(uuid_raw) else None,
        block_bytes=block_bytes,
        inode_bytes=inode_bytes,
    )


def _probe_swap(window: _Window) -> FsInfo | None:
    for page_bytes in SWAP_PAGE_SIZES:
        tail = window.read(page_bytes - 10, 10)
        if tail is None:
            return None
        if tail == b"SWAP-SPACE":
            # The old v0 format: a bitmap, no label and no UUID.
            return FsInfo("swap", None, None, swap_page_bytes=page_bytes, swap_version=0)
        suspended = any(tail.endswith(signature) for signature in SUSPEND_SIGNATURES)
        if tail != b"SWAPSPACE2" and not suspended:
            continue
        header = window.read(1024, 1024 + 16 + 16)
        assert header is not None  # the page itself is inside the window
        version, last_page, _bad = struct.unpack_from("<III", header, 0)
        if version != 1 or last_page == 0:
            # libblkid's rule: a v1 signature with another version or no pages is no swap.
            return None
        uuid_raw = header[12:28]
        return FsInfo(
            type="swsuspend" if suspended else "swap",
            label=_label(header[28:44]),
            uuid=format_uuid(uuid_raw) if any(uuid_raw) else None,
            swap_page_bytes=page_bytes,
            swap_version=version,
            swap_last_page=last_page,
        )
    return None


def _probe_vfat(window: _Window) -> FsInfo | None:
    boot = window.read(0, 512)
    if boot is None or boot[510:512] != b"\x55\xaa":
        return None
    sector_bytes, sectors_per_cluster, reserved_sectors, fat_count, root_entries = (
        struct.unpack_from("<HBHBH", boot, 0x0B)
    )
    total16, media, fat16_sectors = struct.unpack_from("<HBH", boot, 0x13)
    total32 = struct.unpack_from("<I", boot, 0x20)[0]
    if sector_bytes not in (512, 1024, 2048, 4096) or sectors_per_cluster not in (
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
    ):
        return None
    if reserved_sectors == 0 or fat_count not in (1, 2) or (media < 0xF8 and media != 0xF0):
        return None
    if fat16_sectors:
        fat_sectors = fat16_sectors
        volume_id_offset, label_offset = 0x27, 0x2B
        has_serial = boot[0x26] in (0x28, 0x29)
    else:
        fat_sectors = struct.unpack_from("<I", boot, 0x24)[0]
        volume_id_offset, label_offset = 0x43, 0x47
        has_serial = boot[0x42] in (0x28, 0x29)
        if fat_sectors == 0:
            return None
    total_sectors = total16 or total32
    root_dir_sectors = (root_entries * 32 + sector_bytes - 1) // sector_bytes
    first_data_sector = reserved_sectors + fat_count * fat_sectors + root_dir_sectors
    if total_sectors <= first_data_sector:
        return None
    clusters = (total_sectors - first_data_sector) // sectors_per_cluster
    # Microsoft's rule: the cluster count alone says FAT12, FAT16 or FAT32.
    if fat16_sectors == 0:
        version = "FAT32"
    elif clusters < 4085:
        version = "FAT12"
    else:
        version = "FAT16"
    volume_id = boot[volume_id_offset : volume_id_offset + 4] if has_serial else None
    uuid = None
    if volume_id is not None:
        uuid = f"{volume_id[3]:02X}{volume_id[2]:02X}-{volume_id[1]:02X}{volume_id[0]:02X}"
    # blkid prefers the root directory's volume-label entry to the boot sector's copy.
    label = _fat_root_label(
        window, boot, sector_bytes, sectors_per_cluster, reserved_sectors, fat_count, fat_sectors
    )
    if label is None and has_serial:
        label = _fat_label_text(boot[label_offset : label_offset + 11])
    return FsInfo(
        type="vfat",
        label=label,
        uuid=uuid,
        block_bytes=sector_bytes * sectors_per_cluster,
        version=version,
    )


def _fat_label_text(raw: bytes) -> str | None:
    text = raw.decode("cp437", errors="replace").rstrip(" \0")
    # mkfs.vfat writes "NO NAME" when there is no label; blkid shows none then.
    return None if not text or text == "NO NAME" else text


def _fat_root_label(
    window: _Window,
    boot: bytes,
    sector_bytes: int,
    sectors_per_cluster: int,
    reserved_sectors: int,
    fat_count: int,
    fat_sectors: int,
) -> str | None:
    root_entries = struct.unpack_from("<H", boot, 0x11)[0]
    fat_start = reserved_sectors * sector_bytes
    data_start = fat_start + fat_count * fat_sectors * sector_bytes
    if root_entries:
        chunks = [window.read(data_start, root_entries * 32)]
    else:
        # FAT32: the root directory is a cluster chain; a label sits in its first clusters.
        cluster_bytes = sector_bytes * sectors_per_cluster
        cluster = struct.unpack_from("<I", boot, 0x2C)[0]
        chunks = []
        for _ in range(16):
            if not 2 <= cluster < 0x0FFFFFF7:
                break
            chunks.append(window.read(data_start + (cluster - 2) * cluster_bytes, cluster_bytes))
            link = window.read(fat_start + cluster * 4, 4)
            if link is None:
                break
            cluster = struct.unpack("<I", link)[0] & 0x0FFFFFFF
    for chunk in chunks:
        if chunk is None:
            return None
        for offset in range(0, len(chunk) - 31, 32):
            entry = chunk[offset : offset + 32]
            if entry[0] == 0:
                return None
            attributes = entry[11]
            if entry[0] == 0xE5 or attributes & 0x0F == 0x0F:
                continue  # deleted entry or a long-name piece
            if attributes & 0x08:
                return _fat_label_text(entry[:11])
    return None


def probe(path: str | int, offset_bytes: int, length_bytes: int) -> FsInfo | None:
    """The file system or swap found at (offset, length) of a source, or None."""
    if offset_bytes < 0 or length_bytes <= 0:
        raise MbrescueError(f"bad probe window: offset {offset_bytes}, length {length_bytes}")
    if isinstance(path, int):
        return _probe_fd(path, offset_bytes, length_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MbrescueError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        return _probe_fd(fd, offset_bytes, length_bytes)
    finally:
        os.close(fd)


def _probe_fd(fd: int, offset_bytes: int, length_bytes: int) -> FsInfo | None:
    # A window past the source's end (a partition beyond a truncated image) holds nothing.
    source_bytes = os.lseek(fd, 0, os.SEEK_END)
    length_bytes = max(0, min(length_bytes, source_bytes - offset_bytes))
    window = _Window(fd, offset_bytes, length_bytes)
    # Strong magics first; FAT has the weakest signature and comes last.
    for prober in (_probe_ext, _probe_xfs, _probe_swap, _probe_vfat):
        found = prober(window)
        if found is not None:
            return found
    return None
