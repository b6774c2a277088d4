"""`mbrescue verify ISO` without `--boot`: check a rescue ISO independently of how it was built.

Every check reads the file itself: the El Torito catalog and boot info table from the raw
blocks, the file tree through a fresh `pycdlib.PyCdlib()`, the EFI image's `BOOTX64.EFI`
with mtools, the tree's shim and GRUB against the FAT image's files (its BPB, directories and
FAT chains read here), the hybrid MBR against GRUB's installed `boot_hybrid.img`, the partition
table with `sfdisk --json` and `sgdisk -v`, and the payload against the checksums written beside it.
When `builder.capture` offers `check_capture(path)`, the capture inside the payload is handed
to it (it raises MbrescueError on a bad capture). The result is a list of named checks; the
CLI prints them as a table and exits non-zero when one failed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pycdlib
import pycdlib.pycdlibexception

from .cpio import iter_newc
from .errors import MbrescueError
from .log import human_bytes
from .run import output, require_tools, run
from .runner.agecrypt import decrypt
from .runner.capfile import MANIFEST_MEMBER, MANIFEST_SEAL_MEMBER, Capture

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
# An age file whose one recipient stanza is a passphrase (age-encryption.org/v1).
AGE_SCRYPT_HEADER = b"age-encryption.org/v1\n-> scrypt "
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
    stream: BinaryIO, length: int | None = None, copy_to: BinaryIO | None = None,
    prefix: bytes = b"",
) -> str:
    """SHA-256 of `prefix` and the next `length` bytes (or the rest), copying them on if
    asked."""
    digest = hashlib.sha256(prefix)
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


def verify_iso(path: Path, capture_sha256: str | None = None,
               plaintext: tuple[bytes, ...] = (), passphrase: bytes | None = None
               ) -> list[Check]:
    """All checks of one ISO; a failure of one does not stop the others.

    With `capture_sha256` (the build's own check of what it just wrote), the capture in the
    payload must have that SHA-256 (the file the build checked; the encrypted file, for an
    encrypted build) instead of being opened and checked again. `plaintext`: pieces of the
    capture (the build knows them) that an encrypted ISO must not hold anywhere.
    `passphrase` opens an encrypted ISO's capture: it is then checked whole, and its pieces
    are looked for in the ISO.
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

        checks.append(_check(SIZE_CHECK, lambda: _whole_volume(stream, size_bytes)))
        checks.append(_check("El Torito catalog", catalog))
        bios = next((e for e in entries if e.platform == 0), None)
        efi = next((e for e in entries if e.platform == EFI_PLATFORM), None)
        checks.append(_check("El Torito BIOS entry", lambda: _bios_entry(stream, bios)))
        checks.append(
            _check("El Torito EFI entry", lambda: _efi_entry(stream, efi, work, size_bytes))
        )
        checks.append(_check("hybrid MBR (GRUB)", lambda: _hybrid_mbr(stream, bios)))
        checks.append(_check("partition table", lambda: _partitions(path, efi, size_bytes)))
        checks.extend(_tree_checks(path, work, capture_sha256, stream, efi, plaintext,
                                   passphrase))
    return checks


SIZE_CHECK = "size"


def _whole_volume(stream: BinaryIO, size_bytes: int) -> str:
    """The file holds the whole volume its primary volume descriptor names: a cut copy or
    download fails every later check too, and this one says why."""
    stream.seek(16 * 2048)
    descriptor = stream.read(2048)
    _require(len(descriptor) == 2048 and descriptor[1:6] == b"CD001",
             f"truncated or not an ISO: no ISO 9660 volume descriptor ({size_bytes} bytes)")
    blocks = struct.unpack_from("<I", descriptor, 80)[0]
    block_bytes = struct.unpack_from("<H", descriptor, 128)[0]
    volume_bytes = blocks * block_bytes
    _require(size_bytes >= volume_bytes,
             f"truncated: the file holds {human_bytes(size_bytes)} of the "
             f"{human_bytes(volume_bytes)} its volume descriptor names")
    return f"{human_bytes(size_bytes)}, the whole volume"


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


def _efi_image(stream: BinaryIO, efi: BootEntry, size_bytes: int) -> bytes:
    """The FAT image at the El Torito EFI entry, as long as its own sector total says."""
    image_at = efi.load_block * BLOCK
    boot_sector = _read_at(stream, image_at, SECTOR)
    # The load size counts 512-byte sectors; the FAT's own sector total tells its true size.
    total = (
        struct.unpack_from("<H", boot_sector, 19)[0] or struct.unpack_from("<I", boot_sector, 32)[0]
    )
    bytes_per_sector = struct.unpack_from("<H", boot_sector, 11)[0]
    fat_bytes = total * bytes_per_sector
    _require(
        boot_sector[510:512] == b"\x55\xaa" and 0 < fat_bytes <= size_bytes - image_at,
        "the EFI image is not a FAT file system",
    )
    return _read_at(stream, image_at, fat_bytes)


def _efi_entry(stream: BinaryIO, efi: BootEntry | None, work: Path, size_bytes: int) -> str:
    _require(efi is not None, "no EFI (platform 0xEF) entry")
    assert efi is not None
    _require(efi.bootable and efi.media_type == 0, "EFI entry is not bootable no-emulation")
    data = _efi_image(stream, efi, size_bytes)
    fat_bytes = len(data)
    image = work / "efi.img"
    image.write_bytes(data)
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


def _tree_checks(
    path: Path,
    work: Path,
    capture_sha256: str | None,
    stream: BinaryIO,
    efi: BootEntry | None,
    plaintext: tuple[bytes, ...] = (),
    passphrase: bytes | None = None,
) -> list[Check]:
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
        checks.append(_check("EFI files in the tree", lambda: _efi_tree(iso, stream, efi)))
        checks.append(_check("Secure Boot chain signed", lambda: _signed_chain(iso, work)))
        checks.append(_check("build record", lambda: _record(iso, work)))
        checks.append(_check("payload checksum", lambda: _payload(iso, work, capture_sha256)))
        if _encrypted(iso):
            pieces = list(plaintext)
            if passphrase is not None:
                checks.append(_check("encrypted capture opened",
                                     lambda: _open_encrypted(iso, work, passphrase, pieces)))
            checks.append(_check("no plaintext capture",
                                 lambda: no_plaintext(path, tuple(pieces))))
    finally:
        iso.close()
    return checks


# A plain capture anywhere in an ISO shows these: its manifest's format name and its tar
# members' names (each in a tar header). An encrypted build holds the capture only as age
# ciphertext (a compressed rescue system shows none of them either).
PLAINTEXT_MARKERS = (b'"mbrescue-capture"', b"manifest.json\0", b"region.img.gz\0",
                     b"boot.tar.gz\0")


def _encrypted(iso: pycdlib.PyCdlib) -> bool:
    try:
        return options_encrypted(small_file(iso, OPTIONS_PATH))
    except (MbrescueError, pycdlib.pycdlibexception.PyCdlibException):
        return False


# Bytes of a plain capture an encrypted ISO must not hold: this many from the start of
# each piece (a tar header, a gzip member's head, the manifest's), as many pieces as below.
PLAINTEXT_PIECE_BYTES = 64
PLAINTEXT_CHUNKS = 256


def plaintext_pieces(capture: Capture, public: Sequence[Path] = ()) -> tuple[bytes, ...]:
    """What would show a plain copy of this capture: its first tar header, its manifest,
    the head and middle of its members and of (up to PLAINTEXT_CHUNKS) region chunks.

    A piece that is in one of the `public` files is no sign of the capture: a /boot holds
    the very Debian kernel the rescue system boots, and gzip stores an incompressible
    kernel's bytes as they are."""
    manifest = capture.read_member(MANIFEST_MEMBER)
    pieces = [capture.pread(512, capture.base), manifest[:PLAINTEXT_PIECE_BYTES],
              manifest[len(manifest) // 2:][:PLAINTEXT_PIECE_BYTES]]
    for name, member in capture.members.items():
        if name == MANIFEST_SEAL_MEMBER:
            continue  # the manifest's SHA-256, public in options.json
        for at in (0, member.size // 2):
            if member.size - at >= PLAINTEXT_PIECE_BYTES:
                pieces.append(os.pread(capture.fd, PLAINTEXT_PIECE_BYTES, member.offset + at))
    for packed in itertools.islice(capture.compressed_chunks(), PLAINTEXT_CHUNKS):
        if len(packed) >= 2 * PLAINTEXT_PIECE_BYTES:
            middle = len(packed) // 2
            pieces += [packed[:PLAINTEXT_PIECE_BYTES],
                       packed[middle:middle + PLAINTEXT_PIECE_BYTES]]
    # A run of one byte (zeros) is in any file: not a sign of the capture.
    found = [piece for piece in dict.fromkeys(pieces) if len(set(piece)) > 4]
    for path in public:
        data = path.read_bytes()
        found = [piece for piece in found if piece not in data]
    return tuple(found)


def decrypt_from_iso(iso: pycdlib.PyCdlib, work: Path, passphrase: bytes) -> Path:
    """The encrypted ISO's capture, decrypted with age into work/plain.mbrescue."""
    sealed = work / "capture.age"
    with iso.open_file_from_iso(rr_path=PAYLOAD_PATH) as payload:
        for name, _mode, size in iter_newc(payload):
            if name == CAPTURE_MEMBER:
                with open(sealed, "wb") as copy:
                    sha256_stream(payload, size, copy_to=copy)
                break
        else:
            raise MbrescueError(f"the payload holds no capture ({CAPTURE_MEMBER})")
    plain = work / "plain.mbrescue"
    fd = os.open(sealed, os.O_RDONLY)
    try:
        decrypt(fd, 0, os.fstat(fd).st_size, os.fspath(plain), passphrase)
    finally:
        os.close(fd)
        sealed.unlink()
    return plain


def _open_encrypted(iso: pycdlib.PyCdlib, work: Path, passphrase: bytes,
                    pieces: list[bytes]) -> str:
    """Decrypt the capture, check it whole and against options.json, and add its pieces
    (less what the ISO's public kernel and rescue system hold) to `pieces`."""
    options = json.loads(small_file(iso, OPTIONS_PATH))
    plain = decrypt_from_iso(iso, work, passphrase)
    try:
        with open(plain, "rb") as stream:
            _require(sha256_stream(stream) == options.get("capture_sha256"),
                     "the decrypted capture is not the one options.json names")
        hook = _capture_hook()
        _require(hook is not None, "builder.capture.check_capture is missing")
        assert hook is not None
        result = hook(plain)
        _require_manifest_seal(plain, options)
        public = []
        for rr_path in ("/mbrescue/vmlinuz", "/mbrescue/base.img"):
            public.append(work / rr_path.rsplit("/", 1)[1])
            iso.get_file_from_iso(os.fspath(public[-1]), rr_path=rr_path)
        with Capture.open(os.fspath(plain)) as capture:
            pieces.extend(plaintext_pieces(capture, public))
        for path in public:
            path.unlink()
    finally:
        plain.unlink(missing_ok=True)
    return "decrypted with the passphrase, capture checked" + (
        f": {result}" if isinstance(result, str) else "")


def no_plaintext(path: Path, pieces: tuple[bytes, ...] = ()) -> str:
    """An encrypted ISO holds no plain capture: none of its markers, none of `pieces` (the
    build's: its manifest, its members' and region chunks' bytes) at any byte offset."""
    with open(path, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for marker in PLAINTEXT_MARKERS:
            at = data.find(marker)
            _require(at < 0, f"a plain capture's {marker!r} is at byte {at}")
        for index, piece in enumerate(pieces):
            at = data.find(piece)
            _require(at < 0, f"plaintext of the capture (piece {index}) is at byte {at}")
    extra = f" nor any of {len(pieces)} pieces of the capture" if pieces else ""
    return f"no plain capture's markers{extra} anywhere in the ISO"


def _efi_tree(iso: pycdlib.PyCdlib, stream: BinaryIO, efi: BootEntry | None) -> str:
    """The tree's shim and GRUB (ISO 9660 and Joliet records) hold the FAT image's files.

    A record may point at the file's own bytes inside the FAT image's extent (the build
    stores them once; see `iso.write_iso`) or at a separate copy outside it; either way its
    bytes must be the FAT file's. A record that points into the FAT image anywhere else, or
    past the end of the file, is refused.
    """
    _require(efi is not None, "no El Torito EFI image to compare with")
    assert efi is not None
    stream.seek(0, 2)
    size_bytes = stream.tell()
    fat_at = efi.load_block * BLOCK
    image = _efi_image(stream, efi, size_bytes)
    fat_end = fat_at + len(image)
    found = []
    for iso_path, fat_path in EFI_TREE_FILES.items():
        inner = fat_file(image, fat_path)
        data = inner.read(image)
        own = inner.contiguous_at()
        name = iso_path.rsplit("/", 1)[1]
        kinds = []
        for kind, record in (
            ("ISO 9660", iso.get_record(iso_path=_iso9660_path(iso_path))),
            ("Joliet", iso.get_record(joliet_path=iso_path)),
        ):
            at = record.extent_location() * BLOCK
            length = record.get_data_length()
            _require(
                length == inner.size,
                f"the {kind} record of {iso_path} has {length} bytes, {fat_path} in the EFI "
                f"image {inner.size}",
            )
            _require(
                at + length <= size_bytes, f"the {kind} record of {iso_path} ends past the file"
            )
            inside = length > 0 and at < fat_end and at + length > fat_at
            _require(
                not inside or (own is not None and at == fat_at + own),
                f"the {kind} record of {iso_path} points into the EFI image, not at its {fat_path}",
            )
            _require(
                _read_at(stream, at, length) == data,
                f"the {kind} record of {iso_path} holds other bytes than {fat_path} in the EFI "
                "image",
            )
            kinds.append("shared" if inside else "copy")
        how = "the EFI image's bytes" if kinds == ["shared", "shared"] else (
            "copies" if kinds == ["copy", "copy"] else "shared (ISO 9660) / copy (Joliet)"
            if kinds[0] == "shared" else "copy (ISO 9660) / shared (Joliet)")
        found.append(f"{name} {inner.size} bytes: {how}")
    return ", ".join(found)


def _iso9660_path(rr_path: str) -> str:
    """The primary (level 3) name of one of EFI_TREE_FILES, as `iso.ISO_FILES` gives it."""
    return rr_path.upper() + ";1"


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


def small_file(iso: pycdlib.PyCdlib, rr_path: str) -> bytes:
    with iso.open_file_from_iso(rr_path=rr_path) as small:
        data = small.read(MAX_SUMS_BYTES + 1)
    _require(len(data) <= MAX_SUMS_BYTES, f"{rr_path} is larger than it can be")
    return data


def _payload(iso: pycdlib.PyCdlib, work: Path, capture_sha256: str | None = None) -> str:
    sums_text = small_file(iso, SUMS_PATH).decode(errors="replace")
    options_json = small_file(iso, OPTIONS_PATH)
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
    # An encrypted build names the plain capture (what the rescue system decrypts must have
    # that seal) and, apart, the encrypted file the payload holds.
    named = "encrypted_capture_sha256" if options.get("encrypted") is True else "capture_sha256"
    _require(
        options.get(named) == sums["capture.mbrescue"],
        "options.json names another capture than payload.sha256: the rescue system would "
        "refuse it",
    )


def options_encrypted(options_json: bytes | None) -> bool:
    try:
        options = json.loads(options_json) if options_json is not None else None
    except ValueError:
        return False
    return isinstance(options, dict) and options.get("encrypted") is True


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
    encrypted = options_encrypted(options_json)
    deep = capture_sha256 is None and not encrypted
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
            elif encrypted:
                head = payload.read(min(size, 256))
                _require(head.startswith(AGE_SCRYPT_HEADER), "options.json says the capture "
                         "is encrypted, but the payload's capture is no passphrase-encrypted "
                         "age file")
                digest = sha256_stream(payload, size - len(head), prefix=head)
            else:
                digest = sha256_stream(payload, size)
            _require(
                digest == sums["capture.mbrescue"],
                "the capture in the payload does not match its SHA-256",
            )
            _require(
                capture_sha256 is None or digest == capture_sha256,
                "the capture in the payload is not the one the build checked",
            )
        _require(captures == 1, f"the payload holds no capture ({CAPTURE_MEMBER})")
        detail = f"payload.img matches, cpio of {members} member(s)"
        if encrypted:
            return detail + (", the capture age-encrypted (scrypt passphrase), not opened"
                             if capture_sha256 is None else
                             ", the encrypted checked capture (SHA-256 matches)")
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


# --- the FAT image's own layout, read with the standard library ---------------------------------

# ISO path of each EFI file in the tree -> its path inside the El Torito FAT image.
EFI_TREE_FILES = {
    "/EFI/BOOT/BOOTX64.EFI": "EFI/BOOT/BOOTX64.EFI",
    "/EFI/BOOT/grubx64.efi": "EFI/BOOT/grubx64.efi",
}
_FAT_ATTR_LFN = 0x0F
_FAT_ATTR_VOLUME = 0x08
_FAT_ATTR_DIRECTORY = 0x10


@dataclass(frozen=True)
class FatFile:
    size: int
    runs: tuple[tuple[int, int], ...]  # (byte offset from the image's start, length), in order

    def contiguous_at(self) -> int | None:
        """The file's byte offset in the image when its data is one run, else None."""
        return self.runs[0][0] if len(self.runs) == 1 else None

    def read(self, image: bytes) -> bytes:
        return b"".join(image[at : at + length] for at, length in self.runs)


class _Fat:
    """A FAT12/16/32 image's BPB, FAT chains and directories (no LFN checksum games)."""

    def __init__(self, image: bytes) -> None:
        _require(len(image) >= SECTOR and image[510:512] == b"\x55\xaa", "not a FAT image")
        self.image = image
        (bps, spc, reserved, fats, root_entries, total16, _media, fat16) = struct.unpack_from(
            "<HBHBHHBH", image, 11
        )
        total = total16 or struct.unpack_from("<I", image, 32)[0]
        fat_sectors = fat16 or struct.unpack_from("<I", image, 36)[0]
        _require(
            bps in (512, 1024, 2048, 4096) and spc in (1, 2, 4, 8, 16, 32, 64, 128)
            and reserved > 0 and fats > 0 and fat_sectors > 0 and total * bps <= len(image),
            "the FAT image's BPB is not sound",
        )
        self.cluster_bytes = bps * spc
        self.fat_at = reserved * bps
        root_sectors = (root_entries * 32 + bps - 1) // bps
        self.root_at = self.fat_at + fats * fat_sectors * bps
        self.data_at = self.root_at + root_sectors * bps
        _require(self.data_at < total * bps, "the FAT image has no data area")
        self.clusters = (total * bps - self.data_at) // self.cluster_bytes
        self.bits = 12 if self.clusters < 4085 else 16 if self.clusters < 65525 else 32
        self.fat_bytes = fat_sectors * bps
        self.root_bytes = root_sectors * bps
        self.root_cluster = struct.unpack_from("<I", image, 44)[0] if self.bits == 32 else 0

    def _next(self, cluster: int) -> int | None:
        if self.bits == 12:
            at = cluster + cluster // 2
            _require(at + 2 <= self.fat_bytes, "a FAT chain runs past the FAT")
            value = struct.unpack_from("<H", self.image, self.fat_at + at)[0]
            value = value >> 4 if cluster & 1 else value & 0xFFF
            end = 0xFF8
        elif self.bits == 16:
            _require(cluster * 2 + 2 <= self.fat_bytes, "a FAT chain runs past the FAT")
            value = struct.unpack_from("<H", self.image, self.fat_at + cluster * 2)[0]
            end = 0xFFF8
        else:
            _require(cluster * 4 + 4 <= self.fat_bytes, "a FAT chain runs past the FAT")
            value = struct.unpack_from("<I", self.image, self.fat_at + cluster * 4)[0] & 0x0FFFFFFF
            end = 0x0FFFFFF8
        return None if value >= end else value

    def chain(self, first: int) -> list[int]:
        chain: list[int] = []
        cluster: int | None = first
        while cluster is not None:
            _require(2 <= cluster < self.clusters + 2, f"FAT chain names cluster {cluster}")
            _require(len(chain) < self.clusters, "a FAT chain loops")
            chain.append(cluster)
            cluster = self._next(cluster)
        return chain

    def runs(self, first: int, size: int | None) -> tuple[tuple[int, int], ...]:
        """Byte ranges of a chain; `size` (a file's) cuts the last one, None: whole clusters."""
        chain = self.chain(first) if first else []
        if size is not None:
            _require(len(chain) == (size + self.cluster_bytes - 1) // self.cluster_bytes,
                     "a FAT file's chain does not match its size")
        runs: list[list[int]] = []
        for cluster in chain:
            at = self.data_at + (cluster - 2) * self.cluster_bytes
            if runs and runs[-1][0] + runs[-1][1] == at:
                runs[-1][1] += self.cluster_bytes
            else:
                runs.append([at, self.cluster_bytes])
        if size is not None and runs:
            runs[-1][1] -= len(chain) * self.cluster_bytes - size
        return tuple((at, length) for at, length in runs)

    def _entries(self, directory: bytes) -> Iterator[tuple[str, str, int, int, int]]:
        """(long name, short name, attributes, first cluster, size) of each live entry."""
        long_parts: dict[int, str] = {}
        for at in range(0, len(directory) - 31, 32):
            entry = directory[at : at + 32]
            if entry[0] == 0:
                return
            if entry[0] == 0xE5:
                long_parts = {}
                continue
            attributes = entry[11]
            if attributes == _FAT_ATTR_LFN:
                chars = entry[1:11] + entry[14:26] + entry[28:32]
                text = chars.decode("utf-16-le", errors="replace")
                long_parts[entry[0] & 0x1F] = text.split("\0", 1)[0]
                continue
            long_name = "".join(long_parts[key] for key in sorted(long_parts))
            long_parts = {}
            if attributes & _FAT_ATTR_VOLUME:
                continue
            base = entry[0:8].decode("latin-1").rstrip()
            ext = entry[8:11].decode("latin-1").rstrip()
            short = base + ("." + ext if ext else "")
            first = struct.unpack_from("<H", entry, 26)[0]
            if self.bits == 32:
                first |= struct.unpack_from("<H", entry, 20)[0] << 16
            size = struct.unpack_from("<I", entry, 28)[0]
            yield long_name, short, attributes, first, size

    def find(self, path: str) -> FatFile:
        if self.bits == 32:
            directory = FatFile(0, self.runs(self.root_cluster, None)).read(self.image)
        else:
            directory = self.image[self.root_at : self.root_at + self.root_bytes]
        parts = [part for part in path.split("/") if part]
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            for long_name, short, attributes, first, size in self._entries(directory):
                if part.upper() not in (long_name.upper(), short.upper()):
                    continue
                is_directory = bool(attributes & _FAT_ATTR_DIRECTORY)
                _require(is_directory != last, f"{path}: {part} is the wrong kind in the FAT")
                if last:
                    runs = self.runs(first, size)
                    _require(all(at + length <= len(self.image) for at, length in runs),
                             f"{path} runs past the FAT image")
                    return FatFile(size, runs)
                directory = FatFile(0, self.runs(first, None)).read(self.image)
                break
            else:
                raise MbrescueError(f"{path} is not in the FAT image")
        raise MbrescueError(f"{path} is not a file path")


def fat_file(image: bytes, path: str) -> FatFile:
    """Where the file `path` ("EFI/BOOT/BOOTX64.EFI") lies in a FAT image; MbrescueError if
    the image or the file is not sound."""
    return _Fat(image).find(path)
