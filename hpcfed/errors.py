"""The one exception type that reaches users as a single line (exit status 2)."""


class HpcfedError(Exception):
    """A user-facing error: bad input, missing file, invalid config.

    The message is one line that names the key, file or value and what is allowed.
    ``everywhere`` is True when every rank raises it together (e.g. after a broadcast
    of a validation result); the job then exits cleanly with status 2 instead of
    aborting from one rank.
    """

    def __init__(self, message: str, *, everywhere: bool = False) -> None:
        super().__init__(message)
        self.everywhere = everywhere
