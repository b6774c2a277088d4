"""`mbrescue bundle`: the host side as one file, run where nothing is installed.

The bundle is built once, then run inside a chroot whose root holds nothing but the
bundle, bind mounts of /dev, /proc and /sys, the fixture image (bind-mounted at its own
path, so the manifests can be compared whole) and an output folder: no /usr, no /bin, no
shell, no Python, no library. Its captures of fixtures A-D must equal `mbrescue capture`'s
of the same images, bar the time and tool fields; a restore from inside the chroot must
put the captured region back; and nothing may be left behind anywhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import __version__
from builder.kit import elf_interpreter, elf_needed
from builder.runner.capfile import Capture

from .conftest import mbrescue, one_error_line, read_until, sh, sha256_of

# Fields that differ between two captures of the same image by design.
VOLATILE_FIELDS = ("created", "tool_version")
# What a host's root shell would pass on; PATH only finds `chroot` (nothing inside uses it).
CHROOT_ENV = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "mbrescue-host"
    result = mbrescue("bundle", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr
    return out


class Chroot:
    """An empty root: the bundle, /dev, /proc, /sys and whatever `bind` adds."""

    def __init__(self, root: Path, bundle: Path) -> None:
        self.root = root
        self.mounts: list[Path] = []
        root.mkdir()
        (root / "mbrescue-host").write_bytes(bundle.read_bytes())
        (root / "mbrescue-host").chmod(0o755)
        for name in ("dev", "proc", "sys"):
            self.bind(Path("/") / name, Path("/") / name)

    def bind(self, outside: Path, inside: Path) -> Path:
        where = self.root / inside.relative_to("/")
        if outside.is_dir():
            where.mkdir(parents=True, exist_ok=True)
        else:
            where.parent.mkdir(parents=True, exist_ok=True)
            where.touch()
        sh("mount", "--bind", outside, where)
        self.mounts.append(where)
        return inside

    def run(self, *args: str | os.PathLike[str], **kwargs) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["chroot", self.root, "/mbrescue-host", *map(os.fspath, args)],
            text=True, capture_output=True, timeout=300, env=CHROOT_ENV, **kwargs)

    def unmount_all(self) -> None:
        for where in reversed(self.mounts):
            subprocess.run(["umount", "-l", where], check=False)
        self.mounts.clear()


@contextlib.contextmanager
def empty_root(tmp_path: Path, bundle: Path) -> Iterator[Chroot]:
    root = Chroot(tmp_path / "root", bundle)
    try:
        yield root
    finally:
        root.unmount_all()


def manifest_without_volatile(path: Path) -> dict:
    manifest = dict(Capture.open(str(path)).manifest.raw)
    for name in VOLATILE_FIELDS:
        manifest.pop(name)
    return manifest


def test_bundle_is_one_executable_file(bundle_file):
    st = bundle_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_size < 15 << 20, f"bundle is {st.st_size} bytes"
    # A static launcher: no loader named, no library needed, so nothing on the host is used.
    assert elf_interpreter(bundle_file) == ""
    assert elf_needed(bundle_file) == []
    assert not list(bundle_file.parent.glob(".*tmp*")), "temporary file left beside it"


def test_version_in_an_empty_root(bundle_file, tmp_path):
    with empty_root(tmp_path, bundle_file) as root:
        started = time.monotonic()
        result = root.run("--version")
        seconds = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        line = result.stdout.strip()
        assert line.startswith(f"mbrescue {__version__} (host bundle; rescue kit's Python 3.11.")
        assert "python3.11-minimal 3.11" in line and "libc6 2." in line
        assert seconds < 10
        # Nothing unpacked: the root holds what it held before.
        assert sorted(p.name for p in root.root.iterdir()) == ["dev", "mbrescue-host", "proc",
                                                                "sys"]


@pytest.mark.parametrize("name", ["A", "B", "C", "D"])
def test_capture_in_an_empty_root_equals_mbrescue_capture(bundle_file, fixtures, tmp_path, name):
    image = fixtures[name].path
    reference = tmp_path / "reference.mbrescue"
    made = mbrescue("capture", image, "-o", reference)
    assert made.returncode == 0, made.stderr
    out = tmp_path / "out"
    out.mkdir()
    with empty_root(tmp_path, bundle_file) as root:
        root.bind(image, image)
        inside_out = root.bind(out, Path("/out"))
        result = root.run("capture", image, "-o", inside_out / "bundled.mbrescue")
        assert result.returncode == 0, result.stderr
        assert "wrote /out/bundled.mbrescue" in result.stderr
        # The empty root has no e2fsprogs or mtools: the capture goes on without the
        # file-level copies and says so; everything else is the same.
        assert "warning: no file-level copy of partition" in result.stderr, result.stderr
    bundled = out / "bundled.mbrescue"
    assert sorted(p.name for p in out.iterdir()) == ["bundled.mbrescue"]
    ours, theirs = manifest_without_volatile(bundled), manifest_without_volatile(reference)
    assert ours.pop("file_copies") == [] and theirs.pop("file_copies")
    # The boot loader record lists an ESP's loaders from its file-level copy, which the
    # empty root could not make: the same record otherwise.
    ours_loader, theirs_loader = ours.pop("boot_loader"), theirs.pop("boot_loader")
    differing = {r["partition"] for r in ours_loader if r not in theirs_loader}
    listed = {r["partition"] for r in theirs_loader if r["loader_paths"]}
    assert len(ours_loader) == len(theirs_loader) and differing <= listed, (ours_loader,
                                                                           theirs_loader)
    assert ours == theirs
    with Capture.open(str(bundled)) as capture:
        capture.verify()  # the region's bytes are the ones its SHA-256 names
        region = capture.manifest.raw["region"]
    assert sha256_of(image, region["length_bytes"]) == region["sha256"]


def test_restore_in_an_empty_root(bundle_file, fixtures, captures, tmp_path):
    fixture = fixtures["A"]
    out = tmp_path / "out"
    out.mkdir()
    target = out / "target.img"
    with open(target, "wb") as stream:
        stream.truncate(fixture.path.stat().st_size)
    capture_copy = out / "A.mbrescue"
    capture_copy.write_bytes(captures["A"].read_bytes())
    with empty_root(tmp_path, bundle_file) as root:
        root.bind(out, Path("/out"))
        result = root.run("restore", "/out/A.mbrescue", "/out/target.img", "--yes")
        assert result.returncode == 0, result.stderr + result.stdout
        assert "mbrescue: restore complete" in result.stdout + result.stderr
    region = Capture.open(str(captures["A"])).manifest.raw["region"]
    assert sha256_of(target, region["length_bytes"]) == region["sha256"]


def test_check_in_an_empty_root(bundle_file, fixtures, captures, tmp_path):
    """`PATH check` in the bundle: the unchanged fixture matches (0); a changed MBR boot
    code on a copy drifts (1, named); a capture that is not one is an error (2)."""
    out = tmp_path / "out"
    out.mkdir()
    image = out / "A.img"
    image.write_bytes(fixtures["A"].path.read_bytes())
    (out / "A.mbrescue").write_bytes(captures["A"].read_bytes())
    (out / "junk.mbrescue").write_bytes(b"junk")
    with empty_root(tmp_path, bundle_file) as root:
        root.bind(out, Path("/out"))
        same = root.run("check", "/out/A.mbrescue", "/out/A.img")
        assert same.returncode == 0, same.stdout + same.stderr
        with open(image, "r+b") as disk:
            disk.seek(100)
            disk.write(b"\x90" * 8)
        drifted = root.run("check", "/out/A.mbrescue", "/out/A.img")
        assert drifted.returncode == 1, drifted.stdout + drifted.stderr
        assert "MBR boot code changed" in drifted.stdout
        bad = root.run("check", "/out/junk.mbrescue", "/out/A.img")
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert bad.stderr.startswith("mbrescue: error: ")


def test_sigterm_at_the_prompt_leaves_nothing(bundle_file, captures, fixtures, tmp_path):
    """Killed while it waits for `yes`: nothing written, nothing left, the files were memfds."""
    out = tmp_path / "out"
    out.mkdir()
    target = out / "target.img"
    with open(target, "wb") as stream:
        stream.truncate(fixtures["A"].path.stat().st_size)
    (out / "A.mbrescue").write_bytes(captures["A"].read_bytes())
    with empty_root(tmp_path, bundle_file) as root:
        root.bind(out, Path("/out"))
        master, slave = os.openpty()
        process = subprocess.Popen(
            ["chroot", root.root, "/mbrescue-host", "restore", "/out/A.mbrescue",
             "/out/target.img"],
            stdin=slave, stdout=slave, stderr=slave, env=CHROOT_ENV)
        os.close(slave)
        try:
            read_until(master, b"yes", timeout=60)
            maps = Path(f"/proc/{process.pid}/maps").read_text()
            # The interpreter and its libraries run from anonymous memory, not from a file.
            assert "/memfd:python3.11" in maps and "/memfd:libc.so.6" in maps, maps
            # hashlib runs on OpenSSL (17x the built-in SHA-256 here), bundled too.
            assert "/memfd:libcrypto.so.3" in maps, maps
            environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
            assert b"MBRESCUE_BUNDLE_FILE=/mbrescue-host" in environ
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) != 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            os.close(master)
        assert sorted(p.name for p in root.root.iterdir()) == ["dev", "mbrescue-host", "out",
                                                                "proc", "sys"]
    assert sorted(p.name for p in out.iterdir()) == ["A.mbrescue", "target.img"]
    with open(target, "rb") as stream:
        assert not any(stream.read(1 << 20)), "the target was written"


def test_bad_input_in_an_empty_root_is_one_line(bundle_file, tmp_path):
    with empty_root(tmp_path, bundle_file) as root:
        one_error_line(root.run("capture", "/no/such/disk"))
        one_error_line(root.run("capture"))
        one_error_line(root.run("frobnicate"))
        one_error_line(root.run("restore", "/no/such.mbrescue", "/no/target"))


def test_damaged_bundle_is_one_line(bundle_file, tmp_path):
    cut = tmp_path / "cut"
    cut.write_bytes(bundle_file.read_bytes()[:-100])
    cut.chmod(0o755)
    result = subprocess.run([cut, "--version"], capture_output=True, text=True, timeout=30)
    assert one_error_line(result).startswith("mbrescue: error: bundle: no payload found")


def test_two_bundles_are_the_same_bytes(bundle_file, tmp_path):
    again = tmp_path / "again"
    result = mbrescue("bundle", "-o", again)
    assert result.returncode == 0, result.stderr
    assert again.read_bytes() == bundle_file.read_bytes()


def test_bundle_without_a_compiler_is_one_line(tmp_path):
    result = mbrescue("bundle", "-o", tmp_path / "x", env={"PATH": os.fspath(tmp_path)})
    line = one_error_line(result)
    assert "gcc is not installed" in line and "apt-get install gcc" in line
    assert list(tmp_path.iterdir()) == []


def test_bundle_bad_output(tmp_path):
    line = one_error_line(mbrescue("bundle", "-o", tmp_path / "missing" / "x"))
    assert "no such directory" in line
    assert not (tmp_path / "missing").exists()


def test_capture_of_a_mounted_boot_in_an_empty_root_freezes_and_thaws(bundle_file, fixtures,
                                                                      tmp_path):
    """The freeze path (watchdog process, FIFREEZE/FITHAW, file-level archive) in the bundle."""
    from builder.runner.layout import read_layout

    image = tmp_path / "host.img"
    image.write_bytes(fixtures["A"].path.read_bytes())
    boot = next(p for p in read_layout(str(image)).partitions
                if p.number == fixtures["A"].boot_partition)
    out = tmp_path / "out"
    out.mkdir()
    with empty_root(tmp_path, bundle_file) as root:
        root.bind(image, image)
        root.bind(out, Path("/out"))
        loop = sh("losetup", "-f", "--show", "-o", str(boot.start_lba * 512), "--sizelimit",
                  str(boot.size_sectors * 512), image).strip()
        mountpoint = root.root / "boot"
        mountpoint.mkdir()
        try:
            sh("mount", loop, mountpoint)
            try:
                payload = os.urandom(200_000)  # unsynced: only a freeze puts it on the disk
                (mountpoint / "initrd.img-new").write_bytes(payload)
                result = root.run("capture", image, "-o", "/out/frozen.mbrescue")
                assert result.returncode == 0, result.stderr
                assert "froze" in result.stderr and "thawed" in result.stderr, result.stderr
                (mountpoint / "after").write_text("writable again")
            finally:
                subprocess.run(["fsfreeze", "--unfreeze", mountpoint], capture_output=True)
                sh("umount", mountpoint)
        finally:
            sh("losetup", "-d", loop)
    capture = Capture.open(str(out / "frozen.mbrescue"))
    capture.verify()
    assert capture.manifest.raw["frozen"] is True
    assert capture.manifest.raw["boot_files"].get("member"), capture.manifest.raw["boot_files"]


def test_inherited_variables_do_not_override_the_bundles_own(bundle_file, tmp_path):
    """The launcher's own variables win: an inherited MBRESCUE_EXTENSIONS would load another
    .so, an inherited MBRESCUE_BUNDLE_FILE would make install lay down another file."""
    evil = tmp_path / "evil"
    evil.write_bytes(b"#!/bin/sh\necho owned\n")
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           "MBRESCUE_BUNDLE_FILE": os.fspath(evil), "MBRESCUE_BUNDLE": os.fspath(evil),
           "MBRESCUE_EXTENSIONS": f"zlib={evil}:_struct={evil}",
           "LD_PRELOAD": os.fspath(tmp_path / "no-such-library.so")}
    version = subprocess.run([bundle_file, "--version"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("mbrescue "), version.stderr
    assert "preloaded" not in version.stderr, version.stderr
    done = subprocess.run([bundle_file, "install", "--root", root], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    installed = root / "usr/local/sbin/mbrescue-host"
    assert installed.read_bytes() == bundle_file.read_bytes()
