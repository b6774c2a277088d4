"""Which disks the rescue mode offers, on real images: a real rescue ISO of another host
(built by the CLI) written onto a loop "stick" is never offered, whatever the kernel command
line says; removable disks come after fixed ones; unattended mode needs an identified disk."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pycdlib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.runner import restore as runner
from builder.runner.capfile import Capture
from builder.runner.cmdline import Switches
from builder.runner.console import Console
from builder.runner.disk import DiskInfo
from builder.runner.errors import MbrescueError
from builder.runner.targets import (
    Candidate,
    order_key,
    removable_note,
    rescue_medium,
    unattended_choice,
)

from .conftest import loop_device, mbrescue, one_error_line, read_until, sh, sha256_of

MiB = 1 << 20


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("targets")


@pytest.fixture(scope="module")
def capture_a(fixtures, work) -> Path:
    out = work / "host-a.mbrescue"
    result = mbrescue("capture", fixtures["A"].path, "-o", out, "--hostname", "host-a")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def other_host_iso(fixtures, work) -> Path:
    """A real rescue ISO for another host (fixture B as `otherhost`), built by the CLI."""
    capture = work / "otherhost.mbrescue"
    result = mbrescue("capture", fixtures["B"].path, "-o", capture, "--hostname", "otherhost")
    assert result.returncode == 0, result.stderr
    iso = work / "otherhost.iso"
    result = mbrescue("build", capture, "-o", iso)
    assert result.returncode == 0, result.stderr
    return iso


def medium_id_of(iso: Path) -> str:
    """The medium id as an independent reader (pycdlib) sees it in the volume set id."""
    reader = pycdlib.PyCdlib()
    reader.open(os.fspath(iso))
    try:
        volume_set = reader.pvd.volume_set_identifier.decode().strip()
    finally:
        reader.close()
    assert volume_set.startswith("MBRESCUE "), volume_set
    return volume_set.split()[1]


def image(path: Path, size_bytes: int, content: bytes = b"") -> Path:
    with open(path, "wb") as stream:
        stream.write(content)
        stream.truncate(max(size_bytes, len(content)))
    return path


def test_no_rescue_medium_is_ever_offered(fixtures, capture_a, other_host_iso, work, tmp_path):
    """Another host's stick (the ISO dd'ed onto a larger disk), the same ISO with its volume
    ids wiped (only the /MBRESCUE/ID_ file left) and a plain data ISO, without any
    `mbrescue.medium=`: both rescue media are refused with their reason, the data ISO and a
    blank disk are offered."""
    iso_bytes = other_host_iso.read_bytes()
    medium_id = medium_id_of(other_host_iso)
    stick = image(tmp_path / "stick.img", 128 * MiB, iso_bytes)
    wiped_bytes = bytearray(iso_bytes)
    pvd = 16 * 2048
    wiped_bytes[pvd + 190 : pvd + 318] = b" " * 128  # volume set id
    wiped_bytes[pvd + 574 : pvd + 702] = b" " * 128  # application id
    wiped = image(tmp_path / "wiped.img", 64 * MiB, bytes(wiped_bytes))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("not a rescue medium\n")
    plain_iso = tmp_path / "plain.iso"
    sh("xorriso", "-as", "mkisofs", "-quiet", "-V", "MBRESCUE_LOOKALIKE", "-o", plain_iso,
       tmp_path / "data")
    plain = image(tmp_path / "plain.img", fixtures["A"].path.stat().st_size,
                  plain_iso.read_bytes())
    blank = image(tmp_path / "blank.img", fixtures["A"].path.stat().st_size)
    before = {path: sha256_of(path) for path in (stick, wiped, plain, blank)}
    capture = Capture.open(str(capture_a))
    with (loop_device(stick) as stick_dev, loop_device(wiped) as wiped_dev,
          loop_device(plain) as plain_dev, loop_device(blank) as blank_dev):
        found = runner.rescue_candidates(capture, runner.RegionHead(capture), None)
        by_path = {candidate.disk.path: (candidate, plan) for candidate, plan in found}
        assert by_path[stick_dev][0].refusal == (
            f"it is an mbrescue rescue medium (OTHERHOST, medium id {medium_id})")
        assert by_path[wiped_dev][0].refusal == (
            f"it is an mbrescue rescue medium (OTHERHOST, medium id {medium_id})")
        for offered in (plain_dev, blank_dev):
            assert by_path[offered][0].refusal is None and by_path[offered][1] is not None
        # Named by mbrescue.target=, the stick is still refused; nothing is asked.
        console = Console.from_fds([os.open(os.devnull, os.O_RDWR)])
        with pytest.raises(MbrescueError, match=f"refusing {stick_dev}: it is an mbrescue "):
            runner.restore(str(capture_a), None, console=console, rescue=True,
                           switches=Switches(target=stick_dev),
                           options_path=str(tmp_path / "absent.json"))
        # The CLI refuses a rescue medium as TARGET too, even with --yes.
        line = one_error_line(mbrescue("restore", capture_a, stick_dev, "--yes"))
        assert "it is an mbrescue rescue medium (OTHERHOST" in line
    line = one_error_line(mbrescue("restore", capture_a, other_host_iso, "--yes"))
    assert f"medium id {medium_id})" in line
    assert {path: sha256_of(path) for path in before} == before


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pvd_tail=st.binary(min_size=2042, max_size=2042), directory=st.binary(max_size=6144),
       directory_lba=st.integers(0, 40), block_bytes=st.sampled_from([512, 2048, 7]))
def test_rescue_medium_survives_any_volume_descriptor(tmp_path, pvd_tail, directory,
                                                      directory_lba, block_bytes):
    """A disk's bytes are not ours: any PVD and directory give a description or None."""
    pvd = bytearray(b"\x01CD001" + pvd_tail[:2041])
    pvd[128:130] = block_bytes.to_bytes(2, "little")
    pvd[156 + 2 : 156 + 6] = directory_lba.to_bytes(4, "little")
    pvd[156 + 10 : 156 + 14] = (len(directory) + pvd_tail[-1] * 64).to_bytes(4, "little")
    path = tmp_path / "disk.img"
    with open(path, "wb") as stream:
        stream.truncate(18 * 2048)
        stream.seek(16 * 2048)
        stream.write(pvd)
        stream.seek(18 * 2048)
        stream.write(directory)
    found = rescue_medium(str(path))
    assert found is None or isinstance(found, str)


def disk(path: str, size_bytes: int, removable: bool = False, usb: bool = False,
         serial: str | None = None) -> DiskInfo:
    return DiskInfo(path, "block", size_bytes, 512, 512, serial=serial, removable=removable,
                    on_usb=usb)


def test_removable_disks_are_marked_and_ranked_after_fixed_ones():
    same = 100 * MiB
    candidates = [
        Candidate(disk("/dev/sda", same, removable=True, usb=True), 1, "same size"),
        Candidate(disk("/dev/sdb", same, removable=True), 1, "same size"),
        Candidate(disk("/dev/vdb", 4 * same), 2, "large enough"),
        Candidate(disk("/dev/vda", same), 1, "same size"),
        Candidate(disk("/dev/sdc", 2 * same, usb=True, removable=True, serial="S1"), 0,
                  "same serial/WWN"),
    ]
    ordered = [c.disk.path for c in sorted(candidates, key=order_key)]
    # The identity match first even on USB (a host that boots from an internal stick);
    # then fixed disks by rank; removable ones last.
    assert ordered == ["/dev/sdc", "/dev/vda", "/dev/vdb", "/dev/sda", "/dev/sdb"]
    assert removable_note(candidates[0].disk) == "removable (USB)"
    assert removable_note(candidates[1].disk) == "removable"
    assert removable_note(candidates[2].disk) == ""


def test_unattended_takes_only_the_identity_match():
    fits = Candidate(disk("/dev/vda", 100 * MiB), 2, "large enough")
    same_size = Candidate(disk("/dev/vdb", 50 * MiB), 1, "same size")
    known = Candidate(disk("/dev/vdc", 50 * MiB, serial="WD-1"), 0, "same serial/WWN")
    assert unattended_choice([fits, known, same_size]) is known
    assert unattended_choice([fits, same_size]) is None
    assert unattended_choice([fits]) is None  # alone, merely large enough: not proof


def test_unattended_lone_large_enough_disk_asks(fixtures, capture_a, tmp_path):
    """Opted in, `mbrescue.unattended=1`, one blank disk larger than the captured one and
    no identity match: the runner says why it does not proceed and asks; `no` writes
    nothing."""
    options = tmp_path / "options.json"
    options.write_text('{"unattended_allowed": true}')
    target = image(tmp_path / "lone.img", fixtures["A"].path.stat().st_size + 16 * MiB)
    before = sha256_of(target)
    master, slave = os.openpty()
    result: list[object] = []
    with loop_device(target) as device:
        console = Console.from_fds([slave])

        def job() -> None:
            try:
                result.append(runner.restore(str(capture_a), None, console=console,
                                             rescue=True, disks=[device],
                                             switches=Switches(unattended=True),
                                             options_path=str(options)))
            except MbrescueError as exc:
                result.append(str(exc))

        worker = threading.Thread(target=job)
        worker.start()
        try:
            shown = read_until(master, b"Type yes to write ", timeout=120)
            os.write(master, b"no\n")
            worker.join(60)
        finally:
            os.close(master)
            os.close(slave)
    assert b"mbrescue.unattended=1 ignored: no disk has the captured serial/WWN" in shown
    assert f"Target {device}:".encode() in shown
    assert result == ["aborted, nothing written"]
    assert sha256_of(target) == before
