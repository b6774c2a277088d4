"""The rescue kit: where the parts of the rescue system come from.

Today every part is a Debian 12 package fetched into the download cache: the
kernel and its modules, a static busybox, the Python 3.11 interpreter with its
standard library, the programs the file-level restore path runs (e2fsprogs,
dosfstools, mtools, util-linux's blkid and losetup), and the shared libraries the
interpreter, its extension modules and those programs link against. How these parts become an initramfs is not this module's
business (see `initramfs.py`), so a later kit source (the running host's own
kernel and Python, as ReaR does) only has to fill the same `Kit`.

Shared libraries and module dependencies are read from the files themselves
(ELF `DT_NEEDED`, the kernel modules' `.modinfo`), not from hand lists that rot.

The UEFI loaders for Secure Boot come the same way (`ensure_efi_loaders`): Debian's
`shim-signed` (shimx64, signed by Microsoft's UEFI CA, holding Debian's CA) and
`grub-efi-amd64-signed` (GRUB images signed by Debian), each .deb checked by its SHA-256
from the signed archive and cached. They are kept apart from `Kit`, whose fields key the
base initramfs: a new shim does not rebuild the rescue system.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import debs, log
from .errors import MbrescueError
from .run import run

PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib")

# Shared libraries by soname, and the Debian package that ships each. The interpreter
# needs libc, libm, zlib and expat; the rest serve extension modules the runner may
# import (_hashlib: OpenSSL, _lzma, _bz2, _uuid, _ctypes) and glibc's pthread_exit,
# which loads libgcc_s at run time. A soname missing here fails the build by name.
SONAME_PACKAGES: dict[str, str] = {
    "ld-linux-x86-64.so.2": "libc6",
    "libc.so.6": "libc6",
    "libm.so.6": "libc6",
    "libpthread.so.0": "libc6",
    "libdl.so.2": "libc6",
    "librt.so.1": "libc6",
    "libutil.so.1": "libc6",
    "libz.so.1": "zlib1g",
    "libexpat.so.1": "libexpat1",
    "libcrypto.so.3": "libssl3",
    "libssl.so.3": "libssl3",
    "libgcc_s.so.1": "libgcc-s1",
    "liblzma.so.5": "liblzma5",
    "libbz2.so.1.0": "libbz2-1.0",
    "libuuid.so.1": "libuuid1",
    "libffi.so.8": "libffi8",
    # the file-level restore path's tools (RESTORE_TOOLS)
    "libext2fs.so.2": "libext2fs2",
    "libe2p.so.2": "libext2fs2",
    "libcom_err.so.2": "libcom-err2",
    "libblkid.so.1": "libblkid1",
    "libsmartcols.so.1": "libsmartcols1",
    # mkfs.xfs and xfs_repair (an XFS /boot, as RHEL-family hosts make it)
    "libinih.so.1": "libinih1",
    "liburcu.so.8": "liburcu8",
}
LIBRARY_PACKAGES = tuple(sorted(set(SONAME_PACKAGES.values())))
# glibc loads this one with dlopen (no DT_NEEDED names it).
DLOPENED_LIBRARIES = ("libgcc_s.so.1",)

# Disk controllers an administrator meets, plus USB keyboards so that `yes` can be
# typed on the screen console. Dependencies and soft dependencies are added from
# the modules' own metadata; the order here is the load order among equals.
STORAGE_MODULES = (
    # virtual machines
    "virtio_pci", "virtio_blk", "virtio_scsi", "vmw_pvscsi", "hv_storvsc", "xen_blkfront",
    # SATA / PATA, SCSI disks and CD drives
    "ahci", "ata_piix", "ata_generic", "sd_mod", "sr_mod",
    # NVMe
    "nvme",
    # USB host controllers, storage and keyboards
    "xhci_pci", "xhci_hcd", "ehci_pci", "ehci_hcd", "uhci_hcd", "ohci_pci", "ohci_hcd",
    "usb_storage", "uas", "usbhid", "hid_generic",
    # server HBAs and RAID controllers
    "megaraid_sas", "mpt3sas", "mptspi", "mptsas", "hpsa", "smartpqi", "aacraid",
    # the rescue medium's own file system: the capture is read from it, not from RAM
    "isofs",
    # the file-level restore path: its read-back mounts each ext or XFS file system
    # read-only on a loop device (vfat is read with mtools, so it needs no module); an XFS
    # /boot is filled through a writable loop mount
    "loop", "ext4", "xfs",
    # the firmware's variables (runner/nvram.py: the boot entry for the restored ESP); /init
    # loads it apart from the disk drivers, under UEFI only (it refuses to load without EFI)
    "efivarfs",
)

# The file-level restore path (runner/files_restore.py, filecopy.py) runs these programs;
# busybox has none of them in the form needed (no blkid; its losetup lacks --find --show,
# its mke2fs lacks -d). (Debian package, file in it, the names it answers to in the rescue
# system's /usr/sbin). Only what a restore runs: dumpe2fs and debugfs serve the capture.
RESTORE_TOOLS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("e2fsprogs", "sbin/mke2fs", ("mke2fs", "mkfs.ext2", "mkfs.ext3", "mkfs.ext4")),
    ("e2fsprogs", "sbin/e2fsck", ("e2fsck", "fsck.ext2", "fsck.ext3", "fsck.ext4")),
    ("dosfstools", "sbin/mkfs.fat", ("mkfs.fat", "mkfs.vfat")),
    ("dosfstools", "sbin/fsck.fat", ("fsck.fat", "fsck.vfat")),
    ("mtools", "usr/bin/mtools", ("mtools", "mcopy", "mdir")),
    ("util-linux", "sbin/blkid", ("blkid",)),
    ("mount", "sbin/losetup", ("losetup",)),
    ("xfsprogs", "sbin/mkfs.xfs", ("mkfs.xfs",)),
    ("xfsprogs", "sbin/xfs_repair", ("xfs_repair",)),
    # An encrypted capture (build --encrypt): age decrypts it with the typed passphrase
    # (runner/agecrypt.py). Debian's build is a Go binary that needs only libc.
    ("age", "usr/bin/age", ("age",)),
)
TOOL_PACKAGES = tuple(sorted({package for package, _file, _names in RESTORE_TOOLS}))
# mtools converts FAT names to its default code page 850 through iconv, which glibc loads as a
# gconv module (without it: "Error converting to codepage 850"): that module, from libc6, and
# the lines of glibc's gconv configuration that name it.
GCONV_MODULES = ("IBM850",)
GCONV_DIR = "usr/lib/x86_64-linux-gnu/gconv"

LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")


@dataclass(frozen=True)
class Kit:
    kernel: Path  # vmlinuz
    modules_root: Path  # a trimmed lib/modules/<version>, depmod run on it
    kernel_version: str
    busybox: Path
    python: Path  # the python3.11 binary
    python_stdlib: list[Path]  # directories to search in order: minimal first, then stdlib
    libraries: list[Path]  # ELF shared objects the interpreter needs (files named by soname)
    packages: dict[str, str]  # Debian package name -> version, for the build record
    # Beyond the first contract: what the initramfs needs to place and load the parts.
    module_load_order: list[str]  # paths relative to modules_root, dependencies first
    elf_interpreter: str  # the dynamic loader's path inside the rescue system (PT_INTERP)
    library_dirs: list[Path]  # where further sonames (of extension modules) are found
    package_sha256: dict[str, str]  # Debian package name -> .deb SHA-256, for cache keys
    # The file-level restore path's programs: name in the rescue system's /usr/sbin -> the
    # ELF file in its extracted package (aliases such as mkfs.vfat name the same file).
    tools: dict[str, Path]
    gconv_modules: list[Path]  # glibc gconv modules (.so) the tools need, see GCONV_MODULES
    gconv_config: str  # their lines of glibc's gconv-modules configuration

    def library_closure(self, elf_files: Iterable[Path]) -> list[Path]:
        """The shared libraries (by soname) that the given ELF files need, transitively."""
        return library_closure(elf_files, self.library_dirs)


# ---- ELF reading (64-bit little-endian: x86-64 only, like the kit) ----


def _elf_sections(path: Path) -> dict[str, tuple[int, int, int, int]]:
    """Section name -> (type, file offset, size, link), read with a few seeks."""
    with open(path, "rb") as stream:
        head = stream.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise MbrescueError(f"{path} is not a 64-bit little-endian ELF file")
        shoff, = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        stream.seek(shoff)
        table = stream.read(shentsize * shnum)
        raw = [struct.unpack_from("<IIQQQQII", table, i * shentsize) for i in range(shnum)]
        names_offset, names_size = raw[shstrndx][4], raw[shstrndx][5]
        stream.seek(names_offset)
        names = stream.read(names_size)
    sections = {}
    for name_at, kind, _flags, _addr, offset, size, link, _info in raw:
        name = names[name_at:names.index(b"\0", name_at)].decode()
        sections[name] = (kind, offset, size, link)
    return sections


def _read_section(path: Path, name: str) -> bytes:
    sections = _elf_sections(path)
    if name not in sections:
        return b""
    _kind, offset, size, _link = sections[name]
    with open(path, "rb") as stream:
        stream.seek(offset)
        return stream.read(size)


def elf_needed(path: Path) -> list[str]:
    """The DT_NEEDED sonames of a shared object or executable."""
    dynamic = _read_section(path, ".dynamic")
    strings = _read_section(path, ".dynstr")
    needed = []
    for index in range(0, len(dynamic), 16):
        tag, value = struct.unpack_from("<qQ", dynamic, index)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            needed.append(strings[value:strings.index(b"\0", value)].decode())
    return needed


def elf_interpreter(path: Path) -> str:
    return _read_section(path, ".interp").rstrip(b"\0").decode()


def find_library(soname: str, library_dirs: Iterable[Path]) -> Path:
    for directory in library_dirs:
        candidate = directory / soname
        if candidate.exists():
            return candidate
    package = SONAME_PACKAGES.get(soname)
    hint = f"add its Debian package to SONAME_PACKAGES in {__name__}" if package is None else None
    raise MbrescueError(f"shared library {soname} not found in the rescue kit", hint=hint)


def library_closure(elf_files: Iterable[Path], library_dirs: Iterable[Path]) -> list[Path]:
    dirs = list(library_dirs)
    found: dict[str, Path] = {}
    pending = [soname for elf in elf_files for soname in elf_needed(elf)]
    while pending:
        soname = pending.pop()
        if soname in found:
            continue
        found[soname] = find_library(soname, dirs)
        pending.extend(elf_needed(found[soname]))
    return [found[name] for name in sorted(found)]


# ---- kernel modules ----


def _modinfo(path: Path) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for item in _read_section(path, ".modinfo").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    return fields


def _module_name(text: str) -> str:
    return text.removesuffix(".ko").replace("-", "_")


def _softdeps(info: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    pre: list[str] = []
    post: list[str] = []
    for line in info.get("softdep", []):
        target = pre
        for word in line.split():
            if word == "pre:":
                target = pre
            elif word == "post:":
                target = post
            else:
                target.append(word)
    return pre, post


def _alias_index(tree: Path, modules: dict[str, Path]) -> dict[str, list[str]]:
    """Plain (non-wildcard) alias -> module names; read only when a softdep needs it."""
    aliases: dict[str, list[str]] = {}
    for name, path in sorted(modules.items()):
        for alias in _modinfo(tree / path).get("alias", []):
            if not any(char in alias for char in "*?["):
                aliases.setdefault(alias.replace("-", "_"), []).append(name)
    return aliases


def select_modules(tree: Path, wanted: Iterable[str]) -> list[str]:
    """Relative paths of the wanted modules and everything they need, in load order.

    `tree` is lib/modules/<version>; built-in modules (modules.builtin) are skipped,
    soft dependencies are resolved through aliases (e.g. sd_mod's crc-t10dif wants
    the `crct10dif` algorithm, which two modules provide: both are taken, the one
    the CPU cannot run simply fails to load).
    """
    modules = {
        _module_name(path.name): path.relative_to(tree)
        for path in sorted(tree.glob("kernel/**/*.ko"))
    }
    builtin = {
        _module_name(Path(line).name)
        for line in (tree / "modules.builtin").read_text().split()
    }
    aliases: dict[str, list[str]] | None = None
    order: list[str] = []
    state: dict[str, str] = {}

    def resolve(word: str) -> list[str]:
        nonlocal aliases
        name = _module_name(word)
        if name in modules or name in builtin:
            return [name]
        if aliases is None:
            aliases = _alias_index(tree, modules)
        return aliases.get(name, [])

    def visit(name: str) -> None:
        if name in builtin or state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise MbrescueError(f"kernel module dependency cycle at {name}")
        if name not in modules:
            raise MbrescueError(f"kernel module {name} is not in the kernel package")
        state[name] = "visiting"
        info = _modinfo(tree / modules[name])
        pre, post = _softdeps(info)
        for word in pre:
            for provider in resolve(word):
                visit(provider)
        for dep in info.get("depends", [""])[0].split(","):
            if dep:
                visit(_module_name(dep))
        state[name] = "done"
        order.append(name)
        for word in post:
            for provider in resolve(word):
                visit(provider)

    for name in wanted:
        visit(_module_name(name))
    return [str(modules[name]) for name in order]


def _trimmed_modules(source: Path, version: str, selected: list[str], key: str) -> Path:
    """A cached lib/modules/<version> holding only the selected modules, depmod'ed."""
    base = debs.cache_dir() / "kit" / f"modules-{key}"
    tree = base / "lib" / "modules" / version
    if (base / ".complete").exists():
        return tree
    base.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base.parent, prefix=".modules-"))
    try:
        work_tree = work / "lib" / "modules" / version
        for relative in selected:
            (work_tree / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / relative, work_tree / relative)
        for name in ("modules.builtin", "modules.builtin.modinfo"):
            shutil.copyfile(source / name, work_tree / name)
        (work_tree / "modules.order").write_text("".join(f"{path}\n" for path in selected))
        # The rescue shell's `modprobe` (busybox) reads modules.dep and modules.alias.
        run(["depmod", "-b", work, version])
        (work / ".complete").write_text("\n".join(selected) + "\n")
        if base.exists() and not (base / ".complete").exists():
            shutil.rmtree(base)  # left by an interrupted build
        try:
            os.replace(work, base)
        except OSError:
            # Another build finished the same tree first (a directory is not replaced).
            if not (base / ".complete").exists():
                raise
            shutil.rmtree(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return tree


# ---- UEFI Secure Boot loaders ----

SHIM_PACKAGE = "shim-signed"
SIGNED_GRUB_PACKAGE = "grub-efi-amd64-signed"
SHIM_FILE = Path("usr/lib/shim/shimx64.efi.signed")
SIGNED_GRUB_DIR = Path("usr/lib/grub/x86_64-efi-signed")
# PE/COFF: the optional header's data directory entry 4 is the certificate table, where an
# Authenticode signature lives (a file offset and size, not an RVA).
_PE32_PLUS = 0x20B
_CERTIFICATE_TABLE_ENTRY = 4


@dataclass(frozen=True)
class EfiLoaders:
    shim: Path  # shimx64.efi.signed: the firmware checks it against Microsoft's UEFI CA
    # gcdx64: Debian's image for removable media (CD, USB); its built-in prefix is /boot/grub.
    grub_removable: Path
    grub_disk: Path  # grubx64: what Debian installs on a disk; its prefix is /EFI/debian
    packages: dict[str, str]  # Debian package name -> version, for the build record
    package_sha256: dict[str, str]  # Debian package name -> .deb SHA-256, for cache keys


def authenticode_bytes(path: Path) -> int:
    """The size of a PE image's certificate table (its Authenticode signatures); 0: unsigned."""
    with open(path, "rb") as stream:
        dos = stream.read(64)
        if len(dos) < 64 or dos[:2] != b"MZ":
            raise MbrescueError(f"{path} is not a PE (EFI) image")
        pe_at, = struct.unpack_from("<I", dos, 0x3C)
        stream.seek(pe_at)
        head = stream.read(24 + 112 + 8 * 16)
    if len(head) < 24 + 2 or head[:4] != b"PE\0\0":
        raise MbrescueError(f"{path} is not a PE (EFI) image")
    magic, = struct.unpack_from("<H", head, 24)
    if magic != _PE32_PLUS:
        raise MbrescueError(f"{path} is not a 64-bit PE image")
    directories, = struct.unpack_from("<I", head, 24 + 108)
    if directories <= _CERTIFICATE_TABLE_ENTRY:
        return 0
    _offset, size = struct.unpack_from("<II", head, 24 + 112 + 8 * _CERTIFICATE_TABLE_ENTRY)
    return size


def _resolve_efi_loaders() -> EfiLoaders:
    names = [SHIM_PACKAGE, SIGNED_GRUB_PACKAGE]
    debs.prefetch(names)
    fetched = {name: debs.fetch_extracted(name) for name in names}
    return EfiLoaders(
        shim=fetched[SHIM_PACKAGE][1] / SHIM_FILE,
        grub_removable=fetched[SIGNED_GRUB_PACKAGE][1] / SIGNED_GRUB_DIR / "gcdx64.efi.signed",
        grub_disk=fetched[SIGNED_GRUB_PACKAGE][1] / SIGNED_GRUB_DIR / "grubx64.efi.signed",
        packages={name: deb.version for name, (deb, _root) in fetched.items()},
        package_sha256={name: deb.sha256 for name, (deb, _root) in fetched.items()},
    )


def _efi_loaders_from_json(data: dict) -> EfiLoaders | None:
    try:
        loaders = EfiLoaders(
            shim=Path(data["shim"]), grub_removable=Path(data["grub_removable"]),
            grub_disk=Path(data["grub_disk"]), packages=dict(data["packages"]),
            package_sha256=dict(data["package_sha256"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
    return loaders if all(image.is_file() for image in
                          (loaders.shim, loaders.grub_removable, loaders.grub_disk)) else None


@functools.cache
def ensure_efi_loaders() -> EfiLoaders:
    """Debian's signed shim and GRUB images from the download cache (fetched when needed).

    Asking apt for the candidates is most of a small per-host build (1.3 s of 2.3 s for
    fixture A's capture), so the resolution is remembered as the kit's is: until apt's
    lists or this module change.
    """
    memo = _memo_path("efi-loaders")
    try:
        loaders = _efi_loaders_from_json(json.loads(memo.read_text()))
    except (OSError, ValueError):
        loaders = None
    if loaders is None:
        loaders = _resolve_efi_loaders()
        debs.write_atomically(memo, json.dumps(
            {name: str(value) if isinstance(value, Path) else value
             for name, value in loaders.__dict__.items()}, indent=1))
    for image in (loaders.shim, loaders.grub_removable, loaders.grub_disk):
        if not image.is_file():
            raise MbrescueError(f"Secure Boot loader missing from its Debian package: {image}")
        if authenticode_bytes(image) == 0:
            raise MbrescueError(f"{image} carries no signature")
    return loaders


# ---- the kit ----


def _stdlib_dir(root: Path) -> Path:
    return root / "usr" / "lib" / "python3.11"


APT_LISTS = Path("/var/lib/apt/lists")


def _apt_state() -> list[tuple[str, int, int]]:
    """What apt knows, cheaply: its package lists' names, sizes and times."""
    state = []
    for path in sorted(APT_LISTS.glob("*_Packages*")):
        st = path.stat()
        state.append((path.name, st.st_size, st.st_mtime_ns))
    return state


def _memo_path(what: str = "resolved") -> Path:
    """Where a resolution (the kit's, the Secure Boot loaders') is remembered: keyed by this
    module and apt's lists, so an `apt-get update` that brings a new kernel or shim, or a
    change here, resolves it again."""
    key = hashlib.sha256(
        json.dumps([Path(__file__).read_text(), _apt_state()]).encode()
    ).hexdigest()[:16]
    return debs.cache_dir() / "kit" / f"{what}-{key}.json"


def _kit_to_json(kit: Kit) -> dict:
    return {
        name: ({key: str(path) for key, path in value.items()} if name == "tools"
               else str(value) if isinstance(value, Path)
               else [str(item) for item in value] if isinstance(value, list) and value
               and isinstance(value[0], Path) else value)
        for name, value in kit.__dict__.items()
    }


def _kit_from_json(data: dict) -> Kit | None:
    paths = ("kernel", "modules_root", "busybox", "python")
    path_lists = ("python_stdlib", "libraries", "library_dirs", "gconv_modules")
    try:
        values = dict(data)
        for name in paths:
            values[name] = Path(values[name])
        for name in path_lists:
            values[name] = [Path(item) for item in values[name]]
        values["tools"] = {name: Path(item) for name, item in values["tools"].items()}
        kit = Kit(**values)
    except (KeyError, TypeError):
        return None
    needed = [kit.kernel, kit.modules_root, kit.busybox, kit.python, *kit.python_stdlib,
              *kit.libraries, *kit.tools.values(), *kit.gconv_modules]
    return kit if all(path.exists() for path in needed) else None


@functools.cache
def ensure_kit() -> Kit:
    """Fetch (or reuse from the cache) every part of the Debian rescue kit.

    Asking apt about every package and reading every kernel module's dependencies
    takes seconds, so the resolved kit is remembered on disk until apt's lists change.
    """
    memo = _memo_path()
    try:
        remembered = _kit_from_json(json.loads(memo.read_text()))
    except (OSError, ValueError):
        remembered = None
    if remembered is not None:
        return remembered
    kit = _resolve_kit()
    debs.write_atomically(memo, json.dumps(_kit_to_json(kit), indent=1))
    return kit


def gconv_parts(libc_root: Path, names: Iterable[str]) -> tuple[list[Path], str]:
    """The gconv module files of `names` and every configuration line that names them."""
    directory = libc_root / GCONV_DIR
    modules = []
    lines = []
    for name in names:
        module = directory / f"{name}.so"
        if not module.is_file():
            raise MbrescueError(f"glibc gconv module {name} not found in libc6 ({module})")
        modules.append(module)
        configs = [directory / "gconv-modules", *sorted(directory.glob("gconv-modules.d/*.conf"))]
        for config in configs:
            if config.is_file():
                lines += [line for line in config.read_text().splitlines()
                          if f"{name}//" in line.split() and not line.startswith("#")]
        if not any(line.split()[0] == "module" for line in lines if line.split()):
            raise MbrescueError(f"glibc's gconv configuration has no module line for {name}")
    return modules, "".join(f"{line}\n" for line in lines)


def _resolve_kit() -> Kit:
    debs.prefetch(["linux-image-amd64", "busybox-static", *PYTHON_PACKAGES, *LIBRARY_PACKAGES,
                   *TOOL_PACKAGES])
    kernel_package = debs.kernel_package()
    debs.prefetch([kernel_package])
    fetched: dict[str, tuple[debs.Deb, Path]] = {}
    for name in (kernel_package, "busybox-static", *PYTHON_PACKAGES, *LIBRARY_PACKAGES,
                 *TOOL_PACKAGES):
        fetched[name] = debs.fetch_extracted(name)

    kernel_deb, kernel_root = fetched[kernel_package]
    versions = sorted(path.name for path in (kernel_root / "lib" / "modules").iterdir())
    if len(versions) != 1:
        raise MbrescueError(f"{kernel_deb.name} holds {len(versions)} module trees, not one")
    kernel_version = versions[0]
    kernel = kernel_root / "boot" / f"vmlinuz-{kernel_version}"
    full_tree = kernel_root / "lib" / "modules" / kernel_version
    selected = select_modules(full_tree, STORAGE_MODULES)
    selection_key = hashlib.sha256(
        json.dumps([kernel_deb.sha256, selected]).encode()
    ).hexdigest()[:16]
    modules_root = _trimmed_modules(full_tree, kernel_version, selected, selection_key)

    python = fetched["python3.11-minimal"][1] / "usr" / "bin" / "python3.11"
    stdlib = [
        _stdlib_dir(fetched["libpython3.11-minimal"][1]),
        _stdlib_dir(fetched["libpython3.11-stdlib"][1]),
    ]
    library_dirs = [
        fetched[package][1] / sub for package in LIBRARY_PACKAGES for sub in LIB_DIRS
        if (fetched[package][1] / sub).is_dir()
    ]
    libraries = library_closure([python], library_dirs)
    for soname in DLOPENED_LIBRARIES:
        libraries.append(find_library(soname, library_dirs))
    busybox = fetched["busybox-static"][1] / "bin" / "busybox"
    tools = {name: fetched[package][1] / inside
             for package, inside, names in RESTORE_TOOLS for name in names}
    gconv_modules, gconv_config = gconv_parts(fetched["libc6"][1], GCONV_MODULES)
    # A tool's libraries must all come from the kit: a missing soname fails here, by name.
    library_closure([*sorted(set(tools.values())), *gconv_modules], library_dirs)
    for part in (kernel, python, busybox, *stdlib, *tools.values()):
        if not part.exists():
            raise MbrescueError(f"rescue kit part missing: {part}")
    log.debug(f"rescue kit: kernel {kernel_version}, {len(selected)} modules")
    return Kit(
        kernel=kernel,
        modules_root=modules_root,
        kernel_version=kernel_version,
        busybox=busybox,
        python=python,
        python_stdlib=stdlib,
        libraries=libraries,
        packages={name: deb.version for name, (deb, _root) in sorted(fetched.items())},
        module_load_order=selected,
        elf_interpreter=elf_interpreter(python),
        library_dirs=library_dirs,
        package_sha256={name: deb.sha256 for name, (deb, _root) in sorted(fetched.items())},
        tools=tools,
        gconv_modules=gconv_modules,
        gconv_config=gconv_config,
    )
