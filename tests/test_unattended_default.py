"""`build --allow-unattended --unattended-default SECONDS`: a remote dead machine restores
with nobody at it. GRUB starts the unattended entry after a visible countdown when the
host's /boot is on no disk; the rescue system writes only a disk with the captured serial
(a disk that is merely large enough stops at the prompt), then reboots by itself, and the
medium, still inserted, boots the restored disk (issue 19). Real ISO, SeaBIOS, no input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from builder.runner import capfile
from builder.runner.capfile import Capture
from builder.vm import Disk, Vm, VmConfig

from .conftest import mbrescue

SERIAL = "MBRESCUE-SOURCE-7"


def with_serial(capture: Path, out: Path, serial: str) -> Path:
    """The capture as taken from a disk with this serial (an image file records none)."""
    source = Capture.open(str(capture))
    manifest = json.loads(json.dumps(source.manifest.raw))
    manifest["source"]["serial"] = serial
    with open(out, "wb") as stream:
        tar = capfile.TarWriter(stream)
        for name, member in source.members.items():
            if name not in (capfile.MANIFEST_MEMBER, capfile.MANIFEST_SEAL_MEMBER):
                tar.add_bytes(name, source.pread(member.size, member.offset), 0)
        capfile.write_manifest(tar, manifest, 0)
        tar.close()
    source.close()
    return out


@pytest.fixture(scope="module")
def unattended_iso(captures, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unattended")
    capture = with_serial(captures["A"], folder / "a.mbrescue", SERIAL)
    iso = folder / "a-unattended.iso"
    built = mbrescue("build", capture, "-o", iso, "--allow-unattended",
                     "--unattended-default", "5")
    assert built.returncode == 0, built.stderr
    assert "RESTORE WITHOUT A PERSON" in built.stderr
    return iso


def blank(path: Path, size: int) -> Path:
    with open(path, "wb") as stream:
        stream.truncate(size)
    return path


def test_unattended_default_needs_the_opt_in(captures, tmp_path):
    result = mbrescue("build", captures["A"], "-o", tmp_path / "x.iso", "--unattended-default",
                      "5")
    assert result.returncode != 0 and "needs --allow-unattended" in result.stderr
    assert not (tmp_path / "x.iso").exists()


@pytest.mark.qemu
def test_restores_the_identified_disk_with_nobody_and_boots_it(fixtures, unattended_iso,
                                                               tmp_path):
    fx = fixtures["A"]
    target = blank(tmp_path / "disk.img", fx.path.stat().st_size)
    cd = Disk(unattended_iso, interface="cdrom", readonly=True)
    config = VmConfig(disks=[cd, Disk(target, serial=SERIAL)], boot_order="d", memory_mib=768)
    with Vm(config, tmp_path / "serial.log") as vm:
        vm.expect(r"UNATTENDED restore in 5 s", 120)
        vm.expect(r"mbrescue: unattended restore", 400)
        vm.expect(r"mbrescue: restore complete", 400)
        vm.expect(r"rebooting into the restored disk in \d+ s", 60)
        vm.wait_exit(120)  # -no-reboot: the reboot ends QEMU
    assert "Type yes" not in vm.output
    # The medium still inserted: its GRUB finds the restored /boot and boots the disk.
    config = VmConfig(disks=[cd, Disk(target, serial=SERIAL)], boot_order="d", memory_mib=512)
    with Vm(config, tmp_path / "second.log") as vm:
        vm.expect(r"Booting `Boot the first local disk'", 120)
        vm.expect(re.escape(fx.marker), 240)


@pytest.mark.qemu
def test_a_disk_that_only_fits_stops_at_the_prompt(fixtures, unattended_iso, tmp_path):
    target = blank(tmp_path / "other.img", fixtures["A"].path.stat().st_size)
    config = VmConfig(disks=[Disk(unattended_iso, interface="cdrom", readonly=True),
                             Disk(target, serial="SOME-OTHER-DISK")],
                      boot_order="d", memory_mib=768)
    with Vm(config, tmp_path / "serial.log") as vm:
        vm.expect(r"mbrescue\.unattended=1 ignored: no disk has the captured serial", 400)
        vm.expect(r"Type yes to write", 60)
    with open(target, "rb") as stream:
        assert not stream.read(1 << 20).strip(b"\0")
