"""Open a source (block device or image file) and tell who it is.

Sizes and sector sizes come from the kernel (ioctl) for block devices and from
the file plus the caller's word for images (512 unless told: an image file has
no sector size of its own). Model, serial and WWN come from sysfs, because the
restore runner matches a replacement disk against the captured identity and
refuses one whose logical sector size differs.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from dataclasses import dataclass

from .errors import MbrescueError

# <linux/fs.h>: _IOR(0x12, 114, size_t), _IO(0x12, 104), _IO(0x12, 123), _IO(0x12, 94)
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKROGET = 0x125E

VALID_SECTOR_BYTES = (512, 1024, 2048, 4096)
SYS_BLOCK = "/sys/block"


@dataclass
class DiskInfo:
    path: str
    kind: str  # "block" or "file"
    size_bytes: int
    logical_sector_bytes: int
    physical_sector_bytes: int
    model: str | None = None
    serial: str | None = None
    wwn: str | None = None
    name: str | None = None  # kernel name (sda, vda, nvme0n1, loop3); None for files
    removable: bool = False  # sysfs `removable`, or on USB (a stick, a card reader, a USB disk)
    readonly: bool = False
    is_cdrom: bool = False
    on_usb: bool = False

    @property
    def size_sectors(self) -> int:
        return self.size_bytes // self.logical_sector_bytes


def _read_sys(path: str) -> str | None:
    """One sysfs attribute, stripped; None when absent, unreadable or empty."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(4096)
    except OSError:
        return None
    text = raw.decode("ascii", errors="replace").replace("\x00", "").strip()
    return text or None


def _vpd_serial(path: str) -> str | None:
    """The unit serial number from SCSI VPD page 0x80 (4-byte header, then ASCII)."""
    try:
        with open(path, "rb") as handle:
            page = handle.read(4096)
    except OSError:
        return None
    if len(page) < 4 or page[1] != 0x80:
        return None
    length = int.from_bytes(page[2:4], "big")
    text = page[4 : 4 + length].decode("ascii", errors="replace").replace("\x00", "").strip()
    return text or None


def _usb_device_dir(name: str) -> str | None:
    """The USB device (the directory with idVendor) a disk hangs off, or None."""
    try:
        here = os.path.realpath(os.path.join(SYS_BLOCK, name, "device"))
    except OSError:
        return None
    while here.startswith("/sys/devices/") and "/usb" in here:
        if os.path.exists(os.path.join(here, "idVendor")):
            return here
        here = os.path.dirname(here)
    return None


def _usb_serial(name: str) -> str | None:
    # usb-storage skips the SCSI VPD pages; the serial is the USB device's own.
    usb = _usb_device_dir(name)
    return _read_sys(os.path.join(usb, "serial")) if usb else None


def _sys_identity(name: str) -> tuple[str | None, str | None, str | None]:
    """(model, serial, wwn) of a whole disk from /sys/block/<name>."""
    base = os.path.join(SYS_BLOCK, name)
    device = os.path.join(base, "device")
    model = _read_sys(os.path.join(device, "model"))
    # virtio-blk puts the serial on the disk, SATA/NVMe on the device, SCSI in VPD page 0x80.
    serial = (
        _read_sys(os.path.join(base, "serial"))
        or _read_sys(os.path.join(device, "serial"))
        or _vpd_serial(os.path.join(device, "vpd_pg80"))
        or _usb_serial(name)
    )
    wwn = (
        _read_sys(os.path.join(base, "wwid"))
        or _read_sys(os.path.join(device, "wwid"))
        or _read_sys(os.path.join(base, "device", "wwn"))
    )
    return model, serial, wwn


def _sys_name(device_number: int) -> tuple[str | None, str | None]:
    """(kernel name, whole-disk name) of a block device number; the two differ for a partition."""
    link = f"/sys/dev/block/{os.major(device_number)}:{os.minor(device_number)}"
    try:
        real = os.path.realpath(link)
    except OSError:
        return None, None
    if not os.path.exists(real):
        return None, None
    name = os.path.basename(real)
    if os.path.exists(os.path.join(real, "partition")):
        return name, os.path.basename(os.path.dirname(real))
    return name, name


def _sys_flag(name: str, attribute: str) -> bool:
    return _read_sys(os.path.join(SYS_BLOCK, name, attribute)) == "1"


def _sys_on_usb(name: str) -> bool:
    """Is the disk behind a USB controller (a stick, a card reader, a USB disk)?"""
    return _usb_device_dir(name) is not None


def _sys_is_cdrom(name: str) -> bool:
    # SCSI peripheral type 5 is a CD/DVD drive; sr* is how the kernel names those.
    return (
        name.startswith("sr") or _read_sys(os.path.join(SYS_BLOCK, name, "device", "type")) == "5"
    )


def disk_info(path: str, sector_bytes: int | None = None) -> DiskInfo:
    """Identity and geometry of a block device or an image file.

    `sector_bytes` is the logical sector size of an image file (default 512); for a
    block device the kernel's value is used, and a different explicit value is an error.
    """
    if sector_bytes is not None and sector_bytes not in VALID_SECTOR_BYTES:
        raise MbrescueError(f"unsupported sector size {sector_bytes} (use 512, 1024, 2048 or 4096)")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MbrescueError(f"{path}: no such file or device") from None
    except OSError as exc:
        raise MbrescueError(f"{path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MbrescueError(f"{path} is a directory, not a disk or an image file")
    if stat.S_ISREG(st.st_mode):
        logical = sector_bytes or 512
        return DiskInfo(
            path=path,
            kind="file",
            size_bytes=st.st_size,
            logical_sector_bytes=logical,
            physical_sector_bytes=logical,
            readonly=not os.access(path, os.W_OK),
        )
    if not stat.S_ISBLK(st.st_mode):
        raise MbrescueError(f"{path} is neither a block device nor a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MbrescueError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        buffer = bytearray(8)
        fcntl.ioctl(fd, BLKGETSIZE64, buffer)
        size_bytes = struct.unpack("=Q", buffer)[0]
        logical = _ioctl_int(fd, BLKSSZGET)
        physical = _ioctl_int(fd, BLKPBSZGET)
        readonly = _ioctl_int(fd, BLKROGET) != 0
    except OSError as exc:
        raise MbrescueError(f"{path}: cannot query the block device: {exc.strerror}") from None
    finally:
        os.close(fd)
    if sector_bytes is not None and sector_bytes != logical:
        raise MbrescueError(
            f"{path} has {logical}-byte logical sectors, not the {sector_bytes} asked for"
        )
    name, whole = _sys_name(st.st_rdev)
    model = serial = wwn = None
    removable = is_cdrom = on_usb = False
    if whole is not None:
        model, serial, wwn = _sys_identity(whole)
        on_usb = _sys_on_usb(whole)
        removable = _sys_flag(whole, "removable") or on_usb
        is_cdrom = _sys_is_cdrom(whole)
    return DiskInfo(
        path=path,
        kind="block",
        size_bytes=size_bytes,
        logical_sector_bytes=logical,
        physical_sector_bytes=physical,
        model=model,
        serial=serial,
        wwn=wwn,
        name=name,
        removable=removable,
        readonly=readonly,
        is_cdrom=is_cdrom,
        on_usb=on_usb,
    )


def _ioctl_int(fd: int, request: int) -> int:
    buffer = bytearray(4)
    fcntl.ioctl(fd, request, buffer)
    return int(struct.unpack("=i", buffer)[0])


def read_at(path_or_fd: str | int, offset: int, length: int) -> bytes:
    """Exactly `length` bytes at `offset`; a short read (past the end) is an error."""
    if offset < 0 or length < 0:
        raise MbrescueError(f"bad read request: offset {offset}, length {length}")
    if isinstance(path_or_fd, int):
        return _pread_exact(path_or_fd, offset, length, f"fd {path_or_fd}")
    try:
        fd = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MbrescueError(f"{path_or_fd}: cannot open: {exc.strerror}") from None
    try:
        return _pread_exact(fd, offset, length, path_or_fd)
    finally:
        os.close(fd)


def _pread_exact(fd: int, offset: int, length: int, label: str) -> bytes:
    chunks: list[bytes] = []
    done = 0
    while done < length:
        try:
            chunk = os.pread(fd, min(length - done, 1 << 24), offset + done)
        except OSError as exc:
            raise MbrescueError(
                f"{label}: read error at byte {offset + done}: {exc.strerror}"
            ) from None
        if not chunk:
            raise MbrescueError(
                f"{label}: short read: wanted {length} bytes at byte {offset}, "
                f"the source ends after {done}"
            )
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def list_disks() -> list[DiskInfo]:
    """Whole disks the kernel knows, from sysfs, without opening them.

    Skipped: loop devices with no backing file, ram and zram disks, and anything of
    size zero except CD drives (an empty drive is still worth naming).
    """
    try:
        names = sorted(os.listdir(SYS_BLOCK))
    except OSError:
        return []
    disks: list[DiskInfo] = []
    for name in names:
        base = os.path.join(SYS_BLOCK, name)
        if name.startswith(("ram", "zram")) or os.path.exists(os.path.join(base, "partition")):
            continue
        if (
            name.startswith("loop")
            and _read_sys(os.path.join(base, "loop", "backing_file")) is None
        ):
            continue
        is_cdrom = _sys_is_cdrom(name)
        size_512 = int(_read_sys(os.path.join(base, "size")) or "0")
        if size_512 == 0 and not is_cdrom:
            continue
        logical = int(_read_sys(os.path.join(base, "queue", "logical_block_size")) or "512")
        physical = int(_read_sys(os.path.join(base, "queue", "physical_block_size")) or logical)
        model, serial, wwn = _sys_identity(name)
        on_usb = _sys_on_usb(name)
        disks.append(
            DiskInfo(
                path=os.path.join("/dev", name),
                kind="block",
                # sysfs counts 512-byte units whatever the logical sector size.
                size_bytes=size_512 * 512,
                logical_sector_bytes=logical,
                physical_sector_bytes=physical,
                model=model,
                serial=serial,
                wwn=wwn,
                name=name,
                removable=_sys_flag(name, "removable") or on_usb,
                readonly=_sys_flag(name, "ro"),
                is_cdrom=is_cdrom,
                on_usb=on_usb,
            )
        )
    return disks
