"""The restore runner on image files: fixtures A–D onto blank, larger, smaller and random
targets, judged by sfdisk, sgdisk, blkid, e2fsck and a QEMU boot; refusals leave the target
untouched; the rescue-mode candidate logic on loop devices."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from builder.fixtures import Fixture, boot_to_marker
from builder.runner import restore as runner
from builder.runner import writer
from builder.runner.capfile import Capture
from builder.runner.cmdline import Switches
from builder.runner.console import Console, Terminal
from builder.runner.errors import MbrescueError

from .conftest import ROOT, memory_initrd, read_until, sh, sha256_of

MiB = 1 << 20
SECTOR = 512
BLOCK = 4 * MiB
GPT_TAIL_SECTORS = 33


def quiet_console() -> tuple[Console, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Console([Terminal("test", -1, None, False, out_stream=out)], error_stream=err), out, err


def make_target(path: Path, size_bytes: int, fill: str = "zero") -> Path:
    with open(path, "wb") as stream:
        if fill == "random":
            left = size_bytes
            while left:
                step = min(left, 16 * MiB)
                stream.write(os.urandom(step))
                left -= step
        else:
            stream.truncate(size_bytes)
    return path


def differing_sectors(a: Path, b: Path, length: int) -> set[int]:
    found: set[int] = set()
    with open(a, "rb") as sa, open(b, "rb") as sb:
        for offset in range(0, length, BLOCK):
            want = min(BLOCK, length - offset)
            da, db = sa.read(want), sb.read(want)
            if da == db:
                continue
            for at in range(0, want, SECTOR):
                if da[at : at + SECTOR] != db[at : at + SECTOR]:
                    found.add((offset + at) // SECTOR)
    return found


def blkid_at(image: Path, offset: int, size: int) -> dict[str, str]:
    loop = sh("losetup", "-f", "--show", "-r", "-o", str(offset), "--sizelimit", str(size),
              image).strip()
    try:
        out = sh("blkid", "-p", "-o", "export", loop)
    finally:
        sh("losetup", "-d", loop)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def e2fsck_at(image: Path, offset: int, size: int) -> None:
    loop = sh("losetup", "-f", "--show", "-r", "-o", str(offset), "--sizelimit", str(size),
              image).strip()
    try:
        sh("e2fsck", "-fn", loop)
    finally:
        sh("losetup", "-d", loop)


def swap_start_lba(fx: Fixture) -> int:
    layout = json.loads(sh("sfdisk", "--json", fx.path))["partitiontable"]["partitions"]
    return next(p["start"] for p in layout if p["node"].endswith(str(fx.swap_partition)))


def target_size(fx: Fixture, kind: str) -> int:
    size = fx.path.stat().st_size
    if kind == "larger":
        return size + 64 * MiB
    if kind == "smaller":
        # Everything up to the swap, an 8 MiB swap (and the GPT backup): smaller than the
        # original, which only works with the swap shrunk.
        smaller = swap_start_lba(fx) * SECTOR + 8 * MiB + GPT_TAIL_SECTORS * SECTOR
        assert smaller < size
        return smaller
    return size


def run_restore(capture_path: Path, target: Path, **kwargs) -> str:
    console, out, err = quiet_console()
    assert runner.restore(str(capture_path), str(target), console=console, assume_yes=True,
                          **kwargs) == 0
    text = out.getvalue()
    assert "mbrescue: restore complete" in text.splitlines()[-1], text
    assert err.getvalue() == ""
    return text


def check_restored(fx: Fixture, manifest: dict, target: Path, kind: str) -> None:
    region_bytes = manifest["region"]["length_bytes"]
    size = target.stat().st_size
    assert size == target_size(fx, kind), "the image file must not grow"
    # The region is the fixture's, byte for byte, except the intended adjustments.
    diff = differing_sectors(fx.path, target, region_bytes)
    if kind in ("same", "random"):
        assert diff == set()
    elif fx.table == "gpt":
        # Protective MBR size, primary header; when swap shrank, its entry in the array.
        allowed = {0, 1} | set(range(2, 34)) if kind == "smaller" else {0, 1}
        assert diff <= allowed and {0, 1} <= diff, sorted(diff)
    else:
        assert diff == ({0} if kind == "smaller" else set()), sorted(diff)
    if fx.table == "gpt":
        verdict = sh("sgdisk", "-v", target)
        assert "No problems found" in verdict, verdict
        if kind in ("same", "random"):
            # Relocation onto the same size regenerates exactly the captured tail.
            tail = GPT_TAIL_SECTORS * SECTOR
            assert sha256_of(target, tail, size - tail) == sha256_of(fx.path, tail, size - tail)
    else:
        assert "No errors detected" in sh("sfdisk", "-V", target)
    table = json.loads(sh("sfdisk", "--json", target))["partitiontable"]
    parts = {int(p["node"][len(str(target)):].lstrip("p")): p for p in table["partitions"]}
    source_parts = {p["number"]: p for p in manifest["layout"]["partitions"]}
    assert set(parts) == set(source_parts)
    swap = parts[fx.swap_partition]
    end = swap["start"] + swap["size"]
    if kind == "smaller":
        limit = size // SECTOR - (GPT_TAIL_SECTORS if fx.table == "gpt" else 0)
        assert end == limit, (swap, limit)
    else:
        assert swap["size"] == source_parts[fx.swap_partition]["size_sectors"]
    found = blkid_at(target, swap["start"] * SECTOR, swap["size"] * SECTOR)
    assert found.get("TYPE") == "swap", found
    assert found.get("LABEL") == fx.swap_label and found.get("UUID") == fx.swap_uuid, found
    boot = parts[fx.boot_partition]
    e2fsck_at(target, boot["start"] * SECTOR, boot["size"] * SECTOR)


KINDS = ["same", "larger", "smaller", "random"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["A", "B", "C", "D"])
def test_restore_onto_image(fixtures, captures, tmp_path, name, kind):
    fx = fixtures[name]
    target = make_target(tmp_path / "target.img", target_size(fx, kind),
                         "random" if kind == "random" else "zero")
    text = run_restore(captures[name], target)
    manifest = Capture.open(str(captures[name])).manifest.raw
    check_restored(fx, manifest, target, kind)
    if kind == "smaller":
        assert f"swap partition {fx.swap_partition}" in text and "shrunk" in text
    if kind == "random":
        # Running it again (as after an interruption) changes nothing.
        before = sha256_of(target)
        run_restore(captures[name], target)
        assert sha256_of(target) == before


# Each fixture boots after a restore onto a differently made target; the interesting
# adjustments (A: swap shrunk, B: EBRs onto noise, C/D: GPT moved to a larger disk).
BOOT_CASES = [("A", "smaller"), ("B", "random"), ("C", "larger"), ("D", "larger")]


@pytest.mark.qemu
@pytest.mark.parametrize(("name", "kind"), BOOT_CASES)
def test_restored_image_boots(fixtures, captures, tmp_path, name, kind):
    fx = fixtures[name]
    target = make_target(tmp_path / "target.img", target_size(fx, kind),
                         "random" if kind == "random" else "zero")
    run_restore(captures[name], target)
    seconds = boot_to_marker(target, fx, timeout=240)
    assert seconds > 0


def test_interrupted_restore_finishes_on_rerun(fixtures, captures, tmp_path):
    """Power loss half-way: part of the region and nothing after it; a rerun repairs all."""
    fx = fixtures["C"]
    whole = make_target(tmp_path / "whole.img", target_size(fx, "larger"))
    run_restore(captures["C"], whole)
    half = make_target(tmp_path / "half.img", target_size(fx, "larger"), "random")
    with open(whole, "rb") as src, open(half, "r+b") as dst:
        dst.write(src.read(fx.region_end_sectors * SECTOR // 2))
    run_restore(captures["C"], half)
    region = fx.region_end_sectors * SECTOR
    tail = GPT_TAIL_SECTORS * SECTOR
    size = whole.stat().st_size
    assert sha256_of(half, region) == sha256_of(whole, region)
    assert sha256_of(half, tail, size - tail) == sha256_of(whole, tail, size - tail)


# -- refusals: one error line, the target's SHA-256 unchanged ------------------------------------


def runner_cli(*args: str | os.PathLike[str], input_text: str | None = None
               ) -> subprocess.CompletedProcess[str]:
    """`python -m builder.runner`, the same entry point the rescue system uses."""
    return subprocess.run(
        [sys.executable, "-m", "builder.runner", *[os.fspath(a) for a in args]], cwd=ROOT,
        text=True, capture_output=True, input=input_text, timeout=300,
        stdin=None if input_text is not None else subprocess.DEVNULL,
    )


def assert_refused(result: subprocess.CompletedProcess[str], reason: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mbrescue: error: ")]
    assert len(errors) == 1, result.stderr
    assert reason in errors[0], errors[0]
    assert "restore complete" not in result.stdout


@pytest.fixture
def random_target(fixtures, tmp_path) -> Path:
    return make_target(tmp_path / "target.img", fixtures["A"].path.stat().st_size, "random")


def test_refuses_corrupt_capture(captures, random_target, tmp_path):
    broken = tmp_path / "broken.mbrescue"
    data = bytearray(captures["A"].read_bytes())
    member = Capture.open(str(captures["A"])).members["region.img.gz"]
    data[member.offset + member.size // 2] ^= 0x01
    broken.write_bytes(bytes(data))
    before = sha256_of(random_target)
    result = runner_cli("restore", "--yes", broken, random_target)
    assert_refused(result, "checksum mismatch")
    assert sha256_of(random_target) == before


def test_damage_found_while_the_plan_is_shown_refuses_before_the_first_write(
    captures, random_target, tmp_path
):
    """The whole capture is checked on a second thread while the plan is on the screen: a
    damaged last chunk (no plan reads it) lets the question come, and `yes` then gets the
    refusal, with nothing written."""
    broken = tmp_path / "broken.mbrescue"
    data = bytearray(captures["A"].read_bytes())
    with Capture.open(str(captures["A"])) as capture:
        member = capture.members["region.img.gz"]
        last = len(capture.region.chunks) - 1
    data[member.offset + member.size - 5] ^= 0x01  # inside the last gzip member
    broken.write_bytes(bytes(data))
    before = sha256_of(random_target)
    result = runner_cli("restore", broken, random_target, input_text="yes\n")
    assert "Type yes" in result.stdout + result.stderr, result.stdout + result.stderr
    assert_refused(result, f"checksum mismatch in region chunk {last}; nothing written")
    assert sha256_of(random_target) == before


def test_target_smaller_than_region_takes_the_file_level_path(fixtures, captures, tmp_path):
    """The region cannot fit, the files can: the plan names the file-level path and why
    (tests/test_files_restore.py boots such disks; a disk too small for the files too is
    refused there)."""
    fx = fixtures["A"]
    target = make_target(tmp_path / "small.img", fx.region_end_sectors * SECTOR - 4096, "random")
    result = runner_cli("restore", "--yes", captures["A"], target)
    assert result.returncode == 0, result.stderr
    assert "file-level path" in result.stdout and "smaller than the region" in result.stdout, (
        result.stdout)


def test_partition_past_end_that_is_not_swap_takes_the_file_level_path(fixtures, captures,
                                                                        tmp_path):
    """B keeps a data logical (5) before its swap: the region path cannot lay its layout on
    a disk ending inside it (only swap can be shrunk), so the file-level path plans anew,
    the data partition keeping its size; a disk smaller still is refused, naming the
    smallest disk that fits (issue 17)."""
    fx = fixtures["B"]
    manifest = Capture.open(str(captures["B"])).manifest.raw
    data = next(p for p in manifest["layout"]["partitions"] if p["number"] == 5)
    target = make_target(tmp_path / "short.img", (data["end_lba"] - 10) * SECTOR, "random")
    assert target.stat().st_size > fx.region_end_sectors * SECTOR
    result = runner_cli("restore", "--yes", captures["B"], target)
    assert result.returncode == 0, result.stderr
    assert "the region path cannot lay the captured layout on this disk" in result.stdout
    assert "only swap can be shrunk" in result.stdout
    assert "partition 5: entry only" in result.stdout
    tiny = make_target(tmp_path / "tiny.img", 20 * MiB, "random")
    before = sha256_of(tiny)
    refused = runner_cli("restore", "--yes", captures["B"], tiny)
    assert_refused(refused, "the smallest disk this capture fits is")
    assert sha256_of(tiny) == before


def test_refuses_4096_byte_sectors(fixtures, captures, tmp_path):
    target = make_target(tmp_path / "4kn.img", fixtures["A"].path.stat().st_size, "random")
    before = sha256_of(target)
    loop = sh("losetup", "-f", "--show", "-b", "4096", target).strip()
    try:
        result = runner_cli("restore", "--yes", captures["A"], loop)
    finally:
        sh("losetup", "-d", loop)
    assert_refused(result, "4096-byte logical sectors")
    assert sha256_of(target) == before


@pytest.mark.parametrize("answer", ["no\n", "YES\n", "y\n", " yes\n", "\n", ""])
def test_anything_but_yes_aborts(captures, random_target, answer):
    before = sha256_of(random_target)
    result = runner_cli("restore", captures["A"], random_target, input_text=answer)
    assert_refused(result, "aborted, nothing written")
    assert "Type yes to write" in result.stdout
    assert sha256_of(random_target) == before


def test_yes_through_the_pipe_restores(fixtures, captures, random_target):
    result = runner_cli("restore", captures["A"], random_target, input_text="yes\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # The plan names the target, what it holds, what is written and what is recreated.
    assert f"Target {random_target}" in out
    assert "It holds now:" in out and "no partition table" in out
    assert f"sectors 0..{fixtures['A'].region_end_sectors - 1}" in out
    assert "Will recreate: swap partition 2: label SWAP-sda2" in out
    assert out.splitlines()[-1].startswith("mbrescue: restore complete")


def test_write_error_names_the_sector(captures, tmp_path):
    """A target whose storage runs out mid-write (a sparse file on a small tmpfs)."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mountpoint)
    try:
        target = make_target(mountpoint / "target.img", 96 * MiB)
        result = runner_cli("restore", "--yes", captures["A"], target)
    finally:
        sh("umount", mountpoint)
    assert_refused(result, "write error on")
    assert "at sector " in result.stderr and "No space left on device" in result.stderr


def test_refuses_mounted_target(fixtures, captures, tmp_path):
    fx = fixtures["A"]
    target = make_target(tmp_path / "busy.img", fx.path.stat().st_size)
    run_restore(captures["A"], target)
    manifest = Capture.open(str(captures["A"])).manifest.raw
    boot = next(p for p in manifest["layout"]["partitions"] if p["number"] == fx.boot_partition)
    loop = sh("losetup", "-f", "--show", "-o", str(boot["start_lba"] * SECTOR), "--sizelimit",
              str(boot["size_sectors"] * SECTOR), target).strip()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        sh("mount", "-o", "ro", loop, mountpoint)
        try:
            before = sha256_of(target)
            result = runner_cli("restore", "--yes", captures["A"], target)
            assert_refused(result, "mounted")
            assert sha256_of(target) == before
        finally:
            sh("umount", mountpoint)
    finally:
        sh("losetup", "-d", loop)


# -- rescue mode on loop devices ------------------------------------------------------------------


def test_rescue_mode_never_offers_the_medium(fixtures, captures, tmp_path):
    """Two loop "disks": one carries an ISO9660 PVD naming the medium, one is blank. The
    medium is refused with its reason; `mbrescue.target=` + unattended (opted in) restores
    onto the other without a prompt. (Only the preselected loop device is ever written:
    other loop devices on a shared machine may show up as candidates, never as targets.)"""
    fx = fixtures["A"]
    medium_img = make_target(tmp_path / "medium.img", 64 * MiB)
    pvd = bytearray(2048)
    pvd[0], pvd[1:6], pvd[6] = 1, b"CD001", 1
    pvd[40:72] = b"MBRESCUE_TEST".ljust(32)
    pvd[190:318] = b"MBRESCUE-MEDIUM-4711".ljust(128)
    with open(medium_img, "r+b") as stream:
        stream.seek(16 * 2048)
        stream.write(pvd)
    target_img = make_target(tmp_path / "blank.img", fx.path.stat().st_size)
    medium = sh("losetup", "-f", "--show", medium_img).strip()
    try:
        target = sh("losetup", "-f", "--show", target_img).strip()
        try:
            capture_obj = Capture.open(str(captures["A"]))
            found = runner.rescue_candidates(capture_obj, runner.RegionHead(capture_obj),
                                             "MBRESCUE-MEDIUM-4711")
            by_path = {c.disk.path: (c, plan) for c, plan in found}
            assert by_path[medium][0].refusal == "it is the medium the rescue system booted from"
            assert by_path[target][0].refusal is None and by_path[target][1] is not None
            # The host's own (mounted) root disk is never offered either.
            for candidate, _ in found:
                if candidate.disk.name and candidate.disk.name.startswith(("vd", "sd", "nvme")):
                    assert candidate.refusal, candidate
            options = tmp_path / "options.json"
            options.write_text(json.dumps({"unattended_allowed": True}))
            console, out, _ = quiet_console()
            switches = Switches(target=target, unattended=True, medium="MBRESCUE-MEDIUM-4711")
            assert runner.restore(str(captures["A"]), None, console=console, rescue=True,
                                  switches=switches, options_path=str(options)) == 0
            assert "unattended restore" in out.getvalue()
            assert out.getvalue().splitlines()[-1].startswith("mbrescue: restore complete")
            # Preselecting the medium itself is refused.
            console, out, _ = quiet_console()
            with pytest.raises(MbrescueError, match="booted from"):
                runner.restore(str(captures["A"]), None, console=console, rescue=True,
                               switches=Switches(target=medium, medium="MBRESCUE-MEDIUM-4711"),
                               options_path=str(options))
        finally:
            sh("losetup", "-d", target)
    finally:
        sh("losetup", "-d", medium)
    assert differing_sectors(fx.path, target_img, fx.region_end_sectors * SECTOR) == set()


def test_unattended_without_opt_in_still_asks(fixtures, captures, tmp_path):
    fx = fixtures["A"]
    target_img = make_target(tmp_path / "blank.img", fx.path.stat().st_size, "random")
    before = sha256_of(target_img)
    target = sh("losetup", "-f", "--show", target_img).strip()
    try:
        read_fd, write_fd = os.pipe()
        os.write(write_fd, b"no\n")
        os.close(write_fd)
        out = io.StringIO()
        console = Console([Terminal("test", -1, read_fd, False, out_stream=out)])
        with pytest.raises(MbrescueError, match="aborted, nothing written"):
            runner.restore(str(captures["A"]), None, console=console, rescue=True,
                           switches=Switches(target=target, unattended=True),
                           options_path=str(tmp_path / "absent.json"))
        os.close(read_fd)
        assert "built without the unattended opt-in" in out.getvalue()
    finally:
        sh("losetup", "-d", target)
    assert sha256_of(target_img) == before


def test_rescue_mode_asks_which_disk(fixtures, captures, tmp_path):
    """Several candidates: a numbered list on the console, the user types a number, then the
    plan and `yes`. The test picks its own loop device by the path shown and checks the plan
    names it before saying yes (other loop devices of a shared machine may be listed too)."""
    fx = fixtures["A"]
    images = [make_target(tmp_path / f"disk{i}.img", fx.path.stat().st_size) for i in (1, 2)]
    loops = [sh("losetup", "-f", "--show", image).strip() for image in images]
    master, slave = os.openpty()
    try:
        console = Console.from_fds([slave])
        result: list[object] = []

        def job() -> None:
            try:
                result.append(runner.restore(str(captures["A"]), None, console=console,
                                             rescue=True, switches=Switches(),
                                             options_path=str(tmp_path / "absent.json")))
            except MbrescueError as exc:
                result.append(exc)

        worker = threading.Thread(target=job)
        worker.start()
        shown = read_until(master, b"Type its number")
        numbers = re.findall(rb"  (\d+)\) (\S+): ", shown)
        pick = next(number for number, path in numbers if path.decode() == loops[1])
        os.write(master, pick + b"\n")
        plan = read_until(master, b"Type yes to write ")
        answer = b"yes\n" if f"Target {loops[1]}:".encode() in plan else b"no\n"
        os.write(master, answer)
        done = read_until(master, b"restore complete", timeout=120)
        worker.join(60)
        assert result == [0], result
        assert b"It holds now:" in plan and b"blank" in plan
        assert b"mbrescue: restore complete" in done
    finally:
        os.close(master)
        os.close(slave)
        for loop in loops:
            sh("losetup", "-d", loop)
    assert differing_sectors(fx.path, images[1], fx.region_end_sectors * SECTOR) == set()
    assert sha256_of(images[0]) == sha256_of(make_target(tmp_path / "zero.img",
                                                         fx.path.stat().st_size))


# -- the real rescue system: kernel + base + payload initramfs in QEMU ---------------------------


@pytest.fixture(scope="module")
def rescue_initrd(captures, tmp_path_factory) -> tuple[Path, Path]:
    """(kernel, initrd): the kit's kernel, the base initramfs with this runner, fixture A's
    capture as the payload, concatenated as GRUB hands them over."""
    from builder.kit import ensure_kit

    return ensure_kit().kernel, memory_initrd(captures["A"], tmp_path_factory.mktemp("rescue"))


def rescue_vm(rescue_initrd, disks, append: str, log: Path):
    from builder.vm import Vm, VmConfig

    kernel, initrd = rescue_initrd
    config = VmConfig(kernel=kernel, initrd=initrd, append=f"console=ttyS0 {append}",
                      disks=disks, memory_mib=1024)
    return Vm(config, log)


@pytest.mark.qemu
def test_rescue_system_restores_a_blank_disk(fixtures, rescue_initrd, tmp_path):
    """Boot the rescue system with one blank disk: plan on the serial console, `yes` typed
    there, `restore complete`; then the restored disk boots to fixture A's marker."""
    from builder.vm import Disk

    fx = fixtures["A"]
    target = make_target(tmp_path / "blank.img", fx.path.stat().st_size)
    with rescue_vm(rescue_initrd, [Disk(target, serial="BLANK0001")], "",
                   tmp_path / "serial.log") as vm:
        vm.expect(r"Target /dev/vda: .*serial BLANK0001", 300)
        vm.expect(r"Will recreate: swap partition 2: label SWAP-sda2", 30)
        vm.expect(r"Type yes to write /dev/vda", 30)
        prompt_s = vm.elapsed()
        vm.send("yes\n")
        vm.expect(r"mbrescue: restore complete", 300)
        vm.expect(r"press Enter to reboot", 60)
        vm.send("\n")
        vm.wait_exit(60)
        print(f"QEMU start -> confirmation prompt: {prompt_s:.1f} s (TCG)")
    assert "Traceback" not in vm.output and "mbrescue: error:" not in vm.output
    assert differing_sectors(fx.path, target, fx.region_end_sectors * SECTOR) == set()
    boot_to_marker(target, fx, timeout=240)


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 1 << 20, 3 * 65535 + 7])
def test_stored_members_are_read_without_inflating(size):
    """Stored gzip members are handed on as views; anything else is left to zlib."""
    import zlib

    data = os.urandom(size)
    packer = zlib.compressobj(0, zlib.DEFLATED, 31)
    stored = packer.compress(data) + packer.flush()
    parts = writer.stored_blocks(stored)
    assert parts is not None and b"".join(parts) == data
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    assert writer.stored_blocks(packer.compress(b"a" * (size + 100)) + packer.flush()) is None
    broken = bytearray(stored)
    broken[-1] ^= 1  # the length in the trailer
    assert writer.stored_blocks(bytes(broken)) is None
