"""Compile a loaded model: profile it on calibration text, then solve its allocation (Alloc-L)."""

from __future__ import annotations

from typing import Any

from ..formats.budget import BudgetRequest
from ..formats.config import ProfileConfig, RoutingConfig
from ..formats.plan import Plan
from ..formats.profile import SensitivityProfile
from ..runtime.allocations import allocation_for
from ..runtime.layers import find_moe_layers
from .profiling import check_k_min, profile_model
from .solve import solve_profile


def compile_model(
    model: Any,
    tokenizer: Any,
    budget: float | BudgetRequest,
    *,
    profile: ProfileConfig | None = None,
    routing: RoutingConfig | None = None,
    model_name: str | None = None,
) -> tuple[Plan, SensitivityProfile]:
    """The plan for a loaded model at a budget, and the profile it was solved from.

    The budget and the routing settings are checked against the model before the
    expensive profiling, so a typo fails in a second.

    Raises:
        AllocplanError: any input problem, with a one-line reason.
    """
    request = BudgetRequest.of(budget)
    profile = profile or ProfileConfig()
    originals = [layer.top_k for layer in find_moe_layers(model)]
    check_k_min(profile.k_min, originals)
    request.resolve(sum(originals), profile.k_min * len(originals))
    allocation_for(model, originals, routing)  # raises if the routing settings do not fit the model
    measured = profile_model(model, tokenizer, profile, model_name=model_name)
    return solve_profile(measured, request, routing), measured
