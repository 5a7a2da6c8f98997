"""One bounded, strict YAML reader for everything allocplan reads (plans, profiles, recipes).

Plans are reviewed, shared and fed to CI, so reading one must never run away or
guess. Before any value is built the reader refuses, each with a one-line error
that names the line:

* aliases and anchors (a "billion laughs" document expands nothing);
* explicit tags (``!!python/object``, ``!custom``, even ``!!str``): plans never need them;
* duplicate keys (YAML would keep the last one silently);
* YAML 1.1's implicit types: only ``null``/``~``/empty, ``true``/``false``, decimal
  integers and decimal floats with a dot resolve; ``yes``, ``on``, ``0o17``, ``0x1F``,
  ``1_000``, ``1:30`` and ``.nan`` stay strings and then fail their field's type check
  by name (an exponent without a dot, ``1e-3``, too: see records.py's hint);
* nesting deeper than ``MAX_DEPTH``, documents over ``MAX_BYTES``, and numbers of
  more than ``MAX_DIGITS`` characters.

No error message quotes more than ``SHOWN`` characters of any value.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from ..errors import AllocplanError

MAX_BYTES = 16 * 1024 * 1024  # a 256-layer profile of k <= 16 is under 1 MiB
MAX_DEPTH = 8  # a plan nests 5 deep (plan > solver > refinement > steps > step)
MAX_DIGITS = 40  # a float64 needs 17 significant digits; an integer here is at most a count
SHOWN = 40


def shown(value: Any) -> str:
    """``repr(value)``, cut to SHOWN characters (error messages never print an unbounded value)."""
    text = repr(value)
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


class Refused(yaml.YAMLError):
    """A document the strict reader will not build, with the line it refused at."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.problem = message
        self.problem_mark = mark


class StrictLoader(yaml.SafeLoader):
    """SafeLoader without aliases, anchors, tags, duplicate keys or YAML 1.1 implicit types, bounded in depth."""

    yaml_implicit_resolvers: dict = {}

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise Refused("aliases (*name) are not allowed; write the value out", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise Refused("anchors (&name) are not allowed; write values out", event.start_mark)
        if getattr(event, "tag", None) not in (None, "!"):
            raise Refused(f"tags such as {shown(event.tag)} are not allowed; plain values only", event.start_mark)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise Refused(f"nesting is deeper than {MAX_DEPTH} levels, more than any allocplan file has",
                          event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                raise Refused("a mapping key must be a plain value", key_node.start_mark) from None
            if duplicate:
                raise Refused(f"duplicate key {shown(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> int:
        value = self.construct_scalar(node)
        if len(value) > MAX_DIGITS:
            raise Refused(f"a number of {len(value)} characters; at most {MAX_DIGITS} are allowed", node.start_mark)
        return int(value)

    def construct_yaml_float(self, node: Any) -> float:
        value = self.construct_scalar(node)
        if len(value) > MAX_DIGITS:
            raise Refused(f"a number of {len(value)} characters; at most {MAX_DIGITS} are allowed", node.start_mark)
        number = float(value)
        if number in (float("inf"), float("-inf")):
            raise Refused(f"{shown(value)} is too large to be a finite number", node.start_mark)
        return number


StrictLoader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|)$"), ["~", "n", ""])
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|false)$"), list("tf"))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
                                   list("-+0123456789"))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$"),
                                   list("-+0123456789."))
StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
StrictLoader.add_constructor("tag:yaml.org,2002:float", StrictLoader.construct_yaml_float)


# Standard input as first read, with the stream it came from: one command may read ``-`` more than once
# (compile --refine reads its calibration text again after profiling), and a second read of the stream
# would find it empty. A new stream (a test runner's) is read afresh.
_stdin: tuple[object, bytes] | None = None


def read_text_bounded(path: str | Path, what: str) -> str:
    """A UTF-8 text file (``-``: standard input, read once per process), refused when over MAX_BYTES."""
    global _stdin
    label = "standard input" if str(path) == "-" else repr(str(path))
    try:
        if str(path) == "-":
            if _stdin is None or _stdin[0] is not sys.stdin:
                _stdin = (sys.stdin, sys.stdin.buffer.read(MAX_BYTES + 1))
            data = _stdin[1]
        else:
            with open(path, "rb") as handle:
                data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise AllocplanError(f"{what} file {label} does not exist") from None
    except IsADirectoryError:
        raise AllocplanError(f"{what} file {label} is a directory; give the file") from None
    except OSError as exc:
        raise AllocplanError(f"cannot read {what} file {label}: {exc.strerror or exc}") from None
    return decode_text(data, what, label)


def decode_text(data: bytes, what: str, label: str) -> str:
    """A file's bytes as text: UTF-8 under MAX_BYTES, or a one-line AllocplanError naming the byte."""
    if len(data) > MAX_BYTES:
        raise AllocplanError(f"{what} file {label} is over {MAX_BYTES // (1024 * 1024)} MiB, larger than any"
                             f" {what} allocplan writes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AllocplanError(f"{what} file {label} is not UTF-8 text (byte {exc.start}: {exc.reason});"
                             " save it as UTF-8") from None


def byte_offset(text: str, index: int) -> int:
    """The UTF-8 byte offset of character ``index`` of ``text`` (characters that cannot be encoded, lone
    surrogates, count as the three bytes they would take)."""
    return len(text[:index].encode("utf-8", "surrogatepass"))


def load_strict(text: str, what: str, label: str) -> Any:
    """Parse ``text`` with :class:`StrictLoader`; any refusal, by the reader (a control character, NUL, a
    lone surrogate), the scanner, the parser or this loader, is a one-line AllocplanError."""
    loader = None
    try:
        loader = StrictLoader(text)  # the reader checks every character here, before any token
        return loader.get_single_data()
    except yaml.reader.ReaderError as exc:
        character = exc.character if isinstance(exc.character, str) else chr(exc.character)
        raise AllocplanError(f"{what} file {label} is not valid YAML at byte {byte_offset(text, exc.position)}:"
                             f" character U+{ord(character):04X} is not allowed (control characters, NUL and lone"
                             " surrogates are not text); remove it") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1} (byte {byte_offset(text, mark.index)})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        reason = " ".join(str(problem).split())[:200]
        raise AllocplanError(f"{what} file {label} is not valid YAML{at}: {reason}") from None
    except RecursionError:
        raise AllocplanError(f"{what} file {label} nests too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
