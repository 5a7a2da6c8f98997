"""Count the (token, expert) pairs that reach each layer's expert computation."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from allocplan.runtime.layers import find_moe_layers, model_family


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

    Counts at the experts' input: slots holding the ``num_experts`` sentinel are
    not executed and not counted. JetMoE's sparse router output is counted from
    its per-expert sizes. Tokens include padding, so measure on unpadded batches.
    """
    counts = ActivationCounts()
    hooks = []
    sparse_router = model_family(model).router_format == "jetmoe"
    for layer in find_moe_layers(model):
        counts.pairs[layer.path] = 0
        counts.tokens[layer.path] = 0
        if sparse_router:
            def jetmoe_hook(_module: Any, _args: Any, out: Any, path: str = layer.path) -> None:
                counts.pairs[path] += int(sum(out[3]))
                counts.tokens[path] += int(out[4].shape[0])

            hooks.append(layer.router.register_forward_hook(jetmoe_hook))
        else:
            def experts_hook(module: Any, args: Any, path: str = layer.path) -> None:
                top_k_index = args[1]  # [T, k]
                counts.pairs[path] += int((top_k_index < module.num_experts).sum())
                counts.tokens[path] += int(top_k_index.shape[0])

            hooks.append(layer.experts.register_forward_pre_hook(experts_hook))
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()
