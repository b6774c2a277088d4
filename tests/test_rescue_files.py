"""The rescue system takes the file-level path too: its kit carries the programs the path
runs, the runner plans that path for a disk the region path cannot take (another logical
sector size, a disk smaller than the region) and for `mbrescue.files=1`.

Three levels, cheapest first: the runner's candidate planning on real loop devices (a 4Kn
one made with `losetup -b 4096`); the whole file-level restore run inside the real base
initramfs unpacked as a chroot (its busybox, stripped Python, kit programs and libraries,
nothing of the host's userland) onto a 4Kn image; and the real ISO of fixture D booted
under OVMF beside a blank 4Kn virtio disk, `yes` typed on the serial console, the disk then
booted alone as 4Kn to D's marker.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import initramfs
from builder.build import OVERLAYS_DIR, RUNNER_DIR
from builder.fixtures import boot_to_marker
from builder.kit import ensure_kit
from builder.runner import restore as runner
from builder.runner.capfile import Capture
from builder.runner.cmdline import Switches, parse_switches
from builder.runner.console import Console, Terminal
from builder.runner.errors import MbrescueError
from builder.runner.files_restore import FilesPlan
from builder.runner.plan import Plan, RegionHead
from builder.vm import Disk, Vm, VmConfig, VmTimeout

from .conftest import mbrescue, memory_initrd, sh, sha256_of

MiB = 1 << 20
EPOCH = "1700000000"
PROMPT_TIMEOUT_S = 400.0
COMPLETE_TIMEOUT_S = 400.0
MARKER_TIMEOUT_S = 300.0
MEMORY_MIB = 1024
SCRATCH_SERIAL = "MBRESCUE-4KN"
RESTORE_DEFAULT = r"default\s+is\s+the\s+restore"
PROMPT = r"Type yes to write (/dev/\w+) \("
COMPLETE = r"mbrescue: restore complete[^\r\n]*\r?\n"
FAILED = r"mbrescue: error: [^\r\n]*\r?\n"


def blank(path: Path, size_bytes: int) -> Path:
    with open(path, "wb") as stream:
        stream.truncate(size_bytes)
    return path


@contextlib.contextmanager
def loop_device(image: Path, sector_bytes: int = 512) -> Iterator[str]:
    device = sh("losetup", "--find", "--show", "--sector-size", str(sector_bytes),
                image).strip()
    try:
        yield device
    finally:
        sh("losetup", "--detach", device)


def answering(text: str) -> tuple[Console, io.StringIO]:
    """A console whose one answer is `text`; what it showed is in the StringIO."""
    out = io.StringIO()
    terminal = Terminal("test", -1, None, False, out_stream=out, in_stream=io.StringIO(text))
    return Console([terminal], error_stream=io.StringIO()), out


def tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


# --- the kernel command line switch ---------------------------------------------------------


def test_files_switch_is_parsed() -> None:
    assert parse_switches("console=ttyS0 mbrescue.files=1").files
    assert parse_switches('mbrescue.files="yes" quiet').files
    assert not parse_switches("console=ttyS0").files
    assert not parse_switches("mbrescue.files=0").files
    # The last occurrence wins, as for the other switches.
    assert not parse_switches("mbrescue.files=1 mbrescue.files=off").files
    assert parse_switches("mbrescue.files").files is False


# --- the rescue mode's planning, on real loop devices -----------------------------------------


def test_rescue_candidates_take_the_path_each_disk_needs(fixtures, captures, tmp_path) -> None:
    """A 4Kn disk and a disk smaller than the region are planned for the file-level path
    (they were refused before); a same-size 512-byte disk keeps the region path; with the
    switch, every disk takes the file-level path."""
    capture = Capture.open(str(captures["D"]))
    capture.verify()
    head = RegionHead(capture)
    size = fixtures["D"].path.stat().st_size
    region = capture.manifest.region.length_bytes
    images = {"4kn": blank(tmp_path / "4kn.img", size), "small": blank(tmp_path / "small.img",
              region - 8 * MiB), "same": blank(tmp_path / "same.img", size)}
    before = {name: sha256_of(image) for name, image in images.items()}
    with contextlib.ExitStack() as stack:
        devices = {"4kn": stack.enter_context(loop_device(images["4kn"], 4096)),
                   "small": stack.enter_context(loop_device(images["small"])),
                   "same": stack.enter_context(loop_device(images["same"]))}
        by_path = {v: k for k, v in devices.items()}

        def planned(forced_by: str | None) -> dict[str, tuple[str, object]]:
            found = runner.rescue_candidates(capture, head, None, list(devices.values()),
                                             forced_by)
            return {by_path[c.disk.path]: (c.why, plan) for c, plan in found}

        chosen = planned(None)
        for name in ("4kn", "small"):
            why, plan = chosen[name]
            assert isinstance(plan, FilesPlan), (name, why)
            assert why.endswith("file-level path")
        assert isinstance(chosen["4kn"][1], FilesPlan)
        assert "4096-byte logical sectors" in chosen["4kn"][1].why
        assert isinstance(chosen["small"][1], FilesPlan)
        assert "smaller than the region" in chosen["small"][1].why
        assert isinstance(chosen["same"][1], Plan)
        forced = planned(runner.FORCED_BY_CMDLINE)
        assert all(isinstance(plan, FilesPlan) for _, plan in forced.values())
        same_plan = forced["same"][1]
        assert isinstance(same_plan, FilesPlan)
        assert same_plan.why == "asked for (mbrescue.files=1 on the kernel command line)"
    assert {name: sha256_of(image) for name, image in images.items()} == before  # planned only


@pytest.mark.parametrize("switch", [False, True])
def test_rescue_plan_names_the_path_and_writes_nothing_without_yes(fixtures, captures, tmp_path,
                                                                   switch) -> None:
    """The rescue mode's plan says which path and why; `mbrescue.files=1` forces the
    file-level path onto a disk the region path could take; `no` writes nothing."""
    target = blank(tmp_path / "same.img", fixtures["D"].path.stat().st_size)
    with open(target, "r+b") as stream:  # something to lose, so "unchanged" means something
        stream.write(os.urandom(MiB))
    before = sha256_of(target)
    console, out = answering("no\n")
    with pytest.raises(MbrescueError, match="aborted, nothing written"):
        runner.restore(str(captures["D"]), None, console=console, rescue=True,
                       disks=[str(target)], switches=Switches(files=switch),
                       options_path=str(tmp_path / "no-options.json"))
    shown = out.getvalue()
    if switch:
        assert ("Restore path: file-level path, because asked for (mbrescue.files=1 on the "
                "kernel command line)") in shown, shown
        assert "New gpt table, 512-byte sectors" in shown, shown
    else:
        assert "Restore path: region path, because" in shown, shown
        assert "file-level path" not in shown, shown
    assert "Type yes to write" in shown
    assert sha256_of(target) == before


# --- the real base initramfs as a chroot -------------------------------------------------------


@pytest.fixture(scope="module")
def rescue_root(tmp_path_factory) -> Path:
    """The real base initramfs (kit, stripped Python, runner, programs) unpacked, as the
    kernel unpacks it, by the independent tools zstd and cpio."""
    base = initramfs.make_base_initramfs(ensure_kit(), RUNNER_DIR, OVERLAYS_DIR)
    record = initramfs.base_record(base)
    print(f"base initramfs: {record.compressed_bytes} bytes compressed, "
          f"{record.uncompressed_bytes} unpacked")
    data = base.read_bytes()
    frame = data[: len(data) - record.padding_bytes]
    raw = subprocess.run(["zstd", "-q", "-dc"], input=frame, check=True,
                         capture_output=True).stdout
    root = tmp_path_factory.mktemp("rescue-root")
    subprocess.run(["cpio", "-i", "-d", "-m", "--quiet", "--no-absolute-filenames"], input=raw,
                   cwd=root, check=True)
    return root


def test_base_holds_the_file_level_programs(rescue_root: Path) -> None:
    """Each program the file-level path runs is the kit's (not a busybox applet) and starts
    inside the rescue root with the rescue root's libraries only."""
    sbin = rescue_root / "usr" / "sbin"
    for name in ("mke2fs", "e2fsck", "mkfs.fat", "fsck.fat", "mtools", "blkid", "losetup"):
        assert (sbin / name).is_file() and not (sbin / name).is_symlink(), name
    for alias, real in (("mkfs.vfat", "mkfs.fat"), ("mcopy", "mtools"), ("mkfs.ext4", "mke2fs")):
        assert os.readlink(sbin / alias) == real
    # busybox's own losetup and mke2fs would shadow nothing (PATH has /usr/sbin first), but
    # one program per name is what the rescue shell shows.
    assert not (rescue_root / "sbin" / "losetup").exists()
    assert not (rescue_root / "sbin" / "mke2fs").exists()
    # Full paths: busybox's shell runs its own applets before searching PATH (the runner
    # starts programs through PATH, which finds /usr/sbin first).
    versions = subprocess.run(
        ["chroot", rescue_root, "/bin/sh", "-c",
         "cd /usr/sbin; ./mke2fs -V 2>&1; ./e2fsck -V 2>&1; ./blkid -V; ./losetup --version; "
         "./mcopy --version | head -1; ./mkfs.fat --help 2>&1 | head -1; "
         "./fsck.fat --help 2>&1 | head -1"],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}, capture_output=True,
        text=True, check=False)
    assert versions.returncode == 0, versions.stderr
    for expected in ("mke2fs 1.47", "e2fsck 1.47", "blkid from util-linux",
                     "losetup from util-linux", "mcopy (GNU mtools)", "Usage: ./mkfs.fat",
                     "Usage: ./fsck.fat"):
        assert expected in versions.stdout, (expected, versions.stdout)


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev of the rescue root, as /init mounts them."""
    with contextlib.ExitStack() as stack:
        for kind, where in (("proc", "proc"), ("sysfs", "sys")):
            sh("mount", "-t", kind, kind, root / where)
            stack.callback(sh, "umount", root / where)
        sh("mount", "--bind", "/dev", root / "dev")
        stack.callback(sh, "umount", root / "dev")
        sh("mount", "-t", "tmpfs", "tmpfs", root / "tmp")
        stack.callback(sh, "umount", root / "tmp")
        yield


def test_file_level_restore_runs_in_the_rescue_userland(fixtures, captures, rescue_root,
                                                        tmp_path) -> None:
    """D onto a blank 4Kn image, by the rescue system's own runner, Python and programs
    (the host's kernel): restore complete, and the file systems read back as captured."""
    work = rescue_root / "work"
    work.mkdir(exist_ok=True)
    capture = work / "D.mbrescue"
    capture.write_bytes(captures["D"].read_bytes())
    target = blank(work / "t4kn.img", fixtures["D"].path.stat().st_size)
    with chroot_mounts(rescue_root):
        result = subprocess.run(
            ["chroot", rescue_root, "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
             "PYTHONHASHSEED=0", f"PYTHONPATH={initramfs.RUNNER_PARENT}", "python3", "-m",
             initramfs.RUNNER_PACKAGE, "restore", "--yes", "--sector-bytes", "4096",
             "/work/D.mbrescue", "/work/t4kn.img"],
            capture_output=True, text=True, check=False, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, tail(out)
    assert "Traceback" not in out, tail(out)
    assert "file-level path, because the target has 4096-byte logical sectors" in out
    manifest = Capture.open(str(captures["D"])).manifest
    verified = re.search(r"mbrescue: verified: (\d+) files read back", out)
    assert verified, tail(out)
    # Every file compared, the ext4 /boot's through the rescue root's losetup and mount.
    assert int(verified.group(1)) == sum(copy.file_count for copy in manifest.file_copies)
    assert "mbrescue: restore complete" in out.splitlines()[-1]
    with loop_device(target, 4096) as device:
        found = sh("blkid", "-p", "-o", "export", "-O", str(2048 * 512), device)
        esp_copy = next(c for c in manifest.file_copies if c.fs.type == "vfat")
        vid = str(esp_copy.fs.volume_id)
        assert f"UUID={vid[:4]}-{vid[4:]}" in found.splitlines()


# --- the real ISO under OVMF with a blank 4Kn disk -----------------------------------------------


@pytest.fixture(scope="module")
def iso_d(captures, tmp_path_factory) -> Path:
    """Fixture D's rescue ISO, built by the CLI as a user would (made once per module)."""
    out = tmp_path_factory.mktemp("iso-d") / "host-d.iso"
    result = mbrescue("build", captures["D"], "-o", out, env={"SOURCE_DATE_EPOCH": EPOCH})
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.qemu
def test_iso_restores_d_onto_a_blank_4kn_disk_that_then_boots(fixtures, captures, iso_d,
                                                              tmp_path) -> None:
    fixture = fixtures["D"]
    manifest = Capture.open(str(captures["D"])).manifest
    scratch = blank(tmp_path / "scratch-4kn.img", fixture.path.stat().st_size)
    serial_log = tmp_path / "serial.log"
    disks = [
        Disk(iso_d, interface="cdrom", readonly=True, bootindex=0),
        Disk(scratch, interface="virtio", serial=SCRATCH_SERIAL, logical_block_bytes=4096,
             bootindex=1),
    ]
    config = VmConfig(firmware="uefi", memory_mib=MEMORY_MIB, disks=disks)
    try:
        with Vm(config, serial_log) as vm:
            vm.expect(RESTORE_DEFAULT, timeout=PROMPT_TIMEOUT_S)
            vm.expect(r"Restore path: file-level path, because the target has 4096-byte "
                      r"logical sectors, the captured disk 512-byte ones", PROMPT_TIMEOUT_S)
            prompt = vm.expect(PROMPT, timeout=PROMPT_TIMEOUT_S)
            to_prompt_s = vm.elapsed()
            vm.send("yes\r")
            done = vm.expect(rf"{COMPLETE}|{FAILED}", timeout=COMPLETE_TIMEOUT_S)
            text = vm.output
    except VmTimeout as exc:
        log = serial_log.read_text(errors="replace") if serial_log.exists() else ""
        raise AssertionError(f"{str(exc).splitlines()[0]}\n{tail(log)}") from None
    print(f"D uefi-cd 4Kn: prompt {to_prompt_s:.1f} s after QEMU start")
    plan = re.search(r"(?s)(Target /dev/.*?)Type yes to write", text)
    print(plan.group(1).replace("\r", "") if plan else "(no plan seen)")
    assert done.group(0).startswith("mbrescue: restore complete"), tail(text)
    assert "(file-level path)" in done.group(0)
    target = re.search(r"Target (/dev/\S+): [^\r\n]*", text)
    assert target and f"serial {SCRATCH_SERIAL}" in target.group(0), tail(text)
    assert "4096-byte sectors" in target.group(0)
    assert prompt.group(1) == target.group(1)
    assert "Traceback" not in text and "not found (Debian:" not in text, tail(text)
    # Every captured file compared: the ext4 /boot too, which is read back through a loop
    # device mounted read-only (the kit's losetup, the loop and ext4 modules).
    verified = re.search(r"mbrescue: verified: (\d+) files read back[^\r\n]*", text)
    assert verified, tail(text)
    print(verified.group(0))
    assert int(verified.group(1)) == sum(copy.file_count for copy in manifest.file_copies)
    seconds = boot_to_marker(scratch, fixture, timeout=MARKER_TIMEOUT_S,
                             logical_block_bytes=4096)
    print(f"D: the 4Kn disk restored by the ISO reached its marker in {seconds:.1f} s")


@pytest.mark.qemu
def test_files_switch_forces_the_file_level_path_in_the_rescue_system(fixtures, captures,
                                                                      tmp_path) -> None:
    """`mbrescue.files=1` on the kernel command line: a blank disk of the captured size and
    sector size (the region path could take it) gets the file-level path, and boots.

    The kernel is started by QEMU with the base and the payload (the capture in memory, as
    the ISO's in-memory entry and a network boot load it), so the switch is simply appended.
    """
    fixture = fixtures["D"]
    kit = ensure_kit()
    initrd = memory_initrd(captures["D"], tmp_path)
    target = blank(tmp_path / "same.img", fixture.path.stat().st_size)
    serial_log = tmp_path / "serial.log"
    config = VmConfig(kernel=kit.kernel, initrd=initrd, memory_mib=MEMORY_MIB,
                      append="console=ttyS0 mbrescue.files=1",
                      disks=[Disk(target, serial="MBRESCUE-SAME")])
    try:
        with Vm(config, serial_log) as vm:
            vm.expect(r"Restore path: file-level path, because asked for \(mbrescue\.files=1 on "
                      r"the kernel command line\)", PROMPT_TIMEOUT_S)
            vm.expect(r"New gpt table, 512-byte sectors", PROMPT_TIMEOUT_S)
            vm.expect(PROMPT, PROMPT_TIMEOUT_S)
            vm.send("yes\r")
            done = vm.expect(rf"{COMPLETE}|{FAILED}", timeout=COMPLETE_TIMEOUT_S)
            text = vm.output
    except VmTimeout as exc:
        log = serial_log.read_text(errors="replace") if serial_log.exists() else ""
        raise AssertionError(f"{str(exc).splitlines()[0]}\n{tail(log)}") from None
    assert done.group(0).startswith("mbrescue: restore complete"), tail(text)
    assert "(file-level path)" in done.group(0)
    assert "Will write: the boot region" not in text
    seconds = boot_to_marker(target, fixture, timeout=MARKER_TIMEOUT_S)
    print(f"D with mbrescue.files=1: the restored disk reached its marker in {seconds:.1f} s")
