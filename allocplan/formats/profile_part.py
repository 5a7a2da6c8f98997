"""A shard of a sensitivity profile: one slice of the (layer, k) grid, and the merge of all slices.

Once each calibration batch has run through the untouched model, every (layer, k) cell
of S is measured on its own, so the grid splits across processes, GPUs or nodes.
``allocplan profile --shard i/N`` measures the cells shard i owns and writes a *part*:
the profile as that shard sees it (model, measurement, treatments and compensation,
which every shard computes alike from the same calibration text) with sensitivities
measured only at its own cells (0 at the others). :func:`merge_parts` checks that the
parts belong together (one model, one calibration text, the same settings and
treatments; every shard exactly once) and takes each cell from its owner, giving the
profile an unsharded run writes, byte for byte.

Cells are numbered layer by layer (layers in profile order) and k ascending within a
layer; cell j belongs to shard j mod N, which spreads every layer's cells over the
shards. Pure data: no torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AllocplanError
from .profile import LayerSensitivity, SensitivityProfile, k_grid, profile_from_data
from .records import atomic_write_text, dump_yaml, from_data, load_yaml_file, to_data
from .sidecar import read_sidecar, write_sidecar

PART_KIND = "allocplan-profile-part"
PART_SCHEMA_VERSION = 1
MAX_SHARDS = 65536


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS or not 0 <= self.index < self.count:
            raise AllocplanError(f"shard {self.index}/{self.count}: need 0 <= index < count <= {MAX_SHARDS}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``i/N`` (0-based i) as a :class:`Shard`.

    Raises:
        AllocplanError: anything but two integers with 0 <= i < N.
    """
    match = re.fullmatch(r"([0-9]{1,6})/([0-9]{1,6})", text.strip())
    if match is None:
        raise AllocplanError(f"--shard {text[:40]!r} must be I/N with 0 <= I < N (e.g. 0/4), or auto")
    return Shard(int(match.group(1)), int(match.group(2)))


def grid_cells(originals: list[int], k_min: int, k_step: float) -> list[tuple[int, int | float]]:
    """Every (layer position, k) of the grid, in shard order."""
    return [(position, k) for position, original in enumerate(originals) for k in k_grid(k_min, original, k_step)]


def owned_cells(originals: list[int], k_min: int, k_step: float, shard: Shard) -> set[tuple[int, int | float]]:
    """The cells ``shard`` measures."""
    cells = grid_cells(originals, k_min, k_step)
    return {cell for number, cell in enumerate(cells) if number % shard.count == shard.index}


@dataclass(frozen=True)
class ProfilePart:
    """One shard's measurements.

    Attributes:
        schema_version: format version (1).
        kind: always ``allocplan-profile-part`` (a part is never mistaken for a profile).
        shard: which slice of the grid this part measured.
        profile: the profile as this shard measured it: sensitivities at its own cells,
            0 at every other cell; everything else as the whole profile will hold it.
    """

    schema_version: int
    kind: str
    shard: Shard
    profile: SensitivityProfile

    def __post_init__(self) -> None:
        if self.schema_version != PART_SCHEMA_VERSION or self.kind != PART_KIND:
            raise AllocplanError(f"profile part: schema_version {PART_SCHEMA_VERSION} and kind {PART_KIND} expected")

    def cells(self) -> set[tuple[int, int | float]]:
        measurement = self.profile.measurement
        return owned_cells([layer.original_k for layer in self.profile.layers], measurement.k_min,
                           measurement.k_step, self.shard)

    def to_yaml(self) -> str:
        return dump_yaml(to_data(self))


def save_part(part: ProfilePart, path: str | os.PathLike[str]) -> None:
    """Write a part atomically, with the compensation sidecar beside it."""
    profile = part.profile
    if profile.compensation is not None:
        write_sidecar(Path(path).parent, profile.compensation, profile.compensation_data or b"")
    atomic_write_text(path, part.to_yaml())


def load_part(path: str | os.PathLike[str]) -> ProfilePart:
    """Load and strictly validate a part (and its sidecar).

    Raises:
        AllocplanError: not a part, an unknown version, or any profile error.
    """
    where = f"profile part {os.fspath(path)!r}"
    data = load_yaml_file(path, "profile part")
    if not isinstance(data, dict) or data.get("kind") != PART_KIND:
        kind = repr(data.get("kind"))[:40] if isinstance(data, dict) else "none"
        raise AllocplanError(f"{where}: kind is {kind}, not {PART_KIND!r}; give the files `allocplan profile"
                             " --shard` wrote")
    if data.get("schema_version") != PART_SCHEMA_VERSION:
        raise AllocplanError(f"{where}: schema_version {repr(data.get('schema_version'))[:20]} is not supported"
                             f" (this allocplan reads {PART_SCHEMA_VERSION}); re-run the shard with this allocplan")
    unknown = sorted(str(key)[:40] for key in data if key not in ("schema_version", "kind", "shard", "profile"))
    if unknown:
        raise AllocplanError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed keys are schema_version, kind,"
                             " shard, profile")
    shard = from_data(Shard, data.get("shard"), f"{where}.shard")
    profile = profile_from_data(data.get("profile"), where=f"{where}.profile")
    if profile.compensation is not None:
        profile = dataclasses.replace(profile, compensation_data=read_sidecar(Path(path).parent, profile.compensation,
                                                                              where))
    return ProfilePart(PART_SCHEMA_VERSION, PART_KIND, shard, profile)


def _first_difference(a: Any, b: Any, where: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{where}.{key}"
            found = _first_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return where
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else where


def _without_sensitivities(profile: SensitivityProfile) -> dict:
    data = to_data(profile)
    for layer in data["layers"]:
        layer["sensitivity"] = sorted(layer["sensitivity"])  # the grid, not the values
        if layer.get("stand_in_sensitivity") is not None:
            layer["stand_in_sensitivity"] = {rank: sorted(row) for rank, row in layer["stand_in_sensitivity"].items()}
    return data


def merge_parts(parts: list[ProfilePart], names: list[str] | None = None) -> SensitivityProfile:
    """The whole profile from one part per shard.

    Raises:
        AllocplanError: parts of different shardings, a shard missing (a gap) or given twice
            (an overlap), or parts from different models, calibration text or settings,
            naming the first field where two parts differ.
    """
    if not parts:
        raise AllocplanError("no profile parts to merge; give every part `allocplan profile --shard` wrote")
    names = names or [f"part {i}" for i in range(len(parts))]
    count = parts[0].shard.count
    for name, part in zip(names, parts):
        if part.shard.count != count:
            raise AllocplanError(f"{name} is shard {part.shard} but {names[0]} is shard {parts[0].shard}: the parts"
                                 " come from different shardings; merge the parts of one run")
    owners: dict[int, str] = {}
    for name, part in zip(names, parts):
        if part.shard.index in owners:
            raise AllocplanError(f"shard {part.shard} is given twice ({owners[part.shard.index]} and {name}): the"
                                 " parts overlap; give each shard once")
        owners[part.shard.index] = name
    missing = [str(i) for i in range(count) if i not in owners]
    if missing:
        listed = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise AllocplanError(f"shard(s) {listed} of {count} are missing: the parts leave gaps in the (layer, k) grid;"
                             " give every part")
    reference = _without_sensitivities(parts[0].profile)
    for name, part in zip(names[1:], parts[1:]):
        difference = _first_difference(reference, _without_sensitivities(part.profile), "profile")
        if difference is not None:
            raise AllocplanError(f"{name} and {names[0]} differ at {difference}: parts must come from the same model,"
                                 " calibration text, settings and software; re-run the shards alike")
        if part.profile.compensation_data != parts[0].profile.compensation_data:
            raise AllocplanError(f"{name} and {names[0]} hold different compensation vectors; re-run the shards alike")
    # A cell (layer, k) holds S[l, k] and, with compensation, S[l, k, r] for every stand-in rank r: its owner
    # measured them all.
    owner: dict[tuple[int, int | float], LayerSensitivity] = {}
    for part in parts:
        rows = part.profile.layers
        for position, k in part.cells():
            owner[position, k] = rows[position]
    base = parts[0].profile
    layers = tuple(
        dataclasses.replace(
            layer, sensitivity={k: owner[position, k].sensitivity[k] for k in layer.sensitivity},
            stand_in_sensitivity=None if layer.stand_in_sensitivity is None else {
                rank: {k: owner[position, k].stand_in_sensitivity[rank][k] for k in row}
                for rank, row in layer.stand_in_sensitivity.items()})
        for position, layer in enumerate(base.layers)
    )
    return dataclasses.replace(base, layers=layers)
