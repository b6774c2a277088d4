"""`mbrescue verify ISO` without `--boot`: check a rescue ISO independently of how it was built.

Every check reads the file itself: the El Torito catalog and boot info table from the raw
blocks, the file tree through a fresh `pycdlib.PyCdlib()`, the EFI image's `BOOTX64.EFI`
with mtools, the hybrid MBR against GRUB's installed `boot_hybrid.img`, the partition table
with `sfdisk --json` and `sgdisk -v`, and the payload against the checksums written beside it.
When `builder.capture` offers `check_capture(path)`, the capture inside the payload is handed
to it (it raises MbrescueError on a bad capture). The result is a list of named checks; the
CLI prints them as a table and exits non-zero when one failed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pycdlib
import pycdlib.pycdlibexception

from .cpio import iter_newc
from .errors import MbrescueError
from .run import output, require_tools, run

BLOCK = 2048
SECTOR = 512
BOOT_HYBRID = Path("/usr/lib/grub/i386-pc/boot_hybrid.img")
EFI_PLATFORM = 0xEF
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
CAPTURE_MEMBER = "mbrescue/capture.mbrescue"
OPTIONS_MEMBER = "mbrescue/options.json"
PAYLOAD_PATH = "/mbrescue/payload.img"
SUMS_PATH = "/mbrescue/payload.sha256"
# The build's options, also inside the payload: the rescue system reads this copy when it
# reads the capture from the medium.
OPTIONS_PATH = "/mbrescue/options.json"
# Three sha256sum lines, a small JSON object; anything near this size is not ours.
MAX_SUMS_BYTES = 64 * 1024
REQUIRED_FILES = (
    "/boot/grub/grub.cfg",
    "/mbrescue/vmlinuz",
    "/mbrescue/base.img",
    PAYLOAD_PATH,
    SUMS_PATH,
    OPTIONS_PATH,
)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class BootEntry:
    platform: int
    bootable: bool
    media_type: int
    sector_count: int
    load_block: int


# --- raw readers --------------------------------------------------------------------------------


def _read_at(stream: BinaryIO, offset: int, length: int) -> bytes:
    stream.seek(offset)
    return stream.read(length)


def read_boot_catalog(stream: BinaryIO) -> list[BootEntry]:
    """The El Torito catalog's boot entries (initial entry first, then every section entry).

    Any bytes give entries or MbrescueError: the descriptors are looked for in blocks 16..63
    only, and the catalog is one block, so every entry must fit in it.
    """
    catalog_block = None
    for block in range(16, 64):
        descriptor = _read_at(stream, block * BLOCK, BLOCK)
        if len(descriptor) < BLOCK or descriptor[1:6] != b"CD001":
            raise MbrescueError(f"no ISO 9660 volume descriptor at block {block}")
        if descriptor[0] == 0xFF:
            break
        if descriptor[0] == 0 and descriptor[7:30].rstrip(b"\0") == b"EL TORITO SPECIFICATION":
            catalog_block = struct.unpack_from("<I", descriptor, 0x47)[0]
            break
    else:
        raise MbrescueError("no volume descriptor terminator")
    if catalog_block is None:
        raise MbrescueError("no El Torito boot record")
    catalog = _read_at(stream, catalog_block * BLOCK, BLOCK)
    if len(catalog) < 64:
        raise MbrescueError(f"the El Torito catalog at block {catalog_block} is past the end")
    validation = catalog[:32]
    words = struct.unpack("<16H", validation)
    if validation[0] != 1 or validation[30:32] != b"\x55\xaa" or sum(words) & 0xFFFF:
        raise MbrescueError("the El Torito validation entry is damaged")
    entries = [_entry(catalog[32:64], validation[1])]
    offset = 64
    while offset + 32 <= len(catalog) and catalog[offset] in (0x90, 0x91):
        header = catalog[offset : offset + 32]
        platform, count = header[1], struct.unpack_from("<H", header, 2)[0]
        offset += 32
        if offset + 32 * count > len(catalog):
            raise MbrescueError(f"an El Torito section claims {count} entries past the catalog")
        for _ in range(count):
            entries.append(_entry(catalog[offset : offset + 32], platform))
            offset += 32
        if header[0] == 0x91:
            break
    return entries


def _entry(raw: bytes, platform: int) -> BootEntry:
    sector_count, load_block = struct.unpack_from("<HI", raw, 6)
    return BootEntry(
        platform=platform,
        bootable=raw[0] == 0x88,
        media_type=raw[1] & 0x0F,
        sector_count=sector_count,
        load_block=load_block,
    )


def sha256_stream(
    stream: BinaryIO, length: int | None = None, copy_to: BinaryIO | None = None
) -> str:
    """SHA-256 of the next `length` bytes (or the rest), copying them on if asked."""
    digest = hashlib.sha256()
    left = length
    while left is None or left > 0:
        chunk = stream.read(1 << 20 if left is None else min(1 << 20, left))
        if not chunk:
            break
        digest.update(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
        if left is not None:
            left -= len(chunk)
    if left:
        raise MbrescueError("file ends early")
    return digest.hexdigest()


def parse_sums(text: str) -> dict[str, str]:
    """`sha256sum` lines -> {name: digest}."""
    sums = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) == 64 and name:
            sums[name.strip()] = digest
    return sums


# --- checks -------------------------------------------------------------------------------------


def _check(name: str, func: Callable[[], str]) -> Check:
    try:
        return Check(name, True, func())
    except (
        MbrescueError,
        pycdlib.pycdlibexception.PyCdlibException,
        OSError,
        ValueError,
        struct.error,
    ) as exc:
        return Check(name, False, str(exc))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise MbrescueError(message)


def verify_iso(path: Path, capture_sha256: str | None = None) -> list[Check]:
    """All checks of one ISO; a failure of one does not stop the others.

    With `capture_sha256` (the build's own check of what it just wrote), the capture in the
    payload must have that SHA-256 (the file the build checked) instead of being opened and
    checked again.
    """
    require_tools("mdir", "sfdisk", "sgdisk")
    checks: list[Check] = []
    if not path.is_file():
        return [Check("file", False, f"{path} is not a file")]
    size_bytes = path.stat().st_size
    with open(path, "rb") as stream, tempfile.TemporaryDirectory(prefix="mbrescue-verify-") as tmp:
        work = Path(tmp)
        entries: list[BootEntry] = []

        def catalog() -> str:
            entries.extend(read_boot_catalog(stream))
            return ", ".join(
                f"platform 0x{e.platform:02x} at block {e.load_block}" for e in entries
            )

        checks.append(_check("El Torito catalog", catalog))
        bios = next((e for e in entries if e.platform == 0), None)
        efi = next((e for e in entries if e.platform == EFI_PLATFORM), None)
        checks.append(_check("El Torito BIOS entry", lambda: _bios_entry(stream, bios)))
        checks.append(
            _check("El Torito EFI entry", lambda: _efi_entry(stream, efi, work, size_bytes))
        )
        checks.append(_check("hybrid MBR (GRUB)", lambda: _hybrid_mbr(stream, bios)))
        checks.append(_check("partition table", lambda: _partitions(path, efi, size_bytes)))
        checks.extend(_tree_checks(path, work, capture_sha256))
    return checks


def _bios_entry(stream: BinaryIO, bios: BootEntry | None) -> str:
    _require(bios is not None, "no BIOS (platform 0) entry")
    assert bios is not None
    _require(bios.bootable and bios.media_type == 0, "BIOS entry is not bootable no-emulation")
    image_at = bios.load_block * BLOCK
    pvd_block, file_block, file_bytes, checksum = struct.unpack(
        "<IIII", _read_at(stream, image_at + 8, 16)
    )
    _require(pvd_block == 16 and file_block == bios.load_block, "boot info table missing or wrong")
    image = _read_at(stream, image_at, file_bytes)
    padded = image + b"\0" * ((-len(image)) % BLOCK)
    words = struct.unpack_from(f"<{(len(padded) - 64) // 4}I", padded, 64)
    _require(sum(words) & 0xFFFFFFFF == checksum, "boot info table checksum does not match")
    core_sector = struct.unpack_from("<Q", image, 2548)[0]
    _require(
        core_sector == bios.load_block * 4 + 5,
        f"GRUB2 boot info at byte 2548 is {core_sector}, not {bios.load_block * 4 + 5}",
    )
    return (
        f"no-emulation, {file_bytes} bytes at block {bios.load_block}, boot info table, "
        "grub2-boot-info"
    )


def _efi_entry(stream: BinaryIO, efi: BootEntry | None, work: Path, size_bytes: int) -> str:
    _require(efi is not None, "no EFI (platform 0xEF) entry")
    assert efi is not None
    _require(efi.bootable and efi.media_type == 0, "EFI entry is not bootable no-emulation")
    image_at = efi.load_block * BLOCK
    boot_sector = _read_at(stream, image_at, SECTOR)
    # The load size counts 512-byte sectors; the FAT's own sector total tells its true size.
    total = (
        struct.unpack_from("<H", boot_sector, 19)[0] or struct.unpack_from("<I", boot_sector, 32)[0]
    )
    bytes_per_sector = struct.unpack_from("<H", boot_sector, 11)[0]
    fat_bytes = total * bytes_per_sector
    _require(
        boot_sector[510:512] == b"\x55\xaa" and 0 < fat_bytes < size_bytes,
        "the EFI image is not a FAT file system",
    )
    image = work / "efi.img"
    image.write_bytes(_read_at(stream, image_at, fat_bytes))
    listing = output(
        ["mdir", "-b", "-i", image, "::EFI/BOOT"], env={"MTOOLS_SKIP_CHECK": "1"}
    ).upper()
    _require("BOOTX64.EFI" in listing, "EFI/BOOT/BOOTX64.EFI is missing from the FAT image")
    return f"FAT image of {fat_bytes} bytes at block {efi.load_block} holds EFI/BOOT/BOOTX64.EFI"


def _hybrid_mbr(stream: BinaryIO, bios: BootEntry | None) -> str:
    mbr = _read_at(stream, 0, SECTOR)
    _require(mbr[510:512] == b"\x55\xaa", "no MBR signature")
    if BOOT_HYBRID.exists():
        _require(
            mbr[:0x1B0] == BOOT_HYBRID.read_bytes()[:0x1B0],
            "MBR code is not GRUB's boot_hybrid.img",
        )
    else:
        _require(any(mbr[:0x1B0]), "MBR holds no boot code")
    _require(bios is not None, "no BIOS image to point at")
    assert bios is not None
    core_sector = struct.unpack_from("<Q", mbr, 0x1B0)[0]
    _require(
        core_sector == bios.load_block * 4 + 4,
        f"MBR points at sector {core_sector}, not {bios.load_block * 4 + 4}",
    )
    return f"GRUB boot_hybrid code, core at 512-byte sector {core_sector}"


def _partitions(path: Path, efi: BootEntry | None, size_bytes: int) -> str:
    table = json.loads(output(["sfdisk", "--json", path]))["partitiontable"]
    sectors = size_bytes // SECTOR
    parts = table.get("partitions", [])
    _require(bool(parts), "no partitions")
    for part in parts:
        _require(part["start"] + part["size"] <= sectors, f"{part['node']} ends past the file")
    detail = f"{table['label']}: {len(parts)} partition(s) inside the file"
    if table["label"] == "gpt":
        result = run(["sgdisk", "-v", path], check=False)
        text = result.stdout.decode(errors="replace")
        _require(
            result.returncode == 0 and "No problems found" in text,
            "sgdisk -v: " + " ".join(text.split())[:200],
        )
        detail += ", sgdisk -v clean"
    esps = [p for p in parts if p.get("type", "").upper() in (ESP_TYPE, "EF")]
    _require(bool(esps), "no ESP entry")
    if efi is not None:
        _require(
            any(p["start"] == efi.load_block * 4 for p in esps),
            "the ESP entry does not point at the El Torito EFI image",
        )
    return detail + ", ESP on the EFI image"


def _capture_hook() -> Callable[[Path], object] | None:
    """The lead's `builder.capture.check_capture(path)`, once it exists."""
    try:
        from . import capture
    except ImportError:
        return None
    hook = getattr(capture, "check_capture", None)
    return hook if callable(hook) else None


def _tree_checks(path: Path, work: Path, capture_sha256: str | None) -> list[Check]:
    iso = pycdlib.PyCdlib()
    try:
        iso.open(str(path))
    except pycdlib.pycdlibexception.PyCdlibException as exc:
        return [Check("ISO9660 file system", False, f"pycdlib cannot open it: {exc}")]
    checks = []
    try:
        volume_set = iso.pvd.volume_set_identifier.decode(errors="replace").strip()
        checks.append(
            Check(
                "ISO9660 file system",
                True,
                f"Rock Ridge {iso.has_rock_ridge()}, Joliet {iso.has_joliet()}, "
                f"volume set {volume_set!r}",
            )
        )

        def files() -> str:
            sizes = []
            for rr_path in REQUIRED_FILES:
                record = iso.get_record(rr_path=rr_path)
                _require(record.get_data_length() > 0, f"{rr_path} is empty")
                sizes.append(f"{rr_path.rsplit('/', 1)[1]} {record.get_data_length()}")
            return ", ".join(sizes)

        checks.append(_check("kernel, initrds, grub.cfg", files))
        checks.append(_check("Secure Boot chain signed", lambda: _signed_chain(iso, work)))
        checks.append(_check("build record", lambda: _record(iso, work)))
        checks.append(_check("payload checksum", lambda: _payload(iso, work, capture_sha256)))
    finally:
        iso.close()
    return checks


# shim (signed for the firmware's Microsoft keys), Debian's signed GRUB (checked by shim)
# and the signed kernel (checked by shim through GRUB): each must carry an Authenticode
# signature, or a Secure Boot machine refuses the ISO.
SIGNED_FILES = ("/EFI/BOOT/BOOTX64.EFI", "/EFI/BOOT/grubx64.efi", "/mbrescue/vmlinuz")


def _record(iso: pycdlib.PyCdlib, work: Path) -> str:
    from .buildrecord import check_record

    return check_record(iso, work)


def _signed_chain(iso: pycdlib.PyCdlib, work: Path) -> str:
    from .kit import authenticode_bytes

    found = []
    for rr_path in SIGNED_FILES:
        local = work / rr_path.rsplit("/", 1)[1]
        try:
            iso.get_file_from_iso(str(local), rr_path=rr_path)
        except pycdlib.pycdlibexception.PyCdlibException as exc:
            raise MbrescueError(f"{rr_path} is missing ({exc})") from None
        size = authenticode_bytes(local)
        _require(size > 0, f"{rr_path} carries no signature")
        found.append(f"{rr_path.rsplit('/', 1)[1]} ({size} signature bytes)")
    return ", ".join(found)


def _small_file(iso: pycdlib.PyCdlib, rr_path: str) -> bytes:
    with iso.open_file_from_iso(rr_path=rr_path) as small:
        data = small.read(MAX_SUMS_BYTES + 1)
    _require(len(data) <= MAX_SUMS_BYTES, f"{rr_path} is larger than it can be")
    return data


def _payload(iso: pycdlib.PyCdlib, work: Path, capture_sha256: str | None = None) -> str:
    sums_text = _small_file(iso, SUMS_PATH).decode(errors="replace")
    options_json = _small_file(iso, OPTIONS_PATH)
    with iso.open_file_from_iso(rr_path=PAYLOAD_PATH) as payload:
        return check_payload(payload, sums_text, work, capture_sha256=capture_sha256,
                             options_json=options_json)


def check_options(options_json: bytes, sums: dict[str, str]) -> None:
    """The medium's options file: as summed, and naming the capture the sums name (the
    rescue system refuses a capture whose SHA-256 is not the options file's)."""
    _require("options.json" in sums, "payload.sha256 names no options.json")
    _require(
        hashlib.sha256(options_json).hexdigest() == sums["options.json"],
        "options.json does not match its SHA-256",
    )
    try:
        options = json.loads(options_json)
    except (ValueError, UnicodeDecodeError):
        options = None
    _require(isinstance(options, dict), "options.json is not a JSON object")
    _require(
        options.get("capture_sha256") == sums["capture.mbrescue"],
        "options.json names another capture than payload.sha256: the rescue system would "
        "refuse it",
    )


def _require_manifest_seal(capture_path: Path, options: dict) -> None:
    """The rescue system compares the capture's manifest with the build's record of it."""
    recorded = options.get("manifest_sha256")
    if recorded is None:
        return  # an older build: the rescue system compares the whole file's SHA-256
    from .runner.capfile import Capture

    with Capture.open(str(capture_path)) as capture:
        _require(capture.manifest_sha256 == recorded,
                 "options.json names another manifest than the capture's: the rescue system "
                 "would refuse it")


def check_payload(
    payload: BinaryIO,
    sums_text: str,
    work: Path,
    capture_sha256: str | None = None,
    options_json: bytes | None = None,
) -> str:
    """The payload cpio against its sums: sound to the trailer, holding one matching capture.

    The capture is then opened and checked whole by `builder.capture`; or, given
    `capture_sha256` (a capture the caller checked itself), it must have that SHA-256.
    Given `options_json` (the medium's plain copy), it is checked by `check_options`.
    """
    deep = capture_sha256 is None
    sums = parse_sums(sums_text)
    _require("payload.img" in sums, "payload.sha256 names no payload.img")
    _require(
        "capture.mbrescue" in sums, "payload.sha256 names no capture.mbrescue: no capture inside"
    )
    if options_json is not None:
        check_options(options_json, sums)
    payload.seek(0)
    _require(
        sha256_stream(payload) == sums["payload.img"], "payload.img does not match its SHA-256"
    )
    payload.seek(0)
    # The cpio's structure: every header sound up to the trailer.
    members = 0
    captures = 0
    capture_path = work / "capture.mbrescue"
    try:
        for name, _mode, size in iter_newc(payload):
            members += 1
            if name == OPTIONS_MEMBER and options_json is not None:
                _require(size <= MAX_SUMS_BYTES and payload.read(size) == options_json,
                         "the payload's options.json differs from the medium's")
                continue
            if name != CAPTURE_MEMBER:
                continue
            captures += 1
            _require(captures == 1, f"the payload holds {CAPTURE_MEMBER} twice")
            if deep:
                with open(capture_path, "wb") as copy:
                    digest = sha256_stream(payload, size, copy_to=copy)
            else:
                digest = sha256_stream(payload, size)
            _require(
                digest == sums["capture.mbrescue"],
                "the capture in the payload does not match its SHA-256",
            )
            _require(
                deep or digest == capture_sha256,
                "the capture in the payload is not the one the build checked",
            )
        _require(captures == 1, f"the payload holds no capture ({CAPTURE_MEMBER})")
        detail = f"payload.img matches, cpio of {members} member(s)"
        if not deep:
            return detail + ", the checked capture (SHA-256 matches)"
        hook = _capture_hook()
        _require(hook is not None, "builder.capture.check_capture is missing")
        assert hook is not None
        result = hook(capture_path)
        if options_json is not None:
            _require_manifest_seal(capture_path, json.loads(options_json))
        return detail + ", capture checked" + (f": {result}" if isinstance(result, str) else "")
    finally:
        capture_path.unlink(missing_ok=True)


def format_checks(checks: list[Check]) -> str:
    """A plain table for the terminal: status, name, detail."""
    width = max((len(check.name) for check in checks), default=0)
    # Cut to the terminal's width only on a terminal: a script or a log gets every word.
    columns = shutil.get_terminal_size((100, 20)).columns if sys.stdout.isatty() else 1 << 30
    lines = []
    for check in checks:
        line = f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<{width}}  {check.detail}"
        lines.append(line if len(line) <= columns or not check.ok else line[: columns - 1] + "…")
    return "\n".join(lines)
