"""The base and payload initramfs and /init: contents, determinism, sizes, real boots.

The QEMU tests boot Debian's kernel with base + payload concatenated (as the kernel
receives them from GRUB) and read the serial console. They use a stand-in runner
package of the real one's shape, so /init is tested on its own; the real runner is
checked for importability by the kit's Python and booted once into its failure path.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from builder import initramfs
from builder.initramfs import make_base_initramfs, make_payload_initramfs
from builder.kit import Kit, ensure_kit
from builder.vm import Disk, Vm, VmConfig

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ROOT / "overlays"
REAL_RUNNER = ROOT / "builder" / "runner"
GOLDEN = ROOT / "tests" / "golden" / "init.sh"
SIZE_GOAL_BYTES = 20 * 1000 * 1000
BOOT_TIMEOUT_S = 240

STANDIN_MAIN = '''\
"""Stand-in for the restore runner: the same shape and the same kind of imports."""

import argparse
import fcntl
import hashlib
import json
import os
import select
import struct
import sys
import tarfile
import zlib

from .util import banner


def main() -> int:
    parser = argparse.ArgumentParser(prog="standin")
    parser.add_argument("command", choices=["rescue"])
    parser.add_argument("capture")
    args = parser.parse_args()
    disks = sorted(os.listdir("/sys/block"))
    print(banner(), "disks:", json.dumps(disks), flush=True)
    with open(args.capture, "rb") as stream:
        data = stream.read()
    print("standin: capture sha256", hashlib.sha256(data).hexdigest(), flush=True)
    if data.startswith(b"FAIL"):
        print("mbrescue: error: the stand-in was told to fail", flush=True)
        return 3
    print("mbrescue: restore complete", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''
STANDIN_UTIL = '''\
import sys


def banner() -> str:
    return "standin: python " + sys.version.split()[0]
'''


@pytest.fixture(scope="session")
def kit() -> Kit:
    return ensure_kit()


@pytest.fixture(scope="session")
def standin_runner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    package = tmp_path_factory.mktemp("standin") / "runner"
    package.mkdir()
    (package / "__init__.py").write_text('"""Stand-in runner."""\n')
    (package / "__main__.py").write_text(STANDIN_MAIN)
    (package / "util.py").write_text(STANDIN_UTIL)
    return package


@pytest.fixture(scope="session")
def standin_base(kit: Kit, standin_runner: Path) -> Path:
    # The shared download cache: built once per machine, reused by later runs.
    return make_base_initramfs(kit, standin_runner, OVERLAYS)


def archive_listing(base: Path) -> dict[str, str]:
    """path -> `cpio -tv` line, read by the independent tools zstd and cpio."""
    data = base.read_bytes()
    padding = initramfs.base_record(base).padding_bytes
    assert 0 <= padding < 4 and len(data) % 4 == 0
    assert data[len(data) - padding:] == b"\0" * padding
    frame = data[: len(data) - padding]
    subprocess.run(["zstd", "-q", "-t"], input=frame, check=True)
    raw = subprocess.run(["zstd", "-q", "-dc"], input=frame, check=True,
                         capture_output=True).stdout
    listing = subprocess.run(["cpio", "-t", "-v", "--quiet"], input=raw, check=True,
                             capture_output=True).stdout.decode()
    entries = {}
    for line in listing.splitlines():
        name = line.split(" -> ")[0].split()[-1]
        entries[name] = line
    return entries


# ---- /init ----


def fake_kit(tmp_path: Path) -> Kit:
    """A kit with fixed names, so the golden /init does not follow Debian's updates."""
    modules_root = tmp_path / "lib" / "modules" / "6.1.0-99-amd64"
    modules_root.mkdir(parents=True)
    (modules_root / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko "
        "kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/hv/hv_vmbus.ko:\n"
        "kernel/drivers/scsi/hv_storvsc.ko: kernel/drivers/hv/hv_vmbus.ko\n"
    )
    order = ["kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
             "kernel/drivers/block/virtio_blk.ko", "kernel/drivers/hv/hv_vmbus.ko",
             "kernel/drivers/scsi/hv_storvsc.ko"]
    dummy = tmp_path / "dummy"
    return Kit(kernel=dummy, modules_root=modules_root, kernel_version="6.1.0-99-amd64",
               busybox=dummy, python=dummy, python_stdlib=[dummy], libraries=[], packages={},
               module_load_order=order, elf_interpreter="/lib64/ld-linux-x86-64.so.2",
               library_dirs=[], package_sha256={}, tools={}, gconv_modules=[], gconv_config="")


def test_init_matches_golden(tmp_path: Path) -> None:
    rendered = initramfs.render_init(fake_kit(tmp_path))
    if os.environ.get("MBRESCUE_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(rendered)
    assert rendered == GOLDEN.read_text(), "set MBRESCUE_UPDATE_GOLDEN=1 to accept a change"


def test_init_is_valid_busybox_sh(kit: Kit, tmp_path: Path) -> None:
    script = tmp_path / "init"
    script.write_text(initramfs.render_init(kit))
    subprocess.run([kit.busybox, "sh", "-n", script], check=True)
    text = script.read_text()
    assert "PYTHONHASHSEED=0 PYTHONPATH=/opt/mbrescue python3 -m mbrescue_runner rescue " \
           "/mbrescue/capture.mbrescue" in text
    assert "load virtio_blk kernel/drivers/block/virtio_blk.ko virtio virtio_ring" in text


# ---- the base archive ----


def test_base_contents(kit: Kit, standin_base: Path) -> None:
    entries = archive_listing(standin_base)
    console = entries["dev/console"]
    assert console.startswith("crw-------") and re.search(r"\b5,\s+1\b", console), console
    assert entries["init"].startswith("-rwxr-xr-x")
    for path in ("bin/busybox", "usr/bin/python3.11", "lib/x86_64-linux-gnu/libc.so.6",
                 "lib/x86_64-linux-gnu/libz.so.1", "lib/x86_64-linux-gnu/libexpat.so.1",
                 "lib/x86_64-linux-gnu/libcrypto.so.3",  # for _hashlib, which hashlib loads
                 "usr/lib/python3.11/os.py", "usr/lib/python3.11/json/__init__.py",
                 "usr/lib/python3.11/json/__pycache__/decoder.cpython-311.pyc",
                 "usr/lib/python3.11/tarfile.py", "usr/lib/python3.11/encodings/utf_8.py",
                 "usr/lib/python3.11/lib-dynload/_hashlib.cpython-311-x86_64-linux-gnu.so",
                 "opt/mbrescue/mbrescue_runner/__main__.py",
                 "opt/mbrescue/mbrescue_runner/util.py",
                 "opt/mbrescue/mbrescue_runner/__pycache__/__main__.cpython-311.pyc",
                 "etc/profile"):
        assert path in entries, path
        assert entries[path].startswith("-"), entries[path]
    # The file-level restore path's programs, first in PATH, instead of busybox applets.
    for tool in ("usr/sbin/mke2fs", "usr/sbin/e2fsck", "usr/sbin/mkfs.fat", "usr/sbin/fsck.fat",
                 "usr/sbin/mtools", "usr/sbin/blkid", "usr/sbin/losetup",
                 "lib/x86_64-linux-gnu/libext2fs.so.2", "lib/x86_64-linux-gnu/libblkid.so.1",
                 "lib/x86_64-linux-gnu/libsmartcols.so.1",
                 "usr/lib/x86_64-linux-gnu/gconv/IBM850.so",
                 "usr/lib/x86_64-linux-gnu/gconv/gconv-modules"):
        assert entries[tool].startswith("-"), tool
    assert "-> mke2fs" in entries["usr/sbin/mkfs.ext4"]
    assert "-> mtools" in entries["usr/sbin/mcopy"]
    assert "sbin/losetup" not in entries and "sbin/mke2fs" not in entries
    assert "-> /bin/busybox" in entries["bin/sh"]
    assert "-> /bin/busybox" in entries["sbin/insmod"]
    assert "-> python3.11" in entries["usr/bin/python3"]
    assert "-> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" in entries["lib64/ld-linux-x86-64.so.2"]
    # Only what the runner imports: no unrelated parts of the standard library.
    for absent in ("usr/lib/python3.11/email/__init__.py", "usr/lib/python3.11/asyncio",
                   "usr/lib/python3.11/sitecustomize.py", "usr/lib/python3.11/unittest"):
        assert absent not in entries, absent
    modules = f"lib/modules/{kit.kernel_version}"
    for module in ("kernel/drivers/block/virtio_blk.ko", "kernel/drivers/virtio/virtio.ko",
                   "kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio_pci.ko",
                   "kernel/drivers/nvme/host/nvme.ko", "kernel/drivers/ata/ahci.ko",
                   "kernel/fs/ext4/ext4.ko", "kernel/drivers/block/loop.ko",
                   "modules.dep", "modules.alias"):
        assert f"{modules}/{module}" in entries, module
    for line in entries.values():
        assert " root " in line or " 0 " in line, line  # owned by 0:0


def test_base_size_goal(standin_base: Path) -> None:
    record = initramfs.base_record(standin_base)
    print(f"base initramfs: {record.compressed_bytes} bytes compressed, "
          f"{record.uncompressed_bytes} unpacked")
    assert record.compressed_bytes == standin_base.stat().st_size
    assert record.compressed_bytes < SIZE_GOAL_BYTES
    assert record.compressed_bytes % 4 == 0


def test_base_is_reproducible(kit: Kit, standin_runner: Path, standin_base: Path,
                              tmp_path: Path) -> None:
    again = make_base_initramfs(kit, standin_runner, OVERLAYS, out_dir=tmp_path)
    assert again.name == standin_base.name
    assert again.read_bytes() == standin_base.read_bytes()


def test_base_cache_key_follows_the_runner(kit: Kit, standin_runner: Path,
                                           tmp_path: Path) -> None:
    changed = tmp_path / "runner"
    shutil.copytree(standin_runner, changed)
    before = initramfs.input_hash(kit, changed, OVERLAYS)
    (changed / "util.py").write_text((changed / "util.py").read_text() + "\n# changed\n")
    assert initramfs.input_hash(kit, changed, OVERLAYS) != before


def test_real_runner_imports_in_kit_python(kit: Kit) -> None:
    files = {str(path) for path in initramfs.discover_stdlib(kit, REAL_RUNNER)}
    assert "os.py" in files and "encodings/__init__.py" in files


def test_runner_missing_a_lazy_import_is_refused(kit: Kit, standin_runner: Path,
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # argparse needs locale only once a parser is built: the build's own start of the
    # runner on the stripped stdlib (`--help`) must notice that it is missing.
    monkeypatch.setattr(initramfs, "LAZY_IMPORTS_EXCLUDED",
                        initramfs.LAZY_IMPORTS_EXCLUDED | {"locale"})
    with pytest.raises(initramfs.MbrescueError, match="does not start") as failure:
        make_base_initramfs(kit, standin_runner, OVERLAYS, out_dir=tmp_path)
    assert "locale" in (failure.value.hint or "")
    assert list(tmp_path.glob("base-*")) == []


def test_runner_that_cannot_import_is_refused(kit: Kit, tmp_path: Path) -> None:
    package = tmp_path / "runner"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text("import tkinter\n")
    with pytest.raises(initramfs.MbrescueError, match="cannot be imported"):
        initramfs.discover_stdlib(kit, package)


# ---- the payload ----


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 1000])
def test_payload_padding_and_contents(tmp_path: Path, size: int) -> None:
    capture = tmp_path / "capture.bin"
    capture.write_bytes(os.urandom(size))
    out = make_payload_initramfs(capture, tmp_path / "payload.cpio")
    assert out.stat().st_size % 4 == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["cpio", "-i", "-d", "--quiet"], stdin=open(out, "rb"), cwd=unpacked,
                   check=True)
    assert (unpacked / "mbrescue" / "capture.mbrescue").read_bytes() == capture.read_bytes()
    assert sorted(p.name for p in unpacked.rglob("*")) == ["capture.mbrescue", "mbrescue"]


def test_payload_is_reproducible_and_takes_extra_files(tmp_path: Path) -> None:
    capture = tmp_path / "capture.bin"
    capture.write_bytes(b"x" * 777)
    first = make_payload_initramfs(capture, tmp_path / "a.cpio", {"options.json": b"{}"})
    time.sleep(1.1)
    second = make_payload_initramfs(capture, tmp_path / "b.cpio", {"options.json": b"{}"})
    assert first.read_bytes() == second.read_bytes()
    listing = subprocess.run(["cpio", "-t", "--quiet"], stdin=open(first, "rb"),
                             capture_output=True, check=True, text=True).stdout.split()
    assert listing == ["mbrescue", "mbrescue/capture.mbrescue", "mbrescue/options.json"]
    with pytest.raises(initramfs.MbrescueError):
        make_payload_initramfs(capture, tmp_path / "c.cpio", {"../evil": b""})


# ---- booting it ----


def boot(kit: Kit, base: Path, capture_bytes: bytes, append: str, work: Path) -> Vm:
    capture = work / "capture.mbrescue"
    capture.write_bytes(capture_bytes)
    payload = make_payload_initramfs(capture, work / "payload.cpio")
    initrd = work / "initrd.img"
    initrd.write_bytes(base.read_bytes() + payload.read_bytes())
    disk = work / "disk.img"
    with open(disk, "wb") as stream:
        stream.truncate(32 << 20)
    config = VmConfig(kernel=kit.kernel, initrd=initrd, append=f"console=ttyS0 {append}",
                      disks=[Disk(disk, serial="MBRTEST01")], memory_mib=512)
    return Vm(config, work / "serial.log")


@pytest.mark.qemu
def test_boot_runs_the_runner_then_reboots(kit: Kit, standin_base: Path, tmp_path: Path) -> None:
    with boot(kit, standin_base, b"a capture", "mbrescue.wait=3", tmp_path) as vm:
        vm.expect(r"disk drivers loaded", BOOT_TIMEOUT_S)
        disks = vm.expect(r"mbrescue: disks: ([^\r\n]*)\r?\n", 60).group(1)
        assert "vda" in disks.split()
        found = vm.expect(r"standin: python (3\.11\.\d+) disks: (\[[^\]]*\])", 60)
        python_running_s = vm.elapsed()
        assert '"vda"' in found.group(2)
        vm.expect(r"mbrescue: restore complete", 30)
        vm.expect(r"mbrescue: press Enter to reboot", 30)
        print(f"QEMU start -> runner running: {python_running_s:.1f} s (TCG)")
        assert "Kernel panic" not in vm.output and "Traceback" not in vm.output
        vm.send("\n")
        assert vm.wait_exit(60) == 0  # reboot -f; QEMU runs with -no-reboot


@pytest.mark.qemu
def test_shell_switch_reaches_a_shell(kit: Kit, standin_base: Path, tmp_path: Path) -> None:
    with boot(kit, standin_base, b"a capture", "mbrescue.shell=1", tmp_path) as vm:
        vm.expect(r"mbrescue# ", BOOT_TIMEOUT_S)
        vm.send("ls /sys/block; echo probe-$((40 + 2))\n")
        vm.expect(r"probe-42", 60)
        assert "vda" in vm.output
        assert "standin:" not in vm.output  # the runner did not start
        vm.send("reboot -f\n")
        vm.wait_exit(60)


@pytest.mark.qemu
def test_runner_failure_drops_to_a_shell(kit: Kit, standin_base: Path, tmp_path: Path) -> None:
    with boot(kit, standin_base, b"FAIL please", "mbrescue.wait=2", tmp_path) as vm:
        vm.expect(r"mbrescue: error: the restore runner ended with exit status 3", BOOT_TIMEOUT_S)
        vm.expect(r"mbrescue# ", 60)
        vm.send("echo alive-$((6 * 7))\n")
        vm.expect(r"alive-42", 60)
        vm.send("exit\n")  # leaving the shell must not end PID 1
        vm.expect(r"starting another", 60)
        vm.expect(r"mbrescue# ", 60)
        assert "Kernel panic" not in vm.output
        vm.send("reboot -f\n")
        vm.wait_exit(60)


@pytest.mark.qemu
def test_real_runner_starts_and_refuses_garbage(kit: Kit, tmp_path: Path) -> None:
    base = make_base_initramfs(kit, REAL_RUNNER, OVERLAYS)
    with boot(kit, base, b"not a capture at all", "mbrescue.wait=2", tmp_path) as vm:
        vm.expect(r"mbrescue: error: the restore runner ended with exit status [1-9]",
                  BOOT_TIMEOUT_S)
        vm.expect(r"mbrescue# ", 60)
        # The runner itself said why, and no module was missing from the stripped stdlib.
        assert "ModuleNotFoundError" not in vm.output and "ImportError" not in vm.output
        assert vm.output.count("mbrescue: error:") >= 2, vm.output[-2000:]
        vm.send("reboot -f\n")
        vm.wait_exit(60)


@pytest.mark.qemu
def test_payload_too_big_for_ram_is_named(kit: Kit, standin_base: Path, tmp_path: Path) -> None:
    # rootfs is a tmpfs capped at half of RAM: 150 MiB of payload cannot fit in 400 MiB.
    capture = tmp_path / "capture.mbrescue"
    with open(capture, "wb") as stream:
        stream.write(os.urandom(1 << 20) * 150)
    payload = make_payload_initramfs(capture, tmp_path / "payload.cpio")
    initrd = tmp_path / "initrd.img"
    with open(initrd, "wb") as stream:
        stream.write(standin_base.read_bytes())
        stream.write(payload.read_bytes())
    capture.unlink()
    payload.unlink()
    config = VmConfig(kernel=kit.kernel, initrd=initrd, memory_mib=400,
                      append="console=ttyS0 mbrescue.wait=1")
    with Vm(config, tmp_path / "serial.log") as vm:
        vm.expect(r"mbrescue: error: the kernel could not unpack the whole rescue system "
                  r"\(too little RAM", BOOT_TIMEOUT_S)
        vm.expect(r"mbrescue# ", 60)
        assert "standin:" not in vm.output
        vm.send("reboot -f\n")
        vm.wait_exit(60)


@pytest.mark.qemu
def test_disks_on_every_controller_are_seen(kit: Kit, standin_base: Path, tmp_path: Path) -> None:
    """virtio, NVMe, IDE (ata_piix), AHCI and USB (xhci + usb-storage, which probes late)."""
    images = {}
    for name in ("virtio", "nvme", "ide", "usb", "ahci"):
        images[name] = tmp_path / f"{name}.img"
        with open(images[name], "wb") as stream:
            stream.truncate(16 << 20)
    capture = tmp_path / "capture.mbrescue"
    capture.write_bytes(b"a capture")
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(standin_base.read_bytes()
                       + make_payload_initramfs(capture, tmp_path / "payload.cpio").read_bytes())
    ahci = ["-device", "ahci,id=ahci0",
            "-drive", f"file={images['ahci']},format=raw,if=none,id=ahcidisk",
            "-device", "ide-hd,drive=ahcidisk,bus=ahci0.0"]
    config = VmConfig(kernel=kit.kernel, initrd=initrd, append="console=ttyS0",
                      memory_mib=512, extra=ahci,
                      disks=[Disk(images[name], interface=name)
                             for name in ("virtio", "nvme", "ide", "usb")])
    with Vm(config, tmp_path / "serial.log") as vm:
        disks = vm.expect(r"mbrescue: disks: ([^\r\n]*)\r?\n", BOOT_TIMEOUT_S).group(1).split()
        vm.expect(r"standin: python", 60)
    assert sorted(disks) == ["nvme0n1", "sda", "sdb", "sdc", "vda"], disks
    assert "not for this machine: hv_vmbus hv_storvsc xen-blkfront" in vm.output
