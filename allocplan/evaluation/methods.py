"""Routing methods compared at a matched activation budget, registered by name.

Every method is turned into an allocation (plus, for threshold rules, a
per-token selector) and applied with ``apply_plan``, so all of them run through
the same runtime and are measured the same way. The registry, like lm-eval's
``@register_model``, is the one list of methods: the CLI's ``--method`` and the
results script read it, and an unknown name is an error that lists the known ones.

Calibration of the threshold rules' parameters uses calibration text only,
never the evaluation data. This module imports torch only when a method is built.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import AllocplanError
from ..registries import lookup
from ..formats.budget import BudgetRequest
from ..formats.config import ProfileConfig, RoutingConfig

if TYPE_CHECKING:
    import torch

    from ..formats.allocation import Allocation
    from ..formats.profile import SensitivityProfile
    from allocplan.runtime.apply import PlanHandle
    from allocplan.runtime.routing import TokenSelector


@dataclass(frozen=True)
class Policy:
    """A method ready to apply: an allocation, an optional selector, and its calibrated parameter.

    ``target`` is the budget B in activations per token it is held to (None: the full model).
    Threshold methods carry the full model's allocation; their selector meets the target.
    """

    method: str
    allocation: "Allocation | None"
    target: int | None = None
    selector: "TokenSelector | None" = None
    parameter: float | None = None

    def apply(self, model: Any) -> "PlanHandle | None":
        """Apply to ``model`` (None for the untouched model); remove the handle afterwards."""
        if self.allocation is None:
            return None
        from allocplan.runtime.apply import apply_plan

        return apply_plan(model, self.allocation, token_selector=self.selector)


# The seed of the seeded methods (random, lexi) when none is given.
DEFAULT_SEED = 0


@dataclass(frozen=True)
class MethodInputs:
    """What a method may use to build its policy.

    Attributes:
        model: the loaded model.
        budget_ratio: the budget as a ratio of the model's activations.
        total: B, the activations per token the ratio resolves to.
        originals: each MoE layer's original top-k.
        sensitivity: a calibration-text sensitivity profile (methods with ``needs_profile``).
        calib_windows: calibration token windows (methods with ``needs_calibration``).
        seed: a seed for randomised methods.
        routing: routing settings for the methods that solve a profile.
    """

    model: Any
    budget_ratio: float
    total: int
    originals: list[int]
    sensitivity: "SensitivityProfile | None" = None
    calib_windows: "torch.Tensor | None" = None
    seed: int = DEFAULT_SEED
    routing: RoutingConfig = RoutingConfig()


@dataclass(frozen=True)
class Method:
    """A registered method: its name, what it needs, and how it builds a policy."""

    name: str
    build: Callable[[MethodInputs], Policy]
    summary: str
    needs_profile: bool = False
    needs_calibration: bool = False
    seeded: bool = False


METHODS: dict[str, Method] = {}


def register_method(name: str, summary: str, *, needs_profile: bool = False, needs_calibration: bool = False,
                    seeded: bool = False) -> Callable[[Callable[[MethodInputs], Policy]], Callable]:
    """Decorator that registers a policy builder under ``name`` (``seeded``: it draws at random from
    ``MethodInputs.seed``)."""

    def register(build: Callable[[MethodInputs], Policy]) -> Callable[[MethodInputs], Policy]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = Method(name, build, summary, needs_profile, needs_calibration, seeded)
        return build

    return register


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        AllocplanError: unknown name, listing the known ones.
    """
    return lookup(METHODS, name, "method")


# Methods route plainly (each token its top-k) unless they say otherwise.
PLAIN = RoutingConfig(token_level=False)
# How the paper's methods (alloc-l, alloc-lt) have their sensitivities measured when no profile is given:
# plain top-k probes (PLAIN), no weight treatment, no compensation, as Alloc-MoE profiles. `allocplan eval`
# and scripts/make_results.py both profile with these, so the CLI reproduces the page's paper rows.
PAPER_PROFILE = ProfileConfig(weight_fit="off", compensation="off")


def _allocation(model: Any, ks: list[float], routing: RoutingConfig = PLAIN) -> "Allocation":
    from allocplan.runtime.allocation_builder import allocation_for

    return allocation_for(model, ks, routing)


def uniform_allocation(model: Any, budget_ratio: float, routing: RoutingConfig | None = None) -> "Allocation":
    """Every MoE layer the same share of its original top-k, at ``budget_ratio`` of the model's activations.

    The one way allocplan builds a uniform allocation: the ``uniform`` and ``alloc-t`` methods, the
    presets' plans of ``allocplan bench --config`` and the benchmarks' k/2 rows all come from here.

    Args:
        model: a loaded model of a registered family.
        budget_ratio: the share of the model's activations per token (B = round(ratio * sum K_l)).
        routing: the routing of every layer. None: plain top-k where each layer's share is a whole
            number, otherwise Alloc-T rounding with ``k_base`` the smallest share's floor.
    """
    from allocplan.runtime.layers import find_moe_layers

    originals = [layer.top_k for layer in find_moe_layers(model)]
    total = BudgetRequest(ratio=budget_ratio).resolve(sum(originals), len(originals), count_option=False)
    ks = [total * k / sum(originals) for k in originals]
    if routing is not None:
        return _allocation(model, ks, routing)
    if all(float(k).is_integer() for k in ks):
        return _allocation(model, [int(k) for k in ks])
    k_floor = max(1, int(min(ks)))
    return _allocation(model, ks, RoutingConfig(token_level=True, k_base=k_floor,
                                                k_max=min(math.ceil(max(ks)), min(originals))))


def random_allocation(model: Any, total: int, seed: int) -> "Allocation":
    """Integer k per layer summing to ``total``: each unit above k=1 goes to a random layer with room."""
    from allocplan.runtime.layers import find_moe_layers

    originals = [layer.top_k for layer in find_moe_layers(model)]
    ks = [1] * len(originals)
    rng = random.Random(seed)
    for _ in range(total - len(ks)):
        room = [i for i, (k, K) in enumerate(zip(ks, originals)) if k < K]
        ks[rng.choice(room)] += 1
    return _allocation(model, ks)


def naee_selector(beta: float) -> "TokenSelector":
    """Keep a candidate whose weight is at least beta times the token's top weight (top-1 always)."""

    def select(scores: "torch.Tensor", weights: "torch.Tensor", real: "torch.Tensor") -> "torch.Tensor":
        keep = weights >= beta * weights[:, :1]  # [T, K]
        keep[:, 0] = True
        return keep

    return select


def top_p_selector(p: float) -> "TokenSelector":
    """Keep the smallest prefix of candidates whose normalised weights reach p (top-1 always)."""

    def select(scores: "torch.Tensor", weights: "torch.Tensor", real: "torch.Tensor") -> "torch.Tensor":
        probs = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)  # [T, K]
        before = probs.cumsum(-1) - probs  # mass of the better candidates
        keep = before < p
        keep[:, 0] = True
        return keep

    return select


def measured_total(model: Any, policy: Policy, windows: "torch.Tensor", batch_size: int = 8) -> float:
    """Routed experts per token summed over layers, measured on ``windows``."""
    import torch

    from allocplan.runtime.measure import count_activations

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
    make_selector: Callable[[float], "TokenSelector"],
    target: float,
    windows: "torch.Tensor",
    *,
    increasing: bool,
    steps: int = 14,
) -> tuple[float, float]:
    """Bisect a selector parameter in [0, 1] until measured activations match ``target``.

    ``increasing``: activations grow with the parameter (top-p) or fall (NAEE's beta).
    Returns (parameter, measured activations per token).
    """
    from allocplan.runtime.layers import find_moe_layers

    full = _allocation(model, [layer.top_k for layer in find_moe_layers(model)])
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


@register_method("full", "the untouched model")
def _full(inputs: MethodInputs) -> Policy:
    return Policy("full", None)


@register_method("uniform", "the same share of every layer's k; fractional k by Alloc-T rounding with k_base floor(k)")
def _uniform(inputs: MethodInputs) -> Policy:
    return Policy("uniform", uniform_allocation(inputs.model, inputs.budget_ratio), inputs.total)


@register_method("random", "a random integer allocation summing to B (one seed per call)", seeded=True)
def _random(inputs: MethodInputs) -> Policy:
    return Policy("random", random_allocation(inputs.model, inputs.total, inputs.seed), inputs.total,
                  parameter=float(inputs.seed))


def _threshold(name: str, make: Callable[[float], "TokenSelector"], increasing: bool) -> Callable:
    def build(inputs: MethodInputs) -> Policy:
        if inputs.calib_windows is None:
            raise AllocplanError(f"method {name} needs calibration text to set its threshold")
        parameter, _ = calibrate_threshold(inputs.model, make, inputs.total, inputs.calib_windows,
                                           increasing=increasing)
        return Policy(name, _allocation(inputs.model, inputs.originals), inputs.total, make(parameter), parameter)

    return build


register_method("naee", "NAEE-style skipping: drop a candidate below beta x the token's top weight; beta"
                " calibrated to the budget", needs_calibration=True)(_threshold("naee", naee_selector, False))
register_method("top-p", "each token keeps its smallest candidate set reaching probability p; p calibrated to"
                " the budget", needs_calibration=True)(_threshold("top-p", top_p_selector, True))


@register_method("alloc-t", "token-level only: uniform k_l, Alloc-T on, k_base 1")
def _alloc_t(inputs: MethodInputs) -> Policy:
    routing = RoutingConfig(token_level=True, k_base=1, renormalize=inputs.routing.renormalize,
                            reference_k=inputs.routing.reference_k)
    return Policy("alloc-t", uniform_allocation(inputs.model, inputs.budget_ratio, routing), inputs.total)


def _solved(name: str, token_level: bool, data_free: bool = False) -> Callable:
    def build(inputs: MethodInputs) -> Policy:
        from dataclasses import replace

        from allocplan.planner.solve import solve_profile

        sensitivity = inputs.sensitivity
        if data_free:
            from allocplan.planner.data_free import profile_data_free

            sensitivity = profile_data_free(inputs.model, seed=inputs.seed)
        if sensitivity is None:
            raise AllocplanError(f"method {name} needs a sensitivity profile")
        routing = replace(inputs.routing, token_level=token_level)
        plan = solve_profile(sensitivity, inputs.budget_ratio, routing)
        # Per-layer k only: weight treatments or stand-ins a given profile carries are allocplan's, not the paper's.
        return Policy(name, _allocation(inputs.model, [entry.planned_k for entry in plan.allocation.layers], routing),
                      inputs.total)

    return build


@register_method("k2-peer", "uniform k, kept weights divided by the router mass of each token's top-k2 (decoupled"
                 " renormalisation, arXiv 2609.04575), one k2 for all layers chosen on calibration text",
                 needs_calibration=True)
def _k2_peer(inputs: MethodInputs) -> Policy:
    if inputs.calib_windows is None:
        raise AllocplanError("method k2-peer needs calibration text to choose k2")
    from ..evaluation.metrics import nll_and_activations

    ks = [inputs.total * k / sum(inputs.originals) for k in inputs.originals]
    fractional = not all(float(k).is_integer() for k in ks)
    if not fractional:
        ks = [int(k) for k in ks]
    best = None
    for width in range(math.ceil(max(ks)), min(inputs.originals) + 1):
        # Fractional k: every token keeps floor(k) experts and Alloc-T places the rest; candidates
        # stay the full top-K, whose mass the normaliser needs.
        routing = RoutingConfig(token_level=fractional, k_base=max(1, int(min(ks))) if fractional else 1,
                                renormalize="decoupled", reference_k=width)
        policy = Policy("k2-peer", _allocation(inputs.model, ks, routing), inputs.total, parameter=float(width))
        handle = policy.apply(inputs.model)
        try:
            nll = nll_and_activations(inputs.model, inputs.calib_windows, handle)["nll"]
        finally:
            handle.remove()
        if best is None or nll < best[0]:
            best = (nll, policy)
    return best[1]


register_method("lexi", "LExI-style data-free allocation: Gaussian-input sensitivities, same DP", seeded=True)(
    _solved("lexi", token_level=False, data_free=True))
register_method("alloc-l", "layer-level only: the DP's allocation, Alloc-T off", needs_profile=True)(
    _solved("alloc-l", token_level=False))
register_method("alloc-lt", "Alloc-L + Alloc-T (the paper's method)", needs_profile=True)(
    _solved("alloc-lt", token_level=True))


def build_policy(
    model: Any,
    method: str,
    budget_ratio: float,
    *,
    sensitivity: "SensitivityProfile | None" = None,
    calib_windows: "torch.Tensor | None" = None,
    seed: int = DEFAULT_SEED,
    routing: RoutingConfig | None = None,
) -> Policy:
    """The routing policy of ``method`` at ``budget_ratio`` for ``model``.

    Raises:
        AllocplanError: unknown method, or a missing profile / calibration windows it needs.
    """
    from allocplan.runtime.layers import find_moe_layers

    registered = get_method(method)
    originals = [layer.top_k for layer in find_moe_layers(model)]
    # eval --method and bench --config take a ratio only: the message must not suggest --budget-activations.
    total = BudgetRequest(ratio=budget_ratio).resolve(sum(originals), len(originals), count_option=False)
    inputs = MethodInputs(model, budget_ratio, total, originals, sensitivity, calib_windows, seed,
                          routing or RoutingConfig())
    return registered.build(inputs)
