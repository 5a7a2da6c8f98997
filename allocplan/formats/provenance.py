"""Records shared by sensitivity profiles and plans: model identity and calibration.

Pure data (no torch). Versions are read from installed package metadata so that
``allocplan solve`` can stamp a plan without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class ModelIdentity:
    """Which model an artifact belongs to.

    Attributes:
        name: the model as the user named it (local directory or hub id).
        model_type: ``config.model_type``, the key of the family registry.
        fingerprint: ``sha256:...`` of the architecture-relevant config fields;
            a plan only applies to a model with the same fingerprint.
        num_moe_layers: MoE layers found in the model.
        num_experts: routed experts per MoE layer.
    """

    name: str
    model_type: str
    fingerprint: str
    num_moe_layers: int
    num_experts: int


@dataclass(frozen=True)
class CalibrationRecord:
    """The calibration text a sensitivity was measured on.

    Attributes:
        file: base name of the text file (paths differ between machines; the hash does not).
        sha256: ``sha256:...`` of the file's bytes.
        tokens: tokens actually scored (windows * seq_len).
        seq_len: tokens per packed window.
        windows: number of packed windows.
    """

    file: str
    sha256: str
    tokens: int
    seq_len: int
    windows: int


def package_version(name: str) -> str:
    """Installed version of a distribution, or ``"not installed"``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
