"""The allocation plan: the versioned, strictly validated YAML artifact.

A plan is an :class:`~allocplan.formats.allocation.Allocation` (per-layer k by
exact module path, token-level and weight settings) plus the budget it was
solved for, the solver's record and where it came from. It is what CI stores
and reviews, so it is canonical (same inputs, same bytes), carries provenance,
and loads strictly: unknown keys, wrong types and other schema versions are
errors. Pure: no torch. See docs/plan-format.md for a field-by-field description.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import AllocplanError
from .allocation import Allocation, LayerAllocation, TokenLevel, Weights, validate_allocation
from .budget import round_half_up
from .provenance import (SHA256, CalibrationRecord, ModelIdentity, check_text, upgrade_calibration_data,
                         upgrade_model_data)
from .records import atomic_write_text, dump_yaml, from_data, load_yaml_file, to_data, transient
from .sidecar import CompensationRecord, read_sidecar, write_sidecar
from .strict_yaml import shown

PLAN_KIND = "allocplan-plan"
# The DP's and the ILP's objectives agree when equal to 1e-9, relative or absolute: the ILP stops within
# such a tolerance of its optimum, and sensitivities (stored to 9 significant digits) can be tiny and
# negative, where a relative test alone would flag noise.
AGREEMENT_TOLERANCE = 1e-9
STRATEGIES = ("isolated", "paper", "anchored", "data-free")
METRICS = ("nll", "kl", "output-change")
PLAN_SCHEMA_VERSION = 3
# Earlier versions this allocplan still reads (and upgrades; see upgrade_plan_data).
READABLE_PLAN_VERSIONS = (1, 2, 3)
# Charged work is stored to 9 significant digits, so a plan that spends its whole budget may read above it
# by that rounding.
WORK_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Budget:
    """The activation budget and how it was spent.

    Attributes:
        ratio: the ``--budget`` ratio, or None when an absolute count was given.
        total_activations: B, the allowed routed activations per token over all MoE layers.
        original_activations: sum of the original top-k, K_l, over MoE layers.
        planned_activations: sum of the planned k_l; never above ``total_activations``.
        stand_in_work: the work of the stand-ins that serve dropped candidates, in
            expert-equivalents per token (one routed expert's multiply-adds is 1; each dropped
            candidate charges its stand-in's multiply-adds over the expert's).
        charged_work: planned_activations plus stand_in_work: what the budget counts, never
            above ``total_activations``.
        sidecar_bytes: the stand-ins' sidecar file, in bytes (0 without one).
        sidecar_share: those bytes over the routed experts' weights (in the dtype profiled).

    The last four are null in a plan written before version 3, which charged experts only.
    """

    ratio: float | None
    total_activations: int
    original_activations: int
    planned_activations: int | float
    stand_in_work: float | None = None
    charged_work: float | None = None
    sidecar_bytes: int | None = None
    sidecar_share: float | None = None


@dataclass(frozen=True)
class RefinementStep:
    """One move of the measured refinement: ``unit`` of k from one layer to another.

    Attributes:
        from_layer / to_layer: decoder layer indices of the layers giving and receiving.
        objective: the measured objective after the move.
    """

    from_layer: int
    to_layer: int
    objective: float


@dataclass(frozen=True)
class RefinementRecord:
    """The measured refinement after the DP (``compile --refine``; see allocplan.planner.refine).

    Attributes:
        metric: what was measured: ``kl``, the mean KL divergence from the full model on
            calibration windows, with every layer reduced together as the plan runs.
        unit: how much k each step moves (1, or 0.5 on a half-expert grid).
        objective_before: the measured objective of the DP's allocation.
        objective_after: the measured objective of the plan's allocation (<= before).
        steps: the moves taken, in order; undoing them gives the DP's allocation.
        measured: allocations run in all.
    """

    metric: str
    unit: float
    objective_before: float
    objective_after: float
    steps: tuple[RefinementStep, ...]
    measured: int


@dataclass(frozen=True)
class SolverRecord:
    """The layer-level optimisation, its cross-check and the measured refinement.

    Attributes:
        metric: unit of the objectives (``nll`` or ``kl``, nats per token).
        dp_objective: sum of S[l, k_l] for the dynamic programme's allocation.
        ilp_objective: the same sum for the OR-Tools ILP's allocation.
        ilp_status: the ILP's termination status (always ``OPTIMAL`` in a valid plan).
        objectives_agree: the two objectives agree (``objectives_agree``: 1e-9, relative or absolute).
        refinement: the measured refinement that moved the plan away from the DP's
            allocation, or None when none ran.
    """

    metric: str
    dp_objective: float
    ilp_objective: float
    ilp_status: str
    objectives_agree: bool
    refinement: RefinementRecord | None = None


@dataclass(frozen=True)
class PlanProvenance:
    """Where the plan came from (like lm-eval's environment info, minus wall-clock time).

    Attributes:
        allocplan_version: allocplan that solved the plan.
        torch_version / transformers_version: the versions the sensitivities were measured with.
        strategy: profiling strategy (``isolated``, ``anchored``, ``paper`` or ``data-free``).
        k_min: smallest k a layer could be given.
        profile_sha256: hash of the canonical sensitivity profile the plan was solved from.
        calibration: the calibration text.
    """

    allocplan_version: str
    torch_version: str
    transformers_version: str
    strategy: str
    k_min: int
    profile_sha256: str
    calibration: CalibrationRecord


@dataclass(frozen=True)
class Plan:
    """A compiled allocation plan for one model: an allocation, its budget, solver record and provenance.

    Build one with :func:`allocplan.compile_plan` or :func:`allocplan.solve_profile`
    (or :meth:`Plan.build` from parts), read one with :func:`load_plan`, apply it with
    :func:`allocplan.apply_plan`. The fields are stored flat, in this order, so the
    file reads top to bottom; :attr:`allocation` gives the allocation part.
    Construction validates every invariant listed in docs/plan-format.md.
    """

    schema_version: int
    kind: str
    model: ModelIdentity
    budget: Budget
    layers: tuple[LayerAllocation, ...]
    token_level: TokenLevel
    weights: Weights
    compensation: CompensationRecord | None
    solver: SolverRecord
    provenance: PlanProvenance
    compensation_data: bytes | None = transient()

    @classmethod
    def build(cls, allocation: Allocation, budget: Budget, solver: SolverRecord,
              provenance: PlanProvenance) -> "Plan":
        """The plan of this allocplan's schema version made of its parts."""
        return cls(
            schema_version=PLAN_SCHEMA_VERSION, kind=PLAN_KIND, model=allocation.model, budget=budget,
            layers=allocation.layers, token_level=allocation.token_level, weights=allocation.weights,
            compensation=allocation.compensation, solver=solver, provenance=provenance,
            compensation_data=allocation.compensation_data,
        )

    @property
    def allocation(self) -> Allocation:
        """The part ``apply_plan`` runs: model identity, per-layer k and treatments, routing, compensation."""
        return Allocation(model=self.model, layers=self.layers, token_level=self.token_level, weights=self.weights,
                          compensation=self.compensation, compensation_data=self.compensation_data)

    def __post_init__(self) -> None:
        validate_plan(self)

    def to_yaml(self) -> str:
        """Canonical YAML text (byte-identical for equal plans)."""
        return dump_yaml(to_data(self))


def _fail(where: str, message: str) -> None:
    raise AllocplanError(f"{where}: {message}")


def objectives_agree(a: float, b: float) -> bool:
    """Whether the DP's and the ILP's objectives agree (see AGREEMENT_TOLERANCE)."""
    return math.isclose(a, b, rel_tol=AGREEMENT_TOLERANCE, abs_tol=AGREEMENT_TOLERANCE)


def validate_plan(plan: Plan, where: str = "plan") -> None:
    """Check the plan's internal consistency: its allocation, then the budget arithmetic.

    Raises:
        AllocplanError: naming the first inconsistent field.
    """
    if plan.schema_version != PLAN_SCHEMA_VERSION:
        _fail(f"{where}.schema_version", f"{plan.schema_version} is not {PLAN_SCHEMA_VERSION}")
    if plan.kind != PLAN_KIND:
        _fail(f"{where}.kind", f"{plan.kind!r} is not {PLAN_KIND!r}")
    k_min = plan.provenance.k_min
    if k_min < 1:
        _fail(f"{where}.provenance.k_min", f"must be at least 1, got {k_min}")
    validate_allocation(plan, where, k_min=k_min)  # a plan has every field an allocation has

    budget = plan.budget
    original = sum(layer.original_k for layer in plan.layers)
    planned = sum(layer.planned_k for layer in plan.layers)
    if budget.original_activations != original:
        _fail(f"{where}.budget.original_activations", f"is {budget.original_activations} but the layers' original_k sum to {original}")
    if not math.isclose(budget.planned_activations, planned, rel_tol=0, abs_tol=1e-9):
        _fail(f"{where}.budget.planned_activations", f"is {budget.planned_activations} but the layers' planned_k sum to {planned}")
    if not (0 < budget.total_activations <= original):
        _fail(f"{where}.budget.total_activations", f"{budget.total_activations} is outside (0, {original}]")
    if planned > budget.total_activations + 1e-9:
        _fail(f"{where}.budget", f"planned activations {planned} exceed total_activations {budget.total_activations}")
    charged = (budget.stand_in_work, budget.charged_work, budget.sidecar_bytes, budget.sidecar_share)
    if any(value is None for value in charged) and any(value is not None for value in charged):
        _fail(f"{where}.budget", "stand_in_work, charged_work, sidecar_bytes and sidecar_share are all given or all"
                                 " null (a plan before version 3)")
    if budget.charged_work is not None:
        if budget.stand_in_work < 0 or budget.sidecar_bytes < 0 or budget.sidecar_share < 0:
            _fail(f"{where}.budget", "stand_in_work, sidecar_bytes and sidecar_share cannot be negative")
        if not math.isclose(budget.charged_work, planned + budget.stand_in_work, rel_tol=0, abs_tol=WORK_TOLERANCE):
            _fail(f"{where}.budget.charged_work", f"is {budget.charged_work} but planned activations {planned} plus"
                                                  f" stand_in_work {budget.stand_in_work} make"
                                                  f" {planned + budget.stand_in_work:.9g}")
        if budget.charged_work > budget.total_activations + WORK_TOLERANCE:
            _fail(f"{where}.budget.charged_work", f"{budget.charged_work} exceeds total_activations"
                                                  f" {budget.total_activations}: the plan spends more than its budget")
        if (budget.stand_in_work > 0) != (plan.compensation is not None):
            _fail(f"{where}.budget.stand_in_work", f"is {budget.stand_in_work} but the plan"
                                                   f" {'names' if plan.compensation else 'has no'} stand-ins")
        # The sidecar's size is known once its bytes are held (load_plan reads them just after the YAML).
        held = (len(plan.compensation_data) if plan.compensation_data is not None
                else 0 if plan.compensation is None else None)
        if held is not None and budget.sidecar_bytes != held:
            _fail(f"{where}.budget.sidecar_bytes", f"is {budget.sidecar_bytes} but the sidecar holds {held}")
    if budget.ratio is not None:
        if not (0 < budget.ratio <= 1):
            _fail(f"{where}.budget.ratio", f"{budget.ratio} is outside (0, 1]")
        expected = round_half_up(budget.ratio * original)
        if budget.total_activations != expected:
            _fail(
                f"{where}.budget.total_activations",
                f"is {budget.total_activations} but ratio {budget.ratio} of {original} rounds to {expected}",
            )
    solver = plan.solver
    if solver.metric not in METRICS:
        _fail(f"{where}.solver.metric", f"{shown(solver.metric)} is not one of {', '.join(METRICS)}")
    if solver.objectives_agree != objectives_agree(solver.dp_objective, solver.ilp_objective):
        _fail(f"{where}.solver.objectives_agree", f"is {str(solver.objectives_agree).lower()} but the objectives"
                                                  f" {solver.dp_objective} and {solver.ilp_objective} say otherwise")
    if solver.ilp_status != "OPTIMAL" or not solver.objectives_agree:
        _fail(f"{where}.solver", "the ILP cross-check did not confirm the DP optimum; recompile the plan")
    provenance = plan.provenance
    if provenance.strategy not in STRATEGIES:
        _fail(f"{where}.provenance.strategy", f"{shown(provenance.strategy)} is not one of {', '.join(STRATEGIES)}")
    if not SHA256.match(provenance.profile_sha256):
        _fail(f"{where}.provenance.profile_sha256", "must be sha256: and 64 hex digits")
    for name in ("allocplan_version", "torch_version", "transformers_version"):
        check_text(getattr(provenance, name), f"{where}.provenance.{name}")
    experts = plan.model.num_experts
    for i, layer in enumerate(plan.layers):
        if layer.original_k > experts:
            _fail(f"{where}.layers[{i}].original_k", f"{layer.original_k} exceeds model.num_experts {experts}")
    refinement = solver.refinement
    if refinement is not None:
        at = f"{where}.solver.refinement"
        if refinement.unit not in (1.0, 0.5):
            _fail(f"{at}.unit", f"{refinement.unit} is not 1 or 0.5")
        objectives = [refinement.objective_before] + [step.objective for step in refinement.steps]
        if refinement.objective_after != objectives[-1]:
            _fail(f"{at}.objective_after", f"is {refinement.objective_after} but the last measured objective is"
                                           f" {objectives[-1]}")
        if any(later >= earlier for earlier, later in zip(objectives, objectives[1:])):
            _fail(f"{at}.steps", "every step must lower the measured objective")
        indices = {layer.index for layer in plan.layers}
        for i, step in enumerate(refinement.steps):
            if step.from_layer not in indices or step.to_layer not in indices or step.from_layer == step.to_layer:
                _fail(f"{at}.steps[{i}]", "must move k between two different MoE layers of the plan")
        if refinement.measured < 1 + len(refinement.steps):
            _fail(f"{at}.measured", f"{refinement.measured} is fewer than the allocations the steps took")


def upgrade_plan_data(data: dict) -> dict:
    """A version-1 plan's data as version 2: no per-layer treatment, no compensation, no refinement,
    batch-scoped Alloc-T filled by score, an unknown model revision, and calibration text read from a text file.

    Version 2 added fields only, each with the value that means "as version 1 did".
    """
    upgraded = {**data, "schema_version": PLAN_SCHEMA_VERSION}
    if "model" in data:
        upgraded["model"] = upgrade_model_data(data["model"])
    if isinstance(data.get("provenance"), dict):
        upgraded["provenance"] = {**data["provenance"],
                                  "calibration": upgrade_calibration_data(data["provenance"].get("calibration"))}
    if isinstance(data.get("solver"), dict):
        upgraded["solver"] = {**data["solver"], "refinement": None}
    if isinstance(data.get("token_level"), dict):
        upgraded["token_level"] = {**data["token_level"], "scope": "batch", "prefer": "score"}
    ordered = {}
    for key, value in upgraded.items():  # compensation sits after weights, as version 2 writes it
        ordered[key] = value
        if key == "weights":
            ordered["compensation"] = None
    return ordered


def upgrade_plan_data_v2(data: dict) -> dict:
    """A version-2 plan's data as version 3: its budget charged experts only (the charged fields null), and
    its sidecar serves every layer (no layer names a stand-in rank)."""
    upgraded = {**data, "schema_version": PLAN_SCHEMA_VERSION}
    if isinstance(data.get("budget"), dict):
        upgraded["budget"] = {**data["budget"], "stand_in_work": None, "charged_work": None, "sidecar_bytes": None,
                              "sidecar_share": None}
    return upgraded


def plan_from_data(data: object, where: str = "plan") -> Plan:
    """Strictly build a plan from parsed YAML data (version checked first; version 1 is upgraded)."""
    if isinstance(data, dict):
        if data.get("kind") != PLAN_KIND:
            _fail(where, f"kind is {repr(data.get('kind'))[:40]}, not {PLAN_KIND!r}; is this an allocplan plan?")
        version = data.get("schema_version")
        if type(version) is not int or version not in READABLE_PLAN_VERSIONS:
            _fail(
                where,
                f"schema_version {repr(version)[:20]} is not supported (this allocplan reads versions"
                f" {', '.join(map(str, READABLE_PLAN_VERSIONS))}); recompile the plan with this allocplan",
            )
        if version == 1:
            data = upgrade_plan_data(data)
        if version in (1, 2):
            data = upgrade_plan_data_v2(data)
    return from_data(Plan, data, where)


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Load and strictly validate a plan file, and its compensation sidecar if it names one.

    Raises:
        AllocplanError: unreadable file, invalid YAML, wrong kind or version, unknown keys,
            wrong types, broken budget arithmetic, or a missing or changed sidecar.
    """
    where = f"plan {os.fspath(path)!r}"
    plan = plan_from_data(load_yaml_file(path, "plan"), where=where)
    if plan.compensation is None:
        return plan
    data = read_sidecar(Path(path).parent, plan.compensation, where)
    return dataclasses.replace(plan, compensation_data=data)


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Write the plan atomically as canonical YAML, and its compensation sidecar beside it."""
    if plan.compensation is not None:
        if plan.compensation_data is None:
            raise AllocplanError("this plan names a compensation sidecar but holds no vectors; load it from its"
                                 " file or recompile")
        write_sidecar(Path(path).parent if str(Path(path).parent) else ".", plan.compensation, plan.compensation_data)
    atomic_write_text(path, plan.to_yaml())
