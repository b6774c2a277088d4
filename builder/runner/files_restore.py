"""The file-level restore path: a new table in the target's geometry, file systems made
again with their captured UUIDs and labels, the captured files unpacked into them.

The region path (plan.py, writer.py) writes the captured bytes back and so needs a disk
with the captured logical sector size that holds the whole region. This path is for
every other disk (a 4Kn replacement, a smaller one) and for `--files`. What it keeps:
the table's kind, partition numbers, types, GPT disk and partition GUIDs and names,
the msdos disk id and active flag (so `PARTUUID=` and NVRAM entries keep working);
each partition's byte offset where it fits; each file system's UUID, label and
features; swap's label and UUID. A boot-chain partition shrinks only when the target
is too small, never below what its files need plus headroom; swap takes what remains.

A BIOS boot loader is kept only when it can stay where it was, with the captured sector
size: the MBR boot code and what it loads are written back at the same sectors. GRUB 2's
core in the post-MBR gap (msdos) or in a BIOS boot partition (which never moves here)
stays even when /boot moves: boot.img names the core's first sector, the core's blocklist
its own sectors, and the core finds /boot by partition number or file-system UUID, both
kept (bootloader.embedded_core); only exactly the core's captured sectors are written to
the gap, and a layout whose partition would cover them is refused. Any other BIOS boot
code (GRUB legacy's stage1.5, an unknown one) is kept only when every boot-chain partition
keeps its start; otherwise a BIOS-only capture is refused. A UEFI capture boots from its
ESP's files.

Order of work (docs/design.md, safety rules 2 and 6; docs/file-level-path.md): checksums of
the region and of every file copy verified, each file system built and checked (`e2fsck -fn`, `fsck.fat -n`, UUID and
label read back) in a scratch directory — all before the plan is shown; after `yes`, what
would make the disk look bootable is zeroed first, the rest written, read back past the
page cache and compared, and only then sector 0, the primary GPT header and the file
systems' first 64 KiB (their superblocks) are written and read back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from . import bootloader, debuglog, gpt, mbr, nvram, stale, swap, untar
from .capfile import Capture
from .console import Console, human_bytes
from .disk import DiskInfo, read_at
from .errors import DoesNotFit, MbrescueError
from .filecopy import (
    EXT_TYPES,
    MOUNTED_TYPES,
    Reference,
    loop_mounted,
    mounted_ro,
    reference_of,
    xattrs_of,
)
from .manifest import BootLoaderRecord, FileCopyRecord, Manifest, PartitionRecord, SwapRecord
from .plan import SUPERBLOCK_SPAN_BYTES, describe_contents, disk_title, erase_lines
from .tarbounds import CopyTarInfo
from .writer import ReadBack, reread_partitions

MiB = 1 << 20
ESP_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
BIOS_BOOT_GUID = "21686148-6449-6e6f-744e-656564454649"
GPT_ENTRIES = 128
GPT_ENTRY_BYTES = 128
GPT_REVISION = 0x00010000
# What a remade file system needs beyond its files' blocks (used_bytes, 4 KiB-rounded):
# the inode table (counted from the captured inode count) and the journal separately; a
# sixteenth for extent and directory blocks, METADATA_BYTES for bitmaps, group descriptors
# and reserved GDT blocks, and HEADROOM_BYTES of free space for the next kernel update.
# An estimate to plan with: mke2fs -d in scratch is the real test, before anything is
# written (docs/file-level-path.md).
METADATA_BYTES = 2 * MiB
HEADROOM_BYTES = 4 * MiB
# mkfs.xfs (xfsprogs 6.x) refuses a file system under 300 MiB; its log is counted whole.
XFS_MIN_BYTES = 300 * MiB
XFS_LOG_BYTES = 64 * MiB
# XFS features filecopy.xfs_params records that mkfs.xfs sets: (option group, name).
XFS_OPTIONS = (("-m", "finobt"), ("-m", "reflink"), ("-m", "rmapbt"), ("-m", "bigtime"),
               ("-m", "inobtcount"), ("-i", "sparse"), ("-i", "nrext64"))
MIN_SWAP_BYTES = 1 * MiB
# FAT32 needs at least 65525 clusters; smaller volumes are FAT16 (or FAT12).
FAT32_MIN_CLUSTERS = 65525
FAT16_MAX_CLUSTERS = 65524
COPY_BLOCK_BYTES = 4 * MiB


@dataclass
class NewPartition:
    source: PartitionRecord
    start_lba: int  # in the target's sectors
    size_sectors: int
    copy: FileCopyRecord | None = None
    swap: SwapRecord | None = None
    raw: bool = False  # a boot-chain partition without a file system (BIOS boot): copied
    ebr_lba: int | None = None  # a logical partition's EBR


@dataclass
class FilesPlan:
    target: DiskInfo
    sector_bytes: int
    table: str
    why: str
    partitions: list[NewPartition]
    keep_boot_code: bool
    adjusted: list[str] = field(default_factory=list)
    recreated: list[str] = field(default_factory=list)
    # Built in scratch: (byte offset on the target, image file) of each file system.
    images: list[tuple[int, Path]] = field(default_factory=list)
    boot_loader: str = ""  # the install method and what this path does with it
    # GRUB 2's core outside the file systems (gap or BIOS boot partition), written back at
    # its captured sectors (bootloader.embedded_core); None for every other boot loader.
    core: BootLoaderRecord | None = None
    # Old GPT/RAID/LVM signatures outside what this path writes (stale.py, safety rule 9).
    erase: list[stale.Stale] = field(default_factory=list)


def why_files(manifest: Manifest, target: DiskInfo, forced: bool) -> str | None:
    """Why the file-level path is taken for this target, or None for the region path."""
    if target.logical_sector_bytes != manifest.source.logical_sector_bytes:
        return (f"the target has {target.logical_sector_bytes}-byte logical sectors, the captured "
                f"disk {manifest.source.logical_sector_bytes}-byte ones")
    if target.size_bytes < manifest.region.length_bytes:
        return (f"the target ({human_bytes(target.size_bytes)}) is smaller than the region "
                f"({human_bytes(manifest.region.length_bytes)})")
    if forced:
        return "asked for (--files)"
    return None


def _need_bytes(copy: FileCopyRecord) -> int:
    fs = copy.fs
    if fs.type == "xfs":
        return max(XFS_MIN_BYTES, fs.used_bytes + fs.used_bytes // 16 + XFS_LOG_BYTES
                   + METADATA_BYTES + HEADROOM_BYTES)
    inode_bytes = (fs.inode_count or 0) * (fs.inode_bytes or 0)
    journal = 4 * MiB if "has_journal" in fs.features else 0
    return (fs.used_bytes + fs.used_bytes // 16 + inode_bytes + journal + METADATA_BYTES
            + HEADROOM_BYTES)


def _align_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def plan_files(capture: Capture, target: DiskInfo, why: str) -> FilesPlan:
    """The new layout and every refusal, before anything is built or written.

    Swap is first given room up to a quarter of the disk (or its captured size); on a disk
    too tight for that, only its minimum (MIN_SWAP_BYTES, and never fewer pages than
    swap.MIN_PAGES), the boot chain shrinking no further than its files plus headroom.
    A disk that fits neither way is refused with the smallest size that would fit."""
    try:
        return _plan_files(capture, target, why, roomy_swap=True)
    except DoesNotFit:
        pass
    try:
        return _plan_files(capture, target, why, roomy_swap=False)
    except DoesNotFit as exc:
        smallest = smallest_disk_bytes(capture, target, why)
        if smallest is None or smallest <= target.size_bytes:
            raise
        raise DoesNotFit(f"{str(exc).removesuffix('; nothing written')}; the smallest disk "
                         f"this capture fits is {human_bytes(smallest)} ({smallest} bytes); "
                         "nothing written") from None


def smallest_disk_bytes(capture: Capture, target: DiskInfo, why: str) -> int | None:
    """The smallest disk (whole MiB) of the target's sector size the layout fits, found by
    bisection over plan sizes; None when not even twice the captured disk fits."""
    def fits(size_mib: int) -> bool:
        disk = dataclasses.replace(target, size_bytes=size_mib * MiB)
        try:
            _plan_files(capture, disk, why, roomy_swap=False)
        except DoesNotFit:
            return False
        return True

    high = max(capture.manifest.source.size_bytes, target.size_bytes) * 2 // MiB + 1
    if not fits(high):
        return None
    low = 1  # does not fit
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high * MiB


def _plan_files(capture: Capture, target: DiskInfo, why: str, roomy_swap: bool) -> FilesPlan:
    manifest = capture.manifest
    old_sector = manifest.source.logical_sector_bytes
    sector = target.logical_sector_bytes
    chain = set(manifest.boot_chain)
    has_esp = any(manifest.partition(n).type.lower() == ESP_GUID for n in chain)
    if sector != 512 and not has_esp:
        raise MbrescueError(f"refusing {target.path}: it has {sector}-byte logical sectors and "
                            "this capture boots by BIOS only (no ESP), and BIOS cannot boot a "
                            "4Kn disk; nothing written")
    copies = {c.partition: c for c in manifest.file_copies}
    swaps = {s.partition: s for s in manifest.swap}
    for number in manifest.boot_chain:
        part = manifest.partition(number)
        if part.fs is not None and number not in copies:
            raise MbrescueError(f"refusing {target.path}: the capture has no file-level copy of "
                                f"partition {number} (made by an older mbrescue); take a new "
                                "capture; nothing written")
    total = target.size_sectors
    entries_sectors = _align_up(GPT_ENTRIES * GPT_ENTRY_BYTES, sector) // sector
    first_usable = 2 + entries_sectors if manifest.table == "gpt" else 1
    last_usable = total - 2 - entries_sectors if manifest.table == "gpt" else total - 1
    plan = FilesPlan(target, sector, manifest.table, why, [], keep_boot_code=False)
    ordered = sorted(manifest.partitions, key=lambda p: p.start_lba)
    chain_parts = [p for p in ordered if p.number in chain]
    others = [p for p in ordered if p.number not in chain]
    # Room kept after the boot chain: a data partition's full size, swap up to a quarter
    # of the disk (roomy) or its minimum.
    def swap_room(part: PartitionRecord) -> int:
        least = max(MIN_SWAP_BYTES, swap.MIN_PAGES * swaps[part.number].page_bytes)
        wanted = max(least, target.size_bytes // 4) if roomy_swap else least
        return min(part.size_sectors * old_sector, wanted)

    swap_reserve = sum(swap_room(p) if p.number in swaps else p.size_sectors * old_sector + MiB
                       for p in others if not p.is_extended)
    cursor = first_usable
    kept_starts = True
    shrunk = False
    extended_start = -1
    end_bytes = (last_usable + 1) * sector
    for index, part in enumerate(chain_parts):
        start_bytes = part.start_lba * old_sector
        kept = max(_align_up(start_bytes, sector) // sector, cursor)
        # Where the partition would start if it moved up to the one before (1 MiB aligned).
        packed = min(kept, _align_up(cursor * sector, MiB) // sector)
        size = part.size_sectors * old_sector // sector
        later_need = sum(_need_bytes(copies[p.number]) if p.number in copies
                         else p.size_sectors * old_sector for p in chain_parts[index + 1:])
        limit = end_bytes - swap_reserve - later_need
        start = kept
        if (kept + size) * sector > limit and part.fs is not None:
            start = packed  # a BIOS boot partition never moves: its core is found by sector
        if start * sector != start_bytes:
            kept_starts = False
            plan.adjusted.append(f"partition {part.number} moved from byte {start_bytes} to "
                                 f"{start * sector}")
        room = limit - start * sector
        if size * sector > room:
            need = _need_bytes(copies[part.number]) if part.number in copies else size * sector
            if room < need:
                used = copies[part.number].fs.used_bytes if part.number in copies else need
                raise DoesNotFit(
                    f"refusing {target.path}: partition {part.number}'s files "
                    f"({human_bytes(used)}, {human_bytes(need)} with headroom) do not fit in "
                    f"the {human_bytes(max(room, 0))} this disk leaves for it; nothing written")
            new_size = room // MiB * MiB // sector
            plan.adjusted.append(f"partition {part.number} shrunk from "
                                 f"{human_bytes(size * sector)} to "
                                 f"{human_bytes(new_size * sector)}")
            size = new_size
            shrunk = True
        plan.partitions.append(NewPartition(part, start, size, copy=copies.get(part.number),
                                            raw=part.fs is None))
        cursor = start + size
    for part in others:
        start_bytes = part.start_lba * old_sector
        orig_size = part.size_sectors * old_sector // sector
        ebr = None
        # Once the boot chain shrank, what follows moves up behind it (1 MiB aligned).
        packed = _align_up(cursor * sector, MiB) // sector
        kept = max(_align_up(start_bytes, sector) // sector, cursor)
        if part.is_extended:
            # The container runs to the disk's end: its logical partitions follow inside.
            start = packed if shrunk else kept
            extended_start = start
            plan.partitions.append(NewPartition(part, start, total - start))
            if start * sector != start_bytes:
                plan.adjusted.append(f"extended partition {part.number} moved to "
                                     f"{human_bytes(start * sector)}")
            cursor = start
            continue
        if part.is_logical:
            # Its EBR sits before it, as captured (the same distance), or 1 MiB before.
            lead = (start_bytes - (part.table_lba or 0) * old_sector) // sector
            lead = lead if lead > 0 else MiB // sector
            if cursor == extended_start:
                ebr = extended_start  # the first EBR is the container's first sector
            else:
                ebr = packed if shrunk else max(
                    _align_up((part.table_lba or 0) * old_sector, sector) // sector, cursor)
            start = ebr + lead
        else:
            start = packed if shrunk or kept > last_usable else kept
        size = min(orig_size, last_usable + 1 - start)
        record = swaps.get(part.number)
        if record is None:
            # Not captured (a data partition): its entry is kept, its contents are not ours.
            if size != orig_size:
                raise DoesNotFit(f"refusing {target.path}: partition {part.number} (not in "
                                 "the boot chain, not swap) does not fit; nothing written")
            plan.partitions.append(NewPartition(part, start, size, ebr_lba=ebr))
            plan.adjusted.append(f"partition {part.number}: entry only (its contents are not "
                                 "in the capture)")
            cursor = start + size
            continue
        if size * sector < max(MIN_SWAP_BYTES, swap.MIN_PAGES * record.page_bytes):
            raise DoesNotFit(f"refusing {target.path}: no room left for swap partition "
                             f"{part.number}; nothing written")
        if size != orig_size or start * sector != start_bytes:
            plan.adjusted.append(f"swap partition {part.number} at {human_bytes(start * sector)}"
                                 f", {human_bytes(size * sector)} (captured: "
                                 f"{human_bytes(start_bytes)}, "
                                 f"{human_bytes(part.size_sectors * old_sector)})")
        plan.partitions.append(NewPartition(part, start, size, swap=record, ebr_lba=ebr))
        cursor = start + size
    # How the boot loader was installed decides whether this path can give it back.
    # A capture made before the manifest recorded it: the same detection on its region.
    loaders = (manifest.boot_loader if manifest.boot_loader is not None
               else bootloader.found_now(manifest, capture.read_region))
    core = bootloader.embedded_core(loaders) if sector == old_sector else None
    if core is not None and not _core_stays(plan, core):
        core = None
    plan.core = core
    plan.keep_boot_code = sector == old_sector and (kept_starts or core is not None)
    cannot = bootloader.cannot_remake(loaders, plan.keep_boot_code)
    if cannot is not None:
        raise MbrescueError(f"refusing {target.path}: the file-level path cannot re-make this "
                            f"boot loader: {cannot}; nothing written (the region path, onto a "
                            "disk with the captured sector size that holds the region, can)")
    bios_code = not any(r.partition is None and r.method == bootloader.NONE for r in loaders)
    moved = [p.source.number for p in plan.partitions
             if p.source.number in chain and p.start_lba * sector != p.source.start_lba
             * old_sector]
    plan.boot_loader = bootloader.summary(loaders) + (
        " (found now in the region: the capture predates the record)"
        if manifest.boot_loader is None else "") + (
        _core_kept_text(core, moved) if core is not None and moved else
        "; the BIOS boot code written back at the same sectors"
        if plan.keep_boot_code and bios_code else "") + (
        "; the ESP's files restored as they were" if has_esp else "")
    if not plan.keep_boot_code and not has_esp:
        raise MbrescueError(f"refusing {target.path}: the boot chain's partitions cannot keep "
                            "their sectors here, and re-making a BIOS boot loader elsewhere is "
                            "not supported yet; nothing written")
    if any(p.raw for p in plan.partitions) and not plan.keep_boot_code:
        plan.adjusted.append("BIOS boot partition left empty (its core cannot move); the "
                             "disk boots by UEFI only")
    return plan


def _core_stays(plan: FilesPlan, core: BootLoaderRecord) -> bool:
    """Whether GRUB 2's core can stay at its captured sectors in the new layout (the same
    sector size): in the gap (msdos) when no partition nor EBR covers it, in a BIOS boot
    partition when that keeps its sectors. Refused when a partition would cover the core."""
    spans: list[tuple[str, int, int]] = []
    for part in plan.partitions:
        if part.source.number == core.core_partition:
            if (part.start_lba, part.size_sectors) != (part.source.start_lba,
                                                       part.source.size_sectors):
                return False  # never so in plan_files: a BIOS boot partition does not move
            continue
        spans.append((f"partition {part.source.number}", part.start_lba,
                      part.start_lba + part.size_sectors - 1))
        if part.ebr_lba is not None:
            spans.append((f"the EBR of partition {part.source.number}", part.ebr_lba,
                          part.ebr_lba))
    if core.core_partition is None and plan.table != "msdos":
        return False  # a GPT's entries take the sectors after the header
    clash = bootloader.core_clash(core, spans)
    if clash is not None:
        raise MbrescueError(f"refusing {plan.target.path}: {clash}; nothing written")
    return True


def _core_kept_text(core: BootLoaderRecord, moved: list[int]) -> str:
    assert core.core_lba is not None and core.core_sectors is not None
    where = ("in the post-MBR gap" if core.core_partition is None
             else f"in BIOS boot partition {core.core_partition}")
    names = ", ".join(str(n) for n in moved)
    return (f"; the MBR boot code and the core {where} kept at sectors {core.core_lba}.."
            f"{core.core_lba + core.core_sectors - 1}; partition{'s' if len(moved) > 1 else ''}"
            f" {names} moved, which the core finds by partition number (its prefix) or file "
            "system UUID, both kept")


# --- building the file systems in scratch ----------------------------------------------


def _run(argv: list[str], ok: tuple[int, ...] = (0,)) -> str:
    env = {"LANG": "C.UTF-8", "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
           "MTOOLS_SKIP_CHECK": "1"}
    debuglog.command(argv)
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=env, check=False)
    except FileNotFoundError as exc:
        raise MbrescueError(f"{argv[0]} not found (Debian: e2fsprogs, dosfstools, mtools)"
                            ) from exc
    if done.returncode not in ok:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise MbrescueError(f"{argv[0]} failed: {lines[-1] if lines else done.returncode}")
    return done.stdout


# An attribute the scratch tree could not hold: (path inside the tree, name, value).
Pending = tuple[str, str, bytes]


def _unpack(capture: Capture, copy: FileCopyRecord, into: Path, scratch: Path) -> list[Pending]:
    """The copy unpacked into `into` (runner/untar.py: no member reaches outside it);
    returns the extended attributes the scratch file system refused (the rescue system's
    tmpfs on Debian 12's kernel keeps no user.*). `into` exists and is empty (a scratch
    folder, or the root of a file system just made); the archive is staged in `scratch`."""
    member = capture.members.get(copy.member)
    if member is None:
        raise MbrescueError(f"{capture.path}: the capture has no {copy.member}")
    packed = scratch / copy.member
    digest = hashlib.sha256()
    fd = os.open(packed, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with open(fd, "w+b") as out:
        for at in range(0, member.size, MiB):
            block = capture.pread(min(MiB, member.size - at), member.offset + at)
            digest.update(block)
            out.write(block)
        if digest.hexdigest() != copy.sha256:
            raise MbrescueError(f"{capture.path}: checksum mismatch in {copy.member}; "
                                "nothing written")
        out.seek(0)
        try:
            unpacked = untar.unpack(out, into, allow_links=copy.fs.type != "vfat",
                                    limits=untar.copy_limits(capture.manifest, copy),
                                    region_bytes=capture.region.length_bytes)
        except MbrescueError as exc:
            raise MbrescueError(f"{copy.member}: {exc}; nothing written") from None
    packed.unlink()
    _fill(capture, [(path, ref) for path, ref, _ in unpacked.references])
    # Filling a file changed its time: set again (the tree holds no symlinked folder).
    for path, _, mtime in unpacked.references:
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    return unpacked.pending


def _fill(capture: Capture, references: list[tuple[Path, Reference]]) -> None:
    """The referenced files (unpacked empty) filled from the region's checked chunks in
    one pass in region order, each then held against its captured SHA-256. A file is open
    only from its first piece to its last (a /boot can hold more files than descriptors)."""
    pieces = sorted((offset, length, logical, number)
                    for number, (_, ref) in enumerate(references)
                    for logical, offset, length in ref.extents)
    left = [len(ref.extents) for _, ref in references]
    chunk_bytes = capture.region.chunk_bytes
    fds: dict[int, int] = {}
    try:
        index, chunk = -1, memoryview(b"")
        for offset, length, logical, number in pieces:
            path, ref = references[number]
            if number not in fds:
                fds[number] = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                os.ftruncate(fds[number], ref.size)
            done = 0
            while done < length:
                if (offset + done) // chunk_bytes != index:
                    index = (offset + done) // chunk_bytes
                    chunk = memoryview(capture.region_chunk(index))
                within = offset + done - index * chunk_bytes
                piece = chunk[within : within + length - done]
                _pwrite_all(fds[number], piece, logical + done, os.fspath(path))
                done += len(piece)
            left[number] -= 1
            if not left[number]:
                os.close(fds.pop(number))
    finally:
        for fd in fds.values():
            os.close(fd)
    for path, ref in references:
        if _file_digest(path) != ref.sha256:
            raise MbrescueError(f"{path.name}: filled from the region, it differs from the "
                                "captured file; nothing written")


def _set_in_image(image: Path, fs_type: str, pending: list[Pending]) -> None:
    """Attributes the scratch tree could not hold, set in the made ext file system itself
    (mounted from scratch; ext4 keeps every namespace), then checked."""
    with loop_mounted(os.fspath(image), 0, fs_type, writable=True) as where:
        for name, key, value in pending:
            try:
                os.setxattr(where / name, key, value, follow_symlinks=False)
            except OSError as exc:
                raise MbrescueError(f"{name}: extended attribute {key} cannot be set "
                                    f"({exc.strerror}); nothing written") from None
    _run(["e2fsck", "-fn", os.fspath(image)])


def _blkid(image: Path) -> dict[str, str]:
    out = _run(["blkid", "-p", "-o", "export", os.fspath(image)], ok=(0, 2))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _make_ext(plan: FilesPlan, part: NewPartition, tree: Path, image: Path) -> None:
    assert part.copy is not None
    fs = part.copy.fs
    block = fs.block_bytes or 4096
    if block < plan.sector_bytes:
        plan.adjusted.append(f"partition {part.source.number}: {fs.type} block size {block} -> "
                             f"{plan.sector_bytes} (a block may not be smaller than a sector)")
        block = plan.sector_bytes
    size_bytes = part.size_sectors * plan.sector_bytes
    features = ",".join(["none", *fs.features])
    argv = ["mke2fs", "-F", "-q", "-t", fs.type, "-U", str(fs.uuid), "-b", str(block),
            "-I", str(fs.inode_bytes), "-O", features, "-E", "lazy_itable_init=0,"
            "lazy_journal_init=0", "-d", os.fspath(tree)]
    if fs.inode_count:
        argv += ["-N", str(fs.inode_count)]
    if fs.label:
        argv += ["-L", fs.label]
    argv += [os.fspath(image), str(size_bytes // block)]
    _run(argv)
    _run(["e2fsck", "-fn", os.fspath(image)])


def _make_vfat(plan: FilesPlan, part: NewPartition, tree: Path, image: Path) -> None:
    assert part.copy is not None
    fs = part.copy.fs
    size_bytes = part.size_sectors * plan.sector_bytes
    bits = fs.fat_bits or 32
    if bits == 32 and size_bytes // plan.sector_bytes < FAT32_MIN_CLUSTERS + 64:
        plan.adjusted.append(f"partition {part.source.number}: FAT32 -> FAT16 ("
                             f"{plan.sector_bytes}-byte sectors leave too few clusters for FAT32)")
        bits = 16
    with open(image, "wb") as out:
        out.truncate(size_bytes)
    argv = ["mkfs.vfat", "-F", str(bits), "-S", str(plan.sector_bytes), "-i", str(fs.volume_id)]
    if bits == 16:
        # mkfs.fat's default cluster for large sectors leaves too few clusters for FAT16:
        # the smallest cluster that keeps the count under FAT16's limit.
        sectors = size_bytes // plan.sector_bytes
        per_cluster = 1
        while sectors // per_cluster > FAT16_MAX_CLUSTERS:
            per_cluster *= 2
        argv += ["-s", str(per_cluster)]
    if fs.label:
        argv += ["-n", fs.label]
    _run([*argv, os.fspath(image)])
    entries = sorted(os.fspath(path) for path in tree.iterdir())
    if entries:
        _run(["mcopy", "-s", "-p", "-m", "-Q", "-i", os.fspath(image), *entries, "::/"])
    _run(["fsck.fat", "-n", os.fspath(image)])


def _make_xfs(capture: Capture, plan: FilesPlan, part: NewPartition, scratch: Path,
              image: Path) -> list[Pending]:
    """mkfs.xfs with the captured UUID, label, sizes and features, the copy unpacked into
    it through a writable loop mount (XFS keeps every attribute namespace), then
    `xfs_repair -n`. The features are the captured ones, which the host's GRUB read."""
    assert part.copy is not None
    fs = part.copy.fs
    unknown = [f for f in fs.features if f.startswith("unknown") or f == "needsrepair"]
    if unknown:
        raise MbrescueError(f"partition {part.source.number}: XFS features {', '.join(unknown)} "
                            "cannot be made again by this mkfs.xfs; nothing written")
    sector = max(fs.sector_bytes or 512, plan.sector_bytes)
    block = max(fs.block_bytes or 4096, sector)
    for what, old, new in (("sector", fs.sector_bytes, sector), ("block", fs.block_bytes, block)):
        if old != new:
            plan.adjusted.append(f"partition {part.source.number}: xfs {what} size {old} -> "
                                 f"{new} (the target's {plan.sector_bytes}-byte sectors)")
    with open(image, "wb") as out:
        out.truncate(part.size_sectors * plan.sector_bytes)
    crc = "crc" in fs.features
    options: dict[str, list[str]] = {"-m": [f"crc={int(crc)}", f"uuid={fs.uuid}"],
                                     "-i": [f"size={fs.inode_bytes}"],
                                     "-n": [f"ftype={int('ftype' in fs.features)}"]}
    if crc:
        for group, name in XFS_OPTIONS:
            if name != "nrext64" or name in fs.features:
                options[group].append(f"{name}={int(name in fs.features)}")
    argv = ["mkfs.xfs", "-f", "-q", "-b", f"size={block}", "-s", f"size={sector}"]
    for group, values in options.items():
        argv += [group, ",".join(values)]
    if fs.label:
        argv += ["-L", fs.label]
    _run([*argv, os.fspath(image)])
    with loop_mounted(os.fspath(image), 0, "xfs", writable=True) as root:
        pending = _unpack(capture, part.copy, root, scratch)
    if pending:
        raise MbrescueError(f"partition {part.source.number}: extended attributes "
                            f"{', '.join(sorted({key for _, key, _ in pending}))} cannot be set "
                            "on the new XFS file system; nothing written")
    _run(["xfs_repair", "-n", "-f", os.fspath(image)])
    return pending


def build_images(capture: Capture, plan: FilesPlan, scratch: Path) -> None:
    """Each boot-chain file system made in scratch, checked, its UUID and label read back."""
    for part in plan.partitions:
        if part.copy is None:
            continue
        fs = part.copy.fs
        tree = scratch / f"tree-p{part.source.number}"
        image = scratch / f"fs-p{part.source.number}.img"
        if fs.type == "xfs":
            pending = _make_xfs(capture, plan, part, scratch, image)
        else:
            tree.mkdir(mode=0o700)
            pending = _unpack(capture, part.copy, tree, scratch)
        if fs.type == "xfs":
            want = {"UUID": str(fs.uuid), "LABEL": fs.label or ""}
        elif fs.type in EXT_TYPES:
            _make_ext(plan, part, tree, image)
            if pending:
                _set_in_image(image, fs.type, pending)
                plan.adjusted.append(
                    f"partition {part.source.number}: {len(pending)} extended attributes "
                    f"({', '.join(sorted({key for _, key, _ in pending}))}) set in the new "
                    "file system directly (this kernel's scratch file system cannot hold them)")
            want = {"UUID": str(fs.uuid), "LABEL": fs.label or ""}
        else:
            _make_vfat(plan, part, tree, image)
            vid = str(fs.volume_id)
            want = {"UUID": f"{vid[:4]}-{vid[4:]}", "LABEL": fs.label or ""}
        shutil.rmtree(tree, ignore_errors=fs.type == "xfs")
        found = _blkid(image)
        for key, value in want.items():
            if found.get(key, "") != value:
                raise MbrescueError(f"partition {part.source.number}: made with {key} "
                                    f"{found.get(key)!r}, not {value!r}; nothing written")
        plan.recreated.append(f"partition {part.source.number}: {fs.type} UUID "
                              f"{want['UUID']}" + (f" label {fs.label!r}" if fs.label else "")
                              + f", {part.copy.file_count} files")
        plan.images.append((part.start_lba * plan.sector_bytes, image))
    for part in plan.partitions:
        if part.swap is not None:
            plan.recreated.append(f"swap on partition {part.source.number}: UUID "
                                  f"{part.swap.uuid}" + (f" label {part.swap.label!r}"
                                                         if part.swap.label else ""))


# --- the partition table ------------------------------------------------------------------


def _mbr_sector(capture: Capture, plan: FilesPlan, entries: list[bytes]) -> bytes:
    sector = bytearray(512)
    if plan.keep_boot_code:
        sector[:440] = capture.read_region(0, 440)
    if plan.table == "msdos":
        sector[440:444] = struct.pack("<I", int(capture.manifest.disk_id, 16))
    for index, entry in enumerate(entries[:4]):
        sector[446 + 16 * index : 462 + 16 * index] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector) + bytes(plan.sector_bytes - 512)


def _ebr_writes(plan: FilesPlan) -> list[tuple[int, bytes]]:
    """The EBR chain: each EBR names its logical partition (relative to the EBR) and the
    next EBR (relative to the extended partition's start)."""
    extended = next((p for p in plan.partitions if p.source.is_extended), None)
    logicals = sorted((p for p in plan.partitions if p.source.is_logical),
                      key=lambda p: p.start_lba)
    if extended is None:
        return []
    writes = []
    for index, part in enumerate(logicals):
        assert part.ebr_lba is not None
        sector = bytearray(plan.sector_bytes)
        sector[446:462] = mbr.encode_entry(0, int(part.source.type, 16),
                                           part.start_lba - part.ebr_lba, part.size_sectors)
        if index + 1 < len(logicals):
            after = logicals[index + 1]
            assert after.ebr_lba is not None
            sector[462:478] = mbr.encode_entry(0, int(extended.source.type, 16),
                                               after.ebr_lba - extended.start_lba,
                                               after.start_lba + after.size_sectors
                                               - after.ebr_lba)
        sector[510:512] = b"\x55\xaa"
        writes.append((part.ebr_lba * plan.sector_bytes, bytes(sector)))
    if not logicals:
        writes.append((extended.start_lba * plan.sector_bytes, bytes(510) + b"\x55\xaa"))
    return writes


def table_writes(capture: Capture, plan: FilesPlan) -> tuple[list[tuple[int, bytes]],
                                                              list[tuple[int, bytes]]]:
    """(offset, bytes) of the table: written with the rest, and written last."""
    sector = plan.sector_bytes
    total = plan.target.size_sectors
    if plan.table == "msdos":
        entries = [bytes(16)] * 4
        for part in plan.partitions:
            number = part.source.number
            if part.source.is_logical:
                continue
            entries[number - 1] = mbr.encode_entry(0x80 if part.source.bootable else 0,
                                                   int(part.source.type, 16), part.start_lba,
                                                   part.size_sectors)
        return _ebr_writes(plan), [(0, _mbr_sector(capture, plan, entries))]
    array = bytearray(GPT_ENTRIES * GPT_ENTRY_BYTES)
    for part in plan.partitions:
        name = (part.source.name or "").encode("utf-16-le")[:72]
        entry = (gpt.parse_guid(part.source.type) + gpt.parse_guid(part.source.guid or "")
                 + struct.pack("<QQQ", part.start_lba, part.start_lba + part.size_sectors - 1,
                               4 if part.source.bootable else 0) + name.ljust(72, b"\0"))
        at = (part.source.number - 1) * GPT_ENTRY_BYTES
        array[at : at + GPT_ENTRY_BYTES] = entry
    entries_sectors = _align_up(len(array), sector) // sector
    padded = bytes(array).ljust(entries_sectors * sector, b"\0")
    entries_crc = zlib.crc32(bytes(array)) & 0xFFFFFFFF
    last = total - 1

    def header(my_lba: int, alternate: int, entries_lba: int) -> bytes:
        raw = bytearray(sector)
        struct.pack_into("<8sIIIIQQQQ16sQIII", raw, 0, b"EFI PART", GPT_REVISION, 92, 0, 0,
                         my_lba, alternate, 2 + entries_sectors, last - 1 - entries_sectors,
                         gpt.parse_guid(capture.manifest.disk_id), entries_lba, GPT_ENTRIES,
                         GPT_ENTRY_BYTES, entries_crc)
        struct.pack_into("<I", raw, 16, gpt.header_crc(bytes(raw), 92))
        return bytes(raw)

    protective = mbr.encode_entry(0, 0xEE, 1, min(total - 1, 0xFFFFFFFF))
    early = [((last - entries_sectors) * sector, padded), (last * sector, header(last, 1,
                                                               last - entries_sectors)),
             (2 * sector, padded)]
    final = [(0, _mbr_sector(capture, plan, [protective]) + header(1, last, 2))]
    return early, final


# --- showing, writing, verifying -----------------------------------------------------------


def show_files_plan(console: Console, plan: FilesPlan) -> None:
    console.say(f"Target {disk_title(plan.target)}")
    console.say("  It holds now:")
    for line in describe_contents(plan.target):
        console.say("    " + line)
    console.say(f"  Restore path: file-level path, because {plan.why}")
    console.say(f"  New {plan.table} table, {plan.sector_bytes}-byte sectors (captured numbers, "
                "types, GUIDs and disk id):")
    for part in plan.partitions:
        what = (part.copy.fs.type if part.copy else "swap" if part.swap else "extended"
                if part.source.is_extended else "entry only" if not part.raw else "raw copy"
                if plan.keep_boot_code else "left empty")
        console.say(f"    partition {part.source.number}: sectors {part.start_lba}.."
                    f"{part.start_lba + part.size_sectors - 1} "
                    f"({human_bytes(part.size_sectors * plan.sector_bytes)}), {what}")
    console.say(f"  Boot loader: {plan.boot_loader}")
    for line in plan.adjusted:
        console.say("  Will adjust: " + line)
    for line in plan.recreated:
        console.say("  Will recreate: " + line)
    if plan.keep_boot_code:
        console.say("  Will write back: the MBR boot code and the boot loader's sectors as "
                    "captured")
    for line in erase_lines(plan.erase, plan.sector_bytes):
        console.say("  Will erase: " + line)
    console.say("  Written last, once the rest reads back right (until then the disk does not "
                "look bootable): sector 0" + (" and the primary GPT header" if plan.table ==
                                              "gpt" else "") + ", the file systems' superblocks")


def _swap_headers(plan: FilesPlan) -> list[tuple[int, bytes]]:
    return [(part.start_lba * plan.sector_bytes,
             swap.make_swap_header(part.size_sectors * plan.sector_bytes, part.swap.page_bytes,
                                   part.swap.uuid, part.swap.label))
            for part in plan.partitions if part.swap is not None]


def written_ranges(capture: Capture, plan: FilesPlan) -> stale.Ranges:
    """Every byte range this path writes: the table, the file systems' images, swap
    headers, the boot loader's sectors."""
    early, final = table_writes(capture, plan)
    pieces = [*early, *final, *_swap_headers(plan), *_boot_loader_writes(capture, plan)]
    return ([(offset, len(data)) for offset, data in pieces]
            + [(offset, image.stat().st_size) for offset, image in plan.images])


def kept_ranges(plan: FilesPlan) -> stale.Ranges:
    """Partitions this path makes an entry for and leaves as the target has them."""
    sector = plan.sector_bytes
    return [(p.start_lba * sector, p.size_sectors * sector) for p in plan.partitions
            if p.copy is None and p.swap is None and not p.raw and not p.source.is_extended]


def plan_erase(capture: Capture, plan: FilesPlan) -> list[stale.Stale]:
    return stale.plan_erase(lambda at, n: read_at(plan.target.path, at, n),
                            plan.target.size_bytes, plan.sector_bytes,
                            written_ranges(capture, plan), kept_ranges(plan))


def _boot_loader_writes(capture: Capture, plan: FilesPlan) -> list[tuple[int, bytes]]:
    """The post-MBR gap (msdos) and BIOS boot partitions, as captured, when they stay put:
    of GRUB 2's core in the gap exactly its sectors, else the gap up to the first partition."""
    if not plan.keep_boot_code:
        return []
    writes = []
    sector = plan.sector_bytes
    core = plan.core
    if core is not None and core.core_partition is None:
        assert core.core_lba is not None and core.core_sectors is not None
        writes.append((core.core_lba * sector, capture.read_region(
            core.core_lba * sector, core.core_sectors * sector)))
    elif plan.table == "msdos":
        first = min(p.start_lba for p in plan.partitions)
        if first > 1:
            writes.append((sector, capture.read_region(sector, (first - 1) * sector)))
    for part in plan.partitions:
        if part.raw:
            length = part.source.size_sectors * sector
            writes.append((part.start_lba * sector, capture.read_region(
                part.source.start_lba * sector, length)))
    return writes


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, path: str) -> None:
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    except OSError as exc:
        raise MbrescueError(f"write error on {path} at byte {offset}: {exc.strerror}") from exc


def _image_pieces(offset: int, image: Path, skip_head: bool) -> list[tuple[int, bytes]]:
    pieces = []
    size = image.stat().st_size
    head = SUPERBLOCK_SPAN_BYTES
    with open(image, "rb") as stream:
        start = head if skip_head else 0
        end = size if skip_head else head
        for at in range(start, end, COPY_BLOCK_BYTES):
            stream.seek(at)
            pieces.append((offset + at, stream.read(min(COPY_BLOCK_BYTES, end - at))))
    return pieces


def _write_and_verify(fd: int, plan: FilesPlan, writes: list[tuple[int, bytes]],
                      what: str) -> None:
    for offset, data in writes:
        _pwrite_all(fd, data, offset, plan.target.path)
    os.fsync(fd)
    reader = ReadBack(plan.target.path, plan.target.kind)
    try:
        for offset, data in writes:
            if reader.read(offset, len(data)) != data:
                raise MbrescueError(f"{plan.target.path}: {what} at byte {offset} did not read "
                                    "back as written; the restore is incomplete")
    finally:
        reader.close()


def execute(capture: Capture, plan: FilesPlan, console: Console) -> None:
    sector = plan.sector_bytes
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_EXCL if plan.target.kind == "block" else 0)
    try:
        fd = os.open(plan.target.path, flags)
    except OSError as exc:
        raise MbrescueError(f"cannot open {plan.target.path} for writing: {exc.strerror}"
                            ) from exc
    try:
        early_table, final_table = table_writes(capture, plan)
        # What makes the disk look bootable goes first as zeros, last as data (rule 6).
        heads = [(offset, bytes(SUPERBLOCK_SPAN_BYTES)) for offset, _ in plan.images]
        # The stale signatures go first too (safety rule 9); they make nothing bootable.
        _write_and_verify(fd, plan, [*stale.erase_writes(plan.erase),
                                     (0, bytes(sector * (2 if plan.table == "gpt" else 1))),
                                     *heads], "the cleared start")
        rest: list[tuple[int, bytes]] = []
        for offset, image in plan.images:
            rest += _image_pieces(offset, image, skip_head=True)
        rest += _swap_headers(plan)
        rest += _boot_loader_writes(capture, plan) + early_table
        console.say(f"mbrescue: writing {sum(len(d) for _, d in rest)} bytes ...")
        _write_and_verify(fd, plan, rest, "the data")
        last: list[tuple[int, bytes]] = []
        for offset, image in plan.images:
            last += _image_pieces(offset, image, skip_head=False)
        _write_and_verify(fd, plan, last + final_table, "the superblocks and table")
    finally:
        os.close(fd)
    check_target(plan)
    reader = ReadBack(plan.target.path, plan.target.kind)
    try:
        stale.check_erased(reader.read, plan.target.size_bytes, sector, plan.target.path,
                           written_ranges(capture, plan), kept_ranges(plan))
    finally:
        reader.close()
    reread_partitions(plan.target, console)


def _member_digest(archive: tarfile.TarFile, info: tarfile.TarInfo) -> str:
    stream = archive.extractfile(info)
    assert stream is not None
    digest = hashlib.sha256()
    while block := stream.read(MiB):
        digest.update(block)
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def compare_tree(capture: Capture, copy: FileCopyRecord, root: Path, owners: bool) -> int:
    """Every captured file against the tree at root: type, content, link target, and (ext)
    mode, owner, mtime, extended attributes, hard links; returns the number compared."""
    member = capture.members[copy.member]
    compared = 0
    with tempfile.TemporaryFile() as packed:
        for at in range(0, member.size, MiB):
            packed.write(capture.pread(min(MiB, member.size - at), member.offset + at))
        packed.seek(0)
        with tarfile.open(fileobj=packed, mode="r:gz", tarinfo=CopyTarInfo) as archive:
            for info in archive:
                path = root / info.name
                problem = None
                try:
                    st = os.lstat(path)
                except OSError:
                    st = None
                    problem = "missing"
                reference = reference_of(info, capture.region.length_bytes)
                if st is not None and info.isreg() and (
                        not stat.S_ISREG(st.st_mode)
                        or st.st_size != (reference.size if reference else info.size)
                        or _file_digest(path) != (reference.sha256 if reference
                                                  else _member_digest(archive, info))):
                    problem = "content differs"
                elif st is not None and info.issym() and os.readlink(path) != info.linkname:
                    problem = "link target differs"
                elif st is not None and info.islnk() and not os.path.samefile(
                        path, root / info.linkname):
                    problem = "hard link lost"
                elif st is not None and owners and not info.islnk() and (
                        stat.S_IMODE(st.st_mode) != info.mode or st.st_uid != info.uid
                        or st.st_gid != info.gid
                        or (not info.isdir() and int(st.st_mtime) != int(info.mtime))):
                    problem = "mode, owner or time differs"
                elif st is not None and owners:
                    for key, value in xattrs_of(info).items():
                        if os.getxattr(path, key, follow_symlinks=False) != value:
                            problem = f"extended attribute {key} differs"
                if problem:
                    raise MbrescueError(f"partition {copy.partition}: /{info.name}: {problem} "
                                        "after the restore")
                compared += 1
    return compared


def verify_files(capture: Capture, plan: FilesPlan) -> int:
    """The restored files read back from the target and compared with the capture."""
    compared = 0
    for part in plan.partitions:
        if part.copy is None:
            continue
        offset = part.start_lba * plan.sector_bytes
        if part.copy.fs.type in MOUNTED_TYPES:
            with mounted_ro(plan.target.path, offset, part.copy.fs.type) as root:
                if root is None:
                    continue  # no loop devices here: e2fsck and the read-back stand
                compared += compare_tree(capture, part.copy, root, owners=True)
        else:
            with tempfile.TemporaryDirectory(prefix="mbrescue-check-") as where:
                _run(["mcopy", "-s", "-n", "-i", f"{plan.target.path}@@{offset}", "::/",
                      where + "/"])
                compared += compare_tree(capture, part.copy, Path(where), owners=False)
    return compared


def check_target(plan: FilesPlan) -> None:
    """The written file systems judged on the target itself (e2fsck -fn, xfs_repair -n),
    UUIDs and labels."""
    for part in plan.partitions:
        if part.copy is None:
            continue
        offset = part.start_lba * plan.sector_bytes
        if part.copy.fs.type in EXT_TYPES:
            _run(["e2fsck", "-fn", f"{plan.target.path}?offset={offset}"])
        elif part.copy.fs.type == "xfs":
            # xfs_repair takes no offset: a read-only loop device at the partition.
            loop = _run(["losetup", "--find", "--show", "--read-only", "--offset", str(offset),
                         "--sizelimit", str(part.size_sectors * plan.sector_bytes),
                         plan.target.path]).strip()
            try:
                _run(["xfs_repair", "-n", loop])
            finally:
                _run(["losetup", "--detach", loop])
        found = _run(["blkid", "-p", "-o", "export", "-O", str(offset), plan.target.path],
                     ok=(0, 2))
        vid = str(part.copy.fs.volume_id)
        want = part.copy.fs.uuid or f"{vid[:4]}-{vid[4:]}"
        if f"UUID={want}" not in found.splitlines():
            raise MbrescueError(f"{plan.target.path}: partition {part.source.number} does not "
                                f"read back with UUID {want}")



def scratch_need(plan: FilesPlan) -> int:
    """Bytes the scratch folder needs, about: for each new file system its unpacked files
    (ext and FAT are made from a tree) and its sparse image's written blocks (the files
    again, the inode table, the journal or XFS log, metadata), never more than the images'
    full sizes. Not their full sizes: the rescue system's scratch is RAM (tmpfs)."""
    need = 0
    for part in plan.partitions:
        if part.copy is None or part.raw:
            continue
        fs = part.copy.fs
        tree = fs.used_bytes if fs.type != "xfs" else 0  # XFS is filled in place
        log = XFS_LOG_BYTES if fs.type == "xfs" else (
            4 * MiB if "has_journal" in fs.features else 0)
        image = (fs.used_bytes + fs.used_bytes // 16 + (fs.inode_count or 0)
                 * (fs.inode_bytes or 0) + log + METADATA_BYTES)
        need += tree + min(image, part.size_sectors * plan.sector_bytes)
    return need


def scratch_line(plan: FilesPlan, scratch: Path) -> str:
    """Where the scratch goes and how much it needs: refused up front when its file system
    has less free space (not a bare `mke2fs … No space left on device` later)."""
    need = scratch_need(plan)
    st = os.statvfs(scratch)
    free = st.f_bavail * st.f_frsize
    where = (f"a scratch folder in {scratch.parent} ($TMPDIR): about {human_bytes(need)} "
             f"(sparse images), {human_bytes(free)} free there")
    if free < need:
        raise MbrescueError(f"the file-level path builds the file systems in {where}; "
                            "nothing written",
                            hint="point TMPDIR at a file system with that much free space")
    return f"mbrescue: file-level path: making the file systems in {where} ..."


def run(capture: Capture, target: DiskInfo, why: str, console: Console, assume_yes: bool,
        writing: list[str], firmware: bool = False) -> int:
    """The whole file-level restore onto target, after the capture's checksums were verified
    (restore.py): plan, build in scratch, show, ask, write, verify. `firmware`: the rescue
    system, whose firmware gets a boot entry for the new ESP if it has none (nvram.py)."""
    plan = plan_files(capture, target, why)
    placed = {p.source.number: (p.start_lba, p.size_sectors) for p in plan.partitions}
    entry = (nvram.plan_for_target(nvram.esp_of(capture.manifest, placed), target.path,
                                   target.kind) if firmware else None)
    with tempfile.TemporaryDirectory(prefix="mbrescue-restore-") as scratch:
        console.say(scratch_line(plan, Path(scratch)))  # refuses a scratch too small
        build_images(capture, plan, Path(scratch))
        plan.erase = plan_erase(capture, plan)
        show_files_plan(console, plan)
        if entry is not None:
            console.say(entry.plan_line())
        if not assume_yes:
            answer = console.ask(f"Type yes to write {target.path} (a new partition table and "
                                 "file systems; everything on it is lost): ")
            if answer != "yes":
                raise MbrescueError("aborted, nothing written")
        writing.append(target.path)
        execute(capture, plan, console)
    compared = verify_files(capture, plan)
    console.say(f"mbrescue: verified: {compared} files read back from {target.path} as captured "
                "(content; owners, modes, times, links and extended attributes on ext)")
    for line in plan.adjusted:
        console.say("mbrescue: adjusted: " + line)
    for line in plan.recreated:
        console.say("mbrescue: recreated: " + line)
    for item in plan.erase:
        console.say("mbrescue: erased: stale " + item.text(plan.sector_bytes))
    nvram.finish(console, entry)  # last, once verified (see restore.py)
    console.say(f"mbrescue: restore complete: {target.path} holds the boot chain of "
                f"{capture.manifest.hostname} (file-level path)")
    return 0
