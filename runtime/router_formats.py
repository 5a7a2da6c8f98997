"""Router output layouts, converted to and from the common candidate form.

Most routers return ``(logits, weights [T, k], indices [T, k])``; allocplan's
routing works on that form. A family whose router returns another layout names
a format here: ``to_candidates`` turns the router's output at k_max into
``(logits, weights, indices)`` and ``from_candidates`` builds the router's
layout back from the rewritten weights and indices (sentinel slots dropped).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def _topk_to(router: Any, output: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return output[0], output[1], output[2]


def _topk_from(router: Any, output: tuple[Any, ...], weights: torch.Tensor, indices: torch.Tensor) -> tuple:
    return (output[0], weights, indices, *output[3:])


def _jetmoe_to(router: Any, output: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # JetMoE returns a sparse grouping; recompute its candidates exactly as its gating does.
    logits = output[4]  # [T, E] float
    top_logits, indices = logits.topk(router.top_k, dim=1)  # [T, k_max]
    weights = torch.softmax(top_logits, dim=1).type_as(output[2])  # [T, k_max]
    return logits, weights, indices


def _jetmoe_from(router: Any, output: tuple[Any, ...], weights: torch.Tensor, indices: torch.Tensor) -> tuple:
    # (index_sorted_experts, batch_index, batch_gates, expert_size, logits) over the kept pairs only,
    # so JetMoE's own split-by-size experts compute nothing for dropped slots.
    num_slots = indices.shape[1]
    flat = indices.reshape(-1)  # [T*K]
    kept = (flat < router.num_experts).nonzero().squeeze(-1)  # [P]
    expert_ids, order = flat[kept].sort(stable=True)
    slots = kept[order]  # [P]
    expert_size = torch.bincount(expert_ids, minlength=router.num_experts).tolist()
    return slots, slots.div(num_slots, rounding_mode="trunc"), weights.reshape(-1)[slots], expert_size, output[4]


ROUTER_FORMATS: dict[str, tuple[Callable[..., tuple], Callable[..., tuple]]] = {
    "topk": (_topk_to, _topk_from),
    "jetmoe": (_jetmoe_to, _jetmoe_from),
}
