"""Alloc-L step 2: turn a sensitivity profile and a budget into a plan.

Pure: reads the profile, solves the allocation with the DP, confirms it with
the ILP, and builds the Plan. No torch, so ``allocplan solve`` runs anywhere.
"""

from __future__ import annotations

from allocplan._version import __version__
from allocplan.errors import AllocplanError
from allocplan.planner.budget import resolve_budget
from allocplan.planner.plan import (
    PLAN_KIND,
    PLAN_SCHEMA_VERSION,
    Budget,
    LayerPlan,
    Plan,
    PlanProvenance,
    SolverRecord,
    TokenLevel,
    Weights,
)
from allocplan.planner.problem import AllocationProblem
from allocplan.planner.profile_format import SensitivityProfile
from allocplan.planner.solve import objectives_agree, solve_checked


def solve_profile(
    profile: SensitivityProfile,
    *,
    budget_ratio: float | None = None,
    budget_activations: int | None = None,
    token_level: bool = True,
    k_base: int = 1,
    k_max: int | None = None,
    renormalize: str = "model",
    reference_k: int | None = None,
) -> Plan:
    """The optimal per-layer allocation of ``profile`` under a budget, as a Plan.

    Args:
        profile: measured sensitivities S[l, k].
        budget_ratio: fraction of the model's total original top-k, in (0, 1].
        budget_activations: absolute total activations per token (instead of a ratio).
        token_level: enable Alloc-T at runtime (see :class:`allocplan.planner.plan.TokenLevel`).
        k_base / k_max: Alloc-T's per-token floor and candidate width (None: original k).
        renormalize / reference_k: weight mode (see :class:`allocplan.planner.plan.Weights`).

    Raises:
        AllocplanError: invalid or infeasible budget (the message names the smallest feasible
            one), or routing settings that do not fit the model.
        SolverDisagreement / RuntimeError: the ILP did not confirm the DP optimum.
    """
    k_min = profile.measurement.k_min
    original = sum(layer.original_k for layer in profile.layers)
    total = resolve_budget(
        original,
        k_min * len(profile.layers),
        budget_ratio=budget_ratio,
        budget_activations=budget_activations,
    )
    # The solvers work in whole units: a half-expert grid is solved in half-experts.
    units = int(round(1 / profile.measurement.k_step))
    if units != 1 and not token_level:
        raise AllocplanError(
            "this profile has a half-expert grid, whose fractional k only token-level allocation can run;"
            " solve with --token-level"
        )
    problem = AllocationProblem(
        choices=tuple(tuple(int(round(k * units)) for k in layer.sensitivity) for layer in profile.layers),
        costs=tuple(tuple(layer.sensitivity.values()) for layer in profile.layers),
        budget=total * units,
    )
    checked = solve_checked(problem)
    ks = [k // units if k % units == 0 else k / units for k in checked.allocation.ks]
    return Plan(
        schema_version=PLAN_SCHEMA_VERSION,
        kind=PLAN_KIND,
        model=profile.model,
        budget=Budget(
            ratio=budget_ratio,
            total_activations=total,
            original_activations=original,
            planned_activations=sum(ks),
        ),
        layers=tuple(
            LayerPlan(path=layer.path, index=layer.index, original_k=layer.original_k, planned_k=k)
            for layer, k in zip(profile.layers, ks)
        ),
        token_level=TokenLevel(enabled=token_level, k_base=k_base, k_max=k_max),
        weights=Weights(renormalize=renormalize, reference_k=reference_k),
        solver=SolverRecord(
            metric=profile.measurement.metric,
            dp_objective=checked.dp_objective,
            ilp_objective=checked.ilp_objective,
            ilp_status=checked.ilp_status,
            objectives_agree=objectives_agree(checked.dp_objective, checked.ilp_objective),
        ),
        provenance=PlanProvenance(
            allocplan_version=__version__,
            torch_version=profile.provenance.torch_version,
            transformers_version=profile.provenance.transformers_version,
            strategy=profile.measurement.strategy,
            k_min=k_min,
            profile_sha256=profile.content_hash(),
            calibration=profile.measurement.calibration,
        ),
    )
