"""Alloc-L step 2: turn a sensitivity profile and a budget into a plan.

Pure: reads the profile, solves the allocation with the DP, confirms it with
the ILP (:mod:`~allocplan.planner.crosscheck`), and builds the Plan. No torch,
so ``allocplan solve`` runs anywhere.
"""

from __future__ import annotations

import math
from typing import Any

from allocplan._version import __version__
from allocplan.errors import AllocplanError
from allocplan.formats.allocation import Allocation, LayerAllocation
from allocplan.formats.budget import BudgetRequest
from allocplan.formats.config import RoutingConfig
from allocplan.formats.plan import Budget, Plan, PlanProvenance, SolverRecord
from allocplan.formats.profile import SensitivityProfile
from .crosscheck import objectives_agree, solve_and_check
from .problem import AllocationProblem


def allocation_from_profile(profile: SensitivityProfile, ks: list[int | float],
                            routing: RoutingConfig) -> Allocation:
    """The allocation giving layer l the k ``ks[l]`` with what the profile measured it with.

    Each layer gets the weight treatment fitted for its k (if the profile fitted any)
    and the profile's compensation sidecar: the plan runs what was profiled. A k between
    the profile's grid points (a uniform baseline's fractional k) takes the treatment of
    the nearest one, halves rounding up.
    """
    def treatments(layer: Any, k: int | float) -> tuple[tuple[str, Any], ...]:
        grid = sorted(layer.sensitivity)
        nearest = min(grid, key=lambda g: (abs(g - k), -g))
        return tuple((name, row[nearest]) for name, row in layer.treatments)

    return Allocation(
        model=profile.model,
        layers=tuple(
            LayerAllocation(layer.path, layer.index, layer.original_k, k, treatments(layer, k))
            for layer, k in zip(profile.layers, ks)
        ),
        token_level=routing.token_level_record(),
        weights=routing.weights_record(),
        compensation=profile.compensation,
        compensation_data=profile.compensation_data,
    )


def check_k_max(routing: RoutingConfig, originals: list[int], k_min: int, total: int) -> None:
    """Raise unless a budget of ``total`` activations fits under ``routing.k_max`` (when set): no layer
    may plan more experts per token than one token can run.

    Raises:
        AllocplanError: k_max below k_min or above a layer's original k, or too small for the budget (the
            message names the largest budget it allows).
    """
    routing.check_fits(originals)
    k_max = routing.k_max
    if k_max is None:
        return
    if k_max < k_min:
        raise AllocplanError(f"--k-max {k_max} is below the profile's k_min {k_min}; raise --k-max, or profile"
                             f" again with --k-min {k_max}")
    most = sum(min(k_max, k) for k in originals)
    if total > most:
        raise AllocplanError(
            f"--k-max {k_max} lets the MoE layers run at most {most} activations per token, fewer than the"
            f" budget's {total}; raise --k-max or use --budget-activations {most} or less"
        )


def solve_profile(
    profile: SensitivityProfile,
    budget: float | BudgetRequest,
    routing: RoutingConfig | None = None,
) -> Plan:
    """The optimal per-layer allocation of ``profile`` under a budget, as a Plan.

    Args:
        profile: measured sensitivities S[l, k].
        budget: a ratio of the model's total original top-k in (0, 1], or a
            :class:`~allocplan.formats.budget.BudgetRequest` (ratio or absolute count).
        routing: runtime routing settings recorded in the plan (default:
            :class:`~allocplan.formats.config.RoutingConfig`'s, with Alloc-T on or off as the
            profile was measured, so that the plan runs what was profiled).

    Raises:
        AllocplanError: invalid or infeasible budget (the message names the smallest feasible
            one), or routing settings that do not fit the model.
        SolverDisagreement / RuntimeError: the ILP did not confirm the DP optimum.
    """
    request = BudgetRequest.of(budget)
    routing = routing or RoutingConfig(token_level=profile.measurement.token_level)
    k_min = profile.measurement.k_min
    original = sum(layer.original_k for layer in profile.layers)
    total = request.resolve(original, k_min * len(profile.layers))
    check_k_max(routing, [layer.original_k for layer in profile.layers], k_min, total)
    # A layer cannot plan more experts per token than a token may run (Alloc-T's k_max).
    k_cap = routing.k_max if routing.k_max is not None else math.inf
    # The solvers work in whole units: a half-expert grid is solved in half-experts.
    units = int(round(1 / profile.measurement.k_step))
    if units != 1 and not routing.token_level:
        raise AllocplanError(
            "this profile has a half-expert grid, whose fractional k only token-level allocation can run;"
            " solve with --token-level"
        )
    problem = AllocationProblem(
        choices=tuple(tuple(int(round(k * units)) for k in layer.sensitivity if k <= k_cap)
                      for layer in profile.layers),
        costs=tuple(tuple(cost for k, cost in layer.sensitivity.items() if k <= k_cap) for layer in profile.layers),
        budget=total * units,
    )
    checked = solve_and_check(problem)
    ks = [k // units if k % units == 0 else k / units for k in checked.solution.ks]
    allocation = allocation_from_profile(profile, ks, routing)
    return Plan.build(
        allocation,
        budget=Budget(ratio=request.ratio, total_activations=total, original_activations=original,
                      planned_activations=sum(ks)),
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
