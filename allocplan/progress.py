"""Progress bars with an ETA for the long steps (profiling, refinement, eval, bench).

Off for library callers; the CLI turns them on unless ``-q`` is given. They draw on
standard error only when it is a terminal (tqdm's own test), so logs, pipes and the
one-line error contract stay clean.
"""

from __future__ import annotations

from typing import Any, Iterable

_enabled = False


def enable(on: bool) -> None:
    """Draw progress bars from now on (``on``) or not."""
    global _enabled
    _enabled = on


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "") -> Any:
    """``iterable`` wrapped in a tqdm bar (or a bar to ``update`` by hand when ``iterable`` is None)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=None if _enabled else True)
