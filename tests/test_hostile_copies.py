"""A capture from a compromised host (safety rule 8): its file-level copies are built here
as an attacker would write them — a symlink then a file of the same name, a symlink then a
directory, a hard link through a symlink, a symlink on a FAT copy, huge and sparse
references, a member bigger than its partition — resealed so every checksum holds, and
restored through the CLI (answered `no` and `yes`), the bundle and the rescue system. Each
is refused before the prompt, and nothing outside the target changes (content, mode, owner,
times); no host content reaches the target. A property test throws random member sequences
at the unpacker over a sandbox directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.runner import capfile, untar
from builder.runner.capfile import Capture
from builder.runner.errors import MbrescueError
from builder.vm import Disk, Vm, VmConfig, VmTimeout

from .conftest import mbrescue, memory_initrd, sha256_of

MiB = 1 << 20
TiB = 1 << 40

Member = Callable[[tarfile.TarFile], None]


def regular(name: str, data: bytes, mode: int = 0o644, uid: int = 0) -> Member:
    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.uid, info.mtime = len(data), mode, uid, 1_600_000_000
        archive.addfile(info, io.BytesIO(data))
    return add


def special(name: str, kind: bytes, linkname: str = "", mode: int = 0o755, uid: int = 0,
            pax: dict[str, str] | None = None) -> Member:
    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode, info.uid = kind, linkname, mode, uid
        info.mtime = 1_600_000_000
        if pax:
            info.pax_headers = dict(pax)
        archive.addfile(info)
    return add


def archive_of(*members: Member) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        for add in members:
            add(archive)
    return out.getvalue()


def forge(capture: Path, out: Path, copy_bytes: bytes, fs_type: str = "ext") -> Path:
    """The capture with one file-level copy (the first of that kind) replaced and every
    checksum and the seal made anew: what a compromised host can hand the controller."""
    source = Capture.open(str(capture))
    manifest = json.loads(json.dumps(source.manifest.raw))
    copies = manifest["file_copies"]
    index = next(i for i, c in enumerate(copies)
                 if (c["fs"]["type"] == "vfat") == (fs_type == "vfat"))
    member = copies[index]["member"]
    copies[index]["sha256"] = hashlib.sha256(copy_bytes).hexdigest()
    with open(out, "wb") as stream:
        tar = capfile.TarWriter(stream)
        for name in source.members:
            if name in (capfile.MANIFEST_MEMBER, capfile.MANIFEST_SEAL_MEMBER):
                continue
            data = copy_bytes if name == member else source.pread(
                source.members[name].size, source.members[name].offset)
            tar.add_bytes(name, data, 0)
        capfile.write_manifest(tar, manifest, 0)
        tar.close()
    source.close()
    return out


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything under root as it really is: type, mode, owner, size, times, content."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            st_ = os.lstat(path)
            content = (hashlib.sha256(path.read_bytes()).hexdigest()
                       if stat.S_ISREG(st_.st_mode) else
                       os.readlink(path) if stat.S_ISLNK(st_.st_mode) else "")
            seen[os.fspath(path)] = (st_.st_mode, st_.st_uid, st_.st_gid, st_.st_size,
                                     st_.st_mtime_ns, st_.st_nlink, content)
    return seen


@pytest.fixture()
def host(tmp_path) -> Path:
    """Host files an attacker would aim at: a file, a directory, a victim to steal."""
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "shadow").write_bytes(b"root:HOST-SECRET-SHADOW:19000::::::\n")
    (root / "etc" / "shadow").chmod(0o600)
    (root / "secret-dir").mkdir()
    (root / "secret-dir" / "victim").write_bytes(b"HOST-SECRET-VICTIM\n" * 100)
    os.utime(root / "secret-dir", (1_500_000_000, 1_500_000_000))
    return root


def attacks(host: Path) -> dict[str, tuple[bytes, str, str]]:
    """name -> (the copy, which copy it replaces, what the refusal says)."""
    shadow = os.fspath(host / "etc" / "shadow")
    secret_dir = os.fspath(host / "secret-dir")
    return {
        "symlink-then-file": (archive_of(
            special("grub", tarfile.DIRTYPE),
            special("grub/x", tarfile.SYMTYPE, shadow),
            regular("grub/x", b"owned\n", mode=0o4777)), "ext", "a second member"),
        "symlink-then-directory": (archive_of(
            special("d", tarfile.SYMTYPE, secret_dir),
            special("d", tarfile.DIRTYPE, mode=0o777, uid=1234)), "ext", "a second member"),
        "hardlink-through-symlink": (archive_of(
            special("ldir", tarfile.SYMTYPE, secret_dir),
            special("stolen", tarfile.LNKTYPE, "ldir/victim")), "ext",
            "not a regular file made earlier"),
        "hardlink-to-host-path": (archive_of(
            special("stolen", tarfile.LNKTYPE, shadow.lstrip("/"))), "ext",
            "not a regular file made earlier"),
        "file-through-symlinked-folder": (archive_of(
            special("ldir", tarfile.SYMTYPE, secret_dir),
            regular("ldir/victim", b"owned\n")), "ext", "is not a directory made by the copy"),
        "dotdot": (archive_of(regular("../../escaped", b"owned\n")), "ext", "unsafe member"),
        "sparse-reference": (archive_of(special("huge", tarfile.REGTYPE, pax={
            "MBRESCUE.size": str(TiB), "MBRESCUE.sha256": "0" * 64,
            "MBRESCUE.extents": "0:0:512"})), "ext", "more than the partition holds"),
        "huge-member": (archive_of(regular("zeros", bytes(80 * MiB))), "ext",
                        "more than the partition holds"),
        "huge-pax-header": (archive_of(special("x", tarfile.REGTYPE, pax={
            f"SCHILY.xattr.user.k{i}": "v" for i in range(20000)})), "ext",
            "a tar extended header of"),
        "fat-symlink": (archive_of(
            special("EFI", tarfile.DIRTYPE),
            special("EFI/x", tarfile.SYMTYPE, shadow)), "vfat", "holds no links"),
    }


ATTACKS = ["symlink-then-file", "symlink-then-directory", "hardlink-through-symlink",
           "hardlink-to-host-path", "file-through-symlinked-folder", "dotdot",
           "sparse-reference", "huge-member", "huge-pax-header", "fat-symlink"]


def target_of(tmp_path: Path, size_bytes: int) -> Path:
    path = tmp_path / "target.img"
    with open(path, "wb") as stream:
        stream.write(os.urandom(size_bytes))
    return path


def assert_untouched(host: Path, before: dict, target: Path, target_before: str) -> None:
    assert snapshot(host) == before
    assert sha256_of(target) == target_before


@pytest.mark.parametrize("answer", ["no", "yes"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_hostile_copy_is_refused_before_the_prompt(captures, host, tmp_path, attack, answer):
    """Through the CLI onto a disk the file-level path takes by itself (smaller than the
    region): refused in one line before the prompt, whatever is answered."""
    copy, kind, why = attacks(host)[attack]
    source = captures["D"] if kind == "vfat" else captures["A"]
    forged = forge(source, tmp_path / "forged.mbrescue", copy, kind)
    # A: a disk smaller than its region takes the file-level path by itself; D (an ESP):
    # the file-level path asked for, on a disk of its layout's size.
    with Capture.open(str(source)) as opened:
        size = 56 * MiB if kind == "ext" else opened.manifest.source.size_bytes
    target = target_of(tmp_path, size)
    before, target_before = snapshot(host), sha256_of(target)
    started = time.monotonic()
    result = mbrescue("restore", *(["--files"] if kind == "vfat" else []), forged, target,
                      input_text=f"{answer}\n", timeout=300)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mbrescue: error")]
    assert len(errors) == 1 and why in errors[0], result.stderr
    assert "Type yes" not in result.stdout + result.stderr
    assert time.monotonic() - started < 60
    assert_untouched(host, before, target, target_before)
    # No host content reached anything the restore left behind either.
    for leftover in tmp_path.rglob("*"):
        if leftover.is_file() and not leftover.is_symlink() and host not in leftover.parents:
            assert b"HOST-SECRET" not in leftover.read_bytes(), leftover


def test_hostile_copy_is_refused_by_the_bundle(captures, host, tmp_path):
    """The bundle runs the same unpacker: symlink then file is refused there too."""
    bundle = tmp_path / "mbrescue-host"
    made = mbrescue("bundle", "-o", bundle)
    assert made.returncode == 0, made.stderr
    copy, _, why = attacks(host)["symlink-then-file"]
    forged = forge(captures["A"], tmp_path / "forged.mbrescue", copy)
    target = target_of(tmp_path, 56 * MiB)
    before, target_before = snapshot(host), sha256_of(target)
    result = subprocess.run([bundle, "restore", "--yes", forged, target], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 1 and why in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert_untouched(host, before, target, target_before)


def test_a_damaged_copy_fails_build_check_and_verify(captures, tmp_path):
    """A file-level copy damaged after the capture (its manifest not resealed): build and
    check refuse it, naming the member; a real build of it leaves no ISO."""
    data = bytearray(captures["A"].read_bytes())
    source = Capture.open(str(captures["A"]))
    member = source.members["files-p1.tar.gz"]
    data[member.offset + member.size // 2] ^= 0xFF
    source.close()
    damaged = tmp_path / "damaged.mbrescue"
    damaged.write_bytes(bytes(data))
    iso = tmp_path / "damaged.iso"
    built = mbrescue("build", damaged, "-o", iso)
    assert built.returncode != 0 and "files-p1.tar.gz" in built.stderr, built.stderr
    assert not iso.exists() and not list(tmp_path.glob(".*iso*"))
    checked = mbrescue("check", damaged, captures["A"])
    assert checked.returncode == 2 and "files-p1.tar.gz" in checked.stderr, checked


@pytest.mark.qemu
def test_hostile_copy_is_refused_in_the_rescue_system(fixtures, captures, host, tmp_path):
    """The rescue system (kernel + base + payload, no firmware): a forged copy whose
    symlink aims at the rescue root's own /etc/passwd, then a file of that name: refused
    before the prompt, the blank target untouched."""
    from builder.kit import ensure_kit

    copy = archive_of(special("x", tarfile.SYMTYPE, "/etc/passwd"),
                      regular("x", b"owned::0:0::/:/bin/sh\n", mode=0o4777))
    forged = forge(captures["A"], tmp_path / "forged.mbrescue", copy)
    initrd = memory_initrd(forged, tmp_path)
    target = target_of(tmp_path, 56 * MiB)
    target_before = sha256_of(target)
    config = VmConfig(kernel=ensure_kit().kernel, initrd=initrd, memory_mib=768,
                      append="console=ttyS0", disks=[Disk(target, serial="MBRESCUE-SMALL")])
    try:
        with Vm(config, tmp_path / "serial.log") as vm:
            found = vm.expect(r"mbrescue: error: [^\r\n]*\r?\n|Type yes", 400)
    except VmTimeout as exc:
        log = (tmp_path / "serial.log").read_text(errors="replace")
        raise AssertionError(f"{exc}\n{log[-3000:]}") from None
    assert "a second member" in found.group(0), found.group(0)
    assert sha256_of(target) == target_before


# --- the property: random member sequences against a sandbox --------------------------------

NAMES = ["a", "b", "a/b", "a/c", "b/a", "..", "../out", "a/../b", "/abs", "x/./y", "out",
         "a//b", ""]
LINK_TARGETS = ["a", "b", "a/b", "..", "../outside", "/", "OUTSIDE", "OUTSIDE/file",
                "OUTSIDE/dir", "OUTSIDE/dir/inner", "a/b/c"]
KINDS = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE,
         tarfile.CHRTYPE]

member_strategy = st.tuples(st.sampled_from(NAMES), st.sampled_from(KINDS),
                            st.sampled_from(LINK_TARGETS), st.sampled_from([0o644, 0o4777, 0]),
                            st.binary(max_size=8))


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(member_strategy, max_size=8), st.booleans())
def test_no_member_sequence_changes_anything_outside(tmp_path_factory, members, fat):
    sandbox = tmp_path_factory.mktemp("sandbox")
    outside = sandbox / "OUTSIDE"
    (outside / "dir").mkdir(parents=True)
    (outside / "file").write_bytes(b"outside")
    (outside / "dir" / "inner").write_bytes(b"inner")
    into = sandbox / "scratch" / "tree"
    into.mkdir(parents=True)
    before = snapshot(outside)
    outside_inodes = {os.lstat(p).st_ino for p in [outside, *outside.rglob("*")]}

    def member(spec: tuple) -> Member:
        name, kind, link, mode, data = spec
        # Link targets naming the sandbox's outside folder by absolute path, as a host's
        # would name its own files.
        link = link.replace("OUTSIDE", os.fspath(outside)) if link.startswith("OUTSIDE") else link
        if kind == tarfile.REGTYPE:
            return regular(name, data, mode)
        return special(name, kind, link, mode)

    packed = io.BytesIO(archive_of(*map(member, members)))
    limits = untar.Limits(bytes_left=MiB, members_left=100, region_span=(0, MiB))
    try:
        untar.unpack(packed, into, allow_links=not fat, limits=limits, region_bytes=MiB)
    except MbrescueError:
        pass
    assert snapshot(outside) == before
    for path in [into, *into.rglob("*")]:
        info = os.lstat(path)
        assert info.st_ino not in outside_inodes
        assert not (fat and stat.S_ISLNK(info.st_mode))


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_unpacker_alone_refuses_each_attack(host, tmp_path, attack):
    """The second line: the unpacker judges the real tree itself, so each attack is refused
    there too even if the capture's own check (Capture.verify_copies) were bypassed."""
    copy, kind, why = attacks(host)[attack]
    into = tmp_path / "scratch" / "tree"
    into.mkdir(parents=True)
    before = snapshot(host)
    limits = untar.Limits(bytes_left=64 * MiB, members_left=1000, region_span=(0, MiB))
    with pytest.raises(MbrescueError, match=why.replace("(", r"\(")):
        untar.unpack(io.BytesIO(copy), into, allow_links=kind == "ext", limits=limits,
                     region_bytes=MiB)
    assert snapshot(host) == before
    for path in into.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert b"HOST-SECRET" not in path.read_bytes()


def test_a_hostile_capture_is_refused_by_build_and_verify(captures, host, tmp_path):
    """On the controller: a hostile capture never becomes an ISO, and `verify CAPTURE`
    names what is wrong."""
    copy, _, why = attacks(host)["hardlink-through-symlink"]
    forged = forge(captures["A"], tmp_path / "forged.mbrescue", copy)
    iso = tmp_path / "forged.iso"
    built = mbrescue("build", forged, "-o", iso)
    assert built.returncode != 0 and why in built.stderr, built.stderr
    assert not iso.exists()
    verified = mbrescue("verify", forged)
    assert verified.returncode == 1 and why in verified.stdout + verified.stderr, verified
