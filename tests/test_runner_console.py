"""The runner's consoles on real pseudo-terminals, and the kernel command line switches."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from builder.runner.cmdline import parse_switches, split_cmdline, unattended_allowed
from builder.runner.console import Console, console_device, parse_proc_consoles
from builder.runner.errors import MbrescueError

from .conftest import read_until


@pytest.fixture
def two_ptys():
    """Two consoles as the rescue system has them (think ttyS0 and tty1)."""
    pairs = [os.openpty() for _ in range(2)]
    yield pairs
    for master, slave in pairs:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("answering", [0, 1])
def test_plan_on_every_console_answer_from_either(two_ptys, answering):
    console = Console.from_fds([slave for _, slave in two_ptys])
    answer: list[str | None] = []
    asker = threading.Thread(target=lambda: answer.append(console.ask("Type yes to write: ")))
    console.say("Target /dev/vda: QEMU HARDDISK")
    asker.start()
    for master, _ in two_ptys:
        seen = read_until(master, b"Type yes to write: ", timeout=10)
        # The tty's output processing turns \n into \r\n, as on a real serial console.
        assert b"Target /dev/vda: QEMU HARDDISK\r\n" in seen
    os.write(two_ptys[answering][0], b"yes\n")
    asker.join(10)
    assert answer == ["yes"]


def test_partial_lines_are_not_answers(two_ptys):
    console = Console.from_fds([slave for _, slave in two_ptys])
    answer: list[str | None] = []
    asker = threading.Thread(target=lambda: answer.append(console.ask("? ")))
    asker.start()
    read_until(two_ptys[0][0], b"? ", timeout=10)
    # Canonical mode hands over complete lines only: typing on one console without Enter
    # while the other answers must not mix the two.
    os.write(two_ptys[0][0], b"ye")
    time.sleep(0.2)
    assert asker.is_alive()
    os.write(two_ptys[1][0], b"no\n")
    asker.join(10)
    assert answer == ["no"]


def test_ask_times_out_with_none(two_ptys):
    console = Console.from_fds([slave for _, slave in two_ptys])
    assert console.ask("? ", timeout=0.3) is None


def test_error_and_progress_on_every_console(two_ptys):
    console = Console.from_fds([slave for _, slave in two_ptys])
    progress = console.progress("writing", 100 << 20)
    progress.advance(50 << 20)
    progress.advance(50 << 20)
    progress.finish()
    console.error("aborted, nothing written")
    for master, _ in two_ptys:
        seen = read_until(master, b"nothing written\r\n", timeout=10)
        assert b"writing: 100.0% of 100.0 MiB" in seen
        assert b"MB/s, ETA" in seen
        assert b"mbrescue: error: aborted, nothing written\r\n" in seen


def test_a_dead_console_does_not_stop_the_others(two_ptys):
    console = Console.from_fds([slave for _, slave in two_ptys])
    os.close(two_ptys[0][0])
    two_ptys[0] = (os.open("/dev/null", os.O_RDONLY), two_ptys[0][1])
    console.say("mbrescue: restore complete")
    assert b"restore complete" in read_until(two_ptys[1][0], b"complete\r\n", timeout=10)


def test_proc_consoles_parsing():
    text = ("ttyS0                -W- (EC p a)    4:64\n"
            "tty0                 -WU (E  p  )    4:1\n")
    assert parse_proc_consoles(text) == [("ttyS0", 4, 64), ("tty0", 4, 1)]
    # The numbers name the device; sysfs knows its /dev name (tty0 is reported as tty1).
    assert console_device("tty0", 4, 1) == "/dev/tty1"
    assert console_device("ttyS0", 4, 64) == "/dev/ttyS0"


def test_kernel_command_line_switches(tmp_path):
    line = ('BOOT_IMAGE=/vmlinuz console=ttyS0 quiet mbrescue.target="WD Blue 123" '
            "mbrescue.medium=MBRESCUE-web1-20261126 mbrescue.unattended=1\n")
    assert split_cmdline(line)[3] == "mbrescue.target=WD Blue 123"
    switches = parse_switches(line)
    assert switches.target == "WD Blue 123"
    assert switches.medium == "MBRESCUE-web1-20261126"
    assert switches.unattended is True
    plain = parse_switches("console=ttyS0 mbrescue.unattended=0")
    assert (plain.target, plain.medium, plain.unattended) == (None, None, False)
    options = tmp_path / "options.json"
    assert unattended_allowed(str(options)) is False
    options.write_text(json.dumps({"unattended_allowed": "yes"}))
    assert unattended_allowed(str(options)) is False  # only a JSON true opts in
    options.write_text(json.dumps({"unattended_allowed": True}))
    assert unattended_allowed(str(options)) is True
    options.write_text("{broken")
    with pytest.raises(MbrescueError):
        unattended_allowed(str(options))
