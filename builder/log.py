"""Messages for the user, debug output and progress lines for long jobs.

Progress is drawn only when stderr is a terminal, so logs and CI stay quiet.
"""

from __future__ import annotations

import sys
import time

# One formatter for the builder and the runner (which must stay importable alone).
from .runner.console import human_bytes

__all__ = ["Progress", "debug", "human_bytes", "info"]

_debug = False


def set_debug(enabled: bool) -> None:
    global _debug
    _debug = enabled


def debug_enabled() -> bool:
    return _debug


def debug(message: str) -> None:
    if _debug:
        print(f"mbrescue: debug: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    print(f"mbrescue: {message}", file=sys.stderr, flush=True)


class Progress:
    """A one-line progress meter (bytes, rate, ETA) redrawn at most 5 times a second."""

    def __init__(self, label: str, total_bytes: int, enabled: bool | None = None) -> None:
        self.label = label
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._last_draw = 0.0

    def advance(self, count: int) -> None:
        self.done_bytes += count
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= 0.2:
            self._last_draw = now
            self._draw(now)

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
        if self.enabled:
            self._draw(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()
