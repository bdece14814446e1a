"""The one exception type users see: the CLI turns it into a one-line message."""


class ScalerError(ValueError):
    """A user-facing error (bad spec, bad budget, bad file); the message is the whole story."""
