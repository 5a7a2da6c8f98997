"""The allocation plan: the versioned, strictly validated YAML artifact.

A plan names every MoE layer of one model by exact module path and gives its
planned number of routed experts per token. It is what CI stores and reviews,
so it is canonical (same inputs, same bytes), carries provenance, and loads
strictly: unknown keys, wrong types and other schema versions are errors.
Pure: no torch. See docs/plan-format.md for a field-by-field description.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from allocplan.errors import AllocplanError
from allocplan.planner.budget import round_half_up
from allocplan.planner.provenance import CalibrationRecord, ModelIdentity
from allocplan.planner.records import atomic_write_text, dump_yaml, from_data, load_yaml_file, to_data

PLAN_KIND = "allocplan-plan"
# Weight normalisation modes the runtime implements (see allocplan.runtime.routing.reweight).
RENORMALIZE_MODES = ("model", "none", "renorm", "decoupled")
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
class LayerPlan:
    """One MoE layer's allocation.

    Attributes:
        path: exact module path of the MoE block (``model.layers.3.mlp``).
        index: decoder layer index (the number in ``path``).
        original_k: the model's own top-k for this layer.
        planned_k: experts per token under the plan; a whole number unless token-level
            allocation is enabled, which realises fractional averages.
    """

    path: str
    index: int
    original_k: int
    planned_k: int | float


@dataclass(frozen=True)
class TokenLevel:
    """Alloc-T: redistribute a layer's activations between the tokens of a forward pass.

    Attributes:
        enabled: whether the runtime redistributes (otherwise plain top-k_l per token).
        k_base: experts every real token keeps before the redistribution (capped at
            floor(planned_k) in a layer).
        k_max: most experts one token can get; candidates are each token's top-k_max.
            None means each layer's original_k.
    """

    enabled: bool
    k_base: int
    k_max: int | None


@dataclass(frozen=True)
class Weights:
    """How the combine weights of the experts that still run are normalised.

    Attributes:
        renormalize: ``model`` (as the family does when it routes to the kept set
            natively), ``none`` (the router's weights at its original k), ``renorm``
            (kept weights sum to the family's scaling factor) or ``decoupled``
            (divided by the mass of the token's top-``reference_k`` candidates).
        reference_k: k' for ``decoupled``; None means each layer's original_k.
    """

    renormalize: str
    reference_k: int | None


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
    """A compiled allocation plan for one model.

    Build one with :func:`allocplan.compile_plan` or :func:`allocplan.solve_profile`,
    read one with :func:`load_plan`, apply it with :func:`allocplan.apply_plan`.
    Construction validates every invariant listed in docs/plan-format.md.
    """

    schema_version: int
    kind: str
    model: ModelIdentity
    budget: Budget
    layers: tuple[LayerPlan, ...]
    token_level: TokenLevel
    weights: Weights
    solver: SolverRecord
    provenance: PlanProvenance

    @property
    def uses_routing_hooks(self) -> bool:
        """True when the runtime must rewrite routing (Alloc-T or a non-native weight mode)."""
        return self.token_level.enabled or self.weights.renormalize != "model"

    def __post_init__(self) -> None:
        validate_plan(self)

    def to_yaml(self) -> str:
        """Canonical YAML text (byte-identical for equal plans)."""
        return dump_yaml(to_data(self))

    def planned_k_by_path(self) -> dict[str, int | float]:
        """Module path -> planned k."""
        return {layer.path: layer.planned_k for layer in self.layers}


def _fail(where: str, message: str) -> None:
    raise AllocplanError(f"{where}: {message}")


def validate_plan(plan: Plan, where: str = "plan") -> None:
    """Check the plan's internal consistency, including the budget arithmetic.

    Raises:
        AllocplanError: naming the first inconsistent field.
    """
    if plan.schema_version != PLAN_SCHEMA_VERSION:
        _fail(f"{where}.schema_version", f"{plan.schema_version} is not {PLAN_SCHEMA_VERSION}")
    if plan.kind != PLAN_KIND:
        _fail(f"{where}.kind", f"{plan.kind!r} is not {PLAN_KIND!r}")
    if not plan.layers:
        _fail(f"{where}.layers", "is empty; a plan needs one entry per MoE layer")
    if len(plan.layers) != plan.model.num_moe_layers:
        _fail(f"{where}.layers", f"has {len(plan.layers)} entries but model.num_moe_layers is {plan.model.num_moe_layers}")
    k_min = plan.provenance.k_min
    if k_min < 1:
        _fail(f"{where}.provenance.k_min", f"must be at least 1, got {k_min}")
    previous = -1
    seen_paths: set[str] = set()
    for i, layer in enumerate(plan.layers):
        at = f"{where}.layers[{i}]"
        if layer.index <= previous:
            _fail(f"{at}.index", f"layers must be sorted by increasing index ({layer.index} after {previous})")
        previous = layer.index
        if layer.path in seen_paths:
            _fail(f"{at}.path", f"{layer.path!r} appears twice")
        seen_paths.add(layer.path)
        if str(layer.index) not in layer.path.split("."):
            _fail(f"{at}.path", f"{layer.path!r} does not contain its layer index {layer.index}")
        if not (k_min <= layer.planned_k <= layer.original_k):
            _fail(f"{at}.planned_k", f"{layer.planned_k} is outside [k_min={k_min}, original_k={layer.original_k}]")
        if not plan.token_level.enabled and not float(layer.planned_k).is_integer():
            _fail(f"{at}.planned_k", f"{layer.planned_k} is fractional, which needs token_level.enabled: true")
    smallest_k = min(layer.original_k for layer in plan.layers)
    token_level = plan.token_level
    if not (0 <= token_level.k_base <= smallest_k):
        _fail(f"{where}.token_level.k_base", f"{token_level.k_base} must be between 0 and the smallest original_k {smallest_k}")
    if token_level.k_max is not None:
        if not (1 <= token_level.k_max <= smallest_k):
            _fail(f"{where}.token_level.k_max", f"{token_level.k_max} must be between 1 and the smallest original_k {smallest_k}")
        if token_level.k_max < token_level.k_base:
            _fail(f"{where}.token_level.k_max", f"{token_level.k_max} is below k_base {token_level.k_base}")
        for i, layer in enumerate(plan.layers):
            if layer.planned_k > token_level.k_max:
                _fail(f"{where}.layers[{i}].planned_k", f"{layer.planned_k} exceeds token_level.k_max {token_level.k_max}")
    weights = plan.weights
    if weights.renormalize not in RENORMALIZE_MODES:
        _fail(f"{where}.weights.renormalize", f"{weights.renormalize!r} is not one of {', '.join(RENORMALIZE_MODES)}")
    if weights.reference_k is not None:
        if weights.renormalize != "decoupled":
            _fail(f"{where}.weights.reference_k", "is only used with renormalize: decoupled; set it to null")
        if not (1 <= weights.reference_k <= smallest_k):
            _fail(f"{where}.weights.reference_k", f"{weights.reference_k} must be between 1 and the smallest original_k {smallest_k}")

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
