"""Alloc-L step 2: turn a sensitivity profile and a budget into a plan.

Pure: reads the profile, solves the allocation with the DP, confirms it with
the ILP (:mod:`~allocplan.planner.crosscheck`), and builds the Plan. No torch,
so ``allocplan solve`` runs anywhere.

The charged budget. Work is counted in expert-equivalents per token: one routed
expert's multiply-adds M_l is 1. A layer at k of its K_l candidates drops K_l - k
of them per token on average (Alloc-T runs exactly k per token over the layer), and a
rank-r stand-in serving each costs 2 r H + H multiply-adds (r = 0: the constant; no
stand-in: nothing), so option (k, r) charges

    c[l, k, r] = k + (K_l - k) * (2 r H + H) / M_l

and a plan at budget B keeps sum_l c[l, k_l, r_l] <= B. The solver's options are every
such pair the profile measured (S[l, k] without stand-ins, S[l, k, r] with them), and
their charges are put on an exact integer grid: c * lcm_l(M_l) / k_step is an integer,
and the grid is that divided by the greatest common divisor of every charge and the
budget, so no charge is rounded and the DP's optimum is the exact one.
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
from allocplan.formats.sidecar import plan_sidecar, record_for
from allocplan.standins import multiply_adds
from .crosscheck import objectives_agree, solve_and_check
from .problem import AllocationProblem


# The most grid units the DP is run over (a vector of this many float64 per layer): far above any real
# model's need (a DeepSeek-V2-Lite shape at 0.5 needs about 330,000).
MAX_GRID_UNITS = 50_000_000


def stand_ins_ranked(profile: SensitivityProfile) -> bool:
    """Whether the profile measured each layer with and without every stand-in rank (version 3 with
    compensation): the solver then chooses a rank per layer, and charges it."""
    return profile.compensation is not None and profile.layers[0].stand_in_sensitivity is not None


def stand_in_multiply_adds(profile: SensitivityProfile, position: int, k: int | float, rank: int | None) -> int | float:
    """Multiply-adds per token of the stand-ins of layer ``position`` at (k, rank): a rank-``rank`` stand-in
    (None: none) for each of the K - k candidates it drops."""
    if rank is None:
        return 0
    return (profile.layers[position].original_k - k) * multiply_adds(profile.measurement.hidden_size, rank)


def charged_multiply_adds(profile: SensitivityProfile, position: int, k: int | float, rank: int | None) -> int | float:
    """Multiply-adds per token of layer ``position`` at (k, rank): k experts, and its stand-ins."""
    return k * profile.layers[position].expert_multiply_adds + stand_in_multiply_adds(profile, position, k, rank)


def charged_work(profile: SensitivityProfile, ks: list[int | float], ranks: list[int | None]) -> tuple[float, float]:
    """(expert work, stand-in work) of an allocation in expert-equivalents per token (module docstring)."""
    if profile.measurement.hidden_size is None:  # a profile before version 3 records no costs: experts only
        return float(sum(ks)), 0.0
    stand_in = sum(stand_in_multiply_adds(profile, i, k, r) / layer.expert_multiply_adds
                   for i, (layer, k, r) in enumerate(zip(profile.layers, ks, ranks)))
    return float(sum(ks)), float(stand_in)


def allocation_from_profile(profile: SensitivityProfile, ks: list[int | float],
                            routing: RoutingConfig, ranks: list[int | None] | None = None) -> Allocation:
    """The allocation giving layer l the k ``ks[l]`` with what the profile measured it with.

    Each layer gets the weight treatment fitted for its k (if the profile fitted any)
    and its stand-ins: of rank ``ranks[l]`` (None: none) cut from the profile's sidecar when
    the profile offers ranks (``ranks`` None there: none on any layer), else the profile's
    whole sidecar: the plan runs what was profiled. A k between the profile's grid points (a
    uniform baseline's fractional k) takes the treatment of the nearest one, halves rounding up.
    """
    def treatments(layer: Any, k: int | float) -> tuple[tuple[str, Any], ...]:
        grid = sorted(layer.sensitivity)
        nearest = min(grid, key=lambda g: (abs(g - k), -g))
        return tuple((name, row[nearest]) for name, row in layer.treatments)

    compensation, data = profile.compensation, profile.compensation_data
    layer_ranks: list[int | None] = [None] * len(ks)
    if stand_ins_ranked(profile):
        # A layer at its own k drops nothing, so no stand-in serves it.
        layer_ranks = [None if rank is None or k == layer.original_k else rank
                       for layer, k, rank in zip(profile.layers, ks, ranks or layer_ranks)]
        if data is None:
            raise AllocplanError("the profile names a compensation sidecar but holds no vectors; load it from its"
                                 " file or re-profile")
        data = plan_sidecar(data, {layer.path: rank for layer, rank in zip(profile.layers, layer_ranks)})
        compensation = None if data is None else record_for(data, profile.compensation.kind)
    return Allocation(
        model=profile.model,
        layers=tuple(
            LayerAllocation(layer.path, layer.index, layer.original_k, k, treatments(layer, k), stand_in_rank=rank)
            for layer, k, rank in zip(profile.layers, ks, layer_ranks)
        ),
        token_level=routing.token_level_record(),
        weights=routing.weights_record(),
        compensation=compensation,
        compensation_data=data,
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


def allocation_problem(profile: SensitivityProfile, total: int, k_cap: float = math.inf) -> AllocationProblem:
    """The profile's options (k, stand-in rank) per layer with their charges on the exact integer grid (module
    docstring) and their measured S, under a budget of ``total`` expert-equivalents per token.

    Raises:
        AllocplanError: a profile with compensation but no recorded costs (before version 3), or a grid
            too fine to solve (layers of very different, coprime expert sizes).
    """
    measurement = profile.measurement
    units = int(round(1 / measurement.k_step))
    ranked = stand_ins_ranked(profile)
    if profile.compensation is not None and not ranked:
        raise AllocplanError("this profile was measured with stand-ins but records neither their cost nor S"
                             " without them (a profile before version 3), so a charged budget cannot be solved"
                             " from it; re-profile with this allocplan")
    choices, costs, charges = [], [], []
    for position, layer in enumerate(profile.layers):
        row_choices, row_costs, row_charges = [], [], []
        for k, cost in layer.sensitivity.items():
            if k > k_cap:
                continue
            # Without stand-ins, unless the profile fixes them (--fixed-stand-ins) where candidates are dropped.
            dropping = ranked and k != layer.original_k
            options = [(None, cost)] if not dropping or measurement.stand_in_choice else []
            if dropping:
                options += [(rank, row[k]) for rank, row in sorted(layer.stand_in_sensitivity.items())]
            for rank, option_cost in options:
                row_choices.append((int(round(k * units)), rank))
                row_costs.append(option_cost)
                row_charges.append(charged_multiply_adds(profile, position, k, rank) if ranked else k)
        choices.append(tuple(row_choices))
        costs.append(tuple(row_costs))
        charges.append(row_charges)
    if ranked:
        scale = math.lcm(*(layer.expert_multiply_adds for layer in profile.layers))
        weights = [[int(round(charge * units * scale / layer.expert_multiply_adds)) for charge in row]
                   for layer, row in zip(profile.layers, charges)]
        budget = total * units * scale
    else:
        weights = [[int(round(k * units)) for k in row] for row in charges]
        budget = total * units
    divisor = math.gcd(budget, *(w for row in weights for w in row))
    if budget // divisor > MAX_GRID_UNITS:
        raise AllocplanError(f"the charged budget needs a grid of {budget // divisor} units, above"
                             f" {MAX_GRID_UNITS}; the layers' expert sizes share too small a divisor"
                             " (solve with --compensation off)")
    return AllocationProblem(choices=tuple(choices), costs=tuple(costs), budget=budget // divisor,
                             weights=tuple(tuple(w // divisor for w in row) for row in weights))


def budget_record(profile: SensitivityProfile, ratio: float | None, total: int, original: int,
                  experts: float, stand_in: float, sidecar: bytes | None) -> Budget:
    """The plan's budget block: what it allows and what the plan charges against it, and the stand-ins'
    memory beside the routed experts' weights."""
    charged = profile.measurement.hidden_size is not None
    expert_bytes = None
    if charged:
        width = {"float32": 4, "float64": 8}.get(profile.measurement.dtype, 2)
        expert_bytes = sum(layer.expert_multiply_adds for layer in profile.layers) * profile.model.num_experts * width
    size = 0 if sidecar is None else len(sidecar)
    return Budget(ratio=ratio, total_activations=total, original_activations=original,
                  planned_activations=experts if not float(experts).is_integer() else int(experts),
                  stand_in_work=round_work(stand_in) if charged else None,
                  charged_work=round_work(experts + stand_in) if charged else None,
                  sidecar_bytes=size if charged else None,
                  sidecar_share=round_work(size / expert_bytes) if charged else None)


def round_work(value: float) -> float:
    """A work or share figure as the plan stores it (9 significant digits)."""
    return float(f"{value:.9g}")


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
    problem = allocation_problem(profile, total, k_cap)
    checked = solve_and_check(problem)
    ks = [k // units if k % units == 0 else k / units for k, _ in checked.solution.ks]
    ranks = [rank for _, rank in checked.solution.ks]
    allocation = allocation_from_profile(profile, ks, routing, ranks)
    experts, stand_in = charged_work(profile, ks, [entry.stand_in_rank for entry in allocation.layers])
    return Plan.build(
        allocation,
        budget=budget_record(profile, request.ratio, total, original, experts, stand_in, allocation.compensation_data),
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
