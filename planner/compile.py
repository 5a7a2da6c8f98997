"""Compile a loaded model: profile it on calibration text, solve its allocation (Alloc-L), refine it."""

from __future__ import annotations

import dataclasses
from typing import Any

from allocplan.formats.budget import BudgetRequest
from allocplan.formats.config import ProfileConfig, RefineConfig, RoutingConfig
from allocplan.formats.plan import Plan, RefinementRecord, RefinementStep
from allocplan.formats.profile import SensitivityProfile
from allocplan.formats.provenance import CalibrationRecord
from ..runtime.allocation_builder import allocation_for
from ..runtime.layers import find_moe_layers
from ..runtime.fast_paths import using_fast_paths
from .determinism import fixed_threads
from .losses import Reference
from .profiling import check_k_max_for_profiling, check_k_min, profile_model
from .refine import refine_by_exchange
from .solve import allocation_from_profile, budget_record, charged_work, solve_profile
from .windows import calibration_source, pack_windows


def compile_model(
    model: Any,
    tokenizer: Any,
    budget: float | BudgetRequest,
    *,
    profile: ProfileConfig | None = None,
    routing: RoutingConfig | None = None,
    refine: RefineConfig | None = None,
    model_name: str | None = None,
    windows: tuple[Any, CalibrationRecord] | None = None,
) -> tuple[Plan, SensitivityProfile]:
    """The plan for a loaded model at a budget, and the profile it was solved from.

    Profiles as the plan will run (``routing``), solves with the DP (cross-checked by the
    ILP), then, with ``refine.refine``, takes one-expert exchanges between layers while
    the measured calibration KL of the whole plan falls (recorded in the plan's solver
    record). The budget and the settings are checked against the model before the
    expensive profiling, so a typo fails in a second. ``windows``: calibration windows [N, S]
    already packed and their text's record, profiled (and refined on) instead of ``profile.calib``.

    Raises:
        AllocplanError: any input problem, with a one-line reason.
    """
    request = BudgetRequest.of(budget)
    profile = profile or ProfileConfig()
    routing = routing or RoutingConfig()
    refine = refine or RefineConfig()
    originals = [layer.top_k for layer in find_moe_layers(model)]
    check_k_min(profile.k_min, originals)
    request.resolve(sum(originals), profile.k_min * len(originals))
    check_k_max_for_profiling(routing, originals)
    allocation_for(model, originals, routing)  # raises if the routing settings do not fit the model
    measured = profile_model(model, tokenizer, profile, routing, model_name=model_name, windows=windows)
    plan = solve_profile(measured, request, routing)
    if refine.refine:
        # The profile's thread count (planner/determinism.py); ``refined`` pins the stand-in form itself.
        with fixed_threads(model):
            plan = refined(model, tokenizer, plan, measured, profile, routing, refine,
                           windows=None if windows is None else windows[0])
    return plan, measured


def refined(model: Any, tokenizer: Any, plan: Plan, measured: SensitivityProfile, profile: ProfileConfig,
            routing: RoutingConfig, refine: RefineConfig, windows: Any = None) -> Plan:
    """``plan`` after the measured refinement, with the search recorded in its solver record; ``windows``:
    the profiling windows [N, S] to score on (their first ``refine_tokens``), instead of packing
    ``profile.calib`` again."""
    tokens = min(refine.refine_tokens, profile.calib_tokens)
    if windows is None:
        windows, _ = pack_windows(tokenizer, calibration_source(profile, tokens), max_tokens=tokens,
                                  seq_len=min(profile.seq_len, tokens))
    else:
        windows = windows[: max(1, tokens // windows.shape[1])]
    unit = measured.measurement.k_step
    # Each layer keeps the DP's stand-in rank; a move is taken only where the charged work stays in budget
    # (a move between layers with different stand-ins changes it).
    ranks = [layer.stand_in_rank for layer in plan.layers]

    def within_budget(ks: tuple) -> bool:
        experts, stand_in = charged_work(measured, list(ks), [None if k == layer.original_k else rank
                                                               for k, rank, layer in zip(ks, ranks, plan.layers)])
        return experts + stand_in <= plan.budget.total_activations + 1e-9

    # The general stand-in and experts forms, as the profile was measured (planner/determinism.py), whoever calls.
    with using_fast_paths(many_token_stand_ins=False, native_few_token_experts=False):
        search = refine_by_exchange(
            model, [layer.planned_k for layer in plan.layers],
            lambda ks: allocation_from_profile(measured, ks, routing, ranks),
            Reference(model, windows, profile.batch_size),
            k_min=profile.k_min, unit=unit, max_steps=refine.refine_steps, allowed=within_budget,
        )
    steps, previous = [], search.start[0]
    for ks, objective in search.steps:
        giver = next(i for i, (a, b) in enumerate(zip(previous, ks)) if b < a)
        taker = next(i for i, (a, b) in enumerate(zip(previous, ks)) if b > a)
        steps.append(RefinementStep(plan.layers[giver].index, plan.layers[taker].index, objective))
        previous = ks
    record = RefinementRecord(metric="kl", unit=unit, objective_before=search.start[1],
                              objective_after=search.best[1], steps=tuple(steps), measured=search.measured)
    allocation = allocation_from_profile(measured, list(search.best[0]), routing, ranks)
    solver = dataclasses.replace(plan.solver, refinement=record)
    experts, stand_in = charged_work(measured, list(search.best[0]), [entry.stand_in_rank for entry in allocation.layers])
    budget = budget_record(measured, plan.budget.ratio, plan.budget.total_activations,
                           plan.budget.original_activations, experts, stand_in, allocation.compensation_data)
    return Plan.build(allocation, budget, solver, plan.provenance)
