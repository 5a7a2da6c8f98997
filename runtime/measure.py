"""Count the (token, expert) pairs that really run, per MoE layer, whatever the router layout."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .layers import find_moe_layers, model_family
from .router_formats import ROUTER_FORMATS


@dataclass
class ActivationCounts:
    """Pairs executed, tokens seen, and distinct experts run per forward, per MoE layer path."""

    pairs: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    # Summed over the layer's forwards: how many different experts ran in each (what batched decode
    # pays for, since each one's weights are read once per step however many tokens it serves).
    distinct: dict[str, int] = field(default_factory=dict)
    forwards: dict[str, int] = field(default_factory=dict)

    def per_token(self) -> dict[str, float]:
        """Measured routed experts per token, per layer."""
        return {path: self.pairs[path] / self.tokens[path] if self.tokens[path] else 0.0 for path in self.pairs}

    def total_per_token(self) -> float:
        """Measured routed experts per token summed over layers (comparable to a plan's budget)."""
        return sum(self.per_token().values())

    def distinct_per_forward(self) -> float:
        """Distinct experts run per forward (per decode step), averaged over layers and forwards."""
        layers = [path for path in self.distinct if self.forwards[path]]
        return sum(self.distinct[p] / self.forwards[p] for p in layers) / len(layers) if layers else 0.0


@contextmanager
def count_activations(model: Any) -> Iterator[ActivationCounts]:
    """Count executed pairs while the block runs (enter it after ``apply_plan``).

    Each layer's router format says where the pairs that run can be seen (see
    :mod:`allocplan.runtime.router_formats`); slots holding the ``num_experts``
    sentinel are not executed and not counted. Tokens include padding, so measure
    on unpadded batches.
    """
    counts = ActivationCounts()
    router_format = ROUTER_FORMATS[model_family(model).router_format]
    hooks = []
    for layer in find_moe_layers(model):
        counts.pairs[layer.path] = 0
        counts.tokens[layer.path] = 0
        counts.distinct[layer.path] = 0
        counts.forwards[layer.path] = 0

        def record(index: torch.Tensor, num_experts: int, path: str = layer.path) -> None:
            running = index[index < num_experts]  # index [T, k]
            counts.pairs[path] += int(running.numel())
            counts.tokens[path] += int(index.shape[0])
            counts.distinct[path] += int(torch.unique(running).numel())
            counts.forwards[path] += 1

        hooks.append(router_format.watch(layer, record))
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()
