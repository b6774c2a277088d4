"""The rescue ISO: ISO9660 + Rock Ridge + Joliet written with pycdlib, bootable four ways.

BIOS from CD boots the El Torito no-emulation entry (GRUB's i386-pc-eltorito image with a
boot info table); UEFI from CD boots the second El Torito entry (platform 0xEF), a FAT image
holding the Secure Boot chain (shim as BOOTX64.EFI, Debian's signed GRUB; see `grub.py`),
which the ISO 9660 tree carries too (`/EFI/BOOT`, `/EFI/debian/grub.cfg`) for firmware that
boots from the file system rather than the El Torito image. The tree's shim and GRUB are not
stored twice: their ISO 9660 and Joliet directory records point at the files' own bytes inside
the FAT image's extent (overlapping extents are legal ISO 9660), which `grub.make_efi_fat` lays
out contiguously on 2048-byte boundaries; a FAT image that does not allow it gets copies.

The same file written to a USB stick boots on BIOS through GRUB's `boot_hybrid.img` in the MBR,
which loads the El Torito image's core by 512-byte sector, and on UEFI through a GPT whose
only entry is an ESP over the FAT image. This is the layout
`grub-mkrescue` (xorriso `--grub2-mbr --grub2-boot-info`, protective MBR + GPT) produces,
minus its HFS+/APM parts for Macs; pycdlib's `add_isohybrid()` serves isolinux only, so the
system area is written here, after pycdlib has laid out the file system.

pycdlib stamps its dates with the wall clock; while it runs, its modules see a clock frozen at
`SOURCE_DATE_EPOCH` (UTC), so two builds from the same inputs are identical byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import struct
import threading
import time
import types
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pycdlib
import pycdlib.dates
import pycdlib.headervd
import pycdlib.pycdlib
import pycdlib.utils

from . import log
from .debs import sha256_file
from .errors import MbrescueError
from .grub import GrubImages, medium_marker
from .runner.isofs import BadRecord, directory_records, record_name
from .runner.outputs import commit, create_temporary
from .verify import CAPTURE_MEMBER, EFI_TREE_FILES, fat_file, iter_newc, sha256_stream

SECTOR = 512
BLOCK = 2048  # ISO9660 logical block
SYSTEM_AREA_BYTES = 16 * BLOCK
# GRUB's BIOS disk driver reads 32 KiB at a time: a file in the ISO's last 32 KiB failed to
# read without this much room after it. A 1 MiB multiple also suits USB sticks.
MIN_TAIL_PAD_BYTES = 32 * 1024
ALIGN_BYTES = 1024 * 1024

# Offsets from `man xorrisofs`: --grub2-mbr writes the boot image's 512-byte address + 4 at
# 0x1B0 of the MBR (the first sector after cdboot.img, i.e. the core's diskboot sector);
# --grub2-boot-info writes that address + 5 at byte 2548 of the boot image (diskboot's
# block list, which then loads the rest of the core). Checked against grub-mkrescue output.
MBR_CORE_LBA_OFFSET = 0x1B0
HYBRID_CODE_BYTES = 0x1B0
BOOT_INFO_PATCH_OFFSET = 2548

GPT_ENTRIES = 128
GPT_ENTRY_BYTES = 128
GPT_ENTRY_SECTORS = GPT_ENTRIES * GPT_ENTRY_BYTES // SECTOR  # 32
ESP_TYPE_GUID = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")

MEDIUM_ID = re.compile(r"[a-z0-9]{4,24}")

ISO_FILES = {
    # rock ridge / joliet path: ISO9660 level-3 path
    "/boot/grub/grub.cfg": "/BOOT/GRUB/GRUB.CFG;1",
    "/boot/grub/eltorito.img": "/BOOT/GRUB/ELTORITO.IMG;1",
    "/boot/grub/efi.img": "/BOOT/GRUB/EFI.IMG;1",
    "/mbrescue/vmlinuz": "/MBRESCUE/VMLINUZ.;1",
    "/mbrescue/base.img": "/MBRESCUE/BASE.IMG;1",
    "/mbrescue/payload.img": "/MBRESCUE/PAYLOAD.IMG;1",
    "/mbrescue/payload.sha256": "/MBRESCUE/PAYLOAD.SHA;1",
    "/mbrescue/options.json": "/MBRESCUE/OPTIONS.JSN;1",
    "/mbrescue/build.json": "/MBRESCUE/BUILD.JSN;1",
    "/EFI/BOOT/BOOTX64.EFI": "/EFI/BOOT/BOOTX64.EFI;1",
    "/EFI/BOOT/grubx64.efi": "/EFI/BOOT/GRUBX64.EFI;1",
    "/EFI/debian/grub.cfg": "/EFI/DEBIAN/GRUB.CFG;1",
}
BOOT_CATALOG = "/BOOT/GRUB/BOOT.CAT;1"


@dataclass(frozen=True)
class IsoReport:
    path: Path
    size_bytes: int
    medium_id: str
    volume_label: str
    bios_image_block: int  # 2 KiB block of the El Torito BIOS image
    efi_image_block: int  # 2 KiB block of the FAT image
    efi_image_bytes: int
    payload_sha256: str
    seconds: float
    # Filled by `build.check_written` from a check of the written file, never assumed here.
    boots: tuple[str, ...] = ()
    checked: tuple[str, ...] = ()
    check_seconds: float = 0.0
    # Filled by `build.build_one`: whose ISO, from which capture (for `build --json`).
    host: str = ""
    capture: Path | None = None
    capture_sha256: str = ""  # the capture file's SHA-256
    manifest_sha256: str = ""  # its manifest's SHA-256: the capture's digest


def new_medium_id(*parts: str | bytes) -> str:
    """A medium id derived from the build's inputs: stable for a rebuild, distinct otherwise."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def iso_volume_label(text: str) -> str:
    """ISO9660 volume ids are d-characters (A-Z, 0-9, _), at most 32."""
    label = re.sub(r"[^A-Z0-9_]", "_", text.upper())[:32]
    return label or "MBRESCUE"


def _iso_epoch() -> int:
    """The ISO's dates: SOURCE_DATE_EPOCH when set (reproducible), else the build's time."""
    explicit = os.environ.get("SOURCE_DATE_EPOCH")
    return int(explicit) if explicit else int(time.time())


# --- a clock frozen at SOURCE_DATE_EPOCH, seen by pycdlib only --------------------------------

_PYCDLIB_TIME_USERS = (pycdlib.pycdlib, pycdlib.headervd, pycdlib.dates, pycdlib.utils)
_clock_lock = threading.Lock()


StructTime = time.struct_time


class _FrozenClock(types.SimpleNamespace):
    """Stands in for the `time` module inside pycdlib: fixed now, local time = UTC."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self._epoch = epoch

    def time(self) -> float:
        return float(self._epoch)

    def localtime(self, secs: float | None = None) -> StructTime:
        return time.gmtime(self._epoch if secs is None else secs)

    def gmtime(self, secs: float | None = None) -> StructTime:
        return time.gmtime(self._epoch if secs is None else secs)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@contextlib.contextmanager
def _frozen_pycdlib_clock(epoch: int) -> Iterator[None]:
    # pycdlib offers no way to pass its volume and directory dates; it calls time.time()
    # and time.localtime() itself. Swap the module it sees for the length of one build.
    with _clock_lock:
        saved = [module.time for module in _PYCDLIB_TIME_USERS]  # type: ignore[attr-defined]
        clock = _FrozenClock(epoch)
        for module in _PYCDLIB_TIME_USERS:
            module.time = clock  # type: ignore[attr-defined]
        try:
            yield
        finally:
            for module, original in zip(_PYCDLIB_TIME_USERS, saved, strict=True):
                module.time = original  # type: ignore[attr-defined]


# --- the system area: hybrid MBR + GPT ----------------------------------------------------------


def _guid(medium_id: str, what: str) -> uuid.UUID:
    # Derived, not random: the same medium gives the same bytes.
    return uuid.uuid5(uuid.NAMESPACE_URL, f"mbrescue:{medium_id}:{what}")


def protective_mbr(
    boot_hybrid: bytes, core_sector: int, total_sectors: int, disk_signature: int
) -> bytes:
    """GRUB's hybrid boot code with the core's sector, and one 0xEE entry (GPT follows)."""
    mbr = bytearray(SECTOR)
    mbr[:HYBRID_CODE_BYTES] = boot_hybrid[:HYBRID_CODE_BYTES]
    struct.pack_into("<Q", mbr, MBR_CORE_LBA_OFFSET, core_sector)
    struct.pack_into("<I", mbr, 0x1B8, disk_signature)
    size = min(total_sectors - 1, 0xFFFFFFFF)
    # status, CHS first (0/0/2), type, CHS last (maxed out), LBA first, sectors
    mbr[0x1BE:0x1CE] = struct.pack(
        "<B3sB3sII", 0x00, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, size
    )
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def gpt_structures(
    total_sectors: int, esp_first_lba: int, esp_sectors: int, medium_id: str
) -> tuple[bytes, bytes, bytes]:
    """(primary header sector, entry array, backup header sector) for a one-ESP GPT."""
    entries = bytearray(GPT_ENTRIES * GPT_ENTRY_BYTES)
    name = "mbrescue ESP".encode("utf-16-le")
    struct.pack_into(
        "<16s16sQQQ72s",
        entries,
        0,
        ESP_TYPE_GUID.bytes_le,
        _guid(medium_id, "esp").bytes_le,
        esp_first_lba,
        esp_first_lba + esp_sectors - 1,
        0,
        name,
    )
    entries_crc = zlib.crc32(entries)
    last_lba = total_sectors - 1
    first_usable = 2 + GPT_ENTRY_SECTORS
    last_usable = last_lba - GPT_ENTRY_SECTORS - 1

    def header(my_lba: int, alternate_lba: int, entries_lba: int) -> bytes:
        fields = [
            b"EFI PART",
            0x00010000,
            92,
            0,
            0,
            my_lba,
            alternate_lba,
            first_usable,
            last_usable,
            _guid(medium_id, "disk").bytes_le,
            entries_lba,
            GPT_ENTRIES,
            GPT_ENTRY_BYTES,
            entries_crc,
        ]
        layout = "<8sIIIIQQQQ16sQIII"
        crc = zlib.crc32(struct.pack(layout, *fields))
        fields[3] = crc
        return struct.pack(layout, *fields).ljust(SECTOR, b"\0")

    primary = header(1, last_lba, 2)
    backup = header(last_lba, 1, last_lba - GPT_ENTRY_SECTORS)
    return primary, bytes(entries), backup


def boot_info_checksum(image: bytes) -> int:
    """El Torito boot info table checksum: 32-bit LE words from byte 64 to the block end."""
    padded = image + b"\0" * ((-len(image)) % BLOCK)
    words = struct.unpack_from(f"<{(len(padded) - 64) // 4}I", padded, 64)
    return sum(words) & 0xFFFFFFFF


def _patch_grub2_boot_info(stream: BinaryIO, image_block: int, image_bytes: int) -> None:
    image_offset = image_block * BLOCK
    stream.seek(image_offset)
    image = bytearray(stream.read(image_bytes))
    struct.pack_into("<Q", image, BOOT_INFO_PATCH_OFFSET, image_block * 4 + 5)
    # The boot info table (bytes 8..63, written by pycdlib) sums the image after the patch,
    # as xorriso does.
    struct.pack_into("<I", image, 20, boot_info_checksum(bytes(image)))
    stream.seek(image_offset)
    stream.write(image)


def write_system_area(
    stream: BinaryIO,
    *,
    grub: GrubImages,
    bios_block: int,
    efi_block: int,
    efi_bytes: int,
    medium_id: str,
) -> int:
    """Pad the written ISO, then lay the hybrid MBR and GPT into it; return its final size."""
    stream.seek(0, os.SEEK_END)
    iso_bytes = stream.tell()
    total_bytes = (iso_bytes + MIN_TAIL_PAD_BYTES + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES
    stream.truncate(total_bytes)
    total_sectors = total_bytes // SECTOR

    _patch_grub2_boot_info(stream, bios_block, grub.bios_eltorito.stat().st_size)

    disk_signature = struct.unpack("<I", _guid(medium_id, "mbr").bytes[:4])[0]
    mbr = protective_mbr(
        grub.boot_hybrid.read_bytes(), bios_block * 4 + 4, total_sectors, disk_signature
    )
    esp_sectors = (efi_bytes + SECTOR - 1) // SECTOR
    primary, entries, backup = gpt_structures(total_sectors, efi_block * 4, esp_sectors, medium_id)
    stream.seek(0)
    stream.write(mbr + primary + entries)
    assert stream.tell() <= SYSTEM_AREA_BYTES
    stream.seek((total_sectors - 1 - GPT_ENTRY_SECTORS) * SECTOR)
    stream.write(entries + backup)
    return total_bytes


# --- the tree's EFI files: the FAT image's own bytes ------------------------------------------


def shared_efi_files(efi_fat: Path, sources: dict[str, Path]) -> dict[str, tuple[int, int]] | str:
    """For each tree path of EFI_TREE_FILES: (byte offset in the FAT image, length) of that
    file's data, when it is one run starting on an ISO block and holds the source's bytes;
    otherwise the reason the tree needs copies."""
    image = efi_fat.read_bytes()
    shared = {}
    for rr_path, fat_path in EFI_TREE_FILES.items():
        try:
            inner = fat_file(image, fat_path)
        except MbrescueError as exc:
            return str(exc)
        at = inner.contiguous_at()
        if at is None:
            return f"{fat_path} is not contiguous in the FAT image"
        if at % BLOCK:
            return f"{fat_path} starts at byte {at} of the FAT image, not on a {BLOCK}-byte block"
        if image[at : at + inner.size] != sources[rr_path].read_bytes():
            return f"{fat_path} in the FAT image is not {sources[rr_path].name}"
        shared[rr_path] = (at, inner.size)
    return shared


def _point_at_fat(
    stream: BinaryIO, iso: pycdlib.PyCdlib, efi_block: int, shared: dict[str, tuple[int, int]]
) -> None:
    """Aim the (zero-length, as added) primary and Joliet records of the shared files at their
    bytes inside the FAT image: extent (both-endian at 2..9) and data length (10..17)."""
    for rr_path, (at, length) in shared.items():
        iso_path = ISO_FILES[rr_path]
        for lookup, directory in (
            ({"iso_path": iso_path}, {"iso_path": iso_path.rsplit("/", 1)[0]}),
            ({"joliet_path": rr_path}, {"joliet_path": rr_path.rsplit("/", 1)[0]}),
        ):
            record = iso.get_record(**lookup)
            folder = iso.get_record(**directory)
            name = record.file_ident
            dir_at = folder.extent_location() * BLOCK
            stream.seek(dir_at)
            data = stream.read(folder.get_data_length())
            try:
                matches = [offset for offset, found in directory_records(data, BLOCK)
                           if record_name(found) == name]
            except BadRecord as exc:
                raise MbrescueError(f"the written ISO's {folder.file_ident!r}: {exc}") from None
            if len(matches) != 1:
                raise MbrescueError(f"{rr_path}: {len(matches)} directory records, not one")
            offset = dir_at + matches[0]
            stream.seek(offset + 2)
            if struct.unpack("<I4xI4x", stream.read(16))[1] != 0:
                raise MbrescueError(f"{rr_path} was not written as an empty file")
            block = efi_block + at // BLOCK
            stream.seek(offset + 2)
            both = [struct.pack("<I", v) + struct.pack(">I", v) for v in (block, length)]
            stream.write(b"".join(both))


# --- the ISO ----------------------------------------------------------------------------------


def _capture_sum(payload: Path) -> str:
    """A sha256sum line for the capture inside the payload cpio, if it holds one."""
    with open(payload, "rb") as stream:
        for name, _mode, size in iter_newc(stream):
            if name == CAPTURE_MEMBER:
                return f"{sha256_stream(stream, size)}  capture.mbrescue\n"
    return ""


def _add_directories(iso: pycdlib.PyCdlib) -> None:
    for rr_path, iso_path in (
        ("/boot", "/BOOT"),
        ("/boot/grub", "/BOOT/GRUB"),
        ("/mbrescue", "/MBRESCUE"),
        ("/EFI", "/EFI"),
        ("/EFI/BOOT", "/EFI/BOOT"),
        ("/EFI/debian", "/EFI/DEBIAN"),
    ):
        iso.add_directory(iso_path, rr_name=rr_path.rsplit("/", 1)[1], joliet_path=rr_path)


# The capture can hold secrets from /boot: on a mounted medium only root reads it.
PRIVATE_FILES = ("/mbrescue/payload.img", "/mbrescue/options.json")


def _add(iso: pycdlib.PyCdlib, stream: BinaryIO, length: int, rr_path: str, iso_path: str) -> None:
    iso.add_fp(
        stream,
        length,
        iso_path,
        rr_name=rr_path.rsplit("/", 1)[1],
        joliet_path=rr_path,
        file_mode=0o100400 if rr_path in PRIVATE_FILES else 0o100444,
    )


def write_iso(
    out: Path,
    *,
    grub: GrubImages,
    kernel: Path,
    base_initrd: Path,
    payload: Path,
    options_json: bytes,
    build_record: bytes,
    grub_cfg: str,
    volume_label: str,
    medium_id: str,
    before_rename: Callable[[Path], None] | None = None,
) -> IsoReport:
    """Write the hybrid rescue ISO to `out` (via a temporary name, mode 0600).

    `before_rename` is called with the complete temporary file while it is synced: what
    it raises leaves no file behind, so nothing that fails a check gets out's name.

    The payload cpio holds the capture and the build's options file; the options file is
    also a plain file beside it. The rescue system reads the capture inside the payload
    from this medium with Linux's drivers (GRUB loads only the kernel and the base initrd),
    or GRUB loads the whole payload into memory (the menu's "capture loaded into memory").
    """
    started = time.monotonic()
    if not MEDIUM_ID.fullmatch(medium_id):
        raise MbrescueError(f"medium id {medium_id!r} must be 4-24 characters a-z, 0-9")
    if grub.medium_id != medium_id:
        raise MbrescueError("the GRUB images were made for another medium id")
    for path in (kernel, base_initrd, payload, grub.bios_eltorito, grub.efi_fat, grub.boot_hybrid,
                 grub.efi_shim, grub.efi_grub, grub.efi_loader_cfg):  # fmt: skip
        if not path.is_file():
            raise MbrescueError(f"{path} is missing")
    label = iso_volume_label(volume_label)
    # Two passes over a payload of up to a few hundred MB: run them on two cores.
    with ThreadPoolExecutor(2) as pool:
        payload_sum = pool.submit(sha256_file, payload)
        capture_sum = pool.submit(_capture_sum, payload)
        payload_sha256 = payload_sum.result()
        sums = (
            f"{payload_sha256}  payload.img\n" + capture_sum.result()
            + f"{hashlib.sha256(options_json).hexdigest()}  options.json\n"
        )
    small_files = {
        "/boot/grub/grub.cfg": grub_cfg.encode(),
        "/mbrescue/payload.sha256": sums.encode(),
        "/mbrescue/options.json": options_json,
        "/mbrescue/build.json": build_record,
    }
    marker = medium_marker(medium_id)
    marker_iso = "/MBRESCUE/ID_" + medium_id.upper()[:24] + ".;1"
    large_files = {
        "/boot/grub/eltorito.img": grub.bios_eltorito,
        "/boot/grub/efi.img": grub.efi_fat,
        "/mbrescue/vmlinuz": kernel,
        "/mbrescue/base.img": base_initrd,
        "/mbrescue/payload.img": payload,
        "/EFI/BOOT/BOOTX64.EFI": grub.efi_shim,
        "/EFI/BOOT/grubx64.efi": grub.efi_grub,
        "/EFI/debian/grub.cfg": grub.efi_loader_cfg,
    }
    efi_bytes = grub.efi_fat.stat().st_size
    found = shared_efi_files(grub.efi_fat, {"/EFI/BOOT/BOOTX64.EFI": grub.efi_shim,
                                            "/EFI/BOOT/grubx64.efi": grub.efi_grub})
    if isinstance(found, str):
        log.info(f"the ISO tree gets its own copies of shim and GRUB: {found}")
        shared: dict[str, tuple[int, int]] = {}
    else:
        shared = found

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temporary(out, 0o600)
    try:
        with (
            contextlib.ExitStack() as stack,
            open(fd, "r+b", closefd=True) as stream,
            _frozen_pycdlib_clock(_iso_epoch()),
        ):
            iso = pycdlib.PyCdlib()
            iso.new(
                interchange_level=3,
                vol_ident=label,
                sys_ident="LINUX",
                vol_set_ident=f"MBRESCUE {medium_id}",
                app_ident_str=f"MBRESCUE RESCUE MEDIUM {medium_id}",
                preparer_ident_str="MBRESCUE",
                joliet=3,
                rock_ridge="1.09",
            )
            _add_directories(iso)
            for rr_path, data in small_files.items():
                _add(iso, io.BytesIO(data), len(data), rr_path, ISO_FILES[rr_path])
            note = f"mbrescue medium {medium_id}\n".encode()
            _add(iso, io.BytesIO(note), len(note), marker, marker_iso)
            for rr_path, path in large_files.items():
                if rr_path in shared:  # empty here; aimed at the FAT image's bytes once written
                    _add(iso, io.BytesIO(b""), 0, rr_path, ISO_FILES[rr_path])
                    continue
                source = stack.enter_context(open(path, "rb"))
                _add(iso, source, path.stat().st_size, rr_path, ISO_FILES[rr_path])
            iso.add_eltorito(
                ISO_FILES["/boot/grub/eltorito.img"],
                bootcatfile=BOOT_CATALOG,
                rr_bootcatname="boot.cat",
                joliet_bootcatfile="/boot/grub/boot.cat",
                boot_load_size=4,
                boot_info_table=True,
                platform_id=0,
                media_name="noemul",
            )
            # The EFI load size counts 512-byte sectors in 16 bits; pycdlib derives it.
            iso.add_eltorito(
                ISO_FILES["/boot/grub/efi.img"],
                bootcatfile=BOOT_CATALOG,
                rr_bootcatname="boot.cat",
                joliet_bootcatfile="/boot/grub/boot.cat",
                efi=True,
                platform_id=0xEF,
                media_name="noemul",
            )
            bios_block = iso.get_record(
                iso_path=ISO_FILES["/boot/grub/eltorito.img"]
            ).extent_location()
            efi_block = iso.get_record(iso_path=ISO_FILES["/boot/grub/efi.img"]).extent_location()
            iso.write_fp(stream)
            _point_at_fat(stream, iso, efi_block, shared)
            iso.close()
            size_bytes = write_system_area(
                stream,
                grub=grub,
                bios_block=bios_block,
                efi_block=efi_block,
                efi_bytes=efi_bytes,
                medium_id=medium_id,
            )
            stream.flush()
            # The file goes to the disk while it is checked (it is read from the page cache).
            with ThreadPoolExecutor(1) as syncer:
                synced = syncer.submit(os.fsync, stream.fileno())
                if before_rename is not None:
                    before_rename(tmp)
                synced.result()
        commit(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    seconds = time.monotonic() - started
    log.info(
        f"wrote {out} ({log.human_bytes(size_bytes)}, {seconds:.1f} s): it holds the "
        f"host's /boot region; keep it as safe as the host itself"
    )
    return IsoReport(
        path=out,
        size_bytes=size_bytes,
        medium_id=medium_id,
        volume_label=label,
        bios_image_block=bios_block,
        efi_image_block=efi_block,
        efi_image_bytes=efi_bytes,
        payload_sha256=payload_sha256,
        seconds=seconds,
    )
