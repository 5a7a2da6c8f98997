"""The exception types.

The CLI prints an :class:`AllocplanError` as a single line and exits with status 2;
a :class:`SolverDisagreement` is an internal error (exit 1); every other exception
is a bug and keeps its traceback.
"""


class AllocplanError(ValueError):
    """Bad input: the message names the problem and how to fix it, on one line."""


class SolverDisagreement(RuntimeError):
    """The DP and ILP optima differ: a bug in one of them, never a user error."""
