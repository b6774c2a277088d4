"""Errors of the builder side; the same class as the runner's, so the CLI catches one type."""

from .runner.errors import MbrescueError

__all__ = ["MbrescueError", "ToolMissing"]


class ToolMissing(MbrescueError):
    """A program the job needs is not installed; names the Debian package."""
