"""Routing policies to compare at a matched activation budget.

Every method is turned into a Plan (plus, for threshold rules, a per-token
selector) and applied with ``apply_plan``, so all of them run through the same
runtime and are measured the same way:

* ``full``: the untouched model.
* ``uniform``: the same k in every layer, k_l = B * K_l / sum K; a fractional k
  gives each token floor(k) or ceil(k) experts, the extra ones to the
  highest-scoring candidates (Alloc-T rounding with k_base = floor(k)).
* ``random``: a random integer allocation summing to B (one seed per call).
* ``lexi``: LExI-style data-free allocation: sensitivities from Gaussian inputs
  (relative Frobenius change of each MoE block's output), same DP.
* ``naee``: NAEE-style dynamic skipping: a token drops a candidate whose weight is
  below beta * its top weight; beta is calibrated to the budget.
* ``top-p``: each token keeps its smallest set of candidates whose normalised
  probability reaches p; p is calibrated to the budget.
* ``alloc-t``: token-level only (uniform k_l, Alloc-T on, k_base 1).
* ``alloc-l``: layer-level only (the DP's plan, Alloc-T off).
* ``alloc-lt``: Alloc-L + Alloc-T (the paper's method; allocplan's default plan).

Calibration of beta and p uses calibration text only, never the evaluation data.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from allocplan.errors import AllocplanError
from allocplan.planner.budget import resolve_budget
from allocplan.planner.from_profile import solve_profile
from allocplan.planner.plan import Plan
from allocplan.planner.profile_format import SensitivityProfile
from allocplan.runtime.apply import PlanHandle, TokenSelector, apply_plan
from allocplan.runtime.layers import find_moe_layers
from allocplan.runtime.plans import manual_plan
from allocplan.runtime.measure import count_activations

METHODS = ("full", "uniform", "random", "lexi", "naee", "top-p", "alloc-t", "alloc-l", "alloc-lt")
PROFILE_METHODS = {"alloc-l", "alloc-lt"}
THRESHOLD_METHODS = {"naee", "top-p"}


def uniform_plan(model: Any, total: int, budget_ratio: float | None = None) -> Plan:
    """Same share of every layer's K; fractional k realised by Alloc-T rounding."""
    originals = [layer.top_k for layer in find_moe_layers(model)]
    ks = [total * k / sum(originals) for k in originals]
    if all(float(k).is_integer() for k in ks):
        return manual_plan(model, [int(k) for k in ks], budget_ratio=budget_ratio)
    k_floor = max(1, int(min(ks)))
    return manual_plan(model, ks, token_level=True, k_base=k_floor, k_max=min(math.ceil(max(ks)), min(originals)),
                       budget_ratio=budget_ratio)


def random_plan(model: Any, total: int, seed: int) -> Plan:
    """Integer k per layer summing to ``total``: each unit above k=1 goes to a random layer with room."""
    originals = [layer.top_k for layer in find_moe_layers(model)]
    ks = [1] * len(originals)
    rng = random.Random(seed)
    for _ in range(total - len(ks)):
        room = [i for i, (k, K) in enumerate(zip(ks, originals)) if k < K]
        ks[rng.choice(room)] += 1
    return manual_plan(model, ks)


def naee_selector(beta: float) -> TokenSelector:
    """Keep a candidate whose weight is at least beta times the token's top weight (top-1 always)."""

    def select(scores: torch.Tensor, weights: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        keep = weights >= beta * weights[:, :1]  # [T, K]
        keep[:, 0] = True
        return keep

    return select


def top_p_selector(p: float) -> TokenSelector:
    """Keep the smallest prefix of candidates whose normalised weights reach p (top-1 always)."""

    def select(scores: torch.Tensor, weights: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        probs = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)  # [T, K]
        before = probs.cumsum(-1) - probs  # mass of the better candidates
        keep = before < p
        keep[:, 0] = True
        return keep

    return select


@dataclass(frozen=True)
class Policy:
    """A method ready to apply: a plan, an optional selector, and its calibrated parameter.

    ``target`` is the budget B in activations per token it is held to (None: the full model).
    Threshold methods carry the full model's plan; their selector meets the target.
    """

    method: str
    plan: Plan | None
    target: int | None = None
    selector: TokenSelector | None = None
    parameter: float | None = None

    def apply(self, model: Any) -> PlanHandle | None:
        if self.plan is None:
            return None
        return apply_plan(model, self.plan, token_selector=self.selector)


def measured_total(model: Any, policy: Policy, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Routed experts per token summed over layers, measured on ``windows``."""
    handle = policy.apply(model)
    try:
        with torch.inference_mode(), count_activations(model) as counts:
            for batch in windows.split(batch_size):
                model(input_ids=batch, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    return counts.total_per_token()


def calibrate_threshold(
    model: Any,
    make_selector: Callable[[float], TokenSelector],
    target: float,
    windows: torch.Tensor,
    *,
    increasing: bool,
    steps: int = 14,
) -> tuple[float, float]:
    """Bisect a selector parameter in [0, 1] until measured activations match ``target``.

    ``increasing``: activations grow with the parameter (top-p) or fall (NAEE's beta).
    Returns (parameter, measured activations per token).
    """
    full = manual_plan(model, [layer.top_k for layer in find_moe_layers(model)])
    lo, hi = 0.0, 1.0
    best = (0.5, math.inf)
    for _ in range(steps):
        mid = (lo + hi) / 2
        measured = measured_total(model, Policy("calibration", full, selector=make_selector(mid)), windows)
        if abs(measured - target) < abs(best[1] - target):
            best = (mid, measured)
        if (measured < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best


def build_policy(
    model: Any,
    method: str,
    budget_ratio: float,
    *,
    profile: SensitivityProfile | None = None,
    calib_windows: torch.Tensor | None = None,
    seed: int = 0,
    renormalize: str = "model",
) -> Policy:
    """The routing policy of ``method`` at ``budget_ratio`` for ``model``.

    Raises:
        AllocplanError: unknown method, or a missing profile / calibration windows it needs.
    """
    if method not in METHODS:
        raise AllocplanError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if method == "full":
        return Policy(method, None)
    originals = [layer.top_k for layer in find_moe_layers(model)]
    total = resolve_budget(sum(originals), len(originals), budget_ratio=budget_ratio)
    if method == "uniform":
        return Policy(method, uniform_plan(model, total, budget_ratio), total)
    if method == "alloc-t":
        ks = [total * k / sum(originals) for k in originals]
        return Policy(method, manual_plan(model, ks, token_level=True, k_base=1, renormalize=renormalize,
                                          budget_ratio=budget_ratio), total)
    if method == "random":
        return Policy(method, random_plan(model, total, seed), total, parameter=float(seed))
    if method in THRESHOLD_METHODS:
        if calib_windows is None:
            raise AllocplanError(f"method {method} needs calibration text to set its threshold")
        make = naee_selector if method == "naee" else top_p_selector
        parameter, _ = calibrate_threshold(model, make, total, calib_windows, increasing=method == "top-p")
        full = manual_plan(model, originals)
        return Policy(method, full, total, make(parameter), parameter)
    if method == "lexi":
        from allocplan.planner.profiling import profile_data_free

        profile = profile_data_free(model, seed=seed)
    if profile is None:
        raise AllocplanError(f"method {method} needs a sensitivity profile")
    plan = solve_profile(profile, budget_ratio=budget_ratio, token_level=method == "alloc-lt",
                         renormalize=renormalize)
    return Policy(method, plan, total)
