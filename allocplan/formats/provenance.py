"""Records shared by sensitivity profiles and plans: model identity and calibration.

Pure data (no torch). Versions are read from installed package metadata so that
``allocplan solve`` can stamp a plan without importing torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata

from ..errors import AllocplanError

FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{16}$")
SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")
# The largest expert count a registry family can have (DeepSeek-V3 routes 8 of 256); also bounds every k grid.
MAX_EXPERTS = 4096
MAX_TEXT = 512  # names and file names: longer is a broken or hostile file


def check_text(value: str, where: str) -> None:
    """A name-like string: non-empty, one line, at most MAX_TEXT characters."""
    if not value or len(value) > MAX_TEXT or "\n" in value:
        raise AllocplanError(f"{where}: must be one non-empty line of at most {MAX_TEXT} characters")


@dataclass(frozen=True)
class ModelIdentity:
    """Which model an artifact belongs to.

    Attributes:
        name: the model as the user named it (local directory or hub id).
        revision: the hub commit the weights were loaded from (or the revision asked for,
            where the hub gave no commit); None for a local directory.
        model_type: ``config.model_type``, the key of the family registry.
        fingerprint: ``sha256:...`` of the architecture-relevant config fields;
            a plan only applies to a model with the same fingerprint.
        num_moe_layers: MoE layers found in the model.
        num_experts: routed experts per MoE layer.
    """

    name: str
    revision: str | None
    model_type: str
    fingerprint: str
    num_moe_layers: int
    num_experts: int

    def __post_init__(self) -> None:
        check_text(self.name, "model.name")
        if self.revision is not None:
            check_text(self.revision, "model.revision")
        check_text(self.model_type, "model.model_type")
        if not FINGERPRINT.match(self.fingerprint):
            raise AllocplanError("model.fingerprint: must be sha256: and 16 hex digits (allocplan computes it from the"
                                 " model's config)")
        if not 1 <= self.num_moe_layers <= 10_000:
            raise AllocplanError(f"model.num_moe_layers: {self.num_moe_layers} is outside [1, 10000]")
        if not 1 <= self.num_experts <= MAX_EXPERTS:
            raise AllocplanError(f"model.num_experts: {self.num_experts} is outside [1, {MAX_EXPERTS}]")


# Where calibration text comes from: a UTF-8 text file, a JSON-lines file, a ``datasets``
# dataset, or (data-free baselines) Gaussian inputs named by their seed.
CALIBRATION_SOURCES = ("text", "jsonl", "dataset", "gaussian")


def is_jsonl(path: object) -> bool:
    """Whether a calibration file is read as JSON lines (one object per line): by its ``.jsonl`` suffix."""
    return str(path).lower().endswith(".jsonl")


@dataclass(frozen=True)
class CalibrationRecord:
    """The calibration text a sensitivity was measured on.

    Attributes:
        source: ``text``, ``jsonl``, ``dataset`` or ``gaussian`` (see CALIBRATION_SOURCES).
        name: a file's base name (paths differ between machines; the hash does not), or a
            dataset as ``NAME[:CONFIG]:SPLIT``, or ``gaussian``.
        text_field: the record field the text was read from (``jsonl`` and ``dataset``), else None.
        sha256: ``sha256:...`` of the text's UTF-8 bytes as tokenized (``seed:N`` for Gaussian inputs).
        tokens: tokens actually scored (windows * seq_len).
        seq_len: tokens per packed window.
        windows: number of packed windows.
    """

    source: str
    name: str
    text_field: str | None
    sha256: str
    tokens: int
    seq_len: int
    windows: int

    def __post_init__(self) -> None:
        if self.source not in CALIBRATION_SOURCES:
            raise AllocplanError(f"calibration.source: {str(self.source)[:40]!r} is not one of"
                                 f" {', '.join(CALIBRATION_SOURCES)}")
        check_text(self.name, "calibration.name")
        if (self.text_field is not None) != (self.source in ("jsonl", "dataset")):
            raise AllocplanError("calibration.text_field: must name the field for jsonl and dataset sources and be"
                                 " null otherwise")
        if self.text_field is not None:
            check_text(self.text_field, "calibration.text_field")
        # Text is named by its hash; a data-free profile's Gaussian inputs by their seed.
        pattern = r"^seed:[0-9]{1,12}$" if self.source == "gaussian" else SHA256
        if not re.match(pattern, self.sha256):
            raise AllocplanError("calibration.sha256: must be sha256: and 64 hex digits"
                                 + (" (seed:N for gaussian inputs)" if self.source == "gaussian" else ""))
        if min(self.tokens, self.seq_len, self.windows) < 1 or self.tokens != self.windows * self.seq_len:
            raise AllocplanError(f"calibration: tokens {self.tokens} must equal windows {self.windows} x seq_len"
                                 f" {self.seq_len}, each at least 1")


def upgrade_calibration_data(data: object) -> object:
    """A version-1 calibration record (``file``, ...) as version 2 writes it (``source``, ``name``, ...)."""
    if not isinstance(data, dict) or "file" not in data:
        return data
    gaussian = isinstance(data.get("sha256"), str) and data["sha256"].startswith("seed:")
    rest = {k: v for k, v in data.items() if k != "file"}
    return {"source": "gaussian" if gaussian else "text", "name": data["file"], "text_field": None, **rest}


def upgrade_model_data(data: object) -> object:
    """A version-1 model record as version 2 writes it (with ``revision``, unknown then: null)."""
    if not isinstance(data, dict):
        return data
    ordered = {}
    for key, value in data.items():
        ordered[key] = value
        if key == "name":
            ordered["revision"] = None
    return ordered


def package_version(name: str) -> str:
    """Installed version of a distribution, or ``"not installed"``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
