"""Text packed into full token windows: calibration text for profiling, held-out text for eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from allocplan.bundled import DEFAULT_CALIBRATION
from allocplan.errors import AllocplanError
from allocplan.formats.provenance import CalibrationRecord
from allocplan.formats.records import sha256_bytes
from .texts import SourceText, read_source


def pack_windows(tokenizer: Any, source: SourceText | str | Path, *, max_tokens: int, seq_len: int,
                 what: str = "calibration") -> tuple[torch.Tensor, CalibrationRecord]:
    """Tokenize text and pack it into full windows.

    ``source`` is text already read (:func:`~allocplan.planner.texts.read_source`: a text
    file, a JSON-lines file or a dataset) or a file path (``-``: standard input; a
    ``.jsonl`` file gives the ``text`` field of each line). The whole text is tokenized
    once without special tokens; the first ``max_tokens`` tokens are cut into
    ``max_tokens // seq_len`` windows of ``seq_len`` tokens (a trailing partial window is
    dropped). Deterministic.

    Args:
        what: what the text is for, in error messages (``calibration``, ``eval``).

    Returns:
        ``windows`` [W, seq_len] int64 and the record of the text (source, hash, sizes).

    Raises:
        AllocplanError: unreadable or non-UTF-8 text, bad sizes, or too little text for one window.
    """
    if seq_len < 2:
        raise AllocplanError(f"--seq-len {seq_len} is too short; next-token loss needs at least 2 tokens")
    if max_tokens < seq_len:
        raise AllocplanError(f"{max_tokens} {what} tokens are fewer than one --seq-len window of {seq_len}; raise"
                             " the token count or lower --seq-len")
    if not isinstance(source, SourceText):
        source = read_source(source, max_tokens=max_tokens, what=what)
    label = {"text": "file", "jsonl": "file", "dataset": "dataset"}[source.source] + f" {source.name!r}"
    if not source.text.strip():
        raise AllocplanError(f"{what} {label} holds no text (only white space); give it real text")
    ids = tokenizer(source.text, add_special_tokens=False)["input_ids"]
    windows = min(len(ids), max_tokens) // seq_len
    if windows == 0:
        raise AllocplanError(
            f"{what} {label} has {len(ids)} tokens, fewer than one --seq-len window of"
            f" {seq_len}; give more text or a shorter --seq-len"
        )
    tensor = torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)  # [W, S]
    record = CalibrationRecord(
        source=source.source, name=source.name, text_field=source.text_field,
        sha256=sha256_bytes(source.text.encode("utf-8")), tokens=windows * seq_len, seq_len=seq_len, windows=windows,
    )
    return tensor, record


def calibration_source(config: Any, max_tokens: int) -> SourceText:
    """The calibration text a :class:`~allocplan.formats.config.ProfileConfig` names (the bundled
    text when it names none)."""
    if config.calib_dataset is not None:
        return read_source(dataset=config.calib_dataset, text_field=config.text_field, max_tokens=max_tokens)
    return read_source(config.calib or DEFAULT_CALIBRATION, text_field=config.text_field, max_tokens=max_tokens)


def check_window_length(windows: torch.Tensor, model: Any) -> None:
    """Refuse windows longer than the model's ``max_position_embeddings``: it would score positions it was
    never trained on (most rotary models run there without complaint, so nothing else says so).

    Raises:
        AllocplanError: before any forward, naming both lengths and --seq-len, which sets them.
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and windows.shape[-1] > limit:
        raise AllocplanError(f"--seq-len {windows.shape[-1]} is longer than the model's max_position_embeddings"
                             f" {limit}; use --seq-len {limit} or less")


def check_token_ids(windows: torch.Tensor, model: Any) -> None:
    """Refuse token ids the model has no embedding row for (a tokenizer from another model).

    Raises:
        AllocplanError: before any forward, naming the largest id and the embedding size.
    """
    rows = model.get_input_embeddings().num_embeddings
    largest = int(windows.max()) if windows.numel() else 0
    if largest >= rows:
        raise AllocplanError(f"the tokenizer gives token id {largest}, but the model's embedding has only {rows}"
                             " rows; use the tokenizer saved with this model")
