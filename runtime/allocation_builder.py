"""Allocations built in code for a loaded model: probes during profiling, baselines, users' own.

``allocation_for(model, ks)`` is the public way to run a hand-chosen per-layer k
without a profile or a budget: it reads the model's MoE layers and identity and
returns a validated :class:`~allocplan.formats.allocation.Allocation`, which
``apply_plan`` takes like a plan. Nothing is solved, so nothing is recorded as solved.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from allocplan.errors import AllocplanError
from allocplan.formats.allocation import Allocation, LayerAllocation
from allocplan.formats.config import RoutingConfig
from allocplan.formats.sidecar import CompensationRecord
from .layers import find_moe_layers, model_identity


def allocation_for(
    model: Any,
    ks: float | Sequence[float],
    routing: RoutingConfig | None = None,
    *,
    treatments: Sequence[Mapping[str, Any]] | None = None,
    compensation: tuple[CompensationRecord, bytes] | None = None,
    model_name: str | None = None,
) -> Allocation:
    """An allocation giving MoE layer i of ``model`` the average k ``ks[i]``.

    Args:
        model: a loaded causal LM of a registered family.
        ks: one k per MoE layer (fractional k need ``routing.token_level``), or one
            number for every layer.
        routing: token-level and weight settings (default: :class:`RoutingConfig`'s).
        treatments: per layer, its weight treatments by field (``{"normalizer_k": 3}``,
            ``{"gain": 1.1}``; allocplan/weight_treatments/); default none.
        compensation: the sidecar record and its bytes, for compensated dropped experts.
        model_name: recorded as the model's name (default ``model.name_or_path``).

    Raises:
        AllocplanError: a wrong number of k or treatments, or values out of range.
    """
    layers = find_moe_layers(model)
    if isinstance(ks, (int, float)):
        ks = [ks] * len(layers)
    treatments = list(treatments) if treatments is not None else [{}] * len(layers)
    if len(ks) != len(layers) or len(treatments) != len(layers):
        raise AllocplanError(f"got {len(ks)} k values and {len(treatments)} treatments for {len(layers)} MoE"
                             " layers; give one per layer")
    routing = routing or RoutingConfig()
    record, data = compensation if compensation is not None else (None, None)
    return Allocation(
        model=model_identity(model, model_name or getattr(model, "name_or_path", "") or "in-process"),
        layers=tuple(LayerAllocation(layer.path, layer.index, layer.top_k, k, tuple(dict(treated).items()))
                     for layer, k, treated in zip(layers, ks, treatments)),
        token_level=routing.token_level_record(),
        weights=routing.weights_record(),
        compensation=record,
        compensation_data=data,
    )
