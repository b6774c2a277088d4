"""Everything that steers a write is verified before the first byte: the manifest's seal,
its fields, its agreement with the region's own partition table; bounded inflating; and
a restore interrupted by a real write error never leaves a disk that looks healthy."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.runner.capfile import (
    GZIP_WBITS,
    MANIFEST_MEMBER,
    MANIFEST_SEAL_MEMBER,
    REGION_MEMBER,
    Capture,
)
from builder.runner.errors import MbrescueError
from builder.runner.manifest import parse_manifest

from .conftest import ROOT, sh, sha256_of

MiB = 1 << 20


def members_of(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path, "r:") as archive:
        return [(info.name, archive.extractfile(info).read()) for info in archive  # type: ignore[union-attr]
                if info.isfile()]


def repack(members: list[tuple[str, bytes]], out: Path, *, manifest: bytes | None = None,
           reseal: bool = False) -> Path:
    """A capture with the same members in the same order, the manifest replaced; its seal
    kept as it was (a damaged manifest) or made anew (a writer that got a field wrong)."""
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in members:
            if name == MANIFEST_MEMBER and manifest is not None:
                data = manifest
            if name == MANIFEST_SEAL_MEMBER and reseal:
                assert manifest is not None
                data = hashlib.sha256(manifest).hexdigest().encode() + b"\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out


def manifest_of(members: list[tuple[str, bytes]]) -> dict[str, Any]:
    return json.loads(dict(members)[MANIFEST_MEMBER])


def restore_cli(capture: Path, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "builder.cli", "restore", "--yes", os.fspath(capture),
         os.fspath(target)],
        cwd=ROOT, text=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=300,
    )


def the_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mbrescue: error: ")]
    assert len(errors) == 1, result.stderr
    assert "restore complete" not in result.stdout
    return errors[0]


def blank_target(path: Path, size: int) -> Path:
    with open(path, "wb") as stream:
        stream.truncate(size)
    return path


@pytest.fixture(scope="module")
def members_a(captures) -> list[tuple[str, bytes]]:
    return members_of(captures["A"])


# -- the digit that once steered a swap header to the wrong sector --------------------------


def with_swap_start(manifest: dict[str, Any], start: int, *, layout_too: bool) -> bytes:
    """The swap record moved to `start`; with `layout_too` its partition as well (kept
    inside the disk), so the manifest agrees with itself but not with the captured MBR."""
    changed = copy.deepcopy(manifest)
    swap = changed["swap"][0]
    moved_by = start - swap["start_lba"]
    swap["start_lba"] = start
    if layout_too:
        swap["size_sectors"] -= moved_by
        for part in changed["layout"]["partitions"]:
            if part["number"] == swap["partition"]:
                part["start_lba"], part["size_sectors"] = start, swap["size_sectors"]
    return json.dumps(changed, indent=1).encode() + b"\n"


@pytest.mark.parametrize(
    ("start", "reseal", "layout_too", "reason"),
    [
        (171135, False, False, "checksum mismatch in manifest.json"),
        (171135, True, False, "swap[0].start_lba is invalid"),
        (131136, True, True, "disagrees with the partition table in the region"),
    ],
    ids=["damaged", "resealed-swap-only", "resealed-consistent"],
)
def test_changed_swap_start_is_refused_before_any_write(fixtures, members_a, tmp_path, start,
                                                        reseal, layout_too, reason):
    """Issue 7: partition 2's start 131135 -> 171135 wrote a swap header at 171135 and only
    then failed the verification. Now it is refused with nothing written, whether the seal
    is left (damage) or made anew (a wrong writer)."""
    manifest = manifest_of(members_a)
    assert manifest["swap"][0]["start_lba"] == 131135
    bad = repack(members_a, tmp_path / "bad.mbrescue",
                 manifest=with_swap_start(manifest, start, layout_too=layout_too), reseal=reseal)
    target = blank_target(tmp_path / "target.img", fixtures["A"].path.stat().st_size)
    before = sha256_of(target)
    assert reason in the_error(restore_cli(bad, target))
    assert sha256_of(target) == before


# -- hostile manifests: one line naming the field, nothing written -----------------------------


def _set(path: str, value: Any):
    def change(manifest: dict[str, Any]) -> Any:
        *parents, last = path.split(".")
        node: Any = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
        return manifest
    return change


def _drop(path: str):
    def change(manifest: dict[str, Any]) -> Any:
        *parents, last = path.split(".")
        node: Any = manifest
        for key in parents:
            node = node[key]
        del node[last]
        return manifest
    return change


HOSTILE = {
    "a JSON list": (lambda m: [m], "not a capture file"),
    "no source": (_drop("source"), "field source is invalid: missing"),
    "size as text": (_set("source.size_bytes", "big"), "source.size_bytes is invalid"),
    "odd sector size": (_set("source.logical_sector_bytes", 1000), "logical_sector_bytes"),
    "region past the disk": (_set("region.end_lba", 1 << 40), "region.end_lba is invalid"),
    "chunk list short": (lambda m: {**m, "region": {**m["region"], "chunks": m["region"]["chunks"][:-1]}},
                         "region.chunks is invalid"),
    "negative LBA": (_set("layout.partitions.0.start_lba", -5), "layout.partitions[0].start_lba"),
    "partition past the disk": (_set("layout.partitions.1.size_sectors", 1 << 40),
                                "layout.partitions[1].size_sectors"),
    "boolean as number": (_set("boot_partition", True), "boot_partition is invalid"),
    "swap UUID not a UUID": (_set("swap.0.uuid", "x" * 36), "swap[0].uuid is invalid"),
    "boot chain unknown": (_set("boot_chain", [9]), "boot_chain is invalid"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_manifest_is_refused_naming_the_field(fixtures, members_a, tmp_path, case):
    change, reason = HOSTILE[case]
    manifest = change(manifest_of(members_a))
    bad = repack(members_a, tmp_path / "bad.mbrescue",
                 manifest=json.dumps(manifest).encode(), reseal=True)
    target = blank_target(tmp_path / "target.img", fixtures["A"].path.stat().st_size)
    before = sha256_of(target)
    assert reason in the_error(restore_cli(bad, target))
    assert sha256_of(target) == before


def test_non_hex_ebr_is_refused(captures, tmp_path):
    members = members_of(captures["B"])
    manifest = manifest_of(members)
    manifest["ebrs"][0]["hex"] = "zz" * 512
    bad = repack(members, tmp_path / "bad.mbrescue", manifest=json.dumps(manifest).encode(),
                 reseal=True)
    with pytest.raises(MbrescueError, match=r"ebrs\[0\]\.hex is invalid"):
        Capture.open(str(bad))


def test_old_capture_without_seal_is_refused(members_a, tmp_path):
    old = repack([(n, d) for n, d in members_a if n != MANIFEST_SEAL_MEMBER],
                 tmp_path / "old.mbrescue")
    with pytest.raises(MbrescueError, match="must be taken again"):
        Capture.open(str(old))


# -- a gzip member that inflates far past its chunk --------------------------------------------


def test_region_member_that_inflates_to_a_gibibyte_is_refused_in_bounded_memory(members_a,
                                                                                tmp_path):
    """A hostile capture: one 1 MiB chunk whose member, checksums all made to match, holds
    1 GiB of zeros. The reader stops one byte past the chunk; under a 400 MiB data limit
    the old whole-member inflate could not even allocate it."""
    packer = zlib.compressobj(9, zlib.DEFLATED, GZIP_WBITS)
    bomb = b"".join(packer.compress(bytes(64 * MiB)) for _ in range(16)) + packer.flush()
    assert len(bomb) < 2 * MiB
    manifest = manifest_of(members_a)
    region = manifest["region"]
    region["chunks"][0] = len(bomb)
    region["chunk_sha256"][0] = hashlib.sha256(bomb).hexdigest()
    region["compressed_bytes"] = sum(region["chunks"])
    regions = dict(members_a)[REGION_MEMBER]
    first = manifest_of(members_a)["region"]["chunks"][0]
    members = [(n, bomb + regions[first:] if n == REGION_MEMBER else d) for n, d in members_a]
    bad = repack(members, tmp_path / "bomb.mbrescue", manifest=json.dumps(manifest).encode(),
                 reseal=True)
    limit = 400 * MiB
    result = subprocess.run(
        ["prlimit", f"--data={limit}", "--", sys.executable, "-m", "builder.runner", "restore",
         "--yes", os.fspath(bad), os.fspath(blank_target(tmp_path / "t.img", 96 * MiB))],
        cwd=ROOT, text=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=120,
    )
    assert "region chunk 0 is corrupt (inflates to more than" in the_error(result)


# -- property: any manifest value gives a Manifest or the one-line error -----------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node[:3]):
            found += _paths(value, (*prefix, index))
    return found


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_manifest_parser_gives_a_manifest_or_one_error(members_a, data):
    manifest = manifest_of(members_a)
    manifest["region"]["chunks"] = manifest["region"]["chunks"][:3]
    manifest["region"]["chunk_sha256"] = manifest["region"]["chunk_sha256"][:3]
    for _ in range(data.draw(st.integers(1, 4))):
        paths = [p for p in _paths(manifest) if p]
        path = data.draw(st.sampled_from(paths))
        node: Any = manifest
        for key in path[:-1]:
            node = node[key]
        if data.draw(st.booleans()) and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = data.draw(JSON)
    try:
        parse_manifest(manifest)
    except MbrescueError as exc:
        assert "\n" not in str(exc)


@given(st.binary(max_size=4096))
def test_capture_reader_gives_a_capture_or_one_error_on_any_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "x.mbrescue"
    path.write_bytes(raw)
    try:
        Capture.open(str(path)).close()
    except MbrescueError as exc:
        assert "\n" not in str(exc)


# -- a restore stopped by a real write error never looks healthy -------------------------------


def test_interrupted_restore_never_looks_healthy(fixtures, captures, tmp_path):
    """The target held a healthy copy of the host before. The restore's third pwritev gets
    EIO (strace's fault injection into the real process): sector 0 and the /boot superblock
    must not be there, so the ISO's boot-time probe cannot find the captured /boot. A rerun
    without the fault completes, and then they are."""
    fx = fixtures["A"]
    size = fx.path.stat().st_size
    target = blank_target(tmp_path / "target.img", size)
    assert restore_cli(captures["A"], target).returncode == 0
    boot_offset = 63 * 512
    assert fx.boot_fs_uuid in sh("blkid", "-p", "-O", str(boot_offset), target)

    # Counters are per system call: the first two 8 MiB pwritev groups land, the third
    # and the runner's sector-by-sector retry (pwrite64, after the two blanking writes) fail.
    result = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=pwritev,pwrite64",
         "-e", "inject=pwritev:error=EIO:when=3+", "-e", "inject=pwrite64:error=EIO:when=3+",
         sys.executable, "-m", "builder.runner", "restore", "--yes", os.fspath(captures["A"]),
         os.fspath(target)],
        cwd=ROOT, text=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=300,
    )
    error = the_error(result)
    assert "write error on" in error
    assert int(re.search(r"at sector (\d+)", error)[1]) * 512 >= 16 * MiB, error  # type: ignore[index]
    with open(target, "rb") as disk:
        assert disk.read(512) == bytes(512)
    probe = subprocess.run(["blkid", "-p", "-O", str(boot_offset), os.fspath(target)],
                           capture_output=True, text=True)
    assert fx.boot_fs_uuid not in probe.stdout

    assert restore_cli(captures["A"], target).returncode == 0
    assert fx.boot_fs_uuid in sh("blkid", "-p", "-O", str(boot_offset), target)
    region = fx.region_end_sectors * 512
    assert sha256_of(target, region) == sha256_of(fx.path, region)


# -- outputs and names that are not what they seem ------------------------------------------


def cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.cli", *map(os.fspath, args)], cwd=ROOT,
                          text=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)


def test_a_fifo_as_capture_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "capture.fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in the_error(cli("inspect", fifo))


def test_capture_never_renames_over_a_device_node(fixtures, tmp_path):
    """A copy of a real device node (/dev/null's numbers): the temporary output renamed
    over it would have replaced the node with a regular file."""
    node = tmp_path / "node"
    sh("mknod", node, "c", "1", "3")
    assert "it is a character device" in the_error(cli("capture", fixtures["A"].path, "-o", node))
    assert node.is_char_device()


def test_host_name_that_is_a_path_is_refused(fixtures, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    error = the_error(cli("capture", fixtures["A"].path, "-o", out, "--hostname", "../../x"))
    assert "is not a host name" in error
    assert list(out.iterdir()) == []


def test_manifest_host_name_that_is_a_path_is_refused(members_a, tmp_path):
    manifest = manifest_of(members_a)
    manifest["hostname"] = "../../etc/x"
    bad = repack(members_a, tmp_path / "bad.mbrescue", manifest=json.dumps(manifest).encode(),
                 reseal=True)
    assert "field hostname is invalid" in the_error(cli("inspect", bad))


def test_capture_age_in_words():
    from builder.runner.plan import capture_age

    taken = "2026-10-21T08:00:00Z"
    day = 86400
    base = 1792569600  # 2026-10-21T08:00:00Z
    assert capture_age(taken, base + 41 * day + 5) == "captured 41 days ago"
    assert capture_age(taken, base + 5 * 3600) == "captured 5 hours ago"
    assert capture_age(taken, base + 30) == "captured just now"
    assert "clock" in capture_age(taken, base - 3600)
    assert capture_age("yesterday", base) == "age unknown"


def capture_member(path, name: str) -> bytes:
    with tarfile.open(path) as archive:
        member = archive.extractfile(name)
        assert member is not None
        return member.read()


def test_rescue_refuses_a_capture_that_is_not_the_one_built(captures, tmp_path):
    """The build records the capture file's SHA-256 beside it in the payload; the rescue
    system compares before anything else. A capture swapped or damaged in the payload is
    refused even if it is itself a sound capture (here: fixture B's instead of A's)."""
    from builder.runner import restore as runner
    from builder.runner.cmdline import Switches
    from builder.runner.console import Console

    options = tmp_path / "options.json"
    options.write_text(json.dumps({"unattended_allowed": False,
                                   "capture_sha256": sha256_of(captures["A"])}))
    console = Console.from_fds([os.open(os.devnull, os.O_RDWR)])
    with pytest.raises(MbrescueError, match="not the one the ISO was built with"):
        runner.restore(str(captures["B"]), None, console=console, rescue=True, disks=[],
                       switches=Switches(), options_path=str(options))
    # The right one passes that check and goes on to look for disks (none given here).
    with pytest.raises(MbrescueError, match="no disk can take the region"):
        runner.restore(str(captures["A"]), None, console=console, rescue=True, disks=[],
                       switches=Switches(), options_path=str(options))
    # Today's builds record the manifest's seal: compared at once, no pass over the file.
    with Capture.open(str(captures["A"])) as capture:
        seal = capture.manifest_sha256
    assert seal == hashlib.sha256(capture_member(captures["A"], "manifest.json")).hexdigest()
    options.write_text(json.dumps({"capture_sha256": "0" * 64, "manifest_sha256": seal}))
    with pytest.raises(MbrescueError, match="not the one the ISO was built with"):
        runner.restore(str(captures["B"]), None, console=console, rescue=True, disks=[],
                       switches=Switches(), options_path=str(options))
    with pytest.raises(MbrescueError, match="no disk can take the region"):
        runner.restore(str(captures["A"]), None, console=console, rescue=True, disks=[],
                       switches=Switches(), options_path=str(options))
