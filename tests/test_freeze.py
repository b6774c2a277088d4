"""Capture never hangs the host: output on the frozen file system refused, the freeze bounded by a
watchdog, undone on SIGTERM, SIGINT, SIGKILL and the watchdog's death; the root never frozen.

Every test runs the real CLI against a real ext4 mounted through a loop device at the partition's
offset, with timeouts, and thaws in its cleanup so that a regression cannot hang the suite.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import freeze
from builder.runner.capfile import Capture

from .conftest import MBRESCUE, ROOT, mbrescue, one_error_line, sh
from .test_capture import MiB, small_msdos_image

GiB = 1 << 30
BOOT_START_LBA = 2048


@contextlib.contextmanager
def mounted(image: Path, mountpoint: Path, offset: int, size: int) -> Iterator[Path]:
    loop = sh("losetup", "-f", "--show", "-o", str(offset), "--sizelimit", str(size), image).strip()
    mountpoint.mkdir(exist_ok=True)
    try:
        sh("mount", loop, mountpoint)
        try:
            yield mountpoint
        finally:
            subprocess.run(["fsfreeze", "--unfreeze", mountpoint], capture_output=True)
            sh("umount", mountpoint)
    finally:
        sh("losetup", "-d", loop)


def small_mounted(tmp_path: Path) -> contextlib.AbstractContextManager[Path]:
    image = small_msdos_image(tmp_path / "host.img")
    return mounted(image, tmp_path / "boot", BOOT_START_LBA * 512, 16 * MiB)


def writes_within(directory: Path, seconds: float) -> bool:
    """A file written and fsynced on directory's file system within seconds (never hangs)."""
    done = threading.Event()

    def write() -> None:
        with open(directory / f"probe-{time.monotonic_ns()}", "wb") as probe:
            probe.write(b"x")
            os.fsync(probe.fileno())
        done.set()

    threading.Thread(target=write, daemon=True).start()
    if done.wait(seconds):
        return True
    # Frozen still: thaw so the suite goes on, and report the failure.
    subprocess.run(["fsfreeze", "--unfreeze", directory], capture_output=True)
    return False


def is_frozen(mountpoint: Path) -> bool:
    """FIFREEZE on a frozen file system fails with EBUSY; one that froze now is thawed again."""
    probe = subprocess.run(["fsfreeze", "--freeze", mountpoint], capture_output=True, text=True)
    if probe.returncode == 0:
        sh("fsfreeze", "--unfreeze", mountpoint)
        return False
    assert "busy" in probe.stderr.lower(), probe.stderr
    return True


def start_capture(
    *args: str | os.PathLike[str], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*MBRESCUE, *map(os.fspath, args)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def read_stderr_until(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not seen; got {seen!r}"
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            piece = os.read(proc.stderr.fileno(), 65536)
            assert piece, f"{needle!r} not seen before the end; got {seen!r}"
            seen += piece
    return seen


def finish(proc: subprocess.Popen[bytes], mountpoint: Path, timeout: float = 20) -> tuple[int, str]:
    """The process's exit status and the rest of its stderr; a hang fails (thawed first)."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Blocked on the frozen file system: only a thaw lets the kill land.
        subprocess.run(["fsfreeze", "--unfreeze", mountpoint], capture_output=True)
        proc.kill()
        proc.communicate(timeout=60)
        raise AssertionError(f"the capture hung for more than {timeout} s") from None
    return proc.returncode, err.decode()


def run_capture(
    mountpoint: Path, *args: str | os.PathLike[str]
) -> subprocess.CompletedProcess[str]:
    """`mbrescue capture ARGS` that cannot hang the suite: a hang is thawed, killed, failed."""
    code, err = finish(start_capture("capture", *args), mountpoint)
    return subprocess.CompletedProcess(args, code, "", err)


def _watchdog_pid(parent: int) -> int:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


# -- 1. never write onto the file system being frozen --------------------------------------------


def test_output_on_the_frozen_boot_is_refused_not_hung(tmp_path):
    """The deadlock seen in issue 7: `capture SRC -o /mnt/boot/x.mbrescue` onto the frozen /boot."""
    with small_mounted(tmp_path) as mnt:
        out = mnt / "x.mbrescue"
        proc = start_capture("capture", tmp_path / "host.img", "-o", out)
        try:
            code, err = finish(proc, mnt, timeout=20)
        finally:
            subprocess.run(["fsfreeze", "--unfreeze", mnt], capture_output=True)
        line = one_error_line(subprocess.CompletedProcess([], code, "", err))
        assert str(mnt) in line and "frozen" in line, line
        assert "mbrescue: froze" not in err
        assert writes_within(mnt, 5)
        assert not out.exists()
        assert not [p for p in mnt.iterdir() if ".tmp-" in p.name]


def test_output_directory_on_the_frozen_boot_is_refused(tmp_path):
    with small_mounted(tmp_path) as mnt:
        (mnt / "captures").mkdir()
        line = one_error_line(run_capture(mnt, tmp_path / "host.img", "-o", mnt / "captures"))
        assert "frozen" in line
        assert list((mnt / "captures").iterdir()) == []
        assert writes_within(mnt, 5)


def test_stderr_redirected_onto_the_frozen_boot_is_refused(tmp_path):
    with small_mounted(tmp_path) as mnt:
        log_path = mnt / "capture.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(
                [*MBRESCUE, "capture", tmp_path / "host.img", "-o", tmp_path / "x.mbrescue"],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                subprocess.run(["fsfreeze", "--unfreeze", mnt], capture_output=True)
                proc.kill()
                proc.wait(60)
                raise AssertionError("the capture hung") from None
        result = proc
        assert result.returncode == 1
        lines = log_path.read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mbrescue: error: standard error"), lines
        assert not (tmp_path / "x.mbrescue").exists()
        assert writes_within(mnt, 5)


# -- 3. and 4. a bounded freeze, undone by every way the process can end ------------------------


@pytest.fixture(scope="module")
def big_boot(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """An 8 GiB ext4 /boot mounted through a loop device; the disk as a loop device too.

    The slow point is real: the image is sparse, and through a block device (unlike
    an image file, whose holes capture skips with SEEK_DATA) its 8 GiB are read, a
    second or more, during which the file system is frozen.
    """
    work = tmp_path_factory.mktemp("bigboot")
    image = work / "big.img"
    boot_bytes = 8 * GiB
    with open(image, "wb") as f:
        f.truncate(BOOT_START_LBA * 512 + boot_bytes + 64 * MiB)
    sh(
        "sfdisk",
        "-q",
        image,
        input_bytes=f"label: dos\n{BOOT_START_LBA},8GiB,83,*\n,,82\n".encode(),
    )
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={BOOT_START_LBA * 512}", image, "8G")
    disk = sh("losetup", "-f", "--show", "-r", image).strip()
    try:
        with mounted(image, work / "boot", BOOT_START_LBA * 512, boot_bytes) as mnt:
            (mnt / "vmlinuz").write_bytes(os.urandom(MiB))
            yield Path(disk), mnt
    finally:
        sh("losetup", "-d", disk)


def _frozen_capture(big_boot, tmp_path, env: dict[str, str] | None = None):
    disk, mnt = big_boot
    out = tmp_path / "x.mbrescue"
    proc = start_capture("capture", disk, "--boot-partition", "1", "-o", out, env=env)
    try:
        read_stderr_until(proc, b"froze", timeout=30)
        assert is_frozen(mnt), "the capture was not frozen any more when the test looked"
    except BaseException:
        proc.kill()
        proc.wait()
        subprocess.run(["fsfreeze", "--unfreeze", mnt], capture_output=True)
        raise
    return proc, mnt, out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_the_freeze_thaws(big_boot, tmp_path, signum):
    proc, mnt, out = _frozen_capture(big_boot, tmp_path)
    try:
        proc.send_signal(signum)
        assert writes_within(mnt, 5), "still frozen after the signal"
        code, err = finish(proc, mnt)
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", mnt], capture_output=True)
    line = one_error_line(subprocess.CompletedProcess([], code, "", err))
    assert "interrupted" in line and signum.name in line, line
    assert "thawed" in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_sigkill_of_the_capture_is_undone_by_the_watchdog(big_boot, tmp_path):
    proc, mnt, out = _frozen_capture(big_boot, tmp_path)
    try:
        proc.kill()
        assert writes_within(mnt, 5), "SIGKILL left the file system frozen"
        _, err = finish(proc, mnt)
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", mnt], capture_output=True)
    assert "watchdog thawed" in err, err
    assert not out.exists()


def test_death_of_the_watchdog_thaws_and_fails(big_boot, tmp_path):
    proc, mnt, out = _frozen_capture(big_boot, tmp_path)
    try:
        os.kill(_watchdog_pid(proc.pid), signal.SIGKILL)
        assert writes_within(mnt, 5), "the watchdog's death left the file system frozen"
        code, err = finish(proc, mnt)
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", mnt], capture_output=True)
    line = one_error_line(subprocess.CompletedProcess([], code, "", err))
    assert "watchdog" in line
    assert not out.exists()


def test_freeze_limit_thaws_and_the_capture_fails(big_boot, tmp_path):
    disk, mnt = big_boot
    out = tmp_path / "x.mbrescue"
    started = time.monotonic()
    limit = {freeze.FREEZE_LIMIT_ENV: "0.2"}
    code, err = finish(
        start_capture("capture", disk, "--boot-partition", "1", "-o", out, env=limit),
        mnt,
        timeout=60,
    )
    result = subprocess.CompletedProcess([], code, "", err)
    line = one_error_line(result)
    assert "limit" in line and "not consistent" in line, line
    assert time.monotonic() - started < 30
    assert writes_within(mnt, 5)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_freeze_limit_may_be_lowered_never_raised(tmp_path):
    image = small_msdos_image(tmp_path / "host.img")
    line = one_error_line(
        mbrescue("capture", image, "-o", tmp_path / "x", env={freeze.FREEZE_LIMIT_ENV: "600"})
    )
    assert freeze.FREEZE_LIMIT_ENV in line and "never raised" in line


def test_a_normal_capture_reports_how_long_it_was_frozen(tmp_path):
    with small_mounted(tmp_path) as mnt:
        out = tmp_path / "x.mbrescue"
        result = run_capture(mnt, tmp_path / "host.img", "-o", out)
        assert result.returncode == 0, result.stderr
        assert "thawed" in result.stderr and " s" in result.stderr
        assert Capture.open(str(out)).manifest.raw["frozen"] is True
        assert writes_within(mnt, 5)
        # The watchdog went with the capture: no process of ours holds the mount point.
        assert not is_frozen(mnt)


# -- 2. never the root; no silent guess on a live disk ------------------------------------------


def test_boot_partition_mounted_as_root_is_read_twice_not_frozen(tmp_path):
    """Partition 1 is `/` of a chroot: mbrescue run inside it must not freeze its own root."""
    image = small_msdos_image(tmp_path / "host.img")
    out = tmp_path / "x.mbrescue"
    with mounted(image, tmp_path / "root", BOOT_START_LBA * 512, 16 * MiB) as root:
        # The chroot sees the host's programs, Python, this project and tmp_path at the same
        # paths through bind mounts, inside a private mount namespace gone with the command.
        script = ["set -e"]
        # The checkout and the temporary directory may live anywhere (CI clones elsewhere than
        # a developer does): bind them by their own paths, not by a guessed parent.
        for path in ("/usr", "/etc", "/proc", "/sys", "/dev", "/root", str(ROOT), str(tmp_path)):
            script.append(f"mkdir -p {root}{path} && mount --bind {path} {root}{path}")
        for path in ("/bin", "/sbin", "/lib", "/lib64"):
            if os.path.islink(path):
                (root / path.lstrip("/")).symlink_to(os.readlink(path))
        script.append(
            f"cd {ROOT} && exec chroot {root} sh -c 'cd {ROOT} && exec {' '.join(MBRESCUE)} "
            f"capture {image} -o {out} --boot-partition 1'"
        )
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
        )
        subprocess.run(["fsfreeze", "--unfreeze", root], capture_output=True)
        assert result.returncode == 0, result.stderr
        assert "mbrescue: froze" not in result.stderr, result.stderr
        assert "root" in result.stderr and "twice" in result.stderr, result.stderr
        assert Capture.open(str(out)).manifest.raw["frozen"] is False
        assert writes_within(root, 5)


def test_live_disk_without_a_separate_boot_needs_boot_partition(tmp_path):
    """A block-device source with mounted partitions, none at /boot: no silent guess."""
    image = small_msdos_image(tmp_path / "host.img")
    disk = sh("losetup", "-f", "--show", image).strip()
    try:
        with mounted(image, tmp_path / "data", BOOT_START_LBA * 512, 16 * MiB):
            line = one_error_line(mbrescue("capture", disk, "-o", tmp_path / "x.mbrescue"))
            assert "--boot-partition" in line and "/boot" in line, line
            assert not (tmp_path / "x.mbrescue").exists()
    finally:
        sh("losetup", "-d", disk)


# -- 5. md RAID and device-mapper are named, never read as if unmounted --------------------------


def test_plain_devices_are_not_taken_for_md_or_dm(tmp_path):
    """The detection reads real sysfs; this machine has no md or dm (see the report)."""
    image = small_msdos_image(tmp_path / "host.img")
    loop = sh("losetup", "-f", "--show", image).strip()
    try:
        st = os.stat(loop)
        assert freeze.stacked_device(freeze.dev_of(st.st_rdev)) is None
        assert freeze.stacked_device(freeze.dev_of(os.stat("/").st_dev)) is None
        assert freeze.stacked_mounts(loop, {1: BOOT_START_LBA}, 512) == []
    finally:
        sh("losetup", "-d", loop)


# -- the rest of the boot chain: a mounted ESP is not frozen, so it must read the same twice ------


def test_mounted_esp_beside_the_frozen_boot_is_read_twice(tmp_path):
    """GPT: an ESP (ext4 here: this machine's kernel has no vfat) and /boot, both mounted."""
    image = tmp_path / "gpt.img"
    with open(image, "wb") as f:
        f.truncate(48 * MiB)
    sh(
        "sgdisk",
        "-o",
        "-n",
        "1:2048:+8M",
        "-t",
        "1:EF00",
        "-n",
        "2:0:+16M",
        "-t",
        "2:8300",
        "-n",
        "3:0:0",
        "-t",
        "3:8200",
        image,
    )
    esp_at, boot_at = 2048 * 512, (2048 + 8 * 2048) * 512
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={esp_at}", image, "8M")
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={boot_at}", image, "16M")
    out = tmp_path / "x.mbrescue"
    with (
        mounted(image, tmp_path / "efi", esp_at, 8 * MiB) as esp,
        mounted(image, tmp_path / "boot", boot_at, 16 * MiB) as boot,
    ):
        result = run_capture(boot, image, "-o", out)
        assert writes_within(esp, 5) and writes_within(boot, 5)
    assert result.returncode == 0, result.stderr
    assert f"froze {boot}" in result.stderr
    assert f"{esp} (not frozen) read the same twice" in result.stderr, result.stderr
    with Capture.open(str(out)) as capture:
        assert capture.manifest.raw["boot_chain"] == [1, 2]
        assert capture.manifest.raw["frozen"] is True


def test_md_and_dm_messages_say_what_to_do():
    """The wording for the kinds this machine cannot make (no md, no device-mapper here)."""
    raid = freeze.StackedMount(
        1,
        freeze.Mount("9:0", "/boot", "ext4"),
        freeze.StackedDevice("9:0", "md0", "md RAID1", ("8:1", "8:17")),
    )
    error = freeze.describe_stacked("/dev/sda", raid)
    assert "partition 1 of /dev/sda" in str(error) and "md RAID1" in str(error)
    assert error.hint is not None and "capture each RAID1 member disk" in error.hint
    lvm = freeze.StackedMount(
        2,
        freeze.Mount("253:3", "/boot", "ext4"),
        freeze.StackedDevice("253:3", "vg-boot", "LVM", ("8:2",)),
    )
    assert "not supported: /boot on LVM" in str(freeze.describe_stacked("/dev/sda", lvm))
