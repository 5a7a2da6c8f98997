"""The cost model behind the ideal speed-up bound, counted rather than timed.

The bound for a plan at budget b is 1 / (1 - f * (1 - b)), f the routed experts'
share of the work at full k: of the weights a token reads (decode), or of a
forward's FLOPs (prefill), counted with torch's FlopCounterMode.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from allocplan.runtime.layers import find_moe_layers, model_family


def ideal_speedup(f: float, budget: float) -> float:
    """1 / (1 - f * (1 - budget)): the speed-up if only the routed share f shrinks with the budget."""
    return 1 / (1 - f * (1 - budget))


def routed_weight_share(model: Any) -> float:
    """f: routed experts' share of the weights one token uses at full k (decode's cost model).

    Counts every parameter a token touches once: embeddings are a lookup (not counted),
    the LM head is; a routed expert counts k / E of its layer's experts.
    """
    layers = find_moe_layers(model)
    routed = sum(
        sum(p.numel() for p in layer.experts.parameters()) * layer.top_k / layer.experts.num_experts
        for layer in layers
    )
    expert_params = sum(p.numel() for layer in layers for p in layer.experts.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters()) - expert_params - embedding + routed
    return routed / total


def module_flops(model: Any, ids: torch.Tensor) -> dict[str, int]:
    """FLOPs of one full-k forward over ``ids`` per module path ("" is the whole model).

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` while the model runs
    transformers' eager experts and attention (the fused paths are invisible to the
    counter); both implementations are put back afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    config = model.config
    saved_experts, saved_attention = config._experts_implementation, config._attn_implementation
    counter = FlopCounterMode(display=False)
    try:
        model.set_experts_implementation("eager")
        model.set_attn_implementation("eager")
        with torch.inference_mode(), counter:
            model(input_ids=ids, use_cache=False)
    finally:
        model.set_experts_implementation(saved_experts)
        model.set_attn_implementation(saved_attention)
    # Keys are "<model class>.<module path>", and "Global" for everything.
    return {("" if name == "Global" else name.split(".", 1)[-1] if "." in name else ""): sum(ops.values())
            for name, ops in counter.get_flop_counts().items()}


def routed_flop_share(model: Any, ids: torch.Tensor) -> float:
    """f for prefill: routed experts' share of a full-k forward's FLOPs over ``ids``."""
    flops = module_flops(model, ids)
    experts_paths = {layer.path + "." + layer.experts_attr for layer in find_moe_layers(model)}
    return sum(flops.get(path, 0) for path in experts_paths) / flops[""]


def profiling_flop_floor(model: Any, ids: torch.Tensor) -> dict:
    """What allocplan's profiling reuse can save, counted in FLOPs (isolated strategy, k = 1..K).

    Naive: one full forward per (layer, k), k = K included. Reuse: per (layer l, k < K),
    layer l's MoE block, every decoder layer after l, and what follows the decoder
    layers (final norm, LM head); plus one reference forward per batch. The ratio is
    the floor the measured time ratio can reach when FLOPs set the time.
    """
    flops = module_flops(model, ids)
    total = flops[""]
    layers_path = model_family(model).layers_path
    decoder = model.get_submodule(layers_path)
    per_layer = [flops.get(f"{layers_path}.{j}", 0) for j in range(len(decoder))]
    outside_layers = total - sum(per_layer)  # embeddings, final norm, LM head
    head = next(name for name, module in model.named_modules() if module is model.get_output_embeddings())
    reuse = naive = total  # the reference forward
    for layer in find_moe_layers(model):
        later = sum(per_layer[layer.index + 1 :])
        block = flops.get(layer.path, 0)
        reuse += (layer.top_k - 1) * (block + later + outside_layers)
        naive += layer.top_k * total
    return {"ratio": reuse / naive, "lm_head_share": flops.get(head, 0) / total,
            "layer_share": statistics.mean(per_layer) / total}
