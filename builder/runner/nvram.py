"""The firmware's boot entry for the restored ESP: read it from efivarfs, add one if none.

A new mainboard (or a firmware reset) forgets the NVRAM boot entries: the restored disk
then boots only if its ESP carries the removable path \\EFI\\BOOT\\BOOTX64.EFI, and a
distribution's own loader (\\EFI\\debian\\shimx64.efi) is never started. When the rescue
system runs under UEFI this module reads BootOrder and every Boot#### variable from
efivarfs, and looks for an entry whose HD() node names the restored ESP (its GPT partition
GUID, or the msdos disk signature and partition number) and whose file path is the loader.
When there is none, the plan says so and, after the restore has been written and verified,
a new Boot#### is written and put first in BootOrder, as `efibootmgr --create` does.

The layouts are the UEFI specification's (2.10, 3.1.3 Load Options; 10.3 Device Path
Protocol): a variable file in efivarfs is a u32 of attributes followed by the variable's
data; EFI_LOAD_OPTION is u32 Attributes, u16 FilePathListLength, a NUL-terminated UCS-2
Description, the device path list, then optional data. A device path node is u8 type,
u8 subtype, u16 length; HD() (4, 1) holds u32 partition number, u64 start LBA, u64 size in
sectors (the disk's logical sectors), 16 bytes of signature, u8 MBRType, u8 SignatureType.
efivarfs marks existing variables immutable (FS_IMMUTABLE_FL): the flag is cleared before
a rewrite, as libefivar does, and each variable is written in one write(), as efivarfs
requires.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from . import bootloader, debuglog, gpt
from .console import Console
from .errors import MbrescueError
from .manifest import Manifest

EFI_DIR = "/sys/firmware/efi"
EFIVARS_DIR = "/sys/firmware/efi/efivars"
GLOBAL_GUID = "8be4df61-93ca-11d2-aa0d-00e098032b8c"  # EFI_GLOBAL_VARIABLE
# EFI_VARIABLE_NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS: what Boot#### and
# BootOrder carry (a variable without NV would be gone at the next power-on).
VARIABLE_ATTRIBUTES = 0x7
LOAD_OPTION_ACTIVE = 0x1
MEDIA_DEVICE_PATH = 4
MEDIA_HARDDRIVE = 1
MEDIA_FILEPATH = 4
END_DEVICE_PATH = 0x7F
END_ENTIRE = 0xFF
HD_NODE_BYTES = 42
MBR_TYPE_MSDOS = 1
MBR_TYPE_GPT = 2
SIGNATURE_MBR = 1
SIGNATURE_GUID = 2
# linux/fs.h: _IOR('f', 1, long), _IOW('f', 2, long); the kernel moves an int.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
MAX_NODES = 64
REMOVABLE_LOADER = "EFI/BOOT/BOOTX64.EFI"
BOOT_NAME = re.compile(r"^Boot([0-9A-F]{4})-" + GLOBAL_GUID + "$")


class NvramError(MbrescueError):
    """A firmware variable that cannot be read, parsed or written."""


# --- the byte layouts ------------------------------------------------------------------------


@dataclass(frozen=True)
class HardDrive:
    """An HD() device path node: a partition found by its signature, not by the bus."""

    partition_number: int
    start_lba: int
    size_sectors: int
    signature: bytes  # 16 bytes: the GPT partition GUID (on-disk order) or the MBR id, padded
    mbr_type: int  # 1 msdos, 2 GPT
    signature_type: int  # 1 the 32-bit MBR disk signature, 2 a GUID

    def encode(self) -> bytes:
        return struct.pack("<BBHIQQ16sBB", MEDIA_DEVICE_PATH, MEDIA_HARDDRIVE, HD_NODE_BYTES,
                           self.partition_number, self.start_lba, self.size_sectors,
                           self.signature, self.mbr_type, self.signature_type)

    def names_same_partition(self, other: HardDrive) -> bool:
        """The firmware finds a partition by this: the GUID, or the MBR id plus number."""
        if self.signature_type != other.signature_type or self.signature != other.signature:
            return False
        return self.signature_type == SIGNATURE_GUID or \
            self.partition_number == other.partition_number

    def text(self) -> str:
        if self.signature_type == SIGNATURE_GUID:
            signature = gpt.format_guid(self.signature).upper()
            kind = "GPT"
        else:
            signature = f"0x{struct.unpack_from('<I', self.signature)[0]:08X}"
            kind = "MBR"
        return (f"HD({self.partition_number},{kind},{signature},0x{self.start_lba:X},"
                f"0x{self.size_sectors:X})")


def file_path_node(path: str) -> bytes:
    data = (path + "\0").encode("utf-16-le")
    return struct.pack("<BBH", MEDIA_DEVICE_PATH, MEDIA_FILEPATH, 4 + len(data)) + data


END_NODE = struct.pack("<BBH", END_DEVICE_PATH, END_ENTIRE, 4)


@dataclass(frozen=True)
class LoadOption:
    attributes: int
    description: str
    device_path: bytes
    optional_data: bytes
    hard_drive: HardDrive | None  # the first HD() node of the first device path
    file_path: str | None  # its file path nodes joined (a path may come in pieces)

    @property
    def active(self) -> bool:
        return bool(self.attributes & LOAD_OPTION_ACTIVE)


def encode_load_option(description: str, hard_drive: HardDrive, loader: str,
                       attributes: int = LOAD_OPTION_ACTIVE) -> bytes:
    """EFI_LOAD_OPTION for `loader` (\\EFI\\...) on the partition `hard_drive` names."""
    device_path = hard_drive.encode() + file_path_node(loader) + END_NODE
    return (struct.pack("<IH", attributes, len(device_path))
            + (description + "\0").encode("utf-16-le") + device_path)


def _nodes(device_path: bytes) -> list[tuple[int, int, bytes]]:
    """(type, subtype, body) of the first device path instance, to its end node."""
    nodes: list[tuple[int, int, bytes]] = []
    at = 0
    while at + 4 <= len(device_path) and len(nodes) < MAX_NODES:
        kind, subtype, length = struct.unpack_from("<BBH", device_path, at)
        if length < 4 or at + length > len(device_path):
            raise NvramError(f"a device path node at byte {at} has a bad length {length}")
        if kind == END_DEVICE_PATH:
            return nodes
        nodes.append((kind, subtype, device_path[at + 4 : at + length]))
        at += length
    raise NvramError("the device path has no end node")


def parse_load_option(data: bytes) -> LoadOption:
    """One Boot#### variable's data (without efivarfs' attribute prefix)."""
    if len(data) < 6:
        raise NvramError(f"a load option of {len(data)} bytes is too short")
    attributes, path_bytes = struct.unpack_from("<IH", data)
    at = 6
    while True:
        if at + 2 > len(data):
            raise NvramError("the load option's description has no terminating NUL")
        if data[at : at + 2] == b"\0\0":
            break
        at += 2
    description = data[6:at].decode("utf-16-le", errors="replace")
    at += 2
    if at + path_bytes > len(data):
        raise NvramError(f"the load option's device path ({path_bytes} bytes) runs past its end")
    device_path = data[at : at + path_bytes]
    hard_drive = None
    pieces = []
    for kind, subtype, body in _nodes(device_path):
        if kind != MEDIA_DEVICE_PATH:
            continue
        if subtype == MEDIA_HARDDRIVE and hard_drive is None and len(body) == HD_NODE_BYTES - 4:
            number, start, size, signature, mbr_type, signature_type = struct.unpack(
                "<IQQ16sBB", body)
            hard_drive = HardDrive(number, start, size, signature, mbr_type, signature_type)
        elif subtype == MEDIA_FILEPATH:
            pieces.append(body.decode("utf-16-le", errors="replace").split("\0", 1)[0])
    # UEFI joins consecutive file path nodes with a separator where neither has one.
    file_path = "\\".join(piece.strip("\\") for piece in pieces) if pieces else None
    if file_path is not None and pieces[0].startswith("\\"):
        file_path = "\\" + file_path
    return LoadOption(attributes, description, device_path, data[at + path_bytes :],
                      hard_drive, file_path)


def same_loader(one: str, other: str) -> bool:
    """FAT names are case-insensitive; a path may be written with / or \\, with or without
    its leading separator."""
    def norm(path: str) -> str:
        return path.replace("/", "\\").strip("\\").lower()
    return norm(one) == norm(other)


# --- what the restored ESP is ----------------------------------------------------------------


@dataclass(frozen=True)
class Esp:
    """The restored ESP as the firmware will find it, and the loader an entry should start."""

    hard_drive: HardDrive
    loader: str  # \EFI\debian\shimx64.efi
    description: str  # the entry's name in the firmware's menu

    @property
    def partition_number(self) -> int:
        return self.hard_drive.partition_number


def choose_loader(loader_paths: Sequence[str]) -> str | None:
    """A distribution's shim, else its GRUB, else the removable path; None: none of these."""
    paths = sorted({p.strip("/") for p in loader_paths}, key=str.lower)
    for wanted in ("shimx64.efi", "grubx64.efi"):
        for path in paths:
            parts = path.split("/")
            if len(parts) == 3 and parts[1].lower() != "boot" and parts[2].lower() == wanted:
                return path
    for path in paths:
        if path.lower() == REMOVABLE_LOADER.lower():
            return path
    return None


def esp_of(manifest: Manifest, placed: dict[int, tuple[int, int]] | None = None
           ) -> Esp | None:
    """The captured ESP with its loader (from the capture's boot loader record, which lists
    the ESP's file copy). `placed`: partition number -> (start LBA, size) in the target's
    sectors, as the file-level path lays them; default: where it was captured, as the
    region path keeps it. None: no ESP with a loader."""
    records = manifest.boot_loader or ()
    for record in records:
        if record.method != bootloader.UEFI or record.partition is None:
            continue
        loader = choose_loader(record.loader_paths)
        if loader is None:
            continue
        part = manifest.partition(record.partition)
        start, size = (placed or {}).get(part.number, (part.start_lba, part.size_sectors))
        if manifest.table == "gpt":
            if not part.guid:
                continue
            hard_drive = HardDrive(part.number, start, size, gpt.parse_guid(part.guid),
                                   MBR_TYPE_GPT, SIGNATURE_GUID)
        else:
            try:
                disk_signature = int(manifest.disk_id, 16)
            except ValueError:
                continue
            hard_drive = HardDrive(part.number, start, size,
                                   struct.pack("<I", disk_signature & 0xFFFFFFFF).ljust(16, b"\0"),
                                   MBR_TYPE_MSDOS, SIGNATURE_MBR)
        directory = loader.split("/")[1]
        description = manifest.hostname if directory.lower() == "boot" else directory
        return Esp(hard_drive, "\\" + loader.replace("/", "\\"), description)
    return None


# --- the firmware's variables -----------------------------------------------------------------


@dataclass(frozen=True)
class Firmware:
    """BootOrder and the Boot#### entries, as read from efivarfs."""

    efivars: str
    boot_order: tuple[int, ...]
    entries: dict[int, LoadOption]
    unreadable: tuple[int, ...]  # Boot#### present but not parsed (their numbers stay taken)


def _variable_path(efivars: str, name: str) -> str:
    return os.path.join(efivars, f"{name}-{GLOBAL_GUID}")


def _read_variable(path: str) -> bytes:
    with open(path, "rb") as stream:
        raw = stream.read()
    if len(raw) < 4:
        raise NvramError(f"{os.path.basename(path)}: {len(raw)} bytes, no attributes")
    return raw[4:]


def _efivarfs_mounted(efivars: str) -> bool:
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            return any(line.split()[1:3] == [efivars, "efivarfs"] for line in mounts
                       if len(line.split()) >= 3)
    except OSError:
        return False


def mount_efivarfs(efi_dir: str = EFI_DIR, efivars: str = EFIVARS_DIR) -> str | None:
    """The efivarfs directory, mounted here if it was not (the rescue system's /init mounts it
    already); None under BIOS or where it cannot be mounted."""
    if not os.path.isdir(efi_dir):
        return None
    if _efivarfs_mounted(efivars):
        return efivars
    debuglog.command(["mount", "-t", "efivarfs", "-o", "nosuid,nodev,noexec", "efivarfs", efivars])
    try:
        subprocess.run(["mount", "-t", "efivarfs", "-o", "nosuid,nodev,noexec", "efivarfs",
                        efivars], stdin=subprocess.DEVNULL, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return efivars if _efivarfs_mounted(efivars) else None


def read_firmware(efivars: str) -> Firmware:
    try:
        names = os.listdir(efivars)
    except OSError as exc:
        raise NvramError(f"cannot list {efivars}: {exc.strerror}") from exc
    entries: dict[int, LoadOption] = {}
    unreadable = []
    for name in names:
        found = BOOT_NAME.match(name)
        if not found:
            continue
        number = int(found.group(1), 16)
        try:
            entries[number] = parse_load_option(_read_variable(os.path.join(efivars, name)))
        except (OSError, NvramError):
            unreadable.append(number)
    order: tuple[int, ...] = ()
    order_path = _variable_path(efivars, "BootOrder")
    if os.path.exists(order_path):
        try:
            data = _read_variable(order_path)
        except OSError as exc:
            raise NvramError(f"cannot read BootOrder: {exc.strerror}") from exc
        order = struct.unpack(f"<{len(data) // 2}H", data[: len(data) // 2 * 2])
    return Firmware(efivars, order, entries, tuple(sorted(unreadable)))


# --- the decision, shown in the plan -----------------------------------------------------------


@dataclass(frozen=True)
class EntryPlan:
    esp: Esp
    firmware: Firmware
    existing: int | None  # the BootNNNN that already starts the loader on the restored ESP
    disk: str  # the target, for the by-hand hint

    def plan_line(self) -> str:
        if self.existing is not None:
            return (f"  Firmware boot entry: Boot{self.existing:04X} already points at "
                    f"{self.esp.loader} on partition {self.esp.partition_number}; none added")
        return (f'  Will add: firmware boot entry "{self.esp.description}" -> {self.esp.loader} '
                f"on partition {self.esp.partition_number} (the firmware has none for the "
                "restored ESP), first in BootOrder, once the restore has verified")


def matching_entry(esp: Esp, firmware: Firmware) -> int | None:
    """The first active entry in BootOrder (then any other) that starts esp's loader."""
    ordered = [n for n in firmware.boot_order if n in firmware.entries]
    ordered += sorted(n for n in firmware.entries if n not in ordered)
    for number in ordered:
        option = firmware.entries[number]
        if (option.active and option.hard_drive is not None and option.file_path is not None
                and option.hard_drive.names_same_partition(esp.hard_drive)
                and same_loader(option.file_path, esp.loader)):
            return number
    return None


def plan_entry(esp: Esp | None, disk: str, efivars: str | None) -> EntryPlan | None:
    """What the restore will do about the firmware's boot entry; None: nothing to say (BIOS,
    no efivarfs, no ESP with a loader, or variables that cannot be read)."""
    if esp is None or efivars is None:
        return None
    try:
        firmware = read_firmware(efivars)
    except NvramError:
        return None
    return EntryPlan(esp, firmware, matching_entry(esp, firmware), disk)


def plan_for_target(esp: Esp | None, disk_path: str, disk_kind: str,
                    efivars: str | None = None) -> EntryPlan | None:
    """The rescue system's entry plan for a block device target (never for an image file:
    this machine's firmware does not boot it). efivars: default, mounted if needed."""
    if esp is None or disk_kind != "block":
        return None
    return plan_entry(esp, disk_path, efivars or mount_efivarfs())


# --- writing -----------------------------------------------------------------------------------


def _make_mutable(path: str) -> None:
    """Clear FS_IMMUTABLE_FL, which efivarfs sets on the variables it lists."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        flags = bytearray(8)
        try:
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                return  # a file system without these flags: nothing is immutable there
            raise
        value = struct.unpack_from("<i", flags)[0]
        if value & FS_IMMUTABLE_FL:
            struct.pack_into("<i", flags, 0, value & ~FS_IMMUTABLE_FL)
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags)
    finally:
        os.close(fd)


def write_variable(efivars: str, name: str, data: bytes,
                   attributes: int = VARIABLE_ATTRIBUTES) -> None:
    """Set one variable: attributes and data in one write(), as efivarfs takes it."""
    path = _variable_path(efivars, name)
    _make_mutable(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        payload = struct.pack("<I", attributes) + data
        if os.write(fd, payload) != len(payload):
            raise NvramError(f"{name}: short write")
    finally:
        os.close(fd)


def add_entry(entry: EntryPlan) -> int:
    """Write the new Boot#### and put it first in BootOrder; read both back. Returns its
    number; raises NvramError (or OSError) when the firmware refused."""
    efivars = entry.firmware.efivars
    firmware = read_firmware(efivars)  # again: the restore took a while
    taken = set(firmware.entries) | set(firmware.unreadable)
    free = next((n for n in range(0x10000) if n not in taken), None)
    if free is None:
        raise NvramError("no free Boot#### number")
    option = encode_load_option(entry.esp.description, entry.esp.hard_drive, entry.esp.loader)
    name = f"Boot{free:04X}"
    write_variable(efivars, name, option)
    if _read_variable(_variable_path(efivars, name)) != option:
        raise NvramError(f"{name} did not read back as written")
    order = (free, *(n for n in firmware.boot_order if n != free))
    order_data = struct.pack(f"<{len(order)}H", *order)
    write_variable(efivars, "BootOrder", order_data)
    if _read_variable(_variable_path(efivars, "BootOrder")) != order_data:
        raise NvramError("BootOrder did not read back as written")
    return free


def by_hand(entry: EntryPlan) -> str:
    return (f"efibootmgr --create --disk {entry.disk} --part {entry.esp.partition_number} "
            f"--label '{entry.esp.description}' --loader '{entry.esp.loader}'")


def finish(console: Console, entry: EntryPlan | None) -> None:
    """The restore's last step. A firmware that refuses the entry does not undo a verified
    restore: one line says so and how to add it by hand, and the restore still succeeds."""
    if entry is None or entry.existing is not None:
        return
    try:
        number = add_entry(entry)
    except (OSError, NvramError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        console.say(f"mbrescue: warning: the firmware boot entry was not added ({reason}); the "
                    f"disk is restored; to add it by hand: {by_hand(entry)}")
        return
    console.say(f'mbrescue: added firmware boot entry Boot{number:04X} "{entry.esp.description}"'
                f" -> {entry.esp.hard_drive.text()}/{entry.esp.loader}, first in BootOrder")
