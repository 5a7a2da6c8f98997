"""Allocations built in code for a loaded model: probes during profiling, baselines, users' own.

``allocation_for(model, ks)`` is the public way to run a hand-chosen per-layer k
without a profile or a budget: it reads the model's MoE layers and identity and
returns a validated :class:`~allocplan.formats.allocation.Allocation`, which
``apply_plan`` takes like a plan. Nothing is solved, so nothing is recorded as solved.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import AllocplanError
from ..formats.allocation import Allocation, LayerAllocation
from ..formats.config import RoutingConfig
from .layers import find_moe_layers, model_identity


def allocation_for(model: Any, ks: float | Sequence[float], routing: RoutingConfig | None = None,
                   *, model_name: str | None = None) -> Allocation:
    """An allocation giving MoE layer i of ``model`` the average k ``ks[i]``.

    Args:
        model: a loaded causal LM of a registered family.
        ks: one k per MoE layer (fractional k need ``routing.token_level``), or one
            number for every layer.
        routing: token-level and weight settings (default: :class:`RoutingConfig`'s).
        model_name: recorded as the model's name (default ``model.name_or_path``).

    Raises:
        AllocplanError: a wrong number of k, or k outside [1, the layer's original k].
    """
    layers = find_moe_layers(model)
    if isinstance(ks, (int, float)):
        ks = [ks] * len(layers)
    if len(ks) != len(layers):
        raise AllocplanError(f"got {len(ks)} k values for {len(layers)} MoE layers; give one per layer")
    routing = routing or RoutingConfig()
    return Allocation(
        model=model_identity(model, model_name or getattr(model, "name_or_path", "") or "in-process"),
        layers=tuple(LayerAllocation(layer.path, layer.index, layer.top_k, k) for layer, k in zip(layers, ks)),
        token_level=routing.token_level_record(),
        weights=routing.weights_record(),
    )
