"""Raw disk images of the hosts mbrescue is for, with GRUB installed by grub-install.

Four fixtures: A (msdos, ext3 /boot at sector 63, GRUB's core in the post-MBR gap, the
original story), B (msdos, 1 MiB aligned, swap as a logical partition in an EBR chain), C
(GPT with a BIOS boot partition) and D (GPT with an ESP, GRUB for UEFI). Each /boot holds
Debian's kernel and a tiny busybox initramfs whose /init prints the fixture's marker on the
serial console and powers off, so a test can prove that a disk boots.

The host's kernel has no partition support and no vfat, so everything that can be written
into an image file is done on the host (sfdisk, mke2fs -E offset, mkfs.vfat --offset,
mkswap on a side file), and only grub-install runs inside a throw-away QEMU VM booted from
Debian's kernel, with the host's root shared read-only over 9p and the images attached as
virtio disks: all four in one boot. Then each image is booted to its marker once.

The images are cached under `<cache>/fixtures/<recipe hash>/`, the hash covering this
file's text and the kernel and busybox packages; a build runs in a temp folder that is
renamed when complete, under an flock so parallel test workers build once.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from . import cpio, debs, log
from .errors import MbrescueError
from .run import output, require_tools, run
from .vm import Disk, Vm, VmConfig

SECTOR_BYTES = 512
MIB_SECTORS = (1 << 20) // SECTOR_BYTES

# GPT partition type GUIDs (sfdisk's script takes them as they are).
GPT_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GPT_SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"

FIXTURE_NAMES = ("A", "B", "C", "D")

# Generous: under TCG on a loaded 2-core machine the install VM needs a few minutes.
INSTALL_TIMEOUT_S = 1200.0
# The install VM's serial log of a failed build, kept beside the cache folders.
FAILED_LOG = "failed-install.log"


@dataclass(frozen=True)
class Fixture:
    name: str  # "A".."D"
    path: Path  # the cached raw image (treat read-only; copy before writing!)
    firmware: str  # "bios" | "uefi"
    marker: str  # the exact marker line printed on boot
    table: str  # "msdos" | "gpt"
    boot_partition: int  # number of the /boot partition
    swap_partition: int
    swap_label: str
    swap_uuid: str
    boot_fs_uuid: str
    region_end_sectors: int  # sector 0 .. end of the last boot-chain partition (exclusive)


@dataclass(frozen=True)
class Part:
    """One line of the partition recipe; sizes in sectors, start None = sfdisk's choice."""

    number: int
    size_sectors: int | None  # None: the rest of the disk (extended container)
    kind: str  # boot | swap | data | extended | bios_boot | esp
    start_sector: int | None = None
    uuid: str | None = None  # GPT partition GUID


@dataclass(frozen=True)
class Recipe:
    name: str
    table: str
    firmware: str
    disk_sectors: int
    disk_id: str  # msdos disk signature (0x...) or GPT disk GUID
    parts: tuple[Part, ...]
    boot_fs: str  # ext3 | ext4
    boot_fs_uuid: str
    boot_label: str
    swap_label: str
    swap_uuid: str
    data_fs_uuid: str | None = None
    esp_volume_id: str | None = None

    @property
    def marker(self) -> str:
        return f"MBRESCUE-FIXTURE-{self.name}-BOOTED"

    def part(self, kind: str) -> Part:
        return next(part for part in self.parts if part.kind == kind)


RECIPES: dict[str, Recipe] = {
    # The original story: CentOS-5-style /boot at sector 63 (ext3, 1 KiB blocks, 128-byte
    # inodes) and swap right after it, so `dd count=<swap start>` takes MBR, gap and /boot.
    "A": Recipe(
        name="A", table="msdos", firmware="bios", disk_sectors=100 * MIB_SECTORS,
        disk_id="0x5ca1ab1a",
        parts=(Part(1, 64 * MIB_SECTORS, "boot", start_sector=63),
               Part(2, 32 * MIB_SECTORS, "swap", start_sector=63 + 64 * MIB_SECTORS)),
        boot_fs="ext3", boot_fs_uuid="0a0a0a0a-b007-4a00-8000-00000000000a", boot_label="/boot",
        swap_label="SWAP-sda2", swap_uuid="5a5a5a5a-0000-4a00-8000-00000000000a",
    ),
    # Swap is logical partition 6 behind a small data logical 5: a two-EBR chain.
    "B": Recipe(
        name="B", table="msdos", firmware="bios", disk_sectors=128 * MIB_SECTORS,
        disk_id="0x5ca1ab1b",
        parts=(Part(1, 64 * MIB_SECTORS, "boot", start_sector=MIB_SECTORS),
               Part(2, None, "extended"),
               Part(5, 8 * MIB_SECTORS, "data"),
               Part(6, 32 * MIB_SECTORS, "swap")),
        boot_fs="ext4", boot_fs_uuid="0b0b0b0b-b007-4b00-8000-00000000000b", boot_label="boot",
        swap_label="SWAP-sda6", swap_uuid="5b5b5b5b-0000-4b00-8000-00000000000b",
        data_fs_uuid="da7a0000-0000-4b00-8000-00000000000b",
    ),
    "C": Recipe(
        name="C", table="gpt", firmware="bios", disk_sectors=128 * MIB_SECTORS,
        disk_id="0C0C0C0C-0000-4C00-8000-00000000000C",
        parts=(Part(1, MIB_SECTORS, "bios_boot", start_sector=MIB_SECTORS,
                    uuid="0C000001-0000-4C00-8000-00000000000C"),
               Part(2, 64 * MIB_SECTORS, "boot", uuid="0C000002-0000-4C00-8000-00000000000C"),
               Part(3, 32 * MIB_SECTORS, "swap", uuid="0C000003-0000-4C00-8000-00000000000C")),
        boot_fs="ext4", boot_fs_uuid="0c0c0c0c-b007-4c00-8000-00000000000c", boot_label="boot",
        swap_label="SWAP-sda3", swap_uuid="5c5c5c5c-0000-4c00-8000-00000000000c",
    ),
    "D": Recipe(
        name="D", table="gpt", firmware="uefi", disk_sectors=144 * MIB_SECTORS,
        disk_id="0D0D0D0D-0000-4D00-8000-00000000000D",
        parts=(Part(1, 40 * MIB_SECTORS, "esp", start_sector=MIB_SECTORS,
                    uuid="0D000001-0000-4D00-8000-00000000000D"),
               Part(2, 64 * MIB_SECTORS, "boot", uuid="0D000002-0000-4D00-8000-00000000000D"),
               Part(3, 32 * MIB_SECTORS, "swap", uuid="0D000003-0000-4D00-8000-00000000000D")),
        boot_fs="ext4", boot_fs_uuid="0d0d0d0d-b007-4d00-8000-00000000000d", boot_label="boot",
        swap_label="SWAP-sda3", swap_uuid="5d5d5d5d-0000-4d00-8000-00000000000d",
        esp_volume_id="5CA1AB1D",
    ),
}

# Modules the install VM loads (dependencies are added from each .ko's modinfo).
INSTALL_MODULES = ("virtio_pci", "virtio_blk", "virtio-rng", "9pnet_virtio", "9p",
                   "crc32c_generic", "ext4", "vfat", "nls_cp437", "nls_ascii", "nls_utf8")
BUSYBOX_APPLETS = ("sh", "mount", "umount", "insmod", "mkdir", "cat", "sleep", "chroot",
                   "poweroff", "sync", "ls", "echo", "grep")


# ---------------------------------------------------------------- the kernel and busybox


@dataclass(frozen=True)
class Parts:
    """Where the kernel and busybox come from, and the recipe hash they feed."""

    kernel_version: str
    vmlinuz: Path
    kernel_root: Path
    busybox: Path
    recipe_hash: str


def _parts() -> Parts:
    kernel_deb, kernel_root = debs.fetch_extracted(debs.kernel_package())
    busybox_deb, busybox_root = debs.fetch_extracted("busybox-static")
    vmlinuz = sorted((kernel_root / "boot").glob("vmlinuz-*"))[0]
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    digest.update(kernel_deb.sha256.encode())
    digest.update(busybox_deb.sha256.encode())
    return Parts(
        kernel_version=vmlinuz.name.removeprefix("vmlinuz-"),
        vmlinuz=vmlinuz,
        kernel_root=kernel_root,
        busybox=busybox_root / "bin" / "busybox",
        recipe_hash=digest.hexdigest()[:16],
    )


def _modinfo_depends(ko: Path) -> list[str]:
    """The `depends=` entry of a module's .modinfo ELF section."""
    data = ko.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, names_offset, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        if data[names_offset + name:data.index(b"\0", names_offset + name)] == b".modinfo":
            for item in data[offset:offset + size].split(b"\0"):
                if item.startswith(b"depends="):
                    return [dep for dep in item[8:].decode().split(",") if dep]
    return []


def _module_load_order(kernel_root: Path, wanted: Sequence[str]) -> list[Path]:
    """The .ko files for wanted modules and their dependencies, dependencies first."""
    files: dict[str, Path] = {}
    for ko in kernel_root.glob("lib/modules/*/kernel/**/*.ko"):
        files[ko.stem.replace("-", "_")] = ko
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        if key not in files:
            raise MbrescueError(f"kernel module {name} not found in {kernel_root}")
        for dep in _modinfo_depends(files[key]):
            visit(dep)
        order.append(files[key])

    for name in wanted:
        visit(name)
    return order


def _busybox_tree(busybox: Path) -> cpio.Tree:
    tree = cpio.Tree()
    tree.file_from("bin/busybox", busybox, 0o755)
    for applet in BUSYBOX_APPLETS:
        tree.symlink(f"bin/{applet}", "busybox")
    for directory in ("dev", "proc", "sys", "root", "tmp"):
        tree.directory(directory)
    # The kernel opens /dev/console for init's stdio before any devtmpfs is mounted.
    tree.char_device("dev/console", 5, 1)
    return tree


def _fixture_initramfs(recipe: Recipe, busybox: Path) -> bytes:
    tree = _busybox_tree(busybox)
    tree.file("init", (
        "#!/bin/sh\n"
        "# mbrescue test fixture: prove that this disk booted, then power off.\n"
        "export PATH=/bin\n"
        f"echo {recipe.marker}\n"
        "sync\n"
        "poweroff -f\n"
    ).encode(), 0o755)
    raw = io.BytesIO()
    cpio.write_tree(tree, raw)
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def _grub_cfg(recipe: Recipe, kernel_version: str) -> str:
    part_module = "part_msdos" if recipe.table == "msdos" else "part_gpt"
    return (
        f"# /boot/grub/grub.cfg of the mbrescue test fixture {recipe.name} (hand-written).\n"
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\n"
        "terminal_output serial console\n"
        "set default=0\n"
        "set timeout=0\n"
        f"insmod {part_module}\n"
        "insmod ext2\n"
        f"search --no-floppy --fs-uuid --set=root {recipe.boot_fs_uuid}\n"
        f"menuentry 'Debian GNU/Linux, mbrescue fixture {recipe.name}' {{\n"
        f"    linux /vmlinuz-{kernel_version} ro console=tty0"
        " console=ttyS0,115200 panic=-1 quiet\n"
        f"    initrd /initrd.img-{kernel_version}\n"
        "}\n"
    )


def _stage_boot_dir(recipe: Recipe, parts: Parts, into: Path) -> None:
    """The files of the fixture's /boot, before grub-install adds its own."""
    into.mkdir(parents=True)
    version = parts.kernel_version
    shutil.copyfile(parts.vmlinuz, into / f"vmlinuz-{version}")
    (into / f"initrd.img-{version}").write_bytes(_fixture_initramfs(recipe, parts.busybox))
    for extra in ("config", "System.map"):
        source = parts.kernel_root / "boot" / f"{extra}-{version}"
        if source.exists():
            shutil.copyfile(source, into / f"{extra}-{version}")
    (into / "grub").mkdir()
    (into / "grub" / "grub.cfg").write_text(_grub_cfg(recipe, version))


# ---------------------------------------------------------------- the image on the host


@dataclass(frozen=True)
class Placed:
    number: int
    start_sector: int
    size_sectors: int


def _sfdisk_script(recipe: Recipe) -> str:
    lines = [f"label: {'dos' if recipe.table == 'msdos' else 'gpt'}",
             f"label-id: {recipe.disk_id}", "unit: sectors", ""]
    msdos_types = {"boot": "83", "data": "83", "swap": "82", "extended": "5"}
    gpt_types = {"boot": GPT_LINUX, "data": GPT_LINUX, "swap": GPT_SWAP,
                 "bios_boot": GPT_BIOS_BOOT, "esp": GPT_ESP}
    for part in recipe.parts:
        fields = []
        if part.start_sector is not None:
            fields.append(f"start={part.start_sector}")
        if part.size_sectors is not None:
            fields.append(f"size={part.size_sectors}")
        if recipe.table == "msdos":
            fields.append(f"type={msdos_types[part.kind]}")
            if part.kind == "boot":
                fields.append("bootable")
        else:
            fields.append(f"type={gpt_types[part.kind]}")
            fields.append(f"uuid={part.uuid}")
            fields.append(f'name="{part.kind}"')
        lines.append(", ".join(fields))
    return "\n".join(lines) + "\n"


def _read_layout(image: Path) -> dict[int, Placed]:
    table = json.loads(output(["sfdisk", "--json", image]))["partitiontable"]
    placed = {}
    for entry in table["partitions"]:
        number = int(re.sub(r"^p", "", entry["node"].removeprefix(os.fspath(image))))
        placed[number] = Placed(number, int(entry["start"]), int(entry["size"]))
    return placed


def _write_at(image: Path, start_sector: int, source: Path) -> None:
    """Copy a side file into the image at a sector, skipping zero blocks (keeps it sparse)."""
    block = 1 << 20
    with open(source, "rb") as src, open(image, "r+b") as dst:
        position = start_sector * SECTOR_BYTES
        while chunk := src.read(block):
            if chunk.count(0) != len(chunk):
                dst.seek(position)
                dst.write(chunk)
            position += len(chunk)


def _make_image(recipe: Recipe, parts: Parts, work: Path) -> tuple[Path, dict[int, Placed]]:
    image = work / f"fixture-{recipe.name.lower()}.img"
    with open(image, "wb") as stream:
        stream.truncate(recipe.disk_sectors * SECTOR_BYTES)
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image],
        input_bytes=_sfdisk_script(recipe).encode())
    placed = _read_layout(image)

    boot = placed[recipe.part("boot").number]
    boot_dir = work / f"boot-{recipe.name}"
    _stage_boot_dir(recipe, parts, boot_dir)
    if recipe.boot_fs == "ext3":
        # As CentOS 5 made them: 1 KiB blocks, 128-byte inodes.
        fs_args = ["-t", "ext3", "-b", "1024", "-I", "128"]
        block_bytes = 1024
    else:
        fs_args = ["-t", "ext4", "-b", "4096"]
        block_bytes = 4096
    run(["mke2fs", "-q", "-F", *fs_args, "-L", recipe.boot_label, "-U", recipe.boot_fs_uuid,
         "-E", f"offset={boot.start_sector * SECTOR_BYTES},nodiscard,"
               f"hash_seed={recipe.boot_fs_uuid}",
         "-d", boot_dir, image, str(boot.size_sectors * SECTOR_BYTES // block_bytes)])
    shutil.rmtree(boot_dir)

    if recipe.data_fs_uuid is not None:
        data = placed[recipe.part("data").number]
        data_dir = work / f"data-{recipe.name}"
        data_dir.mkdir()
        (data_dir / "README").write_text("mbrescue fixture: a data partition in the EBR chain\n")
        run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "data",
             "-U", recipe.data_fs_uuid,
             "-E", f"offset={data.start_sector * SECTOR_BYTES},nodiscard,"
                   f"hash_seed={recipe.data_fs_uuid}",
             "-d", data_dir, image, str(data.size_sectors * SECTOR_BYTES // 4096)])
        shutil.rmtree(data_dir)

    if recipe.esp_volume_id is not None:
        esp = placed[recipe.part("esp").number]
        run(["mkfs.vfat", "-F", "32", "-s", "1", "-S", str(SECTOR_BYTES), "-n", "ESP",
             "-i", recipe.esp_volume_id, f"--offset={esp.start_sector}", image,
             str(esp.size_sectors * SECTOR_BYTES // 1024)])

    # mkswap has no offset option here: make the swap area on a side file, then copy it in.
    swap = placed[recipe.part("swap").number]
    swap_file = work / f"swap-{recipe.name}"
    with open(swap_file, "wb") as stream:
        stream.truncate(swap.size_sectors * SECTOR_BYTES)
    run(["mkswap", "-L", recipe.swap_label, "-U", recipe.swap_uuid, swap_file])
    _write_at(image, swap.start_sector, swap_file)
    swap_file.unlink()
    return image, placed


# ---------------------------------------------------------------- grub-install in a VM


def _install_script(recipes: Sequence[Recipe], modules: Sequence[Path]) -> str:
    """The install VM's /init: mount the host root, chroot, grub-install each disk."""
    lines = [
        "#!/bin/sh",
        "# mbrescue fixture installer: runs grub-install for each attached disk, then powers off.",
        "export PATH=/bin:/usr/sbin:/usr/bin:/sbin",
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
    ]
    lines += [f"insmod /modules/{ko.name} || echo 'MBRESCUE-INSTALL-WARN insmod {ko.name}'"
              for ko in modules]
    lines += [
        "mkdir -p /host",
        "mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host"
        " || echo 'MBRESCUE-INSTALL-FAIL mount host root'",
        "mount -t tmpfs tmpfs /host/tmp",
        "mount -t tmpfs tmpfs /host/run",
        "mount -t proc proc /host/proc",
        "mount -t sysfs sysfs /host/sys",
        "mount -t devtmpfs devtmpfs /host/dev",
        # virtio disks appear synchronously once the module is loaded; the loop bounds a
        # slow probe anyway.
        "disk_of() { for d in /sys/block/vd*; do",
        "  [ \"$(cat $d/serial 2>/dev/null)\" = \"$1\" ] && { echo ${d##*/}; return; }",
        "done; }",
    ]
    for recipe in recipes:
        name = recipe.name
        boot_number = recipe.part("boot").number
        mnt = f"/tmp/mnt/{name}"
        target = "x86_64-efi" if recipe.firmware == "uefi" else "i386-pc"
        lines += [
            f"n=0; while [ -z \"$(disk_of fixture-{name})\" ] && [ $n -lt 30 ]; do"
            " sleep 1; n=$((n+1)); done",
            f"dev=$(disk_of fixture-{name})",
            f"mkdir -p /host{mnt}",
            f"rc=1; if mount -t {recipe.boot_fs} /dev/${{dev}}{boot_number} /host{mnt}; then",
            f"  echo \"(hd0) /dev/$dev\" > /host{mnt}/grub/device.map",
        ]
        install = ["grub-install", f"--target={target}", f"--boot-directory={mnt}"]
        if recipe.firmware == "uefi":
            esp_number = recipe.part("esp").number
            lines += [
                f"  mkdir -p /host{mnt}-esp",
                f"  mount -t vfat /dev/${{dev}}{esp_number} /host{mnt}-esp",
            ]
            install += [f"--efi-directory={mnt}-esp", "--removable", "--no-nvram",
                        "--no-uefi-secure-boot"]
        else:
            install += ["/dev/$dev"]
        lines += [
            f"  chroot /host {' '.join(install)} 2>&1; rc=$?",
            f"  [ {recipe.firmware} = uefi ] && umount /host{mnt}-esp",
            f"  umount /host{mnt} || rc=99",
            "fi",
            f"echo \"MBRESCUE-INSTALL {name} dev=$dev rc=$rc\"",
        ]
    lines += ["sync", "echo MBRESCUE-INSTALL-DONE", "poweroff -f", ""]
    return "\n".join(lines)


def _install_grub(recipes: Sequence[Recipe], images: dict[str, Path], parts: Parts,
                  work: Path) -> None:
    modules = _module_load_order(parts.kernel_root, INSTALL_MODULES)
    tree = _busybox_tree(parts.busybox)
    for ko in modules:
        tree.file_from(f"modules/{ko.name}", ko, 0o644)
    tree.directory("host")
    tree.file("init", _install_script(recipes, modules).encode(), 0o755)
    initrd = work / "install-initrd.cpio"
    with open(initrd, "wb") as stream:
        cpio.write_tree(tree, stream)
    config = VmConfig(
        firmware="bios", memory_mib=768, kernel=parts.vmlinuz, initrd=initrd,
        append="console=ttyS0,115200 panic=-1 quiet",
        disks=[Disk(images[recipe.name], "virtio", serial=f"fixture-{recipe.name}")
               for recipe in recipes],
        # The host root, read-only: grub-install, its libraries and /usr/lib/grub.
        extra=["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                          "multidevs=remap,id=hostroot"],
    )
    log.info(f"installing GRUB on fixtures {', '.join(r.name for r in recipes)} in a VM")
    with Vm(config, work / "install.log") as vm:
        for recipe in recipes:
            found = vm.expect(rf"MBRESCUE-INSTALL {recipe.name} dev=(\S*) rc=(\d+)",
                              INSTALL_TIMEOUT_S)
            if found.group(2) != "0":
                raise MbrescueError(
                    f"grub-install failed on fixture {recipe.name} (rc={found.group(2)})",
                    hint=f"see {_fixtures_root() / FAILED_LOG}")
        vm.expect("MBRESCUE-INSTALL-DONE", 120)
        vm.wait_exit(120)
    initrd.unlink()


# ---------------------------------------------------------------- boot checks


def boot_to_marker(image: Path, fixture: Fixture, timeout: float = 180,
                   extra_disks: Sequence[Disk] = (), interface: str = "virtio") -> float:
    """Boot a disk image in QEMU until the fixture's marker; return seconds since start.

    The image is the first disk (`interface` as in vm.Disk), extra_disks follow it.
    """
    # The cached images stay untouched; a caller's copy may be written (e.g. by OVMF).
    readonly = Path(image).resolve().is_relative_to(_fixtures_root().resolve())
    config = VmConfig(
        firmware=fixture.firmware, memory_mib=512,
        disks=[Disk(Path(image), interface, readonly=readonly), *extra_disks],
    )
    with Vm(config) as vm:
        # The marker alone on its line; the serial console ends lines with \r\n.
        vm.expect(rf"{re.escape(fixture.marker)}\r*\n", timeout)
        seconds = vm.elapsed()
        try:
            vm.wait_exit(30)
        except MbrescueError:
            log.debug(f"fixture {fixture.name}: QEMU did not power off; killed")
    return seconds


# ---------------------------------------------------------------- cache and API


def _fixtures_root() -> Path:
    root = debs.cache_dir() / "fixtures"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _load(folder: Path) -> dict[str, Fixture]:
    records = json.loads((folder / "fixtures.json").read_text())
    return {name: Fixture(**{**record, "path": folder / record["path"]})
            for name, record in records.items()}


def _build(parts: Parts, final: Path) -> None:
    require_tools("sfdisk", "mke2fs", "mkfs.vfat", "mkswap", "qemu-system-x86_64")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".build-{final.name}-"))
    try:
        recipes = [RECIPES[name] for name in FIXTURE_NAMES]
        images: dict[str, Path] = {}
        fixtures: dict[str, Fixture] = {}
        for recipe in recipes:
            image, placed = _make_image(recipe, parts, work)
            images[recipe.name] = image
            chain = [placed[p.number] for p in recipe.parts
                     if p.kind in ("boot", "bios_boot", "esp")]
            fixtures[recipe.name] = Fixture(
                name=recipe.name, path=image, firmware=recipe.firmware, marker=recipe.marker,
                table=recipe.table, boot_partition=recipe.part("boot").number,
                swap_partition=recipe.part("swap").number, swap_label=recipe.swap_label,
                swap_uuid=recipe.swap_uuid, boot_fs_uuid=recipe.boot_fs_uuid,
                region_end_sectors=max(p.start_sector + p.size_sectors for p in chain),
            )
        _install_grub(recipes, images, parts, work)
        log.info(f"fixtures laid out and GRUB installed in {time.monotonic() - started:.0f} s")
        timings = {}
        for name, fixture in fixtures.items():
            timings[name] = boot_to_marker(fixture.path, fixture)
            log.info(f"fixture {name} boots to its marker in {timings[name]:.1f} s")
        records = {name: {**asdict(fixture), "path": fixture.path.name}
                   for name, fixture in fixtures.items()}
        (work / "fixtures.json").write_text(json.dumps(records, indent=1, sort_keys=True))
        (work / "timings.json").write_text(json.dumps(
            {"build_s": time.monotonic() - started, "boot_s": timings}, indent=1))
        os.replace(work, final)
    except BaseException:
        if (work / "install.log").exists():
            shutil.copyfile(work / "install.log", final.parent / FAILED_LOG)
        shutil.rmtree(work, ignore_errors=True)
        raise


_loaded: dict[str, Fixture] = {}


def ensure_all() -> dict[str, Fixture]:
    """All four fixtures, built in one VM run when the cache lacks them."""
    # Finding the recipe hash asks apt and checksums the debs (seconds): once per process.
    if _loaded and all(fixture.path.exists() for fixture in _loaded.values()):
        return dict(_loaded)
    parts = _parts()
    root = _fixtures_root()
    final = root / parts.recipe_hash
    if not (final / "fixtures.json").exists():
        with _locked(root / ".lock"):
            if not (final / "fixtures.json").exists():
                # Holding the lock, any other build folder is a killed build's leftover.
                for stale in root.glob(".build-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                _build(parts, final)
    _loaded.update(_load(final))
    return dict(_loaded)


def ensure_fixture(name: str) -> Fixture:
    if name not in RECIPES:
        raise MbrescueError(f"no fixture {name!r}", hint=f"one of {', '.join(FIXTURE_NAMES)}")
    return ensure_all()[name]


def main(argv: Sequence[str]) -> int:
    names = [name.upper() for name in argv] or list(FIXTURE_NAMES)
    try:
        for name in names:
            print(f"{name} {ensure_fixture(name).path}")
    except MbrescueError as error:
        print(f"mbrescue: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
