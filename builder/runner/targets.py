"""Which disks may receive the region, in which order, and why the others may not.

Safety rule 1 lives here: no mbrescue rescue medium is ever a candidate, whatever the
kernel command line says (recognised by what builder/iso.py writes into every ISO: the
application and volume set ids of its ISO 9660 primary volume descriptor, and the
`/MBRESCUE/ID_<medium id>` file), so neither the stick the rescue system booted from nor
another host's stick left in the machine can be written; `mbrescue.medium=` still names
the boot medium by serial or path too. CD drives never are candidates, and a disk whose
partitions are mounted or used as swap is refused, as are read-only disks. Size and
sector-size checks belong to the plan, which also knows about partitions to shrink.
Candidates are ranked: the captured disk's identity (serial/WWN) first, then fixed disks
before removable ones (sysfs `removable`, or on USB), each by captured size first, then
any disk large enough. Only an identity match counts as proof of which disk it is: a lone
disk that is merely large enough is not (unattended mode relies on that).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .disk import DiskInfo, read_at
from .errors import MbrescueError
from .isofs import BadRecord, directory_records, record_name
from .manifest import SourceDisk
from .outputs import loop_backing

ISO_PVD_OFFSET = 16 * 2048  # ISO9660 sector 16, whatever the disk's sector size
# What builder/iso.py writes into every rescue medium (application id, volume set id, the
# medium id file in /MBRESCUE); any one of them marks the disk.
MEDIUM_APPLICATION_PREFIX = "MBRESCUE RESCUE MEDIUM "
MEDIUM_VOLUME_SET_PREFIX = "MBRESCUE "
MEDIUM_DIRECTORY = b"MBRESCUE"
MEDIUM_FILE_PREFIX = b"ID_"
DIRECTORY_READ_LIMIT = 64 * 1024  # the root and /MBRESCUE directories are a few records
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


def _pvd(path: str) -> bytes | None:
    try:
        pvd = read_at(path, ISO_PVD_OFFSET, 2048)
    except MbrescueError:
        return None
    return pvd if pvd[0] == 1 and pvd[1:6] == b"CD001" else None


def _directory_entries(path: str, record: bytes, block_bytes: int) -> list[tuple[bytes, bool, bytes]]:
    """(name, is_directory, record) of the entries of the directory a 34+-byte ISO 9660
    directory record points to; bounded, and [] for anything that does not parse."""
    extent_lba = int.from_bytes(record[2:6], "little")
    length = min(int.from_bytes(record[10:14], "little"), DIRECTORY_READ_LIMIT)
    try:
        data = read_at(path, extent_lba * block_bytes, length)
    except MbrescueError:
        return []
    entries = []
    try:
        for _, record in directory_records(data, block_bytes):
            entries.append((record_name(record), bool(record[25] & 0x02), record))
    except BadRecord:
        pass  # what came before stands, as for a truncated directory
    return entries


def rescue_medium(path: str) -> str | None:
    """A description of the mbrescue rescue medium this disk holds ("OTHERHOST, medium id
    6e7a...") or None when it holds none (or cannot be read)."""
    pvd = _pvd(path)
    if pvd is None:
        return None

    def text(raw: bytes) -> str:
        return raw.decode("ascii", errors="replace").strip(" \0")

    volume, volume_set, application = text(pvd[40:72]), text(pvd[190:318]), text(pvd[574:702])
    medium_id = None
    if application.startswith(MEDIUM_APPLICATION_PREFIX):
        medium_id = application[len(MEDIUM_APPLICATION_PREFIX):]
    elif volume_set.startswith(MEDIUM_VOLUME_SET_PREFIX):
        medium_id = volume_set[len(MEDIUM_VOLUME_SET_PREFIX):]
    else:
        block_bytes = int.from_bytes(pvd[128:130], "little")
        if block_bytes not in (512, 1024, 2048):
            return None
        for name, is_dir, record in _directory_entries(path, pvd[156:190], block_bytes):
            if is_dir and name == MEDIUM_DIRECTORY:
                for inner, _, _ in _directory_entries(path, record, block_bytes):
                    if inner.upper().startswith(MEDIUM_FILE_PREFIX):
                        marker = inner[len(MEDIUM_FILE_PREFIX):].split(b".")[0]
                        medium_id = marker.decode("ascii", errors="replace").lower()
                        break
                break  # one /MBRESCUE only: a hostile table gets no second look
        if medium_id is None:
            return None
    return f"{volume or 'no volume id'}, medium id {medium_id.strip() or 'unknown'}"


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
    # By device and inode, not by name: a hard link (or a bind mount) gives the file a name
    # the loop device's backing_file never shows.
    found = []
    try:
        image = os.stat(path)
        names = os.listdir("/sys/block")
    except OSError:
        return []
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/dev", encoding="ascii") as handle:
                major, minor = (int(part) for part in handle.read().split(":"))
        except (OSError, ValueError):
            continue
        if loop_backing(os.makedev(major, minor)) == (image.st_dev, image.st_ino):
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


def removable_note(disk: DiskInfo) -> str:
    """How the list marks a removable disk ("" for a fixed one)."""
    if disk.on_usb:
        return "removable (USB)"
    return "removable" if disk.removable else ""


def order_key(candidate: Candidate) -> tuple[bool, int, int, str]:
    """The list's order: an identity match first, then fixed disks before removable ones
    (the replacement for a dead internal disk is rarely a stick), then rank, size, path."""
    removable_later = candidate.rank != 0 and candidate.disk.removable
    return (removable_later, candidate.rank, candidate.disk.size_bytes, candidate.disk.path)


def identified(candidate: Candidate) -> bool:
    """Is this disk known to be the captured one (serial/WWN)? Fitting is not knowing."""
    return candidate.rank == 0


def unattended_choice(offered: list[Candidate]) -> Candidate | None:
    """The disk unattended mode may take among several without a `mbrescue.target=`: the
    one identity match, or None (then a person must choose)."""
    matched = [candidate for candidate in offered if identified(candidate)]
    return matched[0] if len(matched) == 1 else None


def base_refusal(disk: DiskInfo, medium_id: str | None) -> str | None:
    """Refusals that do not depend on the capture: the boot medium and every other
    mbrescue rescue medium, CD drives, read-only and busy disks."""
    if disk.is_cdrom:
        return "it is a CD/DVD drive"
    if is_medium(disk, medium_id):
        return "it is the medium the rescue system booted from"
    medium = rescue_medium(disk.path)
    if medium is not None:
        return f"it is an mbrescue rescue medium ({medium})"
    if disk.readonly:
        return "it is read-only"
    partition_flag = f"/sys/class/block/{disk.name}/partition"
    if disk.kind == "block" and disk.name and os.path.exists(partition_flag):
        return "it is a partition, not a whole disk (the region starts with the partition table)"
    return busy_reason(disk)


def rank(disk: DiskInfo, source: SourceDisk) -> tuple[int, str]:
    if (disk.serial and disk.serial == source.serial) or (
        disk.wwn and disk.wwn == source.wwn
    ):
        return 0, "same serial/WWN as the captured disk"
    if disk.size_bytes == source.size_bytes:
        return 1, "same size as the captured disk"
    return 2, "large enough"
