"""`mbrescue capture` and `inspect`: fixtures A–D judged by independent tools, freezing, bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from builder.runner.capfile import Capture
from builder.runner.errors import MbrescueError

from .conftest import MBRESCUE, mbrescue, one_error_line, sh, sha256_of

MiB = 1 << 20


def small_msdos_image(path: Path, *, size_mib: int = 24, boot_start: int = 2048) -> Path:
    """msdos label, ext4 /boot at boot_start, swap after it: made by sfdisk, mke2fs, mkswap."""
    with open(path, "wb") as image:
        image.truncate(size_mib * MiB)
    sh("sfdisk", "-q", path, input_bytes=(f"label: dos\n{boot_start},16MiB,83,*\n,,82\n").encode())
    layout = json.loads(sh("sfdisk", "--json", path))["partitiontable"]["partitions"]
    boot, swap = layout
    sh(
        "mke2fs",
        "-q",
        "-F",
        "-t",
        "ext4",
        "-L",
        "tboot",
        "-U",
        "11111111-2222-3333-4444-555555555555",
        "-E",
        f"offset={boot['start'] * 512}",
        path,
        f"{boot['size'] // 2}k",
    )
    swap_file = path.with_suffix(".swap")
    with open(swap_file, "wb") as f:
        f.truncate(swap["size"] * 512)
    sh("mkswap", "-L", "tswap", "-U", "66666666-7777-8888-9999-aaaaaaaaaaaa", swap_file)
    sh(
        "dd",
        f"if={swap_file}",
        f"of={path}",
        "bs=512",
        f"seek={swap['start']}",
        "conv=notrunc",
        "status=none",
    )
    swap_file.unlink()
    return path


def capture_of_mounted_boot(work: Path, fill):
    """small_msdos_image's /boot mounted from a loop device, `fill(mountpoint)` run on it,
    then captured while mounted (so frozen): (the CaptureResult, what fill returned)."""
    from builder.capture import CaptureOptions, capture

    image = small_msdos_image(work / "host.img")
    loop = sh("losetup", "-f", "--show", "-o", str(2048 * 512), "--sizelimit", str(16 * MiB),
              image).strip()
    mnt = work / "boot"
    mnt.mkdir()
    try:
        sh("mount", loop, mnt)
        try:
            filled = fill(mnt)
            out = capture(CaptureOptions(source=image, output=work / "host.mbrescue",
                                         progress=False))
        finally:
            sh("umount", mnt)
    finally:
        sh("losetup", "-d", loop)
    assert out.manifest["frozen"] is True
    return out, filled


def blkid_at(image: Path, offset: int, size: int) -> dict[str, str]:
    loop = sh(
        "losetup", "-f", "--show", "-r", "-o", str(offset), "--sizelimit", str(size), image
    ).strip()
    try:
        probed = subprocess.run(["blkid", "-p", "-o", "export", loop], capture_output=True, text=True)
        # Exit status 2 is blkid's "nothing found" (e.g. a BIOS boot partition).
        assert probed.returncode in (0, 2), probed.stderr
        out = probed.stdout
    finally:
        sh("losetup", "-d", loop)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


# -- fixtures A–D --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["A", "B", "C", "D"])
def test_capture_fixture_region_and_manifest(fixtures, tmp_path, name):
    fx = fixtures[name]
    out = tmp_path / f"{name}.mbrescue"
    result = mbrescue("capture", fx.path, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "mode 0600" in result.stderr
    assert (out.stat().st_mode & 0o777) == 0o600
    capture = Capture.open(str(out))
    capture.verify()
    region = capture.manifest.raw["region"]
    # The region is what `dd if=IMG count=<region end>` gives, byte for byte.
    assert region["end_lba"] == fx.region_end_sectors
    assert region["length_bytes"] == fx.region_end_sectors * 512
    assert region["sha256"] == sha256_of(fx.path, region["length_bytes"])
    raw = b"".join(capture.region_chunks())
    assert len(raw) == region["length_bytes"]
    # The manifest agrees with sfdisk (msdos and GPT alike) on every partition.
    table = json.loads(sh("sfdisk", "--json", fx.path))["partitiontable"]
    manifest_parts = {p["number"]: p for p in capture.manifest.raw["layout"]["partitions"]}
    for part in table["partitions"]:
        number = int(part["node"].rsplit(fx.path.name, 1)[-1].lstrip("p"))
        mine = manifest_parts[number]
        assert mine["start_lba"] == part["start"], (number, mine)
        assert mine["size_sectors"] == part["size"], (number, mine)
        if fx.table == "gpt":
            assert mine["type"].lower() == part["type"].lower()
            assert mine["guid"].lower() == part["uuid"].lower()
        # ... and with blkid on every file system, label and UUID.
        if mine.get("is_extended"):
            continue
        probed = blkid_at(fx.path, part["start"] * 512, part["size"] * 512)
        fs = mine.get("fs") or {}
        assert fs.get("type") == probed.get("TYPE"), (number, fs, probed)
        assert (fs.get("uuid") or None) == probed.get("UUID"), (number, fs, probed)
        assert (fs.get("label") or None) == probed.get("LABEL"), (number, fs, probed)
    assert capture.manifest.raw["boot_partition"] == fx.boot_partition
    swaps = {s["partition"]: s for s in capture.manifest.raw["swap"]}
    assert swaps[fx.swap_partition]["label"] == fx.swap_label
    assert swaps[fx.swap_partition]["uuid"] == fx.swap_uuid
    if fx.table == "gpt":
        tail = capture.read_member("gpt-tail.bin")
        size = fx.path.stat().st_size
        assert (
            sha256_of(fx.path, 33 * 512, size - 33 * 512) == capture.manifest.raw["gpt_tail"]["sha256"]
        )
        assert len(tail) == 33 * 512
        assert sh("sgdisk", "-v", fx.path).count("No problems found") == 1
    # inspect reads it back for a person and as JSON.
    shown = mbrescue("inspect", out)
    assert shown.returncode == 0, shown.stderr
    assert region["sha256"] in shown.stdout and fx.swap_uuid in shown.stdout
    as_json = json.loads(mbrescue("inspect", "--json", out).stdout)
    assert as_json == capture.manifest.raw


def test_fixture_a_region_is_the_original_dd(fixtures, tmp_path):
    """The original story: the region ends exactly where the swap partition starts."""
    fx = fixtures["A"]
    out = tmp_path / "a.mbrescue"
    assert mbrescue("capture", fx.path, "-o", out).returncode == 0
    manifest = Capture.open(str(out)).manifest.raw
    swap = next(p for p in manifest["layout"]["partitions"] if p["number"] == 2)
    assert manifest["region"]["end_lba"] == swap["start_lba"]
    assert next(p for p in manifest["layout"]["partitions"] if p["number"] == 1)["start_lba"] == 63
    dd = tmp_path / "mbr_boot"
    sh("dd", f"if={fx.path}", f"of={dd}", "bs=512", f"count={swap['start_lba']}", "status=none")
    assert sha256_of(dd) == manifest["region"]["sha256"]
    # `zcat` of the region member gives the same bytes: standard tools can read a capture.
    with tarfile.open(out) as archive:
        member = archive.extractfile("region.img.gz")
        assert member is not None
        unpacked = subprocess.run(
            ["zcat"], input=member.read(), capture_output=True, check=True
        ).stdout
    assert unpacked == dd.read_bytes()


# -- a mounted /boot is frozen for the read -----------------------------------------------------


def test_mounted_boot_is_frozen_and_thawed(tmp_path):
    image = small_msdos_image(tmp_path / "host.img")
    loop = sh(
        "losetup", "-f", "--show", "-o", str(2048 * 512), "--sizelimit", str(16 * MiB), image
    ).strip()
    mnt = tmp_path / "boot"
    mnt.mkdir()
    try:
        sh("mount", loop, mnt)
        try:
            # Written, not synced: without the freeze these bytes sit in the page cache only.
            payload = os.urandom(300_000)
            (mnt / "initrd.img-new").write_bytes(payload)
            out = tmp_path / "host.mbrescue"
            result = mbrescue("capture", image, "-o", out)
            assert result.returncode == 0, result.stderr
            assert "froze" in result.stderr and "thawed" in result.stderr
            # Thawed: writing works at once, and a second thaw is refused as "not frozen".
            done = threading.Event()
            threading.Thread(target=lambda: ((mnt / "after").write_text("x"), done.set())).start()
            assert done.wait(10)
            again = subprocess.run(["fsfreeze", "--unfreeze", mnt], capture_output=True)
            assert again.returncode != 0
            capture = Capture.open(str(out))
            assert capture.manifest.raw["frozen"] is True
            # The capture holds a consistent file system with the unsynced file in it.
            region = tmp_path / "region.img"
            region.write_bytes(b"".join(capture.region_chunks()))
            boot_fs = tmp_path / "bootfs.img"
            sh("dd", f"if={region}", f"of={boot_fs}", "bs=512", "skip=2048", "status=none")
            sh("e2fsck", "-fn", boot_fs)
            dumped = tmp_path / "dumped"
            sh("debugfs", "-R", f"dump /initrd.img-new {dumped}", boot_fs)
            assert dumped.read_bytes() == payload
            # The file-level copy holds /boot's files, once: no second archive of the same
            # files beside it (it used to double a mounted /boot's share of the capture).
            with tarfile.open(fileobj=io.BytesIO(capture.read_member("files-p1.tar.gz"))) as files:
                assert "./initrd.img-new" in files.getnames() or \
                    "initrd.img-new" in files.getnames(), files.getnames()[:20]
            with pytest.raises(MbrescueError):
                capture.read_member("boot.tar.gz")
            boot_files = capture.manifest.boot_files
            assert boot_files.member is None and boot_files.file_count > 0
            assert "files-p1.tar.gz" in (boot_files.reason or ""), boot_files
        finally:
            subprocess.run(["fsfreeze", "--unfreeze", mnt], capture_output=True)
            sh("umount", mnt)
    finally:
        sh("losetup", "-d", loop)


def test_unmounted_capture_says_why_there_are_no_files(tmp_path):
    image = small_msdos_image(tmp_path / "host.img")
    out = tmp_path / "x.mbrescue"
    assert mbrescue("capture", image, "-o", out).returncode == 0
    files = Capture.open(str(out)).manifest.raw["boot_files"]
    assert files["member"] is None and "not mounted" in files["reason"]


def test_boot_partition_override(tmp_path):
    image = small_msdos_image(tmp_path / "host.img")
    out = tmp_path / "x.mbrescue"
    assert mbrescue("capture", image, "-o", out, "--boot-partition", "1").returncode == 0
    assert Capture.open(str(out)).manifest.raw["region"]["end_lba"] == 2048 + 16 * 2048


def test_capture_records_the_hosts_mac_addresses(tmp_path):
    """A block device is a disk of this machine: the MACs of its NICs with a device behind them
    (as `ip -d link` sees them) pick its network-boot menu. An image file records none;
    --mac sets them (normalised); a bad one is one error line."""
    links = json.loads(sh("ip", "-j", "-d", "link", "show"))
    nics = sorted({link["address"] for link in links if link.get("link_type") == "ether"
                   and link.get("parentbus") and link["address"] != "00:00:00:00:00:00"})
    assert nics, "this machine has no physical NIC to record"
    image = small_msdos_image(tmp_path / "host.img")
    loop = sh("losetup", "-f", "--show", "-r", image).strip()
    try:
        result = mbrescue("capture", loop, "-o", tmp_path / "block.mbrescue", "--hostname", "h")
    finally:
        sh("losetup", "-d", loop)
    assert result.returncode == 0, result.stderr
    assert Capture.open(str(tmp_path / "block.mbrescue")).manifest.macs == tuple(nics)
    assert mbrescue("capture", image, "-o", tmp_path / "file.mbrescue").returncode == 0
    assert Capture.open(str(tmp_path / "file.mbrescue")).manifest.macs == ()
    given = tmp_path / "given.mbrescue"
    result = mbrescue("capture", image, "-o", given, "--mac", "52-54-00-AB-CD-EF",
                      "--mac", "52:54:00:00:00:02")
    assert result.returncode == 0, result.stderr
    assert Capture.open(str(given)).manifest.macs == ("52:54:00:ab:cd:ef", "52:54:00:00:00:02")
    assert "MACs      52:54:00:ab:cd:ef, 52:54:00:00:00:02" in mbrescue("inspect", given).stdout
    for bad in ("52:54:00:ab:cd", "01:00:5e:00:00:01", "00:00:00:00:00:00"):
        assert "--mac" in one_error_line(mbrescue("capture", image, "-o", tmp_path / "bad",
                                                  "--mac", bad))
        assert not (tmp_path / "bad").exists()


# -- bad input: one line, non-zero, nothing left behind -----------------------------------------


def _no_leftovers(directory: Path) -> None:
    assert not [p for p in directory.iterdir() if ".tmp-" in p.name], list(directory.iterdir())


def test_missing_source(tmp_path):
    line = one_error_line(mbrescue("capture", tmp_path / "nope.img", "-o", tmp_path / "o"))
    assert "no such file" in line
    assert not (tmp_path / "o").exists()


def test_directory_source(tmp_path):
    assert "directory" in one_error_line(mbrescue("capture", tmp_path, "-o", tmp_path / "o"))


def test_file_shorter_than_a_sector(tmp_path):
    short = tmp_path / "short.img"
    short.write_bytes(b"\0" * 100)
    assert "sector" in one_error_line(mbrescue("capture", short, "-o", tmp_path / "o"))
    _no_leftovers(tmp_path)


def test_no_partition_table(tmp_path):
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * MiB)
    assert "partition table" in one_error_line(mbrescue("capture", blank, "-o", tmp_path / "o"))
    _no_leftovers(tmp_path)


def _gpt_image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(40 * MiB)
    sh(
        "sgdisk",
        "-o",
        "-n",
        "1:2048:+1M",
        "-t",
        "1:EF02",
        "-n",
        "2:0:+16M",
        "-t",
        "2:8300",
        "-n",
        "3:0:0",
        "-t",
        "3:8200",
        path,
    )
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={4096 * 512}", path, "16M")
    return path


def test_gpt_with_corrupt_primary_uses_backup(tmp_path):
    image = _gpt_image(tmp_path / "gpt.img")
    with open(image, "r+b") as f:
        f.seek(512 + 16)  # the primary header's CRC field
        f.write(b"\xde\xad\xbe\xef")
    out = tmp_path / "g.mbrescue"
    result = mbrescue("capture", image, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "backup" in result.stderr
    gpt = Capture.open(str(out)).manifest.raw["layout"]["gpt"]
    assert gpt["primary_valid"] is False and gpt["backup_valid"] is True and gpt["used"] == "backup"


def test_gpt_with_both_copies_corrupt_is_refused(tmp_path):
    image = _gpt_image(tmp_path / "gpt.img")
    size = image.stat().st_size
    with open(image, "r+b") as f:
        for header_at in (512, size - 512):
            f.seek(header_at + 16)
            f.write(b"\xde\xad\xbe\xef")
    line = one_error_line(mbrescue("capture", image, "-o", tmp_path / "g.mbrescue"))
    assert "GPT" in line
    _no_leftovers(tmp_path)


def test_boot_partition_that_does_not_exist(tmp_path):
    image = small_msdos_image(tmp_path / "host.img")
    line = one_error_line(mbrescue("capture", image, "-o", tmp_path / "o", "--boot-partition", "7"))
    assert "--boot-partition 7" in line
    _no_leftovers(tmp_path)


def test_unreadable_source(tmp_path):
    image = small_msdos_image(tmp_path / "host.img")
    image.chmod(0o600)
    tmp_path.chmod(0o755)
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            *MBRESCUE,
            "capture",
            image,
            "-o",
            "/tmp/never",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert "permission denied" in one_error_line(result)


def test_output_that_cannot_be_written(tmp_path):
    image = small_msdos_image(tmp_path / "host.img")
    line = one_error_line(mbrescue("capture", image, "-o", tmp_path / "missing-dir" / "x.mbrescue"))
    assert "cannot write" in line


def test_full_disk_removes_the_partial_file(tmp_path):
    image = small_msdos_image(tmp_path / "host.img")
    # Random /boot content that does not compress, so it cannot fit the small file system.
    sh(
        "dd",
        "if=/dev/urandom",
        f"of={image}",
        "bs=1M",
        "seek=2",
        "count=12",
        "conv=notrunc",
        "status=none",
    )
    full = tmp_path / "full"
    full.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", full)
    try:
        line = one_error_line(
            mbrescue("capture", image, "-o", full / "x.mbrescue", "--boot-partition", "1")
        )
        assert "no space left" in line
        assert list(full.iterdir()) == []
    finally:
        sh("umount", full)


# -- regions and members over 8 GiB (ustar's octal size field stops at 8 GiB - 1) ---------------

GiB = 1 << 30


def _tar_listing(path: Path) -> dict[str, int]:
    """`tar tvf` as an independent reader: member name -> size."""
    listing = sh("tar", "tvf", path)
    sizes = {}
    for line in listing.splitlines():
        fields = line.split()
        sizes[fields[5]] = int(fields[2])
    return sizes


def test_capture_of_a_9_gib_region(tmp_path):
    """A sparse 9 GiB /boot partition (no file system: --boot-partition): the whole region."""
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(9 * GiB + 64 * MiB)
    sh("sfdisk", "-q", image, input_bytes=b"label: dos\n2048,9GiB,83,*\n,,82\n")
    with open(image, "r+b") as f:  # some data at both ends of the partition
        f.seek(2048 * 512)
        f.write(os.urandom(MiB))
        f.seek(2048 * 512 + 9 * GiB - MiB)
        f.write(os.urandom(MiB))
    out = tmp_path / "big.mbrescue"
    result = mbrescue("capture", image, "-o", out, "--boot-partition", "1", timeout=600)
    assert result.returncode == 0, result.stderr
    region_bytes = (2048 + 9 * 2048 * 1024) * 512
    with Capture.open(str(out)) as capture:
        assert capture.region.length_bytes == region_bytes > 8 * GiB
        assert capture.manifest.raw["region"]["length_bytes"] == region_bytes
        member = capture.members["region.img.gz"]
        assert member.size == sum(capture.manifest.raw["region"]["chunks"])
        # The last chunk holds the random MiB at the partition's end, as the source does.
        chunks = capture.manifest.raw["region"]["chunks"]
        assert len(chunks) == region_bytes // MiB
        *_, last = capture.compressed_chunks()
        with open(image, "rb") as source:
            source.seek(region_bytes - MiB)
            assert capture.unpack(len(chunks) - 1, last) == source.read(MiB)
    with tarfile.open(out) as archive:
        sizes = {info.name: info.size for info in archive}
    assert sizes["region.img.gz"] == member.size
    assert _tar_listing(out) == sizes


def test_tar_member_over_8_gib_reads_back(tmp_path):
    """capfile.TarWriter's GNU header: a sparse 9 GiB member, then one after it, both read right."""
    from builder.runner.capfile import TarWriter

    path = tmp_path / "big.tar"
    size = 9 * GiB + 12345
    with open(path, "w+b") as out:
        tar = TarWriter(out)
        with tar.member("big.bin", 0) as stream:
            stream.seek(size - 1, os.SEEK_CUR)
            stream.write(b"\x01")
        tar.add_bytes("after.txt", b"after\n", 0)
        tar.close()
    with tarfile.open(path) as archive:
        infos = {info.name: info for info in archive}
        assert infos["big.bin"].size == size
        after = archive.extractfile("after.txt")
        assert after is not None and after.read() == b"after\n"
    assert _tar_listing(path) == {"big.bin": size, "after.txt": 6}
