"""The one exception type users see: the CLI turns it into a one-line message."""


class ScalerError(ValueError):
    """A user-facing error (bad spec, bad budget, bad file); the message is the whole story."""

    exit_code = 2
    prefix = "error"


class Interrupted(ScalerError):
    """Ctrl-C inside a long command; the message says what was saved and how to continue."""

    exit_code = 130
    prefix = "interrupted"
