"""Plans built in code for a loaded model: probes during profiling, baselines, tests."""

from __future__ import annotations

import math
from typing import Any

from allocplan.planner.plan import Budget, LayerPlan, Plan, PlanProvenance, SolverRecord, TokenLevel, Weights
from allocplan.planner.provenance import CalibrationRecord, package_version
from allocplan.runtime.layers import find_moe_layers, model_identity


def manual_plan(
    model: Any,
    ks: list[float],
    *,
    token_level: bool = False,
    k_base: int = 1,
    k_max: int | None = None,
    renormalize: str = "model",
    reference_k: int | None = None,
    budget_ratio: float | None = None,
) -> Plan:
    """A valid Plan giving MoE layer i the average k ``ks[i]`` (not solved from a profile).

    Its solver record is empty (``metric: none``) and its provenance says ``manual``;
    ``budget_ratio`` is recorded only when it rounds to the plan's total.
    """
    layers = find_moe_layers(model)
    entries = tuple(LayerPlan(layer.path, layer.index, layer.top_k, k) for layer, k in zip(layers, ks))
    original = sum(entry.original_k for entry in entries)
    planned = sum(ks)
    total = math.ceil(planned - 1e-9)
    if budget_ratio is not None and math.floor(budget_ratio * original + 0.5 + 1e-9) != total:
        budget_ratio = None
    return Plan(
        schema_version=1,
        kind="allocplan-plan",
        model=model_identity(model, getattr(model, "name_or_path", "") or "in-process"),
        budget=Budget(budget_ratio, total, original, planned),
        layers=entries,
        token_level=TokenLevel(token_level, k_base, k_max),
        weights=Weights(renormalize, reference_k),
        solver=SolverRecord("none", 0.0, 0.0, "OPTIMAL", True),
        provenance=PlanProvenance(
            package_version("allocplan"), package_version("torch"), package_version("transformers"),
            "manual", 1, "sha256:none", CalibrationRecord("none", "sha256:none", 0, 0, 0),
        ),
    )
