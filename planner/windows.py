"""Text packed into full token windows: calibration text for profiling, held-out text for eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import AllocplanError
from ..formats.provenance import CalibrationRecord
from ..formats.records import sha256_file


def pack_windows(tokenizer: Any, path: str | Path, *, max_tokens: int, seq_len: int,
                 what: str = "calibration") -> tuple[torch.Tensor, CalibrationRecord]:
    """Tokenize a UTF-8 text file and pack it into full windows.

    The whole file is tokenized once without special tokens; the first
    ``max_tokens`` tokens are cut into ``max_tokens // seq_len`` windows of
    ``seq_len`` tokens (a trailing partial window is dropped). Deterministic.

    Args:
        what: what the text is for, in error messages (``calibration``, ``eval``).

    Returns:
        ``windows`` [W, seq_len] int64 and the record of the text (file, hash, sizes).

    Raises:
        AllocplanError: unreadable or non-UTF-8 file, bad sizes, or too little text for one window.
    """
    path = Path(path)
    if seq_len < 2:
        raise AllocplanError(f"--seq-len {seq_len} is too short; next-token loss needs at least 2 tokens")
    if max_tokens < seq_len:
        raise AllocplanError(f"{max_tokens} {what} tokens are fewer than one --seq-len window of {seq_len}; raise"
                             " the token count or lower --seq-len")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AllocplanError(f"{what} file {str(path)!r} does not exist") from None
    except UnicodeDecodeError:
        raise AllocplanError(f"{what} file {str(path)!r} is not UTF-8 text") from None
    except OSError as exc:
        raise AllocplanError(f"cannot read {what} file {str(path)!r}: {exc}") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = min(len(ids), max_tokens) // seq_len
    if windows == 0:
        raise AllocplanError(
            f"{what} file {str(path)!r} has {len(ids)} tokens, fewer than one --seq-len window of"
            f" {seq_len}; give more text or a shorter --seq-len"
        )
    tensor = torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)  # [W, S]
    record = CalibrationRecord(
        file=path.name, sha256=sha256_file(path), tokens=windows * seq_len, seq_len=seq_len, windows=windows
    )
    return tensor, record
