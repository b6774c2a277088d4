"""Messages for the user, debug output and progress lines for long jobs.

Progress is redrawn in place on a terminal; into a log or a pipe (Ansible, ssh, systemd)
it is one plain line at every tenth of the job and at least every 5 s, so a job of minutes
never looks hung. Sizes and rates in binary units (MiB), as everywhere.
"""

from __future__ import annotations

import sys
import time

# One formatter for the builder and the runner (which must stay importable alone).
from .runner import debuglog
from .runner.console import human_bytes

__all__ = ["Progress", "debug", "human_bytes", "info"]

_debug = False


def set_debug(enabled: bool) -> None:
    global _debug
    _debug = enabled
    debuglog.set_enabled(enabled)  # the capture/restore side's programs (runner/debuglog.py)


def debug_enabled() -> bool:
    return _debug


def debug(message: str) -> None:
    if _debug:
        print(f"mbrescue: debug: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    print(f"mbrescue: {message}", file=sys.stderr, flush=True)


class Progress:
    """A progress meter (bytes, rate, ETA): on a terminal one line redrawn at most 5 times a
    second; elsewhere a plain line per tenth of the job, and at least every LINE_INTERVAL s.
    `enabled=False` shows nothing."""

    LINE_INTERVAL = 5.0
    LINE_STEPS = 10

    def __init__(self, label: str, total_bytes: int, enabled: bool | None = None) -> None:
        self.label = label
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self.enabled = enabled is not False
        self.redraw = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._last_line = self.started
        self._lines_step = 0

    def advance(self, count: int) -> None:
        self.done_bytes += count
        now = time.monotonic()
        if not self.enabled:
            return
        if self.redraw:
            if now - self._last_draw >= 0.2:
                self._last_draw = now
                self._draw(now)
            return
        step = self.LINE_STEPS * self.done_bytes // self.total_bytes if self.total_bytes else 0
        if step > self._lines_step or now - self._last_line >= self.LINE_INTERVAL:
            self._lines_step, self._last_line = step, now
            self._line(now)

    def _text(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        rate = self.done_bytes / elapsed
        left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else 0.0
        percent = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        return (f"{self.label}: {percent:3.0f}% of {human_bytes(self.total_bytes)}, "
                f"{rate / (1 << 20):.1f} MiB/s, ETA {left:.0f} s")

    def _line(self, now: float) -> None:
        sys.stderr.write(self._text(now) + "\n")
        sys.stderr.flush()

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = self.done_bytes / elapsed
        left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else 0.0
        percent = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        sys.stderr.write(
            f"\r{self.label}: {human_bytes(self.done_bytes)} / {human_bytes(self.total_bytes)}"
            f" ({percent:5.1f}%) {human_bytes(rate)}/s ETA {left:4.0f}s "
        )
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled and self.redraw:
            self._draw(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()
        elif self.enabled and self._lines_step < self.LINE_STEPS:
            self._line(time.monotonic())
