"""What every name registry of allocplan does: register a name once, and look one up (or list the known ones)."""

from __future__ import annotations

from typing import Any

from .errors import AllocplanError


def lookup(table: dict[str, Any], name: str, what: str) -> Any:
    """``table[name]``.

    Raises:
        AllocplanError: ``{what} {name!r} is not one of ...``, listing the registered names in order.
    """
    if not isinstance(name, str) or name not in table:
        raise AllocplanError(f"{what} {name!r} is not one of {', '.join(table)}")
    return table[name]


def register(table: dict[str, Any], name: str, entry: Any, what: str, reserved: tuple[str, ...] = ()) -> Any:
    """Add ``entry`` to ``table`` under ``name`` and return it.

    Raises:
        ValueError: ``name`` is registered already, or reserved (a programming error, not a user's).
    """
    if name in table or name in reserved:
        raise ValueError(f"{what} {name!r} is registered already (or reserved)")
    table[name] = entry
    return entry
