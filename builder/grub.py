"""GRUB boot images for the rescue ISO: one for BIOS, one for UEFI, and the hybrid MBR code.

`grub-mkimage -O i386-pc-eltorito` makes the El Torito no-emulation image (cdboot.img followed
by a core image; the same bytes boot a USB stick through `boot_hybrid.img`), and
`grub-mkimage -O x86_64-efi` makes `BOOTX64.EFI`, which goes into a small FAT image under
`EFI/BOOT/` for the El Torito EFI entry and the GPT ESP entry. The FAT image is made with
`mkfs.vfat --invariant` and mtools, which write image files directly (this machine's kernel
cannot mount vfat) and honour `SOURCE_DATE_EPOCH`, so the bytes are reproducible.

Both images embed a two-line config that finds the medium by a file named after its medium
id and sets the prefix there: from a USB stick the UEFI image starts on the ESP, and the BIOS
image on the whole disk, neither of which is where `/boot/grub/grub.cfg` lives. Results are
cached by a hash of the GRUB package versions, the module lists and the embedded config.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2

from . import log
from .cpio import source_date_epoch
from .debs import cache_dir
from .errors import MbrescueError, ToolMissing
from .run import output, require_tools, run

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
GRUB_LIB = Path("/usr/lib/grub")
BIOS_DIR = GRUB_LIB / "i386-pc"
EFI_DIR = GRUB_LIB / "x86_64-efi"

# What both images need: find the medium, read the ISO and the host's /boot (ext2..4, any
# partition table), talk on serial and screen at once, run grub.cfg's tests and boot Linux or
# chainload the local disk.
COMMON_MODULES = (
    "iso9660",
    "part_msdos",
    "part_gpt",
    "ext2",
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
EFI_MODULES = ("efi_gop", "efi_uga", *COMMON_MODULES)

# FAT cannot store dates before 1980; mtools would wrap an earlier SOURCE_DATE_EPOCH.
FAT_EPOCH_MIN = 315532800
FAT_VOLUME_ID = "4d425245"  # "MBRE": fixed, so two builds give the same bytes
FAT_LABEL = "MBRESCUE"


@dataclass(frozen=True)
class GrubImages:
    bios_eltorito: Path  # cdboot.img + core image, El Torito no-emulation boot file
    efi_fat: Path  # FAT image holding EFI/BOOT/BOOTX64.EFI
    boot_hybrid: Path  # GRUB's MBR code for the hybrid (USB) boot
    modules: tuple[str, ...]  # what the BIOS image holds; the EFI one adds efi_gop/efi_uga
    medium_id: str


def medium_marker(medium_id: str) -> str:
    """The file on the ISO whose presence identifies this medium to GRUB."""
    return f"/mbrescue/id-{medium_id}"


def embedded_config(medium_id: str) -> str:
    # `search` leaves root unchanged when nothing matches, so a CD boot still finds its files.
    return (
        f"search --no-floppy --file --set=root {medium_marker(medium_id)}\n"
        "set prefix=($root)/boot/grub\n"
    )


def check_grub_installed() -> None:
    """Fail before any work when GRUB's image builders or platform files are missing."""
    require_tools("grub-mkimage", "mkfs.vfat", "mmd", "mcopy")
    for directory, package in ((BIOS_DIR, "grub-pc-bin"), (EFI_DIR, "grub-efi-amd64-bin")):
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
            "grub-efi-amd64-bin",
            "dosfstools",
            "mtools",
        ],
        check=False,
    )
    return text


def _cache_key(medium_id: str) -> str:
    digest = hashlib.sha256()
    for part in (
        _package_versions(),
        " ".join(BIOS_MODULES),
        " ".join(EFI_MODULES),
        embedded_config(medium_id),
        str(_fat_epoch()),
        "v1",
    ):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:24]


def _fat_epoch() -> int:
    return max(source_date_epoch(), FAT_EPOCH_MIN)


def _fat_size_kib(payload_bytes: int) -> int:
    # Room for the FAT tables, directories and a quarter spare; El Torito's 16-bit load size
    # (512-byte sectors) caps the image below 32 MiB.
    size_kib = max(1440, (payload_bytes * 5 // 4 + 256 * 1024) // 1024)
    size_kib = (size_kib + 63) // 64 * 64
    if size_kib >= 32 * 1024:
        raise MbrescueError(f"EFI image would be {size_kib} KiB, El Torito allows under 32 MiB")
    return size_kib


def make_efi_fat(bootx64: Path, out: Path) -> None:
    """A FAT image with EFI/BOOT/BOOTX64.EFI, reproducible under SOURCE_DATE_EPOCH."""
    env = {"SOURCE_DATE_EPOCH": str(_fat_epoch()), "MTOOLS_SKIP_CHECK": "1"}
    if out.exists():
        out.unlink()
    run(
        [
            "mkfs.vfat",
            "--invariant",
            "-i",
            FAT_VOLUME_ID,
            "-n",
            FAT_LABEL,
            "-C",
            out,
            str(_fat_size_kib(bootx64.stat().st_size)),
        ],
        env=env,
    )
    run(["mmd", "-i", out, "::EFI", "::EFI/BOOT"], env=env)
    run(["mcopy", "-i", out, bootx64, "::EFI/BOOT/BOOTX64.EFI"], env=env)


def make_grub_images(work: Path, *, medium_id: str) -> GrubImages:
    """Build (or take from the cache) the BIOS El Torito image and the EFI FAT image."""
    check_grub_installed()
    key = _cache_key(medium_id)
    cached = cache_dir() / "grub" / key
    if not (cached / ".complete").exists():
        log.info("making GRUB images (BIOS El Torito, UEFI FAT)")
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
            run(
                [
                    "grub-mkimage",
                    "-O",
                    "x86_64-efi",
                    "-d",
                    EFI_DIR,
                    "-p",
                    "()/boot/grub",
                    "-c",
                    config,
                    "-o",
                    tmp / "BOOTX64.EFI",
                    *EFI_MODULES,
                ]
            )
            make_efi_fat(tmp / "BOOTX64.EFI", tmp / "efi.img")
            shutil.copyfile(BIOS_DIR / "boot_hybrid.img", tmp / "boot_hybrid.img")
            (tmp / ".complete").write_text(key + "\n")
            if cached.exists():
                shutil.rmtree(cached)
            os.replace(tmp, cached)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    work.mkdir(parents=True, exist_ok=True)
    names = ("eltorito.img", "efi.img", "boot_hybrid.img")
    for name in names:
        shutil.copyfile(cached / name, work / name)
    return GrubImages(
        bios_eltorito=work / "eltorito.img",
        efi_fat=work / "efi.img",
        boot_hybrid=work / "boot_hybrid.img",
        modules=BIOS_MODULES,
        medium_id=medium_id,
    )


# Values that land inside GRUB's double-quoted strings and on the kernel command line: refuse
# anything that could end a string or start a new word.
_SAFE_TEXT = re.compile(r"[A-Za-z0-9 ._:+/()-]*")
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")


def kernel_args(medium_id: str, *, serial_console: bool, shell: bool = False) -> str:
    """The rescue kernel's command line; the last console= becomes /dev/console."""
    consoles = ["console=tty0", "console=ttyS0,115200n8"]
    if not serial_console:
        consoles.reverse()
    args = [*consoles, f"mbrescue.medium={medium_id}"]
    if shell:
        args.append("mbrescue.shell=1")
    return " ".join(args)


def render_grub_cfg(
    *,
    host: str,
    captured_at: str,
    region_size: str,
    boot_fs_uuid: str,
    medium_id: str,
    local_timeout_s: int = 10,
    restore_timeout_s: int = 5,
) -> str:
    """grub.cfg for the ISO from templates/grub.cfg.j2; every value is computed here."""
    for name, value, pattern in (
        ("host", host, _SAFE_ID),
        ("boot_fs_uuid", boot_fs_uuid, _SAFE_ID),
        ("medium_id", medium_id, _SAFE_ID),
        ("captured_at", captured_at, _SAFE_TEXT),
        ("region_size", region_size, _SAFE_TEXT),
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
        args_screen=kernel_args(medium_id, serial_console=False),
        args_serial=kernel_args(medium_id, serial_console=True),
        args_shell=kernel_args(medium_id, serial_console=False, shell=True),
    )
