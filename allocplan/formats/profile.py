"""The sensitivity profile: a versioned, strictly loaded YAML artifact.

A profile holds S[l, k], the calibration-loss increase when MoE layer l routes
to its top-k instead of its original K_l, for k_min <= k <= K_l. Profiling is
the expensive, torch-bound step; storing its result lets ``allocplan solve``
and the solver tests run without loading a model. Pure: no torch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from ..errors import AllocplanError
from .provenance import CalibrationRecord, ModelIdentity
from .records import atomic_write_text, dump_yaml, from_data, load_yaml_file, to_data

PROFILE_KIND = "allocplan-profile"
PROFILE_SCHEMA_VERSION = 1
METRICS = ("nll", "kl", "output-change")
STRATEGIES = ("isolated", "paper", "data-free")


@dataclass(frozen=True)
class LayerSensitivity:
    """One MoE layer's row of S.

    Attributes:
        path: module path of the MoE block, e.g. ``model.layers.3.mlp``.
        index: decoder layer index.
        original_k: the layer's original top-k K_l.
        sensitivity: k -> S[l, k] for every k in the grid k_min, k_min + k_step, ..., K_l, in
            the profile's metric (nats per token). S[l, K_l] is 0 under the isolated strategy.
    """

    path: str
    index: int
    original_k: int
    sensitivity: dict[int | float, float]


@dataclass(frozen=True)
class Measurement:
    """How S was measured.

    Attributes:
        metric: ``nll`` (mean next-token NLL increase), ``kl`` (mean KL divergence of
            next-token distributions from the full model's) or ``output-change`` (relative
            squared Frobenius change of the MoE block's output, data-free profiles only).
        strategy: ``isolated`` (other layers at K), ``paper`` (earlier layers at K,
            later layers at k_min, profiled deepest first) or ``data-free`` (each block
            alone on Gaussian inputs, as LExI does; calibration holds the input size).
        k_min: smallest candidate k per layer.
        k_step: spacing of the candidate grid: 1 (whole experts) or 0.5 (a half-expert grid,
            whose fractional k are realised by token-level allocation).
        token_level: whether the measured layer ran with Alloc-T routing (required by a
            half-expert grid) rather than plain top-k.
        reference_nll: mean NLL of the untouched model on the calibration tokens.
        calibration: the text it was measured on.
        device: torch device used.
        dtype: torch dtype the model ran in.
    """

    metric: str
    strategy: str
    k_min: int
    k_step: float
    token_level: bool
    reference_nll: float
    calibration: CalibrationRecord
    device: str
    dtype: str


@dataclass(frozen=True)
class ProfileProvenance:
    """Software that produced the profile."""

    allocplan_version: str
    torch_version: str
    transformers_version: str


@dataclass(frozen=True)
class SensitivityProfile:
    """Per-layer sensitivities of one model, the input of the solvers.

    Attributes:
        schema_version: format version; loading any other version is an error.
        kind: always ``allocplan-profile`` (so a profile is never mistaken for a plan).
        model: the model it was measured on.
        measurement: metric, strategy and calibration.
        layers: one row per MoE layer, sorted by index.
        provenance: allocplan, torch and transformers versions.
    """

    schema_version: int
    kind: str
    model: ModelIdentity
    measurement: Measurement
    layers: tuple[LayerSensitivity, ...]
    provenance: ProfileProvenance

    def __post_init__(self) -> None:
        _validate_profile(self)

    def to_yaml(self) -> str:
        """Canonical YAML text (byte-identical for equal profiles)."""
        return dump_yaml(to_data(self))

    def content_hash(self) -> str:
        """``sha256:...`` of the canonical YAML text; plans record it to name their profile."""
        return "sha256:" + hashlib.sha256(self.to_yaml().encode("utf-8")).hexdigest()


def k_grid(k_min: int, k_max: int, k_step: float) -> list[int | float]:
    """Candidate k values k_min, k_min + k_step, ..., k_max (whole values as ints)."""
    steps = int(round((k_max - k_min) / k_step))
    values = [k_min + i * k_step for i in range(steps + 1)]
    return [int(v) if float(v).is_integer() else v for v in values]


def _validate_profile(profile: SensitivityProfile) -> None:
    where = "profile"
    if profile.measurement.metric not in METRICS:
        raise AllocplanError(
            f"{where}.measurement.metric: {profile.measurement.metric!r} is not one of {', '.join(METRICS)}"
        )
    if profile.measurement.strategy not in STRATEGIES:
        raise AllocplanError(
            f"{where}.measurement.strategy: {profile.measurement.strategy!r} is not one of"
            f" {', '.join(STRATEGIES)}"
        )
    k_min = profile.measurement.k_min
    if k_min < 1:
        raise AllocplanError(f"{where}.measurement.k_min: must be at least 1, got {k_min}")
    k_step = profile.measurement.k_step
    if k_step not in (1.0, 0.5):
        raise AllocplanError(f"{where}.measurement.k_step: must be 1.0 or 0.5, got {k_step}")
    if k_step != 1.0 and not profile.measurement.token_level:
        raise AllocplanError(f"{where}.measurement.k_step: a half-expert grid needs token_level: true")
    if not profile.layers:
        raise AllocplanError(f"{where}.layers: is empty; a profile needs one row per MoE layer")
    if len(profile.layers) != profile.model.num_moe_layers:
        raise AllocplanError(
            f"{where}.layers: has {len(profile.layers)} rows but model.num_moe_layers is"
            f" {profile.model.num_moe_layers}"
        )
    previous = -1
    for i, layer in enumerate(profile.layers):
        at = f"{where}.layers[{i}]"
        if layer.index <= previous:
            raise AllocplanError(f"{at}.index: layers must be sorted by increasing index ({layer.index} after {previous})")
        previous = layer.index
        if layer.original_k < k_min:
            raise AllocplanError(f"{at}.original_k: {layer.original_k} is below k_min {k_min}")
        expected = k_grid(k_min, layer.original_k, k_step)
        if sorted(layer.sensitivity) != expected:
            raise AllocplanError(
                f"{at}.sensitivity: keys must be exactly k = {k_min}..{layer.original_k} in steps of {k_step:g},"
                f" got {sorted(layer.sensitivity)}"
            )


def profile_from_data(data: object, where: str = "profile") -> SensitivityProfile:
    """Strictly build a profile from parsed YAML data."""
    if isinstance(data, dict):
        if data.get("kind") != PROFILE_KIND:
            raise AllocplanError(
                f"{where}: kind is {data.get('kind')!r}, not {PROFILE_KIND!r}; is this a sensitivity profile?"
            )
        version = data.get("schema_version")
        if version != PROFILE_SCHEMA_VERSION:
            raise AllocplanError(
                f"{where}: schema_version {version!r} is not supported (this allocplan reads"
                f" version {PROFILE_SCHEMA_VERSION}); re-run allocplan profile with this version"
            )
    return from_data(SensitivityProfile, data, where)


def load_profile(path: str | os.PathLike[str]) -> SensitivityProfile:
    """Load and strictly validate a profile YAML file.

    Raises:
        AllocplanError: unreadable file, invalid YAML, wrong kind or version,
            unknown keys, wrong types, or inconsistent contents.
    """
    return profile_from_data(load_yaml_file(path, "profile"), where=f"profile {os.fspath(path)!r}")


def save_profile(profile: SensitivityProfile, path: str | os.PathLike[str]) -> None:
    """Write the profile atomically as canonical YAML."""
    atomic_write_text(path, profile.to_yaml())
