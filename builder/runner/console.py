"""Where the runner talks to a person: every console at once, answers from any of them.

In the rescue system nobody knows whether the administrator looks at the screen or
at a serial console (IPMI SoL, a KVM switch, QEMU's `-serial stdio`), so the plan,
the progress and the result go to every console in /proc/consoles, and the answer
is taken from whichever console delivers a line first (`select` over all of them;
the kernel's canonical tty mode assembles the line, so no termios is needed). On any
other Linux (`mbrescue restore`) the console is stdin/stdout, errors go to stderr.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
import struct
import sys
import time
from dataclasses import dataclass
from typing import TextIO

PROC_CONSOLES = "/proc/consoles"
# Characters a terminal acts on instead of showing: C0 controls but newline and tab, DEL,
# the C1 controls (0x9b is CSI by itself), the Unicode marks that reorder or hide text.
_UNPRINTABLE = frozenset([*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0),
                          0x200E, 0x200F, *range(0x2028, 0x202F), *range(0x2066, 0x206A),
                          0xFEFF, *range(0xD800, 0xE000)])  # lone surrogates: undecodable bytes
ERROR_PREFIX = "mbrescue: error: "
# How long the prompt sleeps at most before it looks for a signal taken by another thread.
SIGNAL_POLL_S = 0.2


def printable(text: str) -> str:
    """text with every character a terminal would act on written as an escape (`\\x1b`).

    A capture comes from a host that may be compromised: its disk model, labels, file
    names reach the plan, `inspect` and `check`, and an escape sequence there could
    retitle, clear or rewrite the administrator's screen. Every line shown goes through
    here (Console.say/error, the CLIs' output and error lines); the tool's own text has no
    such characters, so nothing it means is changed."""
    if not any(ord(char) in _UNPRINTABLE for char in text):
        return text
    return "".join(
        (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")
        if ord(char) in _UNPRINTABLE else char
        for char in text
    )


# The kernel's struct termios through ioctl (the kit's Python has no termios module): four
# tcflag_t words, then c_line and c_cc. A pseudo-terminal's master reports its slave's.
TCGETS = 0x5401
TCSETSW = 0x5403
TERMIOS_BYTES = 36
LFLAG_AT = 12
ECHO = 0o10
ECHONL = 0o100


def _local_flags(fd: int) -> tuple[bytes, int] | None:
    try:
        raw = fcntl.ioctl(fd, TCGETS, bytes(TERMIOS_BYTES))
    except OSError:
        return None
    return raw, struct.unpack_from("<I", raw, LFLAG_AT)[0]


def echo_is_off(fd: int) -> bool:
    found = _local_flags(fd)
    return found is not None and not found[1] & ECHO


def set_echo(fd: int, echo: bool) -> bool:
    """Turn a terminal's echo on or off (off keeps the line end's echo: ECHONL); False
    when fd is no terminal."""
    found = _local_flags(fd)
    if found is None:
        return False
    raw, flags = found
    flags = (flags | ECHO) & ~ECHONL if echo else (flags & ~ECHO) | ECHONL
    changed = bytearray(raw)
    struct.pack_into("<I", changed, LFLAG_AT, flags)
    try:
        fcntl.ioctl(fd, TCSETSW, bytes(changed))
    except OSError:
        return False
    return True


@dataclass
class Terminal:
    """One console: a name for messages and the descriptors to write to and read from."""

    name: str
    out_fd: int
    in_fd: int | None
    is_tty: bool
    owned: bool = False  # opened by us, so closed by us
    # stdio goes through Python's streams, which a test runner or a CLI framework may
    # have replaced by objects without a file descriptor.
    out_stream: TextIO | None = None
    in_stream: TextIO | None = None


def parse_proc_consoles(text: str) -> list[tuple[str, int, int]]:
    """(name, major, minor) of each line of /proc/consoles, in the kernel's order."""
    consoles: list[tuple[str, int, int]] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        number = fields[-1]
        major, _, minor = number.partition(":")
        if major.isdigit() and minor.isdigit():
            consoles.append((fields[0], int(major), int(minor)))
    return consoles


def console_device(name: str, major: int, minor: int) -> str:
    """The /dev node of a console: sysfs knows it by number (tty0, the "current VT"
    console, is reported as 4:1 — tty1 — which is the VT to open)."""
    try:
        with open(f"/sys/dev/char/{major}:{minor}/uevent", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("DEVNAME="):
                    return "/dev/" + line.strip().split("=", 1)[1]
    except OSError:
        pass
    return "/dev/tty1" if name == "tty0" else "/dev/" + name


class Console:
    """Writes to every terminal, reads a line from the first that answers."""

    def __init__(self, terminals: list[Terminal], error_stream: TextIO | None = None) -> None:
        self.terminals = terminals
        # Where `mbrescue: error:` goes; None means the terminals themselves.
        self.error_stream = error_stream
        self._pending: dict[int, bytes] = {}

    @classmethod
    def stdio(cls) -> Console:
        """stdout for the plan, stdin for the answer, stderr for errors (the CLI contract)."""
        try:
            is_tty = sys.stdout.isatty()
        except (AttributeError, ValueError):
            is_tty = False
        terminal = Terminal("stdio", -1, None, is_tty, out_stream=sys.stdout, in_stream=sys.stdin)
        return cls([terminal], error_stream=sys.stderr)

    @classmethod
    def from_fds(cls, fds: list[int]) -> Console:
        """Terminals on descriptors someone else opened (tests use pseudo-terminals)."""
        return cls([Terminal(f"fd{fd}", fd, fd, os.isatty(fd)) for fd in fds])

    @classmethod
    def rescue(cls, proc_consoles: str = PROC_CONSOLES) -> Console:
        """Every console the kernel writes to; /dev/console when that list is unreadable."""
        try:
            with open(proc_consoles, encoding="ascii", errors="replace") as handle:
                listed = parse_proc_consoles(handle.read())
        except OSError:
            listed = []
        paths = [console_device(name, major, minor) for name, major, minor in listed]
        paths.append("/dev/console")
        terminals: list[Terminal] = []
        seen: set[int] = set()
        for path in paths:
            if path == "/dev/console" and terminals:
                break  # only a fallback: it is one of the consoles above
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError:
                continue
            device = os.fstat(fd)
            if not stat.S_ISCHR(device.st_mode) or device.st_rdev in seen:
                os.close(fd)
                continue
            seen.add(device.st_rdev)
            terminals.append(Terminal(os.path.basename(path), fd, fd, os.isatty(fd), owned=True))
        if not terminals:
            return cls.stdio()
        return cls(terminals)

    def close(self) -> None:
        for terminal in self.terminals:
            if terminal.owned:
                try:
                    os.close(terminal.out_fd)
                except OSError:
                    pass
        self.terminals = []

    def _write_fd(self, fd: int, data: bytes) -> bool:
        try:
            while data:
                written = os.write(fd, data)
                data = data[written:]
        except OSError:
            return False
        return True

    def _write_terminal(self, terminal: Terminal, text: str) -> bool:
        if terminal.out_stream is not None:
            try:
                terminal.out_stream.write(text)
                terminal.out_stream.flush()
            except (OSError, ValueError):
                return False
            return True
        return self._write_fd(terminal.out_fd, text.encode("utf-8", errors="replace"))

    def write(self, text: str, only_tty: bool | None = None) -> None:
        """Raw text to every terminal (optionally only the ttys, or only the others).

        A console that fails (a hung-up serial line) is dropped; the others go on.
        """
        alive = []
        for terminal in self.terminals:
            if only_tty is not None and terminal.is_tty != only_tty:
                alive.append(terminal)
                continue
            if self._write_terminal(terminal, text):
                alive.append(terminal)
        if alive:
            self.terminals = alive

    def say(self, text: str = "") -> None:
        self.write(printable(text) + "\n")

    def error(self, message: str) -> None:
        line = ERROR_PREFIX + printable(message) + "\n"
        if self.error_stream is None:
            self.write(line)
            return
        for terminal in self.terminals:
            if terminal.out_stream is not None:
                terminal.out_stream.flush()
        self.error_stream.write(line)
        self.error_stream.flush()

    def ask(self, prompt: str, timeout: float | None = None) -> str | None:
        """Show the prompt everywhere; the first full line from any console, without its
        line end. None when every input is closed (EOF) or the timeout passes."""
        self.write(prompt)
        for terminal in self.terminals:
            if terminal.in_stream is not None:
                # One blocking stream (stdin): nothing to multiplex.
                answer = terminal.in_stream.readline()
                try:
                    echoed = terminal.in_stream.isatty()
                except (AttributeError, ValueError):
                    echoed = False
                if not echoed:
                    # Nobody's terminal echoed the answer and its line end; end the prompt.
                    self.write("\n")
                return answer.rstrip("\r\n") if answer else None
        inputs = {t.in_fd for t in self.terminals if t.in_fd is not None}
        deadline = None if timeout is None else time.monotonic() + timeout
        while inputs:
            for fd in inputs:
                line = self._take_line(fd)
                if line is not None:
                    return line
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if left == 0.0:
                return None
            # Short waits: a Ctrl-C the kernel handed to another thread (the capture check)
            # is only marked for the main thread, and runs here at the next wake-up.
            wait = SIGNAL_POLL_S if left is None else min(left, SIGNAL_POLL_S)
            try:
                ready, _, _ = select.select(sorted(inputs), [], [], wait)
            except InterruptedError:
                continue
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError as exc:
                    # EIO: a terminal without a reader on its other side; stop listening.
                    if exc.errno not in (errno.EIO, errno.EBADF):
                        raise
                    data = b""
                if not data:
                    inputs.discard(fd)
                    leftover = self._pending.pop(fd, b"")
                    if leftover:
                        return leftover.decode("utf-8", errors="replace").rstrip("\r")
                    continue
                self._pending[fd] = self._pending.get(fd, b"") + data
        return None

    def line_entered(self, timeout: float) -> bool:
        """Did someone end a line (Enter) on any console within timeout seconds? Only the
        rescue system's own terminals are watched; stdin (the CLI) just waits."""
        if any(terminal.in_stream is not None for terminal in self.terminals):
            time.sleep(timeout)
            return False
        return self.ask("", timeout=timeout) is not None

    def ask_secret(self, prompt: str) -> str | None:
        """ask(), with every terminal's echo off while it waits: a passphrase typed on any
        console shows on none (the line end still echoes). A stream without a descriptor
        (a test's) is read as it is."""
        silenced = [t.in_fd for t in self.terminals
                    if t.in_fd is not None and t.is_tty and set_echo(t.in_fd, False)]
        try:
            return self.ask(prompt)
        finally:
            for fd in silenced:
                set_echo(fd, True)

    def _take_line(self, fd: int) -> str | None:
        buffered = self._pending.get(fd, b"")
        if b"\n" not in buffered:
            return None
        line, _, rest = buffered.partition(b"\n")
        self._pending[fd] = rest
        return line.decode("utf-8", errors="replace").rstrip("\r")

    def progress(self, label: str, total_bytes: int) -> Progress:
        return Progress(self, label, total_bytes)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Percent, MiB/s and ETA on every console: redrawn in place on terminals at most
    every 0.5 s (a serial line at 115200 baud must not fall behind), one full line every
    5 s and per tenth of the job elsewhere (logs and pipes)."""

    TTY_INTERVAL = 0.5
    LINE_INTERVAL = 5.0

    def __init__(self, console: Console, label: str, total_bytes: int) -> None:
        self.console = console
        self.label = label
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self.started = time.monotonic()
        self._tty_drawn = 0.0
        self._line_drawn = self.started
        self._line_step = 0  # a line per tenth of the job too: a fast write still shows

    def text(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        rate = self.done_bytes / elapsed
        left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else 0.0
        percent = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        return (f"{self.label}: {percent:5.1f}% of {human_bytes(self.total_bytes)}, "
                f"{rate / (1 << 20):6.1f} MiB/s, ETA {left:4.0f} s")

    def advance(self, count: int) -> None:
        self.done_bytes += count
        now = time.monotonic()
        if now - self._tty_drawn >= self.TTY_INTERVAL:
            self._tty_drawn = now
            self.console.write("\r" + self.text(now) + " ", only_tty=True)
        step = 10 * self.done_bytes // self.total_bytes if self.total_bytes else 0
        if now - self._line_drawn >= self.LINE_INTERVAL or step > self._line_step:
            self._line_drawn, self._line_step = now, step
            self.console.write(self.text(now) + "\n", only_tty=False)

    def finish(self) -> float:
        """Draw the final state; the elapsed seconds."""
        now = time.monotonic()
        self.console.write("\r" + self.text(now) + " \n", only_tty=True)
        self.console.write(self.text(now) + "\n", only_tty=False)
        return now - self.started
