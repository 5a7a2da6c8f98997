"""The exception types.

The CLI prints an :class:`AllocplanError` as a single line and exits with status 2;
a :class:`SolverDisagreement` is an internal error (exit 1); every other exception
is a bug and keeps its traceback.
"""


class AllocplanError(ValueError):
    """Bad input: the message names the problem and how to fix it, on one line."""


class SolverDisagreement(RuntimeError):
    """The DP and ILP optima differ: a bug in one of them, never a user error."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name if it has none), cut at ``limit``
    characters: what a one-line error quotes of an error raised by another library."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
