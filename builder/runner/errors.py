"""The one error type users see: its message becomes `mbrescue: error: <message>`."""


class MbrescueError(Exception):
    """A failure the user can act on; the message is one line, the hint optional."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class Interrupted(MbrescueError):
    """Ctrl-C or SIGTERM ended the job: both command lines exit 130 (128 + SIGINT), as a
    shell does, so a script can tell a stop from a failure."""


class DoesNotFit(MbrescueError):
    """The region path cannot lay the captured layout on this disk (a partition other than
    swap would run past its end, swap would shrink below its minimum): the file-level path,
    which plans the layout anew, may still fit it."""
