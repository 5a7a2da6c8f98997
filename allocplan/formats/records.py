"""Strict conversion between frozen dataclasses and plain YAML data.

Plans and sensitivity profiles are reviewed artifacts, so loading is strict:
every key must be known, every value must have its declared type, and the
YAML 1.1 trap where ``1e-3`` is read as a string is reported with its fix.
Writing is canonical (field order, no timestamps), so equal inputs give
byte-identical files. This module is pure: it never imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..errors import AllocplanError

T = TypeVar("T")


def to_data(obj: Any) -> Any:
    """Turn a (nested) frozen dataclass into plain dicts, lists and scalars."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_data(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_data(v) for k, v in obj.items()}
    return obj


def from_data(cls: type[T], data: Any, where: str, *, defaults: bool = False) -> T:
    """Build ``cls`` from plain data, rejecting unknown keys and wrong types.

    ``defaults``: a missing key takes its field's default (recipes); otherwise every key
    is required (plans and profiles record every field).

    Raises:
        AllocplanError: naming the offending key path (``where``) and what was expected.
    """
    return _convert(cls, data, where, defaults)


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


def _convert(tp: Any, value: Any, where: str, defaults: bool = False) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise AllocplanError(f"{where}: expected a mapping, got {_describe(value)}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        unknown = sorted(str(k) for k in value if k not in names)
        if unknown:
            raise AllocplanError(
                f"{where}: unknown key(s) {', '.join(unknown)}; allowed keys are {', '.join(names)}"
            )
        optional = {f.name for f in dataclasses.fields(tp) if f.default is not dataclasses.MISSING} if defaults else set()
        missing = [n for n in names if n not in value and n not in optional]
        if missing:
            raise AllocplanError(f"{where}: missing key(s) {', '.join(missing)}")
        return tp(**{n: _convert(hints[n], value[n], f"{where}.{n}", defaults) for n in names if n in value})

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if set(real) == {int, float}:
            return _convert_number(value, where, allow_float=True)
        if len(real) != 1:
            raise TypeError(f"unsupported union {tp}")
        return _convert(real[0], value, where, defaults)
    if origin is tuple:
        if not isinstance(value, list):
            raise AllocplanError(f"{where}: expected a list, got {_describe(value)}")
        return tuple(_convert(args[0], v, f"{where}[{i}]", defaults) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise AllocplanError(f"{where}: expected a mapping, got {_describe(value)}")
        key_tp, val_tp = args
        return {
            _convert(key_tp, k, f"{where} key {k!r}"): _convert(val_tp, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise AllocplanError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        return _convert_number(value, where, allow_float=False)
    if tp is float:
        return float(_convert_number(value, where, allow_float=True))
    if tp is str:
        if not isinstance(value, str):
            raise AllocplanError(f"{where}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported field type {tp!r} at {where}")


def _convert_number(value: Any, where: str, *, allow_float: bool) -> int | float:
    kind = "a number" if allow_float else "an integer"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = (
                    "; YAML 1.1 reads exponents without a dot (1e-3) as strings,"
                    " write 1.0e-3 instead"
                )
            except ValueError:
                pass
        raise AllocplanError(f"{where}: expected {kind}, got {_describe(value)}{hint}")
    if isinstance(value, float):
        if not allow_float:
            raise AllocplanError(f"{where}: expected {kind}, got {_describe(value)}")
        if not math.isfinite(value):
            raise AllocplanError(f"{where}: expected a finite number, got {value!r}")
    return value


class _NoAliasDumper(yaml.SafeDumper):
    """Safe dumper that never writes &anchors (equal sub-records would otherwise share one)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    """Canonical YAML text: field order kept, block style, no aliases."""
    return yaml.dump(
        data,
        Dumper=_NoAliasDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=100,
    )


def load_yaml_file(path: str | os.PathLike[str], what: str) -> Any:
    """Read a YAML file with the safe loader; every failure is an AllocplanError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AllocplanError(f"{what} file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AllocplanError(f"cannot read {what} file {str(path)!r}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise AllocplanError(f"{what} file {str(path)!r} is not valid YAML{at}: {first}") from None


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` so that ``path`` holds either the old file or the whole new one."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise AllocplanError(f"cannot write {str(path)!r}: directory {str(directory)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return f"sha256:{digest}"
