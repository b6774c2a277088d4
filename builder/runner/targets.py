"""Which disks may receive the region, in which order, and why the others may not.

Safety rule 1 lives here: the medium the rescue system booted from is never a
candidate (matched by the ISO's volume ids in its primary volume descriptor, its
serial or its path), CD drives never are, and a disk whose partitions are mounted
or used as swap is refused, as are read-only disks. Size and sector-size checks
belong to the plan (restore.py), which also knows about partitions to shrink.
Candidates are ranked: the captured disk's identity (serial/WWN) first, then disks
of the captured size, then any disk large enough.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .disk import DiskInfo, read_at
from .errors import MbrescueError

ISO_PVD_OFFSET = 16 * 2048  # ISO9660 sector 16, whatever the disk's sector size
PROC_MOUNTS = "/proc/mounts"
PROC_SWAPS = "/proc/swaps"


def iso_volume_ids(path: str) -> list[str]:
    """Volume id, volume set id and application id of an ISO9660 primary volume
    descriptor at byte 32768, or [] when there is none (or the disk is unreadable)."""
    try:
        pvd = read_at(path, ISO_PVD_OFFSET, 2048)
    except MbrescueError:
        return []
    if pvd[0] != 1 or pvd[1:6] != b"CD001":
        return []
    fields = (pvd[40:72], pvd[190:318], pvd[574:702])
    return [raw.decode("ascii", errors="replace").strip() for raw in fields if raw.strip(b" \0")]


def is_medium(disk: DiskInfo, medium_id: str | None) -> bool:
    """Is this the disk the rescue system came from (`mbrescue.medium=ID`)?"""
    if not medium_id:
        return False
    if medium_id in (disk.path, disk.serial, disk.wwn):
        return True
    if medium_id.startswith("/dev/") and os.path.exists(medium_id) and os.path.exists(disk.path):
        if os.path.realpath(medium_id) == os.path.realpath(disk.path):
            return True
    # ISO9660 d-characters are upper case; a writer may have folded the id.
    return any(medium_id.upper() in volume_id.upper() for volume_id in iso_volume_ids(disk.path))


def matches(disk: DiskInfo, wanted: str) -> bool:
    """`mbrescue.target=` names a disk by path, serial or WWN."""
    if wanted in (disk.path, disk.serial, disk.wwn, disk.name):
        return True
    return (
        wanted.startswith("/dev/")
        and os.path.exists(wanted)
        and os.path.realpath(wanted) == os.path.realpath(disk.path)
    )


def _block_names(disk: DiskInfo) -> set[str]:
    """The kernel names of a whole disk and its partitions."""
    if not disk.name:
        return set()
    names = {disk.name}
    base = os.path.join("/sys/block", disk.name)
    try:
        for entry in os.listdir(base):
            if os.path.exists(os.path.join(base, entry, "partition")):
                names.add(entry)
    except OSError:
        pass
    return names


def _loops_backed_by(path: str) -> list[DiskInfo]:
    """Loop devices whose backing file is this image (a mounted one makes it busy)."""
    found = []
    real = os.path.realpath(path)
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return []
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as handle:
                backing = handle.read().strip()
        except OSError:
            continue
        if backing == real:
            found.append(DiskInfo(f"/dev/{name}", "block", 0, 512, 512, name=name))
    return found


def _device_names_in(table_path: str) -> set[str]:
    """Kernel names of the block devices named in /proc/mounts or /proc/swaps."""
    names: set[str] = set()
    try:
        with open(table_path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return names
    for line in lines:
        fields = line.split()
        if not fields or not fields[0].startswith("/"):
            continue
        device = fields[0].replace("\\040", " ")
        try:
            st = os.stat(device)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode):
            link = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            names.add(os.path.basename(os.path.realpath(link)))
    return names


def busy_reason(disk: DiskInfo) -> str | None:
    """Why writing to this disk would hurt something running, or None."""
    disks = [disk] if disk.kind == "block" else _loops_backed_by(disk.path)
    mounted = _device_names_in(PROC_MOUNTS)
    swapping = _device_names_in(PROC_SWAPS)
    for each in disks:
        names = _block_names(each)
        if names & mounted:
            return f"it is mounted ({', '.join(sorted(names & mounted))})"
        if names & swapping:
            return f"it is in use as swap ({', '.join(sorted(names & swapping))})"
    return None


@dataclass
class Candidate:
    disk: DiskInfo
    rank: int  # 0 identity match, 1 captured size, 2 large enough
    why: str  # the ranking in words
    refusal: str | None = None  # set when the disk may not be written


def base_refusal(disk: DiskInfo, medium_id: str | None) -> str | None:
    """Refusals that do not depend on the capture: the boot medium, CD drives,
    read-only and busy disks."""
    if disk.is_cdrom:
        return "it is a CD/DVD drive"
    if is_medium(disk, medium_id):
        return "it is the medium the rescue system booted from"
    if disk.readonly:
        return "it is read-only"
    partition_flag = f"/sys/class/block/{disk.name}/partition"
    if disk.kind == "block" and disk.name and os.path.exists(partition_flag):
        return "it is a partition, not a whole disk (the region starts with the partition table)"
    return busy_reason(disk)


def rank(disk: DiskInfo, source: dict) -> tuple[int, str]:
    if (disk.serial and disk.serial == source.get("serial")) or (
        disk.wwn and disk.wwn == source.get("wwn")
    ):
        return 0, "same serial/WWN as the captured disk"
    if disk.size_bytes == source.get("size_bytes"):
        return 1, "same size as the captured disk"
    return 2, "large enough"
