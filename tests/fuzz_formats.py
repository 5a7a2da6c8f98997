"""Fuzzing plan and profile loading: mutated documents, and an independent check of what is accepted.

Shared by tests/test_fuzz.py and scripts/make_reliability.py. A mutation edits the
parsed data (replace, delete or add a value anywhere, with values of every type and
size), the YAML text itself (insert, delete or replace characters, including YAML's
syntax characters) or the file's bytes (control characters, NUL, byte-order marks,
bytes that are not UTF-8, truncation inside a multi-byte character). Loading may only raise AllocplanError; a document it
accepts must satisfy every documented invariant, checked here without the format's
own validation code.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from hypothesis import strategies as st

import allocplan
from allocplan.errors import AllocplanError
from allocplan.formats.plan import Plan, plan_from_data
from allocplan.formats.profile import SensitivityProfile, profile_from_data
from allocplan.formats.records import to_data
from allocplan.formats.strict_yaml import decode_text, load_strict

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=50),
    st.sampled_from(["yes", "on", "0o17", "1:30", ".nan", "1e-3", "sha256:" + "0" * 64, "sha256:0123456789abcdef",
                     "batch", "sequence", "kl", "linear", "model.layers.0.mlp", "x" * 2000]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)
YAML_CHARACTERS = st.sampled_from(list(":&*!{}[]-#|>'\"\n ,?%@`0123456789.eE+-yesno~"))


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location (a tuple of keys and indices) inside nested dicts and lists."""
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, prefix + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _paths(value, prefix + (index,))
    return found


@st.composite
def mutated_data(draw: Any, base: dict) -> Any:
    """``base`` with one to three random edits at random locations."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        locations = _paths(data)
        where = draw(st.sampled_from(locations))
        if not where:
            data = draw(VALUES) if draw(st.booleans()) and draw(st.booleans()) else data
            continue
        parent = data
        for step in where[:-1]:
            parent = parent[step]
        last = where[-1]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[last] = draw(VALUES)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(VALUES)
        else:
            parent.insert(last, draw(VALUES))
    return data


@st.composite
def mutated_text(draw: Any, base: str) -> str:
    """``base`` YAML text with one to four character-level edits."""
    text = base
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = "".join(draw(st.lists(YAML_CHARACTERS, min_size=1, max_size=6)))
        if action == "insert":
            text = text[:at] + piece + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + len(piece):]
        else:
            text = text[:at] + piece + text[at + len(piece):]
    return text


# Byte-level edits: control characters and NUL, a byte-order mark anywhere, bytes that are not UTF-8
# (a lone continuation byte, 0xFF, a UTF-16 surrogate encoded as UTF-8), and multi-byte characters
# that a truncation may cut in two.
CONTROL_BYTES = st.sampled_from([bytes([c]) for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F)]
                                + [b"\xc2\x85", b"\xc2\x9f"])
ODD_BYTES = st.sampled_from([b"\xef\xbb\xbf", b"\xff", b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                             "é".encode(), "€".encode(), "𝄞".encode()])


@st.composite
def mutated_bytes(draw: Any, base: str) -> bytes:
    """``base`` encoded as UTF-8 with one to three byte-level edits: an inserted control character or odd
    byte sequence, or a truncation (anywhere, so also inside a multi-byte character)."""
    data = base.encode("utf-8")
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["control", "odd", "odd", "truncate"]))
        if action == "truncate":
            data = data[:at]
        else:
            data = data[:at] + draw(CONTROL_BYTES if action == "control" else ODD_BYTES) + data[at:]
    return data


def base_documents() -> tuple[dict, dict]:
    """A valid plan and profile as plain data (a three-layer profile solved at 0.5)."""
    from test_plan_format import make_profile

    profile = make_profile()
    return to_data(allocplan.solve_profile(profile, 0.5)), to_data(profile)


def load(kind: str, data: Any) -> Any:
    """Build a plan or profile from data: the object, or None when refused with AllocplanError."""
    try:
        return plan_from_data(data) if kind == "plan" else profile_from_data(data)
    except AllocplanError:
        return None


def load_text(kind: str, text: str) -> Any:
    try:
        data = load_strict(text, kind, "'fuzz.yaml'")
    except AllocplanError:
        return None
    return load(kind, data)


def load_bytes(kind: str, data: bytes) -> Any:
    """As the loaders read a file: its bytes decoded, then parsed and built; None when refused."""
    try:
        text = decode_text(data, kind, "'fuzz.yaml'")
    except AllocplanError:
        return None
    return load_text(kind, text)


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5 + 1e-9))


def plan_invariants(plan: Plan) -> None:
    """Every invariant docs/plan-format.md lists, checked independently of validate_plan."""
    layers = plan.layers
    assert plan.schema_version == 3 and plan.kind == "allocplan-plan"
    assert len(layers) == plan.model.num_moe_layers >= 1
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", plan.model.fingerprint)
    assert 1 <= plan.model.num_experts
    indices = [layer.index for layer in layers]
    assert indices == sorted(set(indices))
    assert len({layer.path for layer in layers}) == len(layers)
    k_min = plan.provenance.k_min
    for layer in layers:
        assert str(layer.index) in layer.path.split(".")
        assert k_min <= layer.planned_k <= layer.original_k <= plan.model.num_experts
        assert plan.token_level.enabled or float(layer.planned_k).is_integer()
        assert 0 < layer.gain <= 10 and math.isfinite(layer.gain)
        width = plan.token_level.k_max or layer.original_k
        assert layer.normalizer_k is None or 1 <= layer.normalizer_k <= width
    smallest = min(layer.original_k for layer in layers)
    assert 0 <= plan.token_level.k_base <= smallest
    if plan.token_level.k_max is not None:
        assert plan.token_level.k_base <= plan.token_level.k_max <= smallest
        assert all(layer.planned_k <= plan.token_level.k_max for layer in layers)
    assert plan.token_level.scope in ("batch", "sequence")
    assert plan.token_level.prefer in ("score", "active")
    assert plan.weights.renormalize in ("model", "none", "renorm", "decoupled")
    assert plan.weights.reference_k is None or (plan.weights.renormalize == "decoupled"
                                                and 1 <= plan.weights.reference_k <= smallest)
    budget = plan.budget
    original = sum(layer.original_k for layer in layers)
    planned = sum(layer.planned_k for layer in layers)
    assert budget.original_activations == original
    assert abs(budget.planned_activations - planned) <= 1e-9
    assert planned <= budget.total_activations + 1e-9 and 0 < budget.total_activations <= original
    if budget.charged_work is not None:  # charged: experts plus stand-ins, within the budget
        assert abs(budget.charged_work - planned - budget.stand_in_work) <= 1e-6
        assert budget.charged_work <= budget.total_activations + 1e-6
    if budget.ratio is not None:
        assert 0 < budget.ratio <= 1 and budget.total_activations == _round_half_up(budget.ratio * original)
    solver = plan.solver
    assert solver.metric in ("nll", "kl", "output-change") and solver.ilp_status == "OPTIMAL"
    assert solver.objectives_agree and math.isclose(solver.dp_objective, solver.ilp_objective, rel_tol=1e-9,
                                                    abs_tol=1e-9)
    if solver.refinement is not None:
        values = [solver.refinement.objective_before] + [step.objective for step in solver.refinement.steps]
        assert all(b < a for a, b in zip(values, values[1:])) and solver.refinement.objective_after == values[-1]
    calibration = plan.provenance.calibration
    assert calibration.tokens == calibration.windows * calibration.seq_len >= 1
    assert plan.provenance.strategy in ("isolated", "paper", "anchored", "data-free")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", plan.provenance.profile_sha256)
    assert plan.compensation is None or re.fullmatch(r"[^/\\]+\.safetensors", plan.compensation.file)


def profile_invariants(profile: SensitivityProfile) -> None:
    """The profile's documented invariants, checked independently."""
    measurement = profile.measurement
    assert profile.schema_version == 3 and profile.kind == "allocplan-profile"
    assert measurement.metric in ("nll", "kl", "output-change")
    assert measurement.strategy in ("isolated", "paper", "anchored", "data-free")
    assert measurement.k_step in (1.0, 0.5) and measurement.k_min >= 1
    assert measurement.k_step == 1.0 or measurement.token_level
    assert len(profile.layers) == profile.model.num_moe_layers >= 1
    assert (measurement.compensation == "off") == (profile.compensation is None)
    for layer in profile.layers:
        assert measurement.k_min <= layer.original_k <= profile.model.num_experts
        steps = round((layer.original_k - measurement.k_min) / measurement.k_step)
        grid = [measurement.k_min + i * measurement.k_step for i in range(steps + 1)]
        assert sorted(layer.sensitivity) == grid
        assert all(math.isfinite(v) and abs(v) <= 1000 for v in layer.sensitivity.values())
        for row in (layer.normalizer_k, layer.gain):
            assert row is None or sorted(row) == grid
        assert all(0 < g <= 10 for g in (layer.gain or {}).values())


# ---------------------------------------------------------------- structure-aware: valid plans, applied


@st.composite
def structured_plan_data(draw: Any, base: dict) -> dict:
    """A plan for ``base``'s model built field by field within the documented bounds (so most are accepted):
    per-layer k on the token-level grid, Alloc-T settings, weight modes and treatments, a budget that the
    planned k fit, with or without ``base``'s compensation sidecar. Some draws step just outside a bound
    (a k_max below k_base, a reference_k without decoupled weights), which must then be refused."""
    data = copy.deepcopy(base)
    layers = data["layers"]
    smallest = min(layer["original_k"] for layer in layers)
    token_level = draw(st.booleans())
    k_base = draw(st.integers(0, smallest)) if token_level else 1
    k_max = draw(st.one_of(st.none(), st.integers(1, smallest))) if token_level else None
    step = draw(st.sampled_from([1.0, 0.5])) if token_level else 1.0
    for layer in layers:
        top = min(layer["original_k"], k_max or layer["original_k"])
        k = draw(st.integers(2, max(2, int(2 * top)))) * 0.5 if step == 0.5 else draw(st.integers(1, top))
        layer["planned_k"] = k if not float(k).is_integer() else int(k)
        width = k_max or layer["original_k"]
        layer["normalizer_k"] = draw(st.one_of(st.none(), st.integers(1, width)))
        layer["gain"] = draw(st.sampled_from([1.0, 1.0, 0.5, 1.25, 2.0]))
    data["token_level"] = {"enabled": token_level, "k_base": k_base, "k_max": k_max,
                           "scope": draw(st.sampled_from(["batch", "sequence"])),
                           "prefer": draw(st.sampled_from(["score", "active"]))}
    if not token_level:
        data["token_level"].update(k_base=1, k_max=None, scope="batch", prefer="score")
    renormalize = draw(st.sampled_from(["model", "none", "renorm", "decoupled"]))
    reference_k = draw(st.one_of(st.none(), st.integers(1, smallest))) if renormalize == "decoupled" else None
    if draw(st.integers(0, 9)) == 0:  # a reference_k without decoupled weights: refused
        reference_k = 1
    data["weights"] = {"renormalize": renormalize, "reference_k": reference_k}
    planned = sum(layer["planned_k"] for layer in layers)
    original = data["budget"]["original_activations"]
    if draw(st.booleans()):
        data["compensation"] = None
    # Layers keep the base plan's stand-in ranks (the sidecar holds exactly those); without compensation none.
    # The charge of a rank-r stand-in per dropped candidate of the tiny olmoe: (2 r H + H) / M, H 32, M 6144.
    stand_in = 0.0
    for layer in layers:
        if data["compensation"] is None:
            layer["stand_in_rank"] = None
        elif layer["stand_in_rank"] is not None:
            stand_in += (layer["original_k"] - layer["planned_k"]) * (2 * layer["stand_in_rank"] + 1) * 32 / 6144
    charged = float(f"{planned + stand_in:.9g}")
    total = draw(st.integers(max(1, math.ceil(charged - 1e-9)), original))
    data["budget"].update(planned_activations=planned, total_activations=total, ratio=None,
                          stand_in_work=float(f"{stand_in:.9g}"), charged_work=charged,
                          sidecar_bytes=data["budget"]["sidecar_bytes"] if data["compensation"] else 0,
                          sidecar_share=data["budget"]["sidecar_share"] if data["compensation"] else 0.0)
    return data


def apply_and_check(plan: Plan, model: Any, ids: Any, sidecar: bytes | None) -> dict:
    """Apply ``plan`` to ``model``, run ``ids``, remove it; check the invariants of an applied plan: routed
    experts per token at most the budget (plus Alloc-T's rounding of each layer's pairs, at most half a pair
    per layer and forward), finite logits, and the model bit-identical after ``remove()``."""
    import dataclasses

    import torch

    from allocplan.runtime.measure import count_activations

    if plan.compensation is not None:
        plan = dataclasses.replace(plan, compensation_data=sidecar)
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        handle = allocplan.apply_plan(model, plan)
        try:
            with count_activations(model) as counts:
                planned = model(input_ids=ids).logits
        finally:
            handle.remove()
        after = model(input_ids=ids).logits
    tokens = ids.numel()
    slack = len(plan.layers) * 0.5 / tokens
    measured = counts.total_per_token() + counts.stand_in_work_per_token()  # charged: experts and stand-ins
    assert measured <= plan.budget.total_activations + slack + 1e-9, (measured, plan.budget.total_activations)
    assert bool(torch.isfinite(planned).all())
    assert torch.equal(before, after)
    return {"activations": measured}
