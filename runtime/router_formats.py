"""Router output layouts, converted to and from the common candidate form.

Most routers return ``(logits, weights [T, k], indices [T, k])`` and pass the
indices to their experts module; allocplan's routing works on that form. A
family whose router returns another layout names a format here, which says:

* ``to_candidates``: the router's output at k_max as ``(logits, weights, indices)``;
* ``from_candidates``: the router's layout rebuilt from the rewritten weights and
  indices (sentinel slots dropped);
* ``watch``: how to observe the (token, expert) pairs that really run, as a
  [T, k] index with the ``num_experts`` sentinel in slots that do not, whatever
  the layout (activation counting, tests).

A format whose routing allocplan cannot rewrite (the family's ``rewrite_unsupported``)
has no ``to_candidates`` or ``from_candidates``, only ``watch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

# (routed index [T, k] with the num_experts sentinel, num_experts) -> None
IndexCallback = Callable[[torch.Tensor, int], None]


@dataclass(frozen=True)
class RouterFormat:
    """One router output layout (see the module docstring)."""

    to_candidates: Callable[[Any, tuple[Any, ...]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None
    from_candidates: Callable[[Any, tuple[Any, ...], torch.Tensor, torch.Tensor], tuple] | None
    watch: Callable[[Any, IndexCallback], Any]  # (MoELayer, callback) -> removable hook


def _topk_to(router: Any, output: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return output[0], output[1], output[2]


def _topk_from(router: Any, output: tuple[Any, ...], weights: torch.Tensor, indices: torch.Tensor) -> tuple:
    return (output[0], weights, indices, *output[3:])


def _watch_experts_input(layer: Any, callback: IndexCallback) -> Any:
    # The experts module of the block as it is now (dbrx's is swapped while a plan is applied).
    experts = getattr(layer.block, layer.experts_attr)
    return experts.register_forward_pre_hook(lambda module, args: callback(args[1], module.num_experts))


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


def jetmoe_routed_index(router: Any, output: tuple[Any, ...]) -> torch.Tensor:
    """[T, k] expert index of the pairs JetMoE's sparse grouping runs (sentinel elsewhere)."""
    slots, _, _, expert_size, logits = output
    num_slots = router.top_k
    index = torch.full((logits.shape[0] * num_slots,), router.num_experts, dtype=torch.long)  # [T*k]
    index[slots] = torch.repeat_interleave(torch.arange(router.num_experts), torch.tensor(expert_size))
    return index.view(logits.shape[0], num_slots)


def _watch_jetmoe_router(layer: Any, callback: IndexCallback) -> Any:
    return layer.router.register_forward_hook(
        lambda router, _args, output: callback(jetmoe_routed_index(router, output), router.num_experts))


def _watch_dense_router(layer: Any, callback: IndexCallback) -> Any:
    # llama4's router returns (scores [T, E], logits [T, E]): the sigmoid of its top-k logits and zeros
    # elsewhere, which scale every expert's input (all experts run on every token). The routed pairs are
    # the router's own top-k of its logits, taken here by the same call on the same tensor.
    return layer.router.register_forward_hook(
        lambda router, _args, output: callback(output[1].topk(router.top_k, dim=1).indices, router.num_experts))


ROUTER_FORMATS: dict[str, RouterFormat] = {
    "topk": RouterFormat(_topk_to, _topk_from, _watch_experts_input),
    "jetmoe": RouterFormat(_jetmoe_to, _jetmoe_from, _watch_jetmoe_router),
    "dense_scores": RouterFormat(None, None, _watch_dense_router),
}
