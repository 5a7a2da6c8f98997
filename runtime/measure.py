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
    """Pairs executed and tokens seen per MoE layer path."""

    pairs: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def per_token(self) -> dict[str, float]:
        """Measured routed experts per token, per layer."""
        return {path: self.pairs[path] / self.tokens[path] if self.tokens[path] else 0.0 for path in self.pairs}

    def total_per_token(self) -> float:
        """Measured routed experts per token summed over layers (comparable to a plan's budget)."""
        return sum(self.per_token().values())


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

        def record(index: torch.Tensor, num_experts: int, path: str = layer.path) -> None:
            counts.pairs[path] += int((index < num_experts).sum())  # index [T, k]
            counts.tokens[path] += int(index.shape[0])

        hooks.append(router_format.watch(layer, record))
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()
