"""`build --serial PORT,SPEED`: GRUB's terminal and the rescue kernel's console on the port a
server's serial-over-LAN uses (often the second). The real ISO is booted under SeaBIOS with
only that port connected: GRUB's menu, the plan and the prompt appear there, `yes` typed
there restores the blank disk (issue 19)."""

from __future__ import annotations

import pytest

from builder import grub
from builder.runner.errors import MbrescueError
from builder.vm import Disk, Vm, VmConfig

from .conftest import mbrescue

VALUES = dict(host="web01", captured_at="2026-01-02T03:04:05Z", region_size="64.0 MiB",
              boot_fs_uuid="0a0a0a0a-b007-4a00-8000-00000000000a", medium_id="abc123")


def test_serial_port_reaches_grub_and_the_kernel():
    text = grub.render_grub_cfg(**VALUES, serial=grub.parse_serial("ttyS1,57600"))
    assert "serial --unit=1 --speed=57600" in text
    assert "console=ttyS1,57600n8" in text and "ttyS0" not in text
    assert "serial --unit=0 --speed=115200" in grub.render_grub_cfg(**VALUES)


@pytest.mark.parametrize("text", ["ttyS9", "ttyS1,1234", "com2", "ttyS1,115200,8n1", ""])
def test_a_bad_serial_option_is_one_line(text, tmp_path):
    with pytest.raises(MbrescueError, match="is not PORT"):
        grub.parse_serial(text)
    result = mbrescue("build", tmp_path / "none.mbrescue", "--serial", text or " ")
    assert result.returncode != 0 and "Traceback" not in result.stderr


@pytest.mark.qemu
def test_the_iso_talks_on_the_second_port(fixtures, captures, tmp_path):
    iso = tmp_path / "a-ttyS1.iso"
    built = mbrescue("build", captures["A"], "-o", iso, "--serial", "ttyS1,115200")
    assert built.returncode == 0, built.stderr
    target = tmp_path / "blank.img"
    with open(target, "wb") as stream:
        stream.truncate(fixtures["A"].path.stat().st_size)
    config = VmConfig(disks=[Disk(iso, interface="cdrom", readonly=True),
                             Disk(target, serial="BLANK-SOL")],
                      boot_order="d", serial_port=1, memory_mib=768)
    with Vm(config, tmp_path / "serial.log") as vm:
        vm.expect(r"mbrescue: rescue medium for host", 120)
        vm.expect(r"Type yes to write (/dev/\w+) \(", 400)
        vm.send("yes\r")
        vm.expect(r"mbrescue: restore complete", 400)
    assert "Traceback" not in vm.output
