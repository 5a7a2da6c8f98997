"""Where calibration and eval text comes from: a text file, a JSON-lines file, or a ``datasets`` dataset.

A source is read into one string plus the record of what was read
(:class:`~allocplan.formats.provenance.CalibrationRecord` fields: source kind, name,
text field). Documents of a JSON-lines file or a dataset are joined with a blank line,
in file or dataset order, so the same source always gives the same text and hash.
Pure Python: no torch. ``datasets`` is an optional extra, imported only when a dataset
is asked for, and never runs a dataset's own code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from allocplan.errors import AllocplanError, first_line
from allocplan.formats.config import parse_dataset_spec
from allocplan.formats.provenance import is_jsonl
from allocplan.formats.strict_yaml import read_text_bounded
from allocplan.loading import from_cache_or_hub, hub_offline

DOCUMENT_SEPARATOR = "\n\n"
# A dataset is read row by row until its text is this many characters per token wanted:
# no tokenizer gives tokens longer than that on natural text, so the windows are full,
# and a large dataset is not read whole.
CHARS_PER_TOKEN_READ = 32


@dataclass(frozen=True)
class SourceText:
    """Text read from a source, and how the record names it.

    Attributes:
        text: the text, documents joined with a blank line.
        source: ``text``, ``jsonl`` or ``dataset``.
        name: the file's base name (``<stdin>`` for standard input) or ``NAME[:CONFIG]:SPLIT``.
        text_field: the field the documents were read from (None for a text file).
    """

    text: str
    source: str
    name: str
    text_field: str | None


def _document(row: object, field: str, where: str, columns: list[str]) -> str:
    if not isinstance(row, dict):
        raise AllocplanError(f"{where} is not a JSON object; each line must be one object with a {field!r} field")
    if field not in row:
        known = ", ".join(sorted(map(str, columns or row))[:8]) or "none"
        raise AllocplanError(f"{where} has no field {field!r} (fields: {known}); name the text field with --text-field")
    value = row[field]
    if not isinstance(value, str):
        raise AllocplanError(f"{where}: field {field!r} holds {type(value).__name__}, not text; name a text field"
                             " with --text-field")
    return value


def read_jsonl(path: str | Path, text_field: str, what: str = "calibration") -> SourceText:
    """Documents from the ``text_field`` of each line of a JSON-lines file (blank lines skipped).

    Raises:
        AllocplanError: unreadable file, a line that is not a JSON object, a missing or non-text field.
    """
    label = "standard input" if str(path) == "-" else repr(str(path))
    documents = []
    for number, line in enumerate(read_text_bounded(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_constant=lambda name: None)
        except ValueError as exc:
            raise AllocplanError(f"{what} file {label} line {number} is not JSON ({str(exc).split(':')[0]});"
                                 " give one JSON object per line") from None
        documents.append(_document(row, text_field, f"{what} file {label} line {number}", []))
    if not documents:
        raise AllocplanError(f"{what} file {label} holds no JSON lines; give one object per line")
    return SourceText(DOCUMENT_SEPARATOR.join(documents), "jsonl", _name(path), text_field)


def read_dataset(spec: str, text_field: str, max_tokens: int, what: str = "calibration") -> SourceText:
    """Documents from a ``datasets`` dataset's ``text_field``, read in order until there is enough text.

    The dataset is loaded with ``datasets.load_dataset(NAME, CONFIG, split=SPLIT)`` (a hub
    dataset, or a local directory of data files); rows are read until the text holds
    ``CHARS_PER_TOKEN_READ`` characters per wanted token, or the split ends.

    Raises:
        AllocplanError: ``datasets`` not installed, the dataset cannot be loaded, or the field is missing.
    """
    name, config, split = parse_dataset_spec(spec)
    try:
        import datasets
    except ImportError:
        raise AllocplanError("--calib-dataset needs the datasets package; pip install 'allocplan[datasets]'") from None

    def load(local: bool) -> Any:
        with hub_offline(local):
            return datasets.load_dataset(name, config, split=split)

    try:
        # The local cache first, the hub only if that misses and it answers, as for models.
        data = from_cache_or_hub(name, name, load, unreachable=(
            f"dataset {spec!r} is not in the local datasets cache and the hub cannot be reached (offline?);"
            " download it where the hub is reachable, or give a local text file with --calib"))
    except AllocplanError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ValueError, its own, hub errors)
        raise AllocplanError(f"cannot load dataset {spec!r}: {first_line(exc, 200)}") from None
    columns = list(getattr(data, "column_names", None) or [])
    if columns and text_field not in columns:
        raise AllocplanError(f"dataset {spec!r} has no field {text_field!r} (fields: {', '.join(columns[:8])});"
                             " name the text field with --text-field")
    documents, size, wanted = [], 0, CHARS_PER_TOKEN_READ * max_tokens
    for number, row in enumerate(data):
        document = _document(row, text_field, f"dataset {spec!r} row {number}", columns)
        if document.strip():
            documents.append(document)
            size += len(document) + len(DOCUMENT_SEPARATOR)
        if size >= wanted:
            break
    if not documents:
        raise AllocplanError(f"dataset {spec!r} holds no text in field {text_field!r}")
    return SourceText(DOCUMENT_SEPARATOR.join(documents), "dataset", spec, text_field)


def read_source(path: str | Path | None = None, *, dataset: str | None = None, text_field: str = "text",
                max_tokens: int = 0, what: str = "calibration") -> SourceText:
    """Read a text file, a ``.jsonl`` file (by its suffix) or a dataset (exactly one of ``path``, ``dataset``).

    Raises:
        AllocplanError: both or neither given, or any reading problem.
    """
    if (path is None) == (dataset is None):
        raise AllocplanError(f"give {what} text as a file or as a dataset, not {'both' if path else 'neither'}")
    if dataset is not None:
        return read_dataset(dataset, text_field, max_tokens, what)
    if is_jsonl(path):
        return read_jsonl(path, text_field, what)
    return SourceText(read_text_bounded(path, what), "text", _name(path), None)


def _name(path: str | Path) -> str:
    return "<stdin>" if str(path) == "-" else Path(path).name
