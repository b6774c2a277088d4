"""GRUB boot images for the rescue ISO: BIOS GRUB, the Secure Boot UEFI chain, the hybrid MBR code.

`grub-mkimage -O i386-pc-eltorito` makes the El Torito no-emulation image (cdboot.img followed
by a core image; the same bytes boot a USB stick through `boot_hybrid.img`). UEFI boots
Debian's signed chain, so it works with Secure Boot on and off: `EFI/BOOT/BOOTX64.EFI` is
shim (signed by Microsoft's UEFI CA), `EFI/BOOT/grubx64.efi` beside it is Debian's signed
GRUB for removable media (gcdx64, as Debian's own installer and live media use), and shim
checks it and the kernel against Debian's CA. They go into a small FAT image for the El Torito
EFI entry and the GPT ESP entry; the ISO 9660 tree's EFI/BOOT records point at their bytes there,
for firmware that reads the tree (laid out for it: see `make_efi_fat`).
The FAT image is made with `mkfs.vfat --invariant` and mtools, which write image files directly
(this machine's kernel cannot mount vfat) and honour `SOURCE_DATE_EPOCH`, so the bytes are
reproducible.

A signed GRUB cannot take an embedded config of ours nor load modules under Secure Boot:
everything the menu uses must be built into Debian's image (see SIGNED_GRUB_COMMANDS). gcdx64
reads `<its device>/boot/grub/grub.cfg`: from CD that device is the ISO itself, so the real
menu is read at once; from USB it is the ESP, whose `boot/grub/grub.cfg` is a three-line
loader config that finds this medium by a file named after its medium id (never by Debian's
`/.disk/info`, which another Debian medium in the machine would also have), sets the prefix
there and sources the real menu. The same loader config sits at `EFI/debian/grub.cfg`, where
Debian's disk image (grubx64, prefix `/EFI/debian`) would look for it. The BIOS image embeds
the same search. Results are cached by a hash of the package versions, the module list and
the configs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2

from . import log
from .cpio import source_date_epoch
from .debs import cache_dir
from .errors import MbrescueError, ToolMissing
from .kit import EfiLoaders, ensure_efi_loaders
from .run import output, require_tools, run
from .runner.outputs import write_output

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
GRUB_LIB = Path("/usr/lib/grub")
BIOS_DIR = GRUB_LIB / "i386-pc"
EFI_DIR = GRUB_LIB / "x86_64-efi"

# What both images need: find the medium, read the ISO and the host's /boot (ext2..4, or XFS
# as RHEL-family hosts make it; any partition table), talk on serial and screen at once, run grub.cfg's tests and boot Linux or
# chainload the local disk.
COMMON_MODULES = (
    "iso9660",
    "part_msdos",
    "part_gpt",
    "ext2",
    "xfs",
    "fat",
    "search",
    "search_fs_uuid",
    "search_fs_file",
    "search_label",
    "serial",
    "terminal",
    "regexp",
    "normal",
    "configfile",
    "linux",
    "chain",
    "echo",
    "test",
    "sleep",
    "ls",
    "cat",
    "halt",
    "reboot",
    "minicmd",
)
BIOS_MODULES = ("biosdisk", *COMMON_MODULES)
# What grub.cfg and the loader config may use under UEFI: each of these is built into both of
# Debian's signed images (gcdx64 and grubx64 of grub-efi-amd64-signed 2.06-13, read from the
# images' module list), because under Secure Boot `insmod` refuses to load anything more.
# Command -> the GRUB module that provides it (the script's own words live in `normal`).
SIGNED_GRUB_COMMANDS = {
    "serial": "serial",
    "terminal_input": "terminal",
    "terminal_output": "terminal",
    "echo": "echo",
    "search": "search",
    "set": "normal",
    "if": "normal",
    "for": "normal",
    "menuentry": "normal",
    "linux": "linux",
    "initrd": "linux",
    "regexp": "regexp",
    "chainloader": "chain",
    "boot": "boot",
    "configfile": "configfile",
    "source": "configfile",
    "sleep": "sleep",
    "exit": "minicmd",
    "[": "test",
}
# The file systems and partition tables the menu reads through.
SIGNED_GRUB_MODULES = ("iso9660", "fat", "ext2", "part_gpt", "part_msdos", "search_fs_uuid",
                       "search_fs_file")  # fmt: skip

_GRUB_MODULES_MAGIC = 0x676D696D  # "mimg": the module area's header in a GRUB image
_GRUB_MODULE_ELF = 0


def image_modules(image: Path) -> list[str]:
    """The module names built into a GRUB EFI image (read from its module area)."""
    data = image.read_bytes()
    magic = struct.pack("<I", _GRUB_MODULES_MAGIC)
    at = data.find(magic)
    while at >= 0:
        _magic, padding, offset, size = struct.unpack_from("<IIQQ", data, at)
        if padding == 0 and offset == 24 and at + size <= len(data):
            break
        at = data.find(magic, at + 1)
    if at < 0:
        raise MbrescueError(f"{image} holds no GRUB module area")
    names = []
    cursor, end = at + 24, at + size
    while cursor + 8 <= end:
        kind, length = struct.unpack_from("<II", data, cursor)
        if length < 8:
            break
        if kind == _GRUB_MODULE_ELF:
            names.append(_elf_modname(data[cursor + 8 : cursor + length]))
        cursor += length
    return [name for name in names if name]


def _elf_modname(elf: bytes) -> str:
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    entry_bytes, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQII", elf, shoff + i * entry_bytes) for i in range(count)]
    names_at = sections[names_index][4]
    for name_at, _kind, _flags, _addr, offset, size, _link, _info in sections:
        name = elf[names_at + name_at : elf.index(b"\0", names_at + name_at)]
        if name == b".modname":
            return elf[offset : offset + size].rstrip(b"\0").decode()
    return ""

# FAT cannot store dates before 1980; mtools would wrap an earlier SOURCE_DATE_EPOCH.
FAT_EPOCH_MIN = 315532800
FAT_VOLUME_ID = "4d425245"  # "MBRE": fixed, so two builds give the same bytes
FAT_LABEL = "MBRESCUE"
# 512-byte sectors, 4 to a cluster: every cluster, and so each file that starts one and runs
# on contiguously, lies on an ISO 9660 block (2048 bytes) of the FAT image, so the ISO tree's
# EFI/BOOT files can point at the FAT's own bytes instead of holding copies (`iso.write_iso`
# checks it and falls back to copies). mkfs.fat aligns its data area to the cluster size.
FAT_SECTOR_BYTES = 512
FAT_SECTORS_PER_CLUSTER = 4
# Part of the cache key: images made before this layout was asked for are not reused.
FAT_LAYOUT = "fat-layout-2: 2048-byte clusters, aligned data area, shim then GRUB contiguous"


@dataclass(frozen=True)
class GrubImages:
    bios_eltorito: Path  # cdboot.img + core image, El Torito no-emulation boot file
    efi_fat: Path  # FAT image: EFI/BOOT/BOOTX64.EFI (shim), grubx64.efi, the loader configs
    boot_hybrid: Path  # GRUB's MBR code for the hybrid (USB) boot
    modules: tuple[str, ...]  # what the BIOS image holds
    medium_id: str
    # The same UEFI chain for the ISO 9660 tree (EFI/BOOT/..., EFI/debian/grub.cfg).
    efi_shim: Path
    efi_grub: Path
    efi_loader_cfg: Path
    efi_packages: dict[str, str]  # Debian package -> version of the signed loaders


def medium_marker(medium_id: str) -> str:
    """The file on the ISO whose presence identifies this medium to GRUB."""
    return f"/mbrescue/id-{medium_id}"


def embedded_config(medium_id: str) -> str:
    # `search` leaves root unchanged when nothing matches, so a CD boot still finds its files.
    return (
        f"search --no-floppy --file --set=root {medium_marker(medium_id)}\n"
        "set prefix=($root)/boot/grub\n"
    )


def efi_loader_config(medium_id: str) -> str:
    """What the signed GRUB reads from the ESP: find this medium, then its real menu."""
    return (
        f"search --no-floppy --file --set=root {medium_marker(medium_id)}\n"
        "set prefix=($root)/boot/grub\n"
        "source $prefix/grub.cfg\n"
    )


def check_grub_installed() -> None:
    """Fail before any work when GRUB's image builders or platform files are missing."""
    require_tools("grub-mkimage", "mkfs.vfat", "mmd", "mcopy")
    # UEFI needs no platform files here: its GRUB is Debian's signed image from the kit.
    for directory, package in ((BIOS_DIR, "grub-pc-bin"),):
        if not (directory / "kernel.img").exists():
            raise ToolMissing(
                f"GRUB platform files missing in {directory}",
                hint=f"apt-get install {package} (or run: make setup)",
            )
    if not (BIOS_DIR / "boot_hybrid.img").exists():
        raise ToolMissing(
            f"{BIOS_DIR}/boot_hybrid.img is missing", hint="apt-get install grub-pc-bin"
        )


def _package_versions() -> str:
    text = output(
        [
            "dpkg-query",
            "-W",
            "-f",
            "${Package}=${Version}\n",
            "grub-common",
            "grub-pc-bin",
            "dosfstools",
            "mtools",
        ],
        check=False,
    )
    return text


def _cache_key(medium_id: str, loaders: EfiLoaders | None = None) -> str:
    loaders = loaders or ensure_efi_loaders()
    digest = hashlib.sha256()
    for part in (
        _package_versions(),
        " ".join(BIOS_MODULES),
        " ".join(f"{name}={sha}" for name, sha in sorted(loaders.package_sha256.items())),
        embedded_config(medium_id),
        efi_loader_config(medium_id),
        str(_fat_epoch()),
        FAT_LAYOUT,
        # This module's text: a change to how the images are made (the FAT's size) is a
        # change of the images.
        Path(__file__).read_text(),
    ):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:24]


def _fat_epoch() -> int:
    return max(source_date_epoch(), FAT_EPOCH_MIN)


def _fat_size_kib(payload_bytes: int) -> int:
    # Room for the FAT tables, directories and cluster slack (a sixteenth and 128 KiB: the
    # image is part of every ISO's overhead, so no more); El Torito's 16-bit load size
    # (512-byte sectors) caps the image below 32 MiB.
    size_kib = max(1440, (payload_bytes * 17 // 16 + 128 * 1024) // 1024)
    size_kib = (size_kib + 63) // 64 * 64
    if size_kib >= 32 * 1024:
        raise MbrescueError(f"EFI image would be {size_kib} KiB, El Torito allows under 32 MiB")
    return size_kib


def make_efi_fat(shim: Path, grub_efi: Path, loader_cfg: Path, out: Path) -> None:
    """The ESP image: shim as EFI/BOOT/BOOTX64.EFI, the signed GRUB beside it, loader configs.

    Reproducible under SOURCE_DATE_EPOCH. Clusters of 2048 bytes on an aligned data area, and
    shim and GRUB copied into a fresh file system one after the other, so each lies in one run
    of clusters starting on a 2048-byte boundary of the image (see FAT_SECTORS_PER_CLUSTER).
    """
    env = {"SOURCE_DATE_EPOCH": str(_fat_epoch()), "MTOOLS_SKIP_CHECK": "1"}
    if out.exists():
        out.unlink()
    payload_bytes = sum(path.stat().st_size for path in (shim, grub_efi)) + 2 * 4096
    run(
        [
            "mkfs.vfat",
            "--invariant",
            "-i",
            FAT_VOLUME_ID,
            "-n",
            FAT_LABEL,
            "-S",
            str(FAT_SECTOR_BYTES),
            "-s",
            str(FAT_SECTORS_PER_CLUSTER),
            "-C",
            out,
            str(_fat_size_kib(payload_bytes)),
        ],
        env=env,
    )
    run(["mmd", "-i", out, "::EFI", "::EFI/BOOT", "::EFI/debian", "::boot", "::boot/grub"],
        env=env)  # fmt: skip
    # shim loads grubx64.efi from its own directory; no fbx64.efi, so shim never starts its
    # fallback (which would write boot entries into the machine's NVRAM).
    run(["mcopy", "-i", out, shim, "::EFI/BOOT/BOOTX64.EFI"], env=env)
    run(["mcopy", "-i", out, grub_efi, "::EFI/BOOT/grubx64.efi"], env=env)
    # gcdx64 reads (ESP)/boot/grub/grub.cfg; Debian's disk image (ESP)/EFI/debian/grub.cfg.
    run(["mcopy", "-i", out, loader_cfg, "::boot/grub/grub.cfg"], env=env)
    run(["mcopy", "-i", out, loader_cfg, "::EFI/debian/grub.cfg"], env=env)


def make_grub_images(work: Path, *, medium_id: str) -> GrubImages:
    """Build (or take from the cache) the BIOS El Torito image and the EFI FAT image."""
    check_grub_installed()
    loaders = ensure_efi_loaders()
    key = _cache_key(medium_id, loaders)
    cached = cache_dir() / "grub" / key
    if not (cached / ".complete").exists():
        log.info("making GRUB images (BIOS El Torito, UEFI FAT with shim and signed GRUB)")
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".g-"))
        try:
            config = tmp / "embedded.cfg"
            config.write_text(embedded_config(medium_id))
            run(
                [
                    "grub-mkimage",
                    "-O",
                    "i386-pc-eltorito",
                    "-d",
                    BIOS_DIR,
                    "-p",
                    "/boot/grub",
                    "-c",
                    config,
                    "-o",
                    tmp / "eltorito.img",
                    *BIOS_MODULES,
                ]
            )
            loader_cfg = tmp / "loader.cfg"
            loader_cfg.write_text(efi_loader_config(medium_id))
            shutil.copyfile(loaders.shim, tmp / "BOOTX64.EFI")
            shutil.copyfile(loaders.grub_removable, tmp / "grubx64.efi")
            make_efi_fat(tmp / "BOOTX64.EFI", tmp / "grubx64.efi", loader_cfg, tmp / "efi.img")
            shutil.copyfile(BIOS_DIR / "boot_hybrid.img", tmp / "boot_hybrid.img")
            (tmp / ".complete").write_text(key + "\n")
            if cached.exists():
                shutil.rmtree(cached)
            os.replace(tmp, cached)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    work.mkdir(parents=True, exist_ok=True)
    names = ("eltorito.img", "efi.img", "boot_hybrid.img", "BOOTX64.EFI", "grubx64.efi",
             "loader.cfg")  # fmt: skip
    for name in names:
        shutil.copyfile(cached / name, work / name)
    return GrubImages(
        bios_eltorito=work / "eltorito.img",
        efi_fat=work / "efi.img",
        boot_hybrid=work / "boot_hybrid.img",
        modules=BIOS_MODULES,
        medium_id=medium_id,
        efi_shim=work / "BOOTX64.EFI",
        efi_grub=work / "grubx64.efi",
        efi_loader_cfg=work / "loader.cfg",
        efi_packages=dict(loaders.packages),
    )


# Values that land inside GRUB's double-quoted strings and on the kernel command line: refuse
# anything that could end a string or start a new word.
_SAFE_TEXT = re.compile(r"[A-Za-z0-9 ._:+/()-]*")
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SerialPort:
    """The serial line GRUB and the rescue kernel talk on (`build --serial ttyS1,115200`):
    many servers' serial-over-LAN is the second port."""

    unit: int = 0
    speed: int = 115200

    @property
    def device(self) -> str:
        return f"ttyS{self.unit}"


DEFAULT_SERIAL = SerialPort()
SERIAL_SPEEDS = (9600, 19200, 38400, 57600, 115200)
_SERIAL_RE = re.compile(r"(?:ttyS)?([0-3])(?:,([0-9]{4,6}))?")


def parse_serial(text: str) -> SerialPort:
    """`ttyS1,115200`, `ttyS1` (115200) or `1,57600`; ports 0..3 (COM1..COM4)."""
    found = _SERIAL_RE.fullmatch(text.strip())
    if found is None or (found.group(2) and int(found.group(2)) not in SERIAL_SPEEDS):
        raise MbrescueError(f"--serial {text[:40]!r} is not PORT[,SPEED] (PORT ttyS0..ttyS3, "
                            f"SPEED one of {', '.join(map(str, SERIAL_SPEEDS))})")
    return SerialPort(int(found.group(1)), int(found.group(2) or 115200))


def kernel_args(medium_id: str, *, serial_console: bool, shell: bool = False,
                serial: SerialPort = DEFAULT_SERIAL) -> str:
    """The rescue kernel's command line; the last console= becomes /dev/console."""
    consoles = ["console=tty0", f"console={serial.device},{serial.speed}n8"]
    if not serial_console:
        consoles.reverse()
    args = [*consoles, f"mbrescue.medium={medium_id}"]
    if shell:
        args.append("mbrescue.shell=1")
    return " ".join(args)


# The host's own menu, where the healthy default looks when there is no boot code to hand
# over to, relative to the host's /boot file system: a separate /boot first (Debian's `grub`,
# Red Hat's `grub2`), then /boot inside the root file system.
HOST_MENUS = ("grub/grub.cfg", "grub2/grub.cfg", "boot/grub/grub.cfg", "boot/grub2/grub.cfg")

# A fixed-size comment in grub.cfg that `mbrescue rescue` (bmc.py) overwrites, in a copy of
# the ISO and at the same length, so that no ISO 9660 structure moves: the restore entries
# then get the BMC rescue's kernel arguments (unattended, power off after) without a rebuild.
BMC_SLOT_TAG = "#mbrescue-bmc-slot"
BMC_SLOT_BYTES = 480  # the line's length, its newline included
_BMC_ARG = re.compile(r"[A-Za-z0-9._:/=,@%+-]+")


def bmc_slot() -> str:
    """The slot as built: a comment, without its newline (the template adds it)."""
    return BMC_SLOT_TAG + "#" * (BMC_SLOT_BYTES - 1 - len(BMC_SLOT_TAG))


def filled_bmc_slot(kernel_args: list[str]) -> bytes:
    """The slot's replacement: `set mbrescue_bmc_args="..."`, then a comment to the same
    length. Only plain words: nothing GRUB's script would read as quoting or a command."""
    for word in kernel_args:
        if not _BMC_ARG.fullmatch(word):
            raise MbrescueError(f"kernel argument {word!r} cannot go into grub.cfg")
    line = f'set mbrescue_bmc_args="{" ".join(kernel_args)}"\n#'
    if len(line) + 1 > BMC_SLOT_BYTES:
        raise MbrescueError(f"the kernel arguments for the BMC rescue exceed {BMC_SLOT_BYTES} bytes")
    return (line + "#" * (BMC_SLOT_BYTES - 1 - len(line))).encode()


def render_grub_cfg(
    *,
    host: str,
    captured_at: str,
    region_size: str,
    boot_fs_uuid: str,
    medium_id: str,
    local_timeout_s: int = 10,
    restore_timeout_s: int = 5,
    payload_path: str | None = None,
    serial: SerialPort = DEFAULT_SERIAL,
    unattended_default_s: int | None = None,
) -> str:
    """grub.cfg for the ISO from templates/grub.cfg.j2; every value is computed here.

    `unattended_default_s` (build --unattended-default): with no local /boot found, the
    unattended restore entry is the default after that visible countdown.

    The ISO's rescue system reads the capture from its medium, and one more entry has GRUB
    load it into memory instead; `payload_path` (a network-boot tree's per-host payload, there
    being no medium) makes every entry load that payload after the base.
    """
    for name, value, pattern in (
        ("host", host, _SAFE_ID),
        ("boot_fs_uuid", boot_fs_uuid, _SAFE_ID),
        ("medium_id", medium_id, _SAFE_ID),
        ("captured_at", captured_at, _SAFE_TEXT),
        ("region_size", region_size, _SAFE_TEXT),
        *((("payload_path", payload_path, _SAFE_TEXT),) if payload_path is not None else ()),
    ):
        if not pattern.fullmatch(value):
            raise MbrescueError(f"{name} {value!r} cannot go into grub.cfg")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template("grub.cfg.j2").render(
        host=host,
        captured_at=captured_at,
        region_size=region_size,
        boot_fs_uuid=boot_fs_uuid,
        medium_id=medium_id,
        local_timeout_s=local_timeout_s,
        restore_timeout_s=restore_timeout_s,
        serial_unit=serial.unit,
        serial_speed=serial.speed,
        unattended_default_s=unattended_default_s,
        args_screen=kernel_args(medium_id, serial_console=False, serial=serial),
        args_serial=kernel_args(medium_id, serial_console=True, serial=serial),
        args_shell=kernel_args(medium_id, serial_console=False, shell=True, serial=serial),
        initrds=" ".join(["/mbrescue/base.img", *([payload_path] if payload_path else [])]),
        memory_entry=payload_path is None,
        host_menus=HOST_MENUS,
        bmc_slot=bmc_slot(),
    )


# --- network boot ------------------------------------------------------------------------

NET_BIOS_BOOT_FILE = "boot/grub/i386-pc/core.0"
# shim loads grubx64.efi from the TFTP directory it was itself loaded from.
NET_UEFI_DIR = "efi"
NET_UEFI_BOOT_FILE = f"{NET_UEFI_DIR}/bootx64.efi"
# Debian's signed network GRUB has the prefix /grub built in (device: the TFTP server it came
# from) and reads $prefix/x86_64-efi/grub.cfg, else $prefix/grub.cfg.
NET_UEFI_GRUB_CFG = "grub/grub.cfg"


@dataclass(frozen=True)
class NetImages:
    bios_boot_file: str  # relative to the tree: what DHCP names for a BIOS (PXE) client
    uefi_boot_file: str  # relative to the tree: shim, for a UEFI client (Secure Boot or not)
    efi_packages: dict[str, str]


def signed_net_grub(loaders: EfiLoaders) -> Path:
    """Debian's signed network GRUB (grubnetx64), in the same package as grubx64."""
    image = loaders.grub_disk.parent / "grubnetx64.efi.signed"
    if not image.is_file():
        raise MbrescueError(f"{image} is missing from Debian's signed GRUB package")
    return image


def make_net_images(tree: Path, *, dispatcher: str) -> NetImages:
    """GRUB's network images in `tree`: BIOS PXE (grub-mknetdir) and UEFI shim + signed GRUB.

    `dispatcher` is the one grub.cfg both read first, at `tree`/boot/grub/grub.cfg.
    """
    require_tools("grub-mknetdir")
    check_grub_installed()
    loaders = ensure_efi_loaders()
    net_grub = signed_net_grub(loaders)
    # grub-mknetdir writes boot/grub/i386-pc/core.0 with its modules beside it (a PXE GRUB
    # loads them over TFTP), and boot/grub/i386-pc/grub.cfg that sources boot/grub/grub.cfg.
    run(["grub-mknetdir", f"--net-directory={os.fspath(tree)}", "--subdir=boot/grub",
         "-d", BIOS_DIR])  # fmt: skip
    efi_dir = tree / NET_UEFI_DIR
    efi_dir.mkdir(parents=True, exist_ok=True)
    _replace_file(efi_dir / "bootx64.efi", loaders.shim.read_bytes())
    _replace_file(efi_dir / "grubx64.efi", net_grub.read_bytes())
    _replace_file(tree / NET_UEFI_GRUB_CFG, b"source ($root)/boot/grub/grub.cfg\n")
    _replace_file(tree / "boot/grub/grub.cfg", dispatcher.encode())
    return NetImages(NET_BIOS_BOOT_FILE, NET_UEFI_BOOT_FILE, dict(loaders.packages))


def _replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    # A client booting while the tree is updated reads the old file or the new, never half.
    path.parent.mkdir(parents=True, exist_ok=True)
    write_output(path, data, mode)
