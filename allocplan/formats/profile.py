"""The sensitivity profile: a versioned, strictly loaded YAML artifact.

A profile holds S[l, k], the calibration-loss increase when MoE layer l routes
to its top-k instead of its original K_l, for k_min <= k <= K_l, together with
what was in place when it was measured: each (l, k)'s fitted weight treatment
(normaliser width or gain) and the compensation sidecar. Profiling is the
expensive, torch-bound step; storing its result lets ``allocplan solve`` and the
solver tests run without loading a model. Pure: no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AllocplanError
from ..weight_treatments import WEIGHT_TREATMENTS, treatment_fields
from .provenance import MAX_EXPERTS, CalibrationRecord, ModelIdentity, upgrade_calibration_data, upgrade_model_data
from .records import atomic_write_text, dump_yaml, from_data, load_yaml_file, read_flat_record, to_data, transient
from ..standins import STAND_IN_KINDS
from .sidecar import CompensationRecord, read_sidecar, write_sidecar

PROFILE_KIND = "allocplan-profile"
# |S| above this is not a loss increase in nats per token (or an output change) but a broken file.
MAX_SENSITIVITY = 1000.0
PROFILE_SCHEMA_VERSION = 3
READABLE_PROFILE_VERSIONS = (1, 2, 3)
METRICS = ("nll", "kl", "output-change")
STRATEGIES = ("isolated", "paper", "anchored", "data-free")
WEIGHT_FIT_RECORDS = ("fitted", "off")


@dataclass(frozen=True)
class LayerSensitivity:
    """One MoE layer's row of S.

    Attributes:
        path: module path of the MoE block, e.g. ``model.layers.3.mlp``.
        index: decoder layer index.
        original_k: the layer's original top-k K_l.
        sensitivity: k -> S[l, k] for every k in the grid k_min, k_min + k_step, ..., K_l, in
            the profile's metric (nats per token), without stand-ins for the dropped candidates.
            S[l, K_l] is 0 under the isolated strategy.
        expert_multiply_adds: one routed expert's multiply-adds per token (the unit a charged
            budget counts work in); None in a profile written before version 3.
        stand_in_sensitivity: stand-in rank r -> k -> S[l, k, r], measured with every dropped
            candidate served by the rank-r stand-in (r = 0: the constant alone), for the
            solver to choose from; None without compensation.
        treatments: per weight treatment field (allocplan/weight_treatments/), k -> the value
            fitted for (l, k) and in place while S[l, k] was measured; a field left out was not
            fitted for this row. Files write every registered field flat in the row, in
            registration order, null for the whole row where it was not fitted:
            ``normalizer_k`` (k -> the normaliser width k2, null where none applies) and
            ``gain`` (k -> the gain).
    """

    path: str
    index: int
    original_k: int
    sensitivity: dict[int | float, float]
    treatments: tuple[tuple[str, dict], ...] = ()
    expert_multiply_adds: int | None = None
    stand_in_sensitivity: dict[int, dict[int | float, float]] | None = None

    def __getattr__(self, name: str) -> Any:
        # A registered treatment's field reads as an attribute (row.gain, row.normalizer_k: k -> value, or None).
        if name != "treatments" and name in treatment_fields():
            return self.treatment_row(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def treatment_row(self, field_name: str) -> dict | None:
        """k -> the fitted value of treatment field ``field_name``, or None where it was not fitted."""
        return dict(self.treatments).get(field_name)

    def to_record(self) -> dict[str, Any]:
        """The row as files hold it: the four keys, then every registered treatment field."""
        return {"path": self.path, "index": self.index, "original_k": self.original_k,
                "expert_multiply_adds": self.expert_multiply_adds, "sensitivity": self.sensitivity,
                "stand_in_sensitivity": self.stand_in_sensitivity,
                **{field_name: self.treatment_row(field_name) for field_name in treatment_fields()}}

    @classmethod
    def from_record(cls, value: Any, where: str, convert: Any) -> "LayerSensitivity":
        """A row from a file's mapping; a registered treatment field left out was not fitted."""
        base = {"path": str, "index": int, "original_k": int, "expert_multiply_adds": int | None,
                "sensitivity": dict[int | float, float],
                "stand_in_sensitivity": dict[int, dict[int | float, float]] | None}
        extra = {t.field: dict[int | float, t.file_type] | None for t in WEIGHT_TREATMENTS.values()}
        values, rows = read_flat_record(value, where, base, extra, convert)
        return cls(**values, treatments=tuple((name, row) for name, row in rows.items() if row is not None))


@dataclass(frozen=True)
class Measurement:
    """How S was measured.

    Attributes:
        metric: ``nll`` (mean next-token NLL increase), ``kl`` (mean KL divergence of
            next-token distributions from the full model's) or ``output-change`` (relative
            squared Frobenius change of the MoE block's output, data-free profiles only).
        strategy: ``isolated`` (other layers at K), ``anchored`` (other layers at K; every probe
            but each layer's k_min one carried straight to the head and scaled, an approximate S),
            ``paper`` (earlier layers at K, later layers at k_min, profiled deepest first) or
            ``data-free`` (each block alone on Gaussian inputs, as LExI does; calibration holds
            the input size).
        k_min: smallest candidate k per layer.
        k_step: spacing of the candidate grid: 1 (whole experts) or 0.5 (a half-expert grid,
            whose fractional k are realised by token-level allocation).
        token_level: whether the measured layer ran with Alloc-T routing (required by a
            half-expert grid) rather than plain top-k.
        weight_fit: ``fitted`` (each (l, k) measured with its fitted normaliser width, for a
            family that renormalises, or gain, for one that does not) or ``off``.
        compensation: ``expert`` or ``layer`` (dropped candidates compensated by the
            sidecar's vectors while measuring) or ``off``.
        reference_nll: mean NLL of the untouched model on the calibration tokens.
        hidden_size: the width H of the experts' input and output (a rank-r stand-in costs
            2 r H + H multiply-adds per dropped candidate); None before version 3.
        stand_in_choice: with compensation, whether a layer that drops candidates may also run
            without stand-ins (``--stand-in-choice``); false: it runs one of the profiled ranks
            (``--fixed-stand-ins``). True before version 3.
        calibration: the text it was measured on.
        device: torch device used.
        dtype: torch dtype the model ran in.
    """

    metric: str
    strategy: str
    k_min: int
    k_step: float
    token_level: bool
    weight_fit: str
    compensation: str
    reference_nll: float
    calibration: CalibrationRecord
    device: str
    dtype: str
    hidden_size: int | None = None
    stand_in_choice: bool = True


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
        measurement: metric, strategy, treatments and calibration.
        compensation: the sidecar of compensation vectors in place while measuring, or None.
        layers: one row per MoE layer, sorted by index.
        provenance: allocplan, torch and transformers versions.
        compensation_data: the sidecar's bytes in memory (see the plan's).
    """

    schema_version: int
    kind: str
    model: ModelIdentity
    measurement: Measurement
    compensation: CompensationRecord | None
    layers: tuple[LayerSensitivity, ...]
    provenance: ProfileProvenance
    compensation_data: bytes | None = transient()

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
    if profile.schema_version != PROFILE_SCHEMA_VERSION or profile.kind != PROFILE_KIND:
        raise AllocplanError(f"{where}: a profile object is schema_version {PROFILE_SCHEMA_VERSION} and kind"
                             f" {PROFILE_KIND}, got {profile.schema_version!r} and {profile.kind!r}")
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
    if profile.measurement.weight_fit not in WEIGHT_FIT_RECORDS:
        raise AllocplanError(f"{where}.measurement.weight_fit: {profile.measurement.weight_fit!r} is not one of"
                             f" {', '.join(WEIGHT_FIT_RECORDS)}")
    kinds = ("off", *STAND_IN_KINDS)
    if profile.measurement.compensation not in kinds:
        raise AllocplanError(f"{where}.measurement.compensation: {profile.measurement.compensation!r} is not one"
                             f" of {', '.join(kinds)}")
    if (profile.measurement.compensation == "off") != (profile.compensation is None) or (
            profile.compensation is not None and profile.compensation.kind != profile.measurement.compensation):
        raise AllocplanError(f"{where}.compensation: must name a sidecar of kind"
                             f" {profile.measurement.compensation} exactly when measurement.compensation is not off")
    if not profile.layers:
        raise AllocplanError(f"{where}.layers: is empty; a profile needs one row per MoE layer")
    if len(profile.layers) != profile.model.num_moe_layers:
        raise AllocplanError(
            f"{where}.layers: has {len(profile.layers)} rows but model.num_moe_layers is"
            f" {profile.model.num_moe_layers}"
        )
    previous = -1
    paths: set[str] = set()
    experts = min(profile.model.num_experts, MAX_EXPERTS)
    for i, layer in enumerate(profile.layers):
        at = f"{where}.layers[{i}]"
        if layer.index <= previous:
            raise AllocplanError(f"{at}.index: layers must be sorted by increasing index ({layer.index} after {previous})")
        previous = layer.index
        if layer.path in paths or str(layer.index) not in layer.path.split("."):
            raise AllocplanError(f"{at}.path: must be unique and contain the layer index {layer.index}")
        paths.add(layer.path)
        if not k_min <= layer.original_k <= experts:
            raise AllocplanError(f"{at}.original_k: {layer.original_k} is outside [k_min {k_min}, model.num_experts"
                                 f" {experts}]")
        for k, value in layer.sensitivity.items():
            if not -MAX_SENSITIVITY <= value <= MAX_SENSITIVITY:
                raise AllocplanError(f"{at}.sensitivity: {value!r} at k={k} is outside [-{MAX_SENSITIVITY:g},"
                                     f" {MAX_SENSITIVITY:g}] nats per token")
        expected = k_grid(k_min, layer.original_k, k_step)
        rows = {"sensitivity": layer.sensitivity, **dict(layer.treatments)}
        charged = profile.measurement.hidden_size is not None
        if charged != (layer.expert_multiply_adds is not None) or (charged and not (
                1 <= profile.measurement.hidden_size <= layer.expert_multiply_adds)):
            raise AllocplanError(f"{at}.expert_multiply_adds: must be given, with measurement.hidden_size, as a"
                                 " positive count at least the hidden size, or neither (a profile before version 3)")
        if (layer.stand_in_sensitivity is not None) != (profile.compensation is not None and charged):
            raise AllocplanError(f"{at}.stand_in_sensitivity: must be given exactly when the profile has"
                                 " compensation (version 3)")
        for rank, row in sorted((layer.stand_in_sensitivity or {}).items()):
            if not 0 <= rank <= profile.measurement.hidden_size:
                raise AllocplanError(f"{at}.stand_in_sensitivity: rank {rank} is outside [0, hidden_size]")
            rows[f"stand_in_sensitivity[{rank}]"] = row
            for k, value in row.items():
                if not -MAX_SENSITIVITY <= value <= MAX_SENSITIVITY:
                    raise AllocplanError(f"{at}.stand_in_sensitivity: {value!r} at rank {rank}, k={k} is outside"
                                         f" [-{MAX_SENSITIVITY:g}, {MAX_SENSITIVITY:g}] nats per token")
        if layer.stand_in_sensitivity == {}:
            raise AllocplanError(f"{at}.stand_in_sensitivity: names no rank")
        for name, row in rows.items():
            if sorted(row) != expected:
                raise AllocplanError(
                    f"{at}.{name}: keys must be exactly k = {k_min}..{layer.original_k} in steps of {k_step:g},"
                    f" got {sorted(row)[:20]}"
                )
        for treatment in WEIGHT_TREATMENTS.values():
            for k, value in (layer.treatment_row(treatment.field) or {}).items():
                problem = treatment.check(value, layer.original_k)
                if problem is not None:
                    raise AllocplanError(f"{at}.{treatment.field}: at k={k}, {problem}")


def upgrade_profile_data(data: dict) -> dict:
    """A version-1 profile's data as version 2: measured without weight treatment or compensation, from
    a text file, on a model of unknown revision."""
    upgraded = {}
    for key, value in data.items():
        if key == "measurement" and isinstance(value, dict):
            value = {**value}
            ordered = {}
            for name, item in value.items():
                ordered[name] = upgrade_calibration_data(item) if name == "calibration" else item
                if name == "token_level":
                    ordered.update(weight_fit="off", compensation="off")
            value = ordered
        if key == "model":
            value = upgrade_model_data(value)
        upgraded[key] = value  # (version-1 rows have no treatment fields: none was fitted)
        if key == "measurement":
            upgraded["compensation"] = None
    upgraded["schema_version"] = PROFILE_SCHEMA_VERSION
    return upgraded


def upgrade_profile_data_v2(data: dict) -> dict:
    """A version-2 profile's data as version 3: no hidden size or expert cost recorded, and no per-rank
    stand-in sensitivities. Such a profile solves only without compensation (the solver cannot charge
    stand-ins whose cost it was not told); one with compensation is refused there, naming the fix."""
    upgraded = {**data, "schema_version": PROFILE_SCHEMA_VERSION}
    if isinstance(data.get("measurement"), dict):
        upgraded["measurement"] = {**data["measurement"], "hidden_size": None, "stand_in_choice": True}
    if isinstance(data.get("layers"), list):
        upgraded["layers"] = [
            {**{key: value for key, value in row.items() if key in ("path", "index", "original_k")},
             "expert_multiply_adds": None, "sensitivity": row.get("sensitivity"), "stand_in_sensitivity": None,
             **{key: value for key, value in row.items() if key not in ("path", "index", "original_k", "sensitivity")}}
            if isinstance(row, dict) else row for row in data["layers"]]
    return upgraded


def profile_from_data(data: object, where: str = "profile") -> SensitivityProfile:
    """Strictly build a profile from parsed YAML data (version 1 is upgraded)."""
    if isinstance(data, dict):
        if data.get("kind") != PROFILE_KIND:
            raise AllocplanError(
                f"{where}: kind is {repr(data.get('kind'))[:40]}, not {PROFILE_KIND!r}; is this a sensitivity profile?"
            )
        version = data.get("schema_version")
        if type(version) is not int or version not in READABLE_PROFILE_VERSIONS:
            raise AllocplanError(
                f"{where}: schema_version {repr(version)[:20]} is not supported (this allocplan reads versions"
                f" {', '.join(map(str, READABLE_PROFILE_VERSIONS))}); re-run allocplan profile with this version"
            )
        if version == 1:
            data = upgrade_profile_data(data)
        if version in (1, 2):
            data = upgrade_profile_data_v2(data)
    return from_data(SensitivityProfile, data, where)


def load_profile(path: str | os.PathLike[str]) -> SensitivityProfile:
    """Load and strictly validate a profile YAML file.

    Raises:
        AllocplanError: unreadable file, invalid YAML, wrong kind or version,
            unknown keys, wrong types, or inconsistent contents.
    """
    where = f"profile {os.fspath(path)!r}"
    profile = profile_from_data(load_yaml_file(path, "profile"), where=where)
    if profile.compensation is None:
        return profile
    return dataclasses.replace(profile, compensation_data=read_sidecar(Path(path).parent, profile.compensation, where))


def save_profile(profile: SensitivityProfile, path: str | os.PathLike[str]) -> None:
    """Write the profile atomically as canonical YAML, and its compensation sidecar beside it."""
    if profile.compensation is not None:
        if profile.compensation_data is None:
            raise AllocplanError("this profile names a compensation sidecar but holds no vectors; re-run profiling")
        write_sidecar(Path(path).parent if str(Path(path).parent) else ".", profile.compensation,
                      profile.compensation_data)
    atomic_write_text(path, profile.to_yaml())
