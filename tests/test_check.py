"""`mbrescue check`: a loop-mounted ext4 /boot captured, then changed one way at a time.

Each case changes the real thing (files on the mounted file system, sectors of a copy of
the image, the partition table with sfdisk) and runs the real CLI; drift must be named
line by line, and GRUB's grubenv rewrite and atime must not count.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.runner.capfile import Capture
from builder.runner.errors import MbrescueError
from builder.runner.manifest import parse_manifest

from .conftest import ROOT, mbrescue, one_error_line, sh, sha256_of

MiB = 1 << 20
BOOT_START = 2048
BOOT_BYTES = 16 * MiB
KERNEL = "6.1.0-54-amd64"
GRUBENV = "# GRUB Environment Block\nsaved_entry=0\n".ljust(1024, "#")


def _boot_tree(root: Path) -> None:
    (root / "grub").mkdir(parents=True)
    (root / f"vmlinuz-{KERNEL}").write_bytes(os.urandom(200_000))
    (root / f"initrd.img-{KERNEL}").write_bytes(os.urandom(300_000))
    (root / f"config-{KERNEL}").write_text("CONFIG_EXT4_FS=y\n")
    (root / "grub" / "grub.cfg").write_text("set timeout=5\n")
    (root / "grub" / "grubenv").write_text(GRUBENV)
    os.symlink(f"vmlinuz-{KERNEL}", root / "vmlinuz")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """msdos disk: ext4 /boot (filled by mke2fs -d) at sector 2048, swap after it."""
    folder = tmp_path_factory.mktemp("check-template")
    image = folder / "host.img"
    with open(image, "wb") as f:
        f.truncate(24 * MiB)
    sh("sfdisk", "-q", image, input_bytes=b"label: dos\n2048,16MiB,83,*\n,,82\n")
    tree = folder / "tree"
    _boot_tree(tree)
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-L", "boot", "-d", tree, "-E",
       f"offset={BOOT_START * 512}", image, f"{BOOT_BYTES // 1024}k")
    return image


@dataclass
class Host:
    image: Path
    boot: Path  # where the image's /boot is mounted
    capture: Path


@pytest.fixture
def host(template, tmp_path):
    image = tmp_path / "host.img"
    sh("cp", "--sparse=always", template, image)
    loop = sh("losetup", "-f", "--show", "-o", str(BOOT_START * 512), "--sizelimit",
              str(BOOT_BYTES), image).strip()
    boot = tmp_path / "boot"
    boot.mkdir()
    try:
        # strictatime: every read moves atime, so the false-alarm case really has one.
        sh("mount", "-o", "strictatime", loop, boot)
        try:
            capture = tmp_path / "host.mbrescue"
            made = mbrescue("capture", image, "-o", capture)
            assert made.returncode == 0, made.stderr
            yield Host(image, boot, capture)
        finally:
            subprocess.run(["fsfreeze", "--unfreeze", boot], capture_output=True)
            sh("umount", boot)
    finally:
        sh("losetup", "-d", loop)


def check(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return mbrescue("check", *args, timeout=120)


def drift_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout.splitlines()


def unmounted_copy(host: Host, tmp_path: Path) -> Path:
    copied = tmp_path / "copy.img"
    shutil.copyfile(host.image, copied)
    return copied


# ---- matches --------------------------------------------------------------------------------


def test_unchanged_matches(host):
    result = check(host.capture, host.image)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "still matches" in result.stderr and "6 files" in result.stderr


def test_capture_records_the_file_list_and_kernels(host):
    manifest = Capture.open(str(host.capture)).manifest
    fingerprint = manifest.fingerprint
    assert fingerprint is not None and fingerprint.files is not None
    by_path = {entry.path: entry for entry in fingerprint.files}
    kernel = by_path[f"vmlinuz-{KERNEL}"]
    assert kernel.type == "file" and kernel.size == 200_000 and kernel.mode == 0o644
    assert kernel.sha256 == sh("sha256sum", host.boot / f"vmlinuz-{KERNEL}").split()[0]
    assert by_path["vmlinuz"].type == "symlink" and by_path["vmlinuz"].target == f"vmlinuz-{KERNEL}"
    assert [k.version for k in fingerprint.kernels] == [KERNEL]
    # Not the running system's /boot: whether its modules exist is not asked.
    assert fingerprint.kernels[0].modules is None and not fingerprint.live_host
    assert fingerprint.gap is not None and (fingerprint.gap.start_lba, fingerprint.gap.end_lba) == (
        1, BOOT_START - 1)
    assert manifest.mbr_boot_code_sha256 is not None


# ---- each kind of drift ----------------------------------------------------------------------


def test_new_kernel_is_named(host):
    (host.boot / "vmlinuz-6.1.0-58-amd64").write_bytes(b"new kernel")
    assert drift_lines(check(host.capture, host.image)) == [
        f"{host.boot}/vmlinuz-6.1.0-58-amd64 added"]


def test_changed_removed_and_mode_are_each_named(host):
    (host.boot / "grub" / "grub.cfg").write_text("set timeout=1\n")
    (host.boot / f"config-{KERNEL}").unlink()
    os.chmod(host.boot / f"initrd.img-{KERNEL}", 0o600)
    lines = drift_lines(check(host.capture, host.image))
    assert lines == [
        f"{host.boot}/config-{KERNEL} removed",
        f"{host.boot}/grub/grub.cfg changed (same size, other content)",
        f"{host.boot}/initrd.img-{KERNEL} mode changed: 0644 -> 0600",
    ]


def test_symlink_retargeted_and_owner_changed(host):
    (host.boot / "vmlinuz").unlink()
    os.symlink("vmlinuz-6.1.0-58-amd64", host.boot / "vmlinuz")
    os.chown(host.boot / f"config-{KERNEL}", 1000, 1000)
    assert drift_lines(check(host.capture, host.image)) == [
        f"{host.boot}/config-{KERNEL} owner changed: 0:0 -> 1000:1000",
        f"{host.boot}/vmlinuz now points to vmlinuz-6.1.0-58-amd64 (was vmlinuz-{KERNEL})",
    ]


def test_mbr_boot_code_and_gap_changed_on_a_copy(host, tmp_path):
    copied = unmounted_copy(host, tmp_path)
    with open(copied, "r+b") as disk:
        disk.seek(0)
        disk.write(b"\xeb\x63\x90GRUB-ish")  # boot code only: the table at 446.. stays
        disk.seek(5 * 512)
        disk.write(b"core.img")
    before = sha256_of(copied)
    result = check("--json", host.capture, copied)
    data = json.loads(result.stdout)
    assert [d["line"] for d in data["differences"]] == [
        "MBR boot code changed (bytes 0..439)",
        f"post-MBR gap changed (sectors 1..{BOOT_START - 1}: GRUB's core image)",
    ]
    # The copy's /boot is not mounted (a copy of a mounted ext4: its journal wants a
    # replay): its files are read read-only, compared, unchanged, and nothing is written.
    assert data["files_compared"] == 6 and data["notes"] == [], data
    assert sha256_of(copied) == before


def test_partition_type_changed_with_sfdisk(host, tmp_path):
    copied = unmounted_copy(host, tmp_path)
    sh("sfdisk", "-q", "--part-type", copied, "2", "83")
    assert drift_lines(check(host.capture, copied)) == ["partition 2 type changed: 0x82 -> 0x83"]


def test_file_system_uuid_and_label_changed(host, tmp_path):
    copied = unmounted_copy(host, tmp_path)
    loop = sh("losetup", "-f", "--show", "-o", str(BOOT_START * 512), "--sizelimit",
              str(BOOT_BYTES), copied).strip()
    try:
        # A copy of a mounted ext4 has a journal to replay before tune2fs may change it.
        assert subprocess.run(["e2fsck", "-fy", loop], capture_output=True).returncode <= 1
        sh("tune2fs", "-U", "11111111-2222-3333-4444-555555555555", "-L", "other", loop)
    finally:
        sh("losetup", "-d", loop)
    lines = drift_lines(check(host.capture, copied))
    assert len(lines) == 2, lines
    assert lines[0].startswith("partition 1 file system UUID changed: ")
    assert lines[0].endswith(" -> 11111111-2222-3333-4444-555555555555")
    assert lines[1] == "partition 1 file system label changed: 'boot' -> 'other'"


# ---- no false alarms -----------------------------------------------------------------------


def test_grubenv_rewrite_atime_and_touch_are_not_drift(host):
    before = os.stat(host.boot / f"vmlinuz-{KERNEL}").st_atime_ns
    for path in host.boot.rglob("*"):
        if path.is_file():
            path.read_bytes()
    assert os.stat(host.boot / f"vmlinuz-{KERNEL}").st_atime_ns != before
    # GRUB rewrites its 1024-byte block in place at boot.
    (host.boot / "grub" / "grubenv").write_text(GRUBENV.replace("saved_entry=0", "saved_entry=1"))
    os.utime(host.boot / f"config-{KERNEL}", (1, 1))  # same bytes, another mtime
    result = check(host.capture, host.image)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "ignored: " in result.stderr and "grubenv" in result.stderr
    strict = check("--strict", host.capture, host.image)
    assert drift_lines(strict) == [
        f"{host.boot}/config-{KERNEL} modification time changed (content unchanged)",
        f"{host.boot}/grub/grubenv changed (same size, other content)",
    ]


def test_json_gives_the_same_as_data(host):
    (host.boot / "vmlinuz-6.1.0-58-amd64").write_bytes(b"new kernel")
    (host.boot / "grub" / "grubenv").write_text(GRUBENV.replace("=0", "=1"))
    result = check("--json", host.capture, host.image)
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["matches"] is False
    assert [(d["kind"], d["subject"]) for d in data["differences"]] == [
        ("file", "vmlinuz-6.1.0-58-amd64")]
    assert [d["subject"] for d in data["ignored"]] == ["grub/grubenv"]
    assert data["files_compared"] == 7


# ---- the capture inside an ISO, the default SOURCE, kernels and their modules ---------------


def test_capture_inside_an_iso(host, tmp_path):
    from builder.initramfs import make_payload_initramfs

    tree = tmp_path / "iso"
    (tree / "mbrescue").mkdir(parents=True)
    make_payload_initramfs(host.capture, tree / "mbrescue" / "payload.img")
    iso = tmp_path / "host-rescue.iso"
    sh("xorriso", "-as", "mkisofs", "-quiet", "-R", "-o", iso, tree)
    assert check(iso, host.image).returncode == 0
    (host.boot / "vmlinuz-6.1.0-58-amd64").write_bytes(b"new kernel")
    assert drift_lines(check(iso, host.image)) == [f"{host.boot}/vmlinuz-6.1.0-58-amd64 added"]


def test_live_host_kernel_modules(host, tmp_path):
    """In a private mount namespace: the fixture is /boot, /usr/lib an overlay that holds
    /lib/modules/KERNEL. Capture warns of a kernel without modules; check, with the
    default SOURCE, reports modules that disappeared since."""
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    (host.boot / "vmlinuz-6.1.0-99-amd64").write_bytes(b"no modules for me")
    capture = tmp_path / "live.mbrescue"
    cli = f"{sys.executable} -m builder.cli"
    script = f"""
set -e
mount -t overlay overlay -o lowerdir=/usr/lib,upperdir={upper},workdir={work} /usr/lib
mkdir -p /lib/modules/{KERNEL}
mount --move {host.boot} /boot
{cli} capture {host.image} -o {capture} 2>&1
echo "== matches"
{cli} check {capture} 2>&1 && echo "rc=0"
rmdir /lib/modules/{KERNEL}
echo "== gone"
{cli} check {capture} 2>&1 || echo "rc=$?"
"""
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    captured, matches, gone = result.stdout.split("== ")
    assert ("warning: /boot/vmlinuz-6.1.0-99-amd64 has no /lib/modules/6.1.0-99-amd64"
            in captured), captured
    assert f"{KERNEL} has no" not in captured
    assert matches.rstrip().endswith("rc=0"), matches
    assert (f"kernel {KERNEL}: /lib/modules/{KERNEL} is gone since the capture" in gone), gone
    assert gone.rstrip().endswith("rc=1"), gone
    fingerprint = Capture.open(str(capture)).manifest.fingerprint
    assert fingerprint is not None and fingerprint.live_host
    assert {k.version: k.modules for k in fingerprint.kernels} == {
        KERNEL: True, "6.1.0-99-amd64": False}


# ---- errors ---------------------------------------------------------------------------------


def test_bad_capture_path_is_one_line_exit_2(tmp_path, template):
    result = check(tmp_path / "nothing.mbrescue", template)
    assert result.returncode == 2
    assert "nothing.mbrescue" in one_error_line(result)
    not_capture = tmp_path / "junk.mbrescue"
    not_capture.write_bytes(os.urandom(4096))
    result = check(not_capture, template)
    assert result.returncode == 2 and "not a capture file" in one_error_line(result)


def test_bad_source_is_one_line_exit_2(host, tmp_path):
    result = check(host.capture, tmp_path / "no-such-disk")
    assert result.returncode == 2 and "no-such-disk" in one_error_line(result)


# ---- the manifest's new optional fields -----------------------------------------------------


def test_manifest_without_fingerprint_still_parses(host):
    raw = copy.deepcopy(Capture.open(str(host.capture)).manifest.raw)
    del raw["fingerprint"]
    del raw["layout"]["mbr"]
    manifest = parse_manifest(raw)
    assert manifest.fingerprint is None and manifest.mbr_boot_code_sha256 is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda f: f["files"][0].update(path="../etc/shadow"), "fingerprint.files[0].path"),
        (lambda f: f["files"][0].update(type="socket"), "fingerprint.files[0].type"),
        (lambda f: f["files"][0].update(mode=-1), "fingerprint.files[0].mode"),
        (lambda f: f["files"].append(dict(f["files"][0])), "fingerprint.files"),
        (lambda f: f["gap"].update(sha256="xyz"), "fingerprint.gap.sha256"),
        (lambda f: f["kernels"][0].update(modules="yes"), "fingerprint.kernels[0].modules"),
        (lambda f: f["raw_partitions"].append({"partition": 9, "sha256": "0" * 64}),
         "fingerprint.raw_partitions[0].partition"),
    ],
)
def test_bad_fingerprint_fields_name_themselves(host, change, field):
    raw = copy.deepcopy(Capture.open(str(host.capture)).manifest.raw)
    files = raw["fingerprint"]["files"]
    files.sort(key=lambda entry: entry["type"] != "file")  # a regular file first
    change(raw["fingerprint"])
    with pytest.raises(MbrescueError, match=f"field {re.escape(field)} "):
        parse_manifest(raw)


# ---- GPT: the BIOS boot partition (GRUB's core image) and the partition GUIDs -----------------


def test_gpt_bios_boot_partition_and_guid(fixtures, tmp_path):
    disk = fixtures["C"]
    capture = tmp_path / "c.mbrescue"
    assert mbrescue("capture", disk.path, "-o", capture).returncode == 0
    fingerprint = Capture.open(str(capture)).manifest.fingerprint
    assert fingerprint is not None and [r.partition for r in fingerprint.raw_partitions] == [1]
    assert fingerprint.gap is not None and fingerprint.gap.start_lba == 34
    result = check(capture, disk.path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    copied = tmp_path / "c-copy.img"
    sh("cp", "--sparse=always", disk.path, copied)
    bios_boot_start = Capture.open(str(capture)).manifest.partition(1).start_lba
    with open(copied, "r+b") as image:
        image.seek((bios_boot_start + 3) * 512)
        image.write(b"another core.img")
    sh("sgdisk", "--partition-guid=2:01234567-89ab-cdef-0123-456789abcdef", copied)
    lines = drift_lines(check(capture, copied))
    assert len(lines) == 2, lines
    assert lines[0].startswith("partition 2 GUID changed: ")
    assert lines[0].endswith(" -> 01234567-89ab-cdef-0123-456789abcdef")
    assert lines[1].startswith("partition 1's content changed ("), lines


# ---- a /boot that is not mounted (a disk image, an offline disk): read-only, never written ----


@dataclass
class Offline:
    image: Path
    capture: Path


@pytest.fixture
def offline(template, tmp_path) -> Offline:
    """The template image captured while nothing of it is mounted."""
    image = tmp_path / "offline.img"
    sh("cp", "--sparse=always", template, image)
    capture = tmp_path / "offline.mbrescue"
    made = mbrescue("capture", image, "-o", capture)
    assert made.returncode == 0, made.stderr
    return Offline(image, capture)


@contextlib.contextmanager
def mounted_boot(image: Path, where: Path) -> Iterator[Path]:
    """The image's /boot mounted read-write for a moment (an update), unmounted after."""
    where.mkdir()
    loop = sh("losetup", "-f", "--show", "-o", str(BOOT_START * 512), "--sizelimit",
              str(BOOT_BYTES), image).strip()
    try:
        sh("mount", loop, where)
        try:
            yield where
        finally:
            sh("umount", where)
    finally:
        sh("losetup", "-d", loop)


def kernel_update(image: Path, where: Path, version: str = "6.1.0-58-amd64") -> None:
    with mounted_boot(image, where) as boot:
        (boot / f"vmlinuz-{version}").write_bytes(os.urandom(50_000))
        (boot / "grub" / "grub.cfg").write_text(f"set timeout=5\nlinux /vmlinuz-{version}\n")


def without_loop_devices(tmp_path: Path) -> dict[str, str]:
    """PATH with a `losetup` that finds no free loop device, as on a host without any."""
    bin_dir = tmp_path / "no-loop-bin"
    bin_dir.mkdir()
    fake = bin_dir / "losetup"
    fake.write_text("#!/bin/sh\necho 'losetup: cannot find an unused loop device' >&2\nexit 1\n")
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_offline_boot_unchanged_matches_with_its_files_compared(offline):
    before = sha256_of(offline.image)
    result = check(offline.capture, offline.image)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "still matches" in result.stderr and "6 files" in result.stderr, result.stderr
    assert "not compared" not in result.stderr
    assert sha256_of(offline.image) == before  # read-only: not a byte of the source written


def test_offline_boot_new_kernel_and_grub_cfg_are_named(offline, tmp_path):
    kernel_update(offline.image, tmp_path / "update")
    before = sha256_of(offline.image)
    result = check(offline.capture, offline.image)
    assert drift_lines(result) == [
        "partition 1:/grub/grub.cfg changed (14 -> 44 bytes)",
        "partition 1:/vmlinuz-6.1.0-58-amd64 added",
    ], result.stderr
    assert sha256_of(offline.image) == before
    data = json.loads(check("--json", offline.capture, offline.image).stdout)
    assert data["files_compared"] == 7
    assert [(d["kind"], d["subject"]) for d in data["differences"]] == [
        ("file", "grub/grub.cfg"), ("file", "vmlinuz-6.1.0-58-amd64")]


def test_offline_boot_that_cannot_be_mounted_is_not_a_match(offline, tmp_path):
    no_loop = without_loop_devices(tmp_path)
    # Its bytes are the captured ones, so are its files: a match, said how it was known.
    same = mbrescue("check", offline.capture, offline.image, env=no_loop)
    assert same.returncode == 0, (same.stdout, same.stderr)
    assert "bytes are as captured" in same.stderr, same.stderr
    kernel_update(offline.image, tmp_path / "update")
    changed = mbrescue("check", offline.capture, offline.image, env=no_loop)
    assert changed.returncode == 1, (changed.stdout, changed.stderr)
    [line] = changed.stdout.splitlines()
    assert line.startswith("partition 1's files not compared: "), line
    assert "cannot find an unused loop device" in line, line
    assert "still matches" not in changed.stderr


def test_refresh_recaptures_a_changed_offline_host(offline, tmp_path):
    from builder.runner import refresh

    captures = tmp_path / "captures"
    captures.mkdir()
    conf = tmp_path / "host.conf"
    conf.write_text(f"capture_dir = {captures}\nsource = {offline.image}\nhostname = offline\n")
    first = host_side("refresh", "--config", conf)
    assert first.returncode == 0, (first.stdout, first.stderr)
    quiet = host_side("refresh", "--config", conf)
    assert quiet.returncode == 0 and "still matches" in quiet.stdout, quiet.stdout
    [made] = refresh.generations(os.fspath(captures), "offline")
    kernel_update(offline.image, tmp_path / "update")
    again = host_side("refresh", "--config", conf)
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert "drifted (2 difference(s)" in again.stdout, again.stdout
    assert "vmlinuz-6.1.0-58-amd64 added" in again.stdout
    now = refresh.generations(os.fspath(captures), "offline")
    assert len(now) == 2 and now[0] == made and now[-1] in again.stdout
    assert check(now[-1], offline.image).returncode == 0


def host_side(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """`mbrescue-host` as the refresh service runs it."""
    return subprocess.run([sys.executable, "-m", "builder.host", *map(os.fspath, args)],
                          cwd=ROOT, text=True, capture_output=True, timeout=180,
                          stdin=subprocess.DEVNULL)


def test_offline_boot_with_a_symlink_to_a_directory(template, tmp_path):
    """openSUSE's /boot holds `boot -> .`: the copy stores it, the live walk must too."""
    image = tmp_path / "suse.img"
    sh("cp", "--sparse=always", template, image)
    with mounted_boot(image, tmp_path / "setup") as boot:
        os.symlink(".", boot / "boot")
    capture = tmp_path / "suse.mbrescue"
    assert mbrescue("capture", image, "-o", capture).returncode == 0
    same = check(capture, image)
    assert same.returncode == 0 and "7 files" in same.stderr, (same.stdout, same.stderr)
    with mounted_boot(image, tmp_path / "update") as boot:
        (boot / "boot").unlink()
        os.symlink("grub", boot / "boot")
    assert drift_lines(check(capture, image)) == ["partition 1:/boot now points to grub (was .)"]
