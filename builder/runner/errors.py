"""The one error type users see: its message becomes `mbrescue: error: <message>`."""


class MbrescueError(Exception):
    """A failure the user can act on; the message is one line, the hint optional."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
