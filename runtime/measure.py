"""Count the (token, expert) pairs that really run, per MoE layer, whatever the router layout, and the
stand-ins that run in place of dropped ones, in expert-equivalents (the charged budget's unit)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from allocplan.standins import multiply_adds

from .experts import COMPENSATION_ATTR
from .layers import expert_multiply_adds, find_moe_layers, model_family
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
    # Dropped candidates served by a stand-in, and what one stand-in costs in expert-equivalents (its
    # multiply-adds over one routed expert's), per compensated layer.
    stand_in_pairs: dict[str, int] = field(default_factory=dict)
    stand_in_cost: dict[str, float] = field(default_factory=dict)

    def per_token(self) -> dict[str, float]:
        """Measured routed experts per token, per layer."""
        return {path: self.pairs[path] / self.tokens[path] if self.tokens[path] else 0.0 for path in self.pairs}

    def total_per_token(self) -> float:
        """Measured routed experts per token summed over layers (comparable to a plan's budget)."""
        return sum(self.per_token().values())

    def stand_in_work_per_layer(self) -> dict[str, float]:
        """Measured stand-in work per token, per layer, in expert-equivalents."""
        return {path: self.stand_in_pairs[path] * self.stand_in_cost.get(path, 0.0) / self.tokens[path]
                if self.tokens[path] else 0.0 for path in self.stand_in_pairs}

    def stand_in_work_per_token(self) -> float:
        """Measured stand-in work per token summed over layers, in expert-equivalents."""
        return sum(self.stand_in_work_per_layer().values())

    def distinct_per_forward(self) -> float:
        """Distinct experts run per forward (per decode step), averaged over layers and forwards."""
        layers = [path for path in self.distinct if self.forwards[path]]
        return sum(self.distinct[p] / self.forwards[p] for p in layers) / len(layers) if layers else 0.0


def stand_in_cost(layer: Any) -> float | None:
    """What one stand-in of ``layer``'s applied plan costs, in expert-equivalents: its multiply-adds over one
    routed expert's (None where the layer runs no stand-ins)."""
    stand_ins = getattr(layer.experts, COMPENSATION_ATTR, None)
    if stand_ins is None:
        return None
    rank = stand_ins.down.shape[-1] if stand_ins.down is not None else 0
    return multiply_adds(stand_ins.bias.shape[-1], rank) / expert_multiply_adds(layer)


@contextmanager
def count_activations(model: Any) -> Iterator[ActivationCounts]:
    """Count executed pairs and stand-ins while the block runs (enter it after ``apply_plan``).

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
        counts.stand_in_pairs[layer.path] = 0
        stand_ins = getattr(layer.experts, COMPENSATION_ATTR, None)
        if stand_ins is not None:
            counts.stand_in_cost[layer.path] = stand_in_cost(layer)

        def record(index: torch.Tensor, num_experts: int, path: str = layer.path,
                   compensated: bool = stand_ins is not None) -> None:
            running = index[index < num_experts]  # index [T, k]
            if compensated:  # every slot not running carries a dropped candidate's stand-in (num_experts + e)
                counts.stand_in_pairs[path] += int(index.numel() - running.numel())
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
