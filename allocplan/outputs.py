"""Where a command writes, checked before it does any work.

A command lists its outputs and inputs; :func:`check_outputs` refuses, with one
line naming the option, an output whose directory does not exist or cannot be
written, an output that is a directory, an output that is also an input, two
outputs in the same place, and more than one output on standard output (``-``).
So a failed command writes nothing, and a long compile never dies at its last
step. The writes themselves are atomic (``allocplan.formats.records``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import AllocplanError

STDOUT = "-"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_outputs(outputs: dict[str, str | os.PathLike[str] | None],
                  inputs: dict[str, str | os.PathLike[str] | None] | None = None) -> None:
    """Refuse outputs that cannot be written or would clobber an input or each other.

    Args:
        outputs: option name -> path (``-``: standard output; None: not written).
        inputs: option name -> path read by the same command.

    Raises:
        AllocplanError: naming the option and the fix.
    """
    given = {name: os.fspath(path) for name, path in outputs.items() if path is not None}
    on_stdout = [name for name, path in given.items() if path == STDOUT]
    if len(on_stdout) > 1:
        raise AllocplanError(f"{' and '.join(on_stdout)} both write to standard output (-); give one of them a file")
    files = {name: Path(path) for name, path in given.items() if path != STDOUT}
    for name, path in files.items():
        directory = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise AllocplanError(f"{name} {str(path)!r} is a directory; give a file name")
        if not directory.is_dir():
            raise AllocplanError(f"cannot write {name} {str(path)!r}: directory {str(directory)!r} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise AllocplanError(f"cannot write {name} {str(path)!r}: permission denied; choose a writable place")
    names = list(files)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            if _same(files[first], files[second]):
                raise AllocplanError(f"{first} and {second} name the same file {str(files[first])!r}; give each its own")
    for in_name, in_path in (inputs or {}).items():
        if in_path is None or os.fspath(in_path) == STDOUT:
            continue
        for name, path in files.items():
            if _same(path, Path(in_path)):
                raise AllocplanError(f"{name} {str(path)!r} is also the input {in_name}; writing it would destroy"
                                     " the input: choose another file")
