"""The allocation plan: the versioned, strictly validated YAML artifact.

A plan is an :class:`~allocplan.formats.allocation.Allocation` (per-layer k by
exact module path, token-level and weight settings) plus the budget it was
solved for, the solver's record and where it came from. It is what CI stores
and reviews, so it is canonical (same inputs, same bytes), carries provenance,
and loads strictly: unknown keys, wrong types and other schema versions are
errors. Pure: no torch. See docs/plan-format.md for a field-by-field description.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..errors import AllocplanError
from .allocation import Allocation, LayerAllocation, TokenLevel, Weights, validate_allocation
from .budget import round_half_up
from .provenance import CalibrationRecord, ModelIdentity
from .records import atomic_write_text, dump_yaml, from_data, load_yaml_file, to_data

PLAN_KIND = "allocplan-plan"
PLAN_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Budget:
    """The activation budget and how it was spent.

    Attributes:
        ratio: the ``--budget`` ratio, or None when an absolute count was given.
        total_activations: B, the allowed routed activations per token over all MoE layers.
        original_activations: sum of the original top-k, K_l, over MoE layers.
        planned_activations: sum of the planned k_l; never above ``total_activations``.
    """

    ratio: float | None
    total_activations: int
    original_activations: int
    planned_activations: int | float


@dataclass(frozen=True)
class SolverRecord:
    """The layer-level optimisation and its cross-check.

    Attributes:
        metric: unit of the objectives (``nll`` or ``kl``, nats per token).
        dp_objective: sum of S[l, k_l] for the dynamic programme's allocation.
        ilp_objective: the same sum for the OR-Tools ILP's allocation.
        ilp_status: the ILP's termination status (always ``OPTIMAL`` in a valid plan).
        objectives_agree: the two objectives agree to 1e-9 relative.
    """

    metric: str
    dp_objective: float
    ilp_objective: float
    ilp_status: str
    objectives_agree: bool


@dataclass(frozen=True)
class PlanProvenance:
    """Where the plan came from (like lm-eval's environment info, minus wall-clock time).

    Attributes:
        allocplan_version: allocplan that solved the plan.
        torch_version / transformers_version: the versions the sensitivities were measured with.
        strategy: profiling strategy (``isolated`` or ``paper``).
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
    solver: SolverRecord
    provenance: PlanProvenance

    @classmethod
    def build(cls, allocation: Allocation, budget: Budget, solver: SolverRecord,
              provenance: PlanProvenance) -> "Plan":
        """The plan of this allocplan's schema version made of its parts."""
        return cls(
            schema_version=PLAN_SCHEMA_VERSION, kind=PLAN_KIND, model=allocation.model, budget=budget,
            layers=allocation.layers, token_level=allocation.token_level, weights=allocation.weights,
            solver=solver, provenance=provenance,
        )

    @property
    def allocation(self) -> Allocation:
        """The part ``apply_plan`` runs: model identity, per-layer k, token-level and weight settings."""
        return Allocation(model=self.model, layers=self.layers, token_level=self.token_level, weights=self.weights)

    def __post_init__(self) -> None:
        validate_plan(self)

    def to_yaml(self) -> str:
        """Canonical YAML text (byte-identical for equal plans)."""
        return dump_yaml(to_data(self))


def _fail(where: str, message: str) -> None:
    raise AllocplanError(f"{where}: {message}")


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
    if solver.ilp_status != "OPTIMAL" or not solver.objectives_agree:
        _fail(f"{where}.solver", "the ILP cross-check did not confirm the DP optimum; recompile the plan")


def plan_from_data(data: object, where: str = "plan") -> Plan:
    """Strictly build a plan from parsed YAML data (version checked first)."""
    if isinstance(data, dict):
        if data.get("kind") != PLAN_KIND:
            _fail(where, f"kind is {data.get('kind')!r}, not {PLAN_KIND!r}; is this an allocplan plan?")
        version = data.get("schema_version")
        if version != PLAN_SCHEMA_VERSION:
            _fail(
                where,
                f"schema_version {version!r} is not supported (this allocplan reads version"
                f" {PLAN_SCHEMA_VERSION}); recompile the plan with this allocplan",
            )
    return from_data(Plan, data, where)


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Load and strictly validate a plan file.

    Raises:
        AllocplanError: unreadable file, invalid YAML, wrong kind or version,
            unknown keys, wrong types, or broken budget arithmetic.
    """
    return plan_from_data(load_yaml_file(path, "plan"), where=f"plan {os.fspath(path)!r}")


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Write the plan atomically as canonical YAML."""
    atomic_write_text(path, plan.to_yaml())
