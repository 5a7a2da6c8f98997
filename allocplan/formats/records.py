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
import re
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from ..errors import AllocplanError

T = TypeVar("T")
# No field of a plan, profile or recipe holds a longer string (paths, names, hashes, versions).
MAX_STRING = 512


def transient(default: Any = None) -> Any:
    """A dataclass field held in memory only: never written, never read, not compared."""
    return dataclasses.field(default=default, compare=False, repr=False, metadata={"transient": True})


def stored_fields(cls_or_obj: Any) -> list[dataclasses.Field]:
    """The fields a record writes and reads, in order (transient ones left out)."""
    return [f for f in dataclasses.fields(cls_or_obj) if not f.metadata.get("transient")]


def to_data(obj: Any) -> Any:
    """Turn a (nested) frozen dataclass into plain dicts, lists and scalars."""
    if hasattr(obj, "to_record"):  # a record whose file form is not its fields one for one
        return to_data(obj.to_record())
    if dataclasses.is_dataclass(obj):
        return {f.name: to_data(getattr(obj, f.name)) for f in stored_fields(obj)}
    if isinstance(obj, tuple):
        return [to_data(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_data(v) for k, v in obj.items()}
    return obj


def from_data(cls: type[T], data: Any, where: str, *, defaults: bool = False) -> T:
    """Build ``cls`` from plain data, rejecting unknown keys and wrong types.

    ``defaults``: a missing key takes its field's default (recipes); otherwise every key
    is required (plans and profiles record every field). The records' own validation
    names fields from their root (``plan.layers[0]...``); here that root becomes ``where``,
    so every error names the file.

    Raises:
        AllocplanError: naming the offending key path (``where``) and what was expected.
    """
    return _convert(cls, data, where, defaults)


def _check_keys(value: Any, where: str, allowed: list[str], required: list[str]) -> None:
    """Refuse a record that is not a mapping, has a key not in ``allowed``, or lacks one of ``required``."""
    if not isinstance(value, dict):
        raise AllocplanError(f"{where}: expected a mapping, got {_describe(value)}")
    unknown = sorted(str(k)[:40] for k in value if k not in allowed)
    if unknown:
        listed = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise AllocplanError(f"{where}: unknown key(s) {listed}; allowed keys are {', '.join(allowed)}")
    missing = [name for name in required if name not in value]
    if missing:
        raise AllocplanError(f"{where}: missing key(s) {', '.join(missing)}")


def read_flat_record(value: Any, where: str, base: dict[str, Any], extra: dict[str, Any],
                     convert: Callable[[Any, Any, str], Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A record whose file form is flat: every ``base`` key (name -> type) required, any ``extra`` key
    (registered fields) optional; unknown keys are refused. Returns both parts converted (the extra
    keys present only).

    Raises:
        AllocplanError: not a mapping, an unknown or missing key, or a value of the wrong type.
    """
    _check_keys(value, where, [*base, *extra], list(base))
    return ({name: convert(tp, value[name], f"{where}.{name}") for name, tp in base.items()},
            {name: convert(tp, value[name], f"{where}.{name}") for name, tp in extra.items() if name in value})


def _relocated(message: str, where: str) -> str:
    """A record's own validation message (``model.fingerprint: ...``) with its full path (``where``)."""
    head = re.match(r"[a-z_]+", message)
    if head is None or message.startswith(where):
        return message
    name = head.group(0)
    if where == name or where.endswith("." + name) or where.startswith(name + " "):
        return where + message[len(name):]
    return message


def _describe(value: Any) -> str:
    from .strict_yaml import shown

    if isinstance(value, str):
        return f"the string {shown(value)}"
    return f"{type(value).__name__} {shown(value)}"


def _convert(tp: Any, value: Any, where: str, defaults: bool = False) -> Any:
    if hasattr(tp, "from_record"):  # a record that reads its own file form (to_record's)
        return tp.from_record(value, where, lambda inner, item, at: _convert(inner, item, at, defaults))
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = [f.name for f in stored_fields(tp)]
        optional = {f.name for f in stored_fields(tp) if f.default is not dataclasses.MISSING} if defaults else set()
        _check_keys(value, where, names, [n for n in names if n not in optional])
        fields = {n: _convert(hints[n], value[n], f"{where}.{n}", defaults) for n in names if n in value}
        try:
            return tp(**fields)
        except AllocplanError as exc:
            raise AllocplanError(_relocated(str(exc), where)) from None

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
            _convert(key_tp, k, f"{where} key {str(k)[:40]!r}"): _convert(val_tp, v, f"{where}.{str(k)[:40]}")
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
        if len(value) > MAX_STRING:
            raise AllocplanError(f"{where}: a string of {len(value)} characters, longer than any allocplan writes")
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
    if isinstance(value, int) and abs(value) > 10**15:
        raise AllocplanError(f"{where}: {str(value)[:20]}… is far outside any count allocplan writes")
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
    """Read a YAML file (``-``: standard input) with the bounded strict reader; every failure is an
    AllocplanError (see :mod:`allocplan.formats.strict_yaml`)."""
    from .strict_yaml import load_strict, read_text_bounded

    label = "standard input" if os.fspath(path) == "-" else repr(os.fspath(path))
    return load_strict(read_text_bounded(path, what), what, label)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8, ``\n`` line ends) so that ``path`` holds either the old file or the whole new one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old file or the whole new one (``-``: standard output).

    The file gets the permissions of any new file under the user's umask (not the temporary
    file's 0600).

    Raises:
        AllocplanError: the directory is missing or cannot be written.
    """
    if os.fspath(path) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise AllocplanError(f"cannot write {str(path)!r}: directory {str(directory)!r} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise AllocplanError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, PermissionError):
            raise AllocplanError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
        raise


def sha256_bytes(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"

