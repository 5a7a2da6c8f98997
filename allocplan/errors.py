"""The one exception type for problems a user can fix.

The CLI prints an :class:`AllocplanError` as a single line and exits with status 2;
every other exception is a bug and keeps its traceback.
"""


class AllocplanError(ValueError):
    """Bad input: the message names the problem and how to fix it, on one line."""
