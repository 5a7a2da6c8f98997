"""The cost models: the ideal speed-up bound, and what profiling costs, counted rather than timed.

The bound for a plan at budget b is 1 / (1 - f * (1 - b)), f the routed experts'
share of the work at full k: of the weights a token reads (decode), or of a
forward's FLOPs (prefill), counted with torch's FlopCounterMode.

Profiling's analytic model (:func:`layer_costs` and the counts built on it) counts what
``measure_sensitivity`` runs per calibration batch (planner/profiling.py): one reference
forward; for each MoE layer l and each k below its original K, layer l's MoE block at k plus
every decoder layer after l and the head; plus the treatment fitting and compensation passes.
docs/scale.md checks it against counted FLOPs and measured time (allocplan/bench/scale.py).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from allocplan.formats.config import ProfileConfig
from allocplan.runtime.layers import find_moe_layers, model_family


def ideal_speedup(f: float, budget: float) -> float:
    """1 / (1 - f * (1 - budget)): the speed-up if only the routed share f shrinks with the budget."""
    return 1 / (1 - f * (1 - budget))


def charged_budget(model: Any, allocation: Any) -> float:
    """The allocation's charged work over the model's original routed work, both in expert-equivalents
    per token: its routed experts plus, on each layer that runs stand-ins, the K_l - k_l dropped
    candidates' stand-ins at their own multiply-adds over one routed expert's (the cost ``eval`` and
    ``bench`` count as they run). This is the b of the speed-up bound: a plan that spends on stand-ins
    is promised less."""
    from allocplan.runtime.apply import apply_plan
    from allocplan.runtime.measure import stand_in_cost

    if allocation is None:
        return 1.0
    entries = {entry.path: entry for entry in allocation.layers}
    stand_in = 0.0
    with apply_plan(model, allocation):
        for layer in find_moe_layers(model):
            per_candidate = stand_in_cost(layer)
            if per_candidate is None or layer.path not in entries:
                continue
            entry = entries[layer.path]
            stand_in += (entry.original_k - entry.planned_k) * per_candidate
    return (allocation.planned_activations + stand_in) / allocation.original_activations


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

    Naive: one full forward per (layer, k < K), the probes the reuse path needs (S[l, K] = 0
    under ``isolated`` without a probe). Reuse: per (layer l, k < K),
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
        naive += (layer.top_k - 1) * total
    return {"ratio": reuse / naive, "lm_head_share": flops.get(head, 0) / total,
            "layer_share": statistics.mean(per_layer) / total}


# ---------------------------------------------------------------- profiling's analytic cost


def layer_costs(model: Any, seq_len: int) -> dict:
    """Per decoder layer, FLOPs per token: everything but the routed experts, and one routed expert;
    plus the head's FLOPs per token and the weight bytes per layer (at 1 byte per parameter)."""
    family = model_family(model)
    decoder_layers = model.get_submodule(family.layers_path)
    moe = {layer.index: layer for layer in find_moe_layers(model)}
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    # Presets leave head_dim unset, and transformers then uses hidden_size / heads.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    qk = (getattr(config, "qk_nope_head_dim", 0) or 0) + (getattr(config, "qk_rope_head_dim", 0) or 0) or head_dim
    v = getattr(config, "v_head_dim", None) or head_dim
    rows = []
    for index, decoder_layer in enumerate(decoder_layers):
        params = sum(p.numel() for p in decoder_layer.parameters())
        layer = moe.get(index)
        expert_params = sum(p.numel() for p in layer.experts.parameters()) if layer else 0
        per_expert = expert_params / layer.experts.num_experts if layer else 0
        # Scores and weighted values over the whole window, as eager attention computes them.
        attention = 2 * seq_len * heads * (qk + v)
        # The MoE block without its routed experts: router and shared experts, what a probe re-runs besides them.
        block = sum(p.numel() for p in layer.block.parameters()) - expert_params if layer else 0
        rows.append({"index": index, "moe": layer is not None, "k": layer.top_k if layer else 0,
                     "base": 2 * (params - expert_params) + attention, "expert": 2 * per_expert,
                     "block": 2 * block, "params": params})
    head = 2 * model.get_output_embeddings().weight.numel()
    return {"layers": rows, "head": head, "vocab": model.get_output_embeddings().weight.shape[0],
            "hidden": config.hidden_size, "params": sum(p.numel() for p in model.parameters()),
            "options": probe_options(model)}


def probe_options(model: Any) -> int:
    """Probes per (layer, k < K) under the default profiling config: the layer without stand-ins, and with
    each stand-in rank the solver may choose (the constant, the rank within the share and within twice
    it) where the family compensates. Each probe re-runs the same later layers, so the probes' cost
    scales with this count. The first MoE layer's count stands for all (same shapes)."""
    from allocplan.planner.profiling import resolve_treatments
    from allocplan.planner.treatments import stand_in_ranks

    config = ProfileConfig()
    _, compensation = resolve_treatments(model, config)
    if compensation == "off":
        return 1
    layer = find_moe_layers(model)[0]
    hidden = model.config.get_text_config().hidden_size
    return 1 + len(stand_in_ranks(layer, hidden, compensation, config.compensation_share, config.compensation_rank,
                                  config.stand_in_choice))


def forward_flops(costs: dict) -> float:
    """FLOPs per token of one full-k forward."""
    return sum(r["base"] + r["k"] * r["expert"] for r in costs["layers"]) + costs["head"]


def probe_flops(costs: dict, k_min: int = 1) -> float:
    """FLOPs per token of every probe of one batch (isolated strategy, prefix reuse): ``costs["options"]``
    probes per (layer, k < K), each the block at k and every later layer (the stand-ins' own
    multiply-adds, a few percent of one expert's per dropped candidate, are left out)."""
    rows, total = costs["layers"], 0.0
    for position, row in enumerate(rows):
        if not row["moe"]:
            continue
        after = sum(r["base"] + r["k"] * r["expert"] for r in rows[position + 1 :]) + costs["head"]
        for k in range(k_min, row["k"]):
            total += costs.get("options", 1) * (row["block"] + k * row["expert"] + after)
    return total


def anchored_probe_flops(costs: dict, k_min: int = 1, anchor_share: float = 0.25) -> float:
    """FLOPs per token of every probe of one batch under ``--strategy anchored`` (planner/anchoring.py):
    ``costs["options"]`` carried probes per (layer, k < K), each the block at k and the head only, and the
    layer's two anchors (k_min and K - 1) re-run exactly, block and every later layer, on
    ``anchor_share`` of the batches (the first of every four)."""
    rows, total = costs["layers"], 0.0
    for position, row in enumerate(rows):
        if not row["moe"] or row["k"] <= k_min:
            continue
        after = sum(r["base"] + r["k"] * r["expert"] for r in rows[position + 1 :]) + costs["head"]
        for k in range(k_min, row["k"]):
            total += costs.get("options", 1) * (row["block"] + k * row["expert"] + costs["head"])
        total += anchor_share * sum(row["block"] + k * row["expert"] + after for k in {k_min, row["k"] - 1})
    return total


# The fitting passes: stand-ins, the drop order (when on by default) and the treatments.
FITTING_PASSES = 3 if ProfileConfig().drop_order else 2


def fitting_flops(costs: dict) -> float:
    """FLOPs per token of the compensation and treatment passes: a captured forward each, plus every
    candidate's expert output once per pass (one call per candidate slot)."""
    routed = sum(r["k"] * r["expert"] for r in costs["layers"])
    return FITTING_PASSES * (forward_flops(costs) + routed)


def streamed_bytes(costs: dict, weight_bytes: float) -> float:
    """Weight bytes one batch moves when nothing stays on the GPU: every layer once for the reference and
    once per fitting pass, and, per probe, the probed block and every later layer."""
    rows = costs["layers"]
    size = [r["params"] * weight_bytes for r in rows]
    total = (1 + FITTING_PASSES) * sum(size)
    for position, row in enumerate(rows):
        if row["moe"]:
            total += (row["k"] - 1) * (size[position] + sum(size[position + 1 :]))
    return total


def anchored_streamed_bytes(costs: dict, weight_bytes: float, anchor_share: float = 0.25) -> float:
    """:func:`streamed_bytes` under ``--strategy anchored``: per (layer, k) the probed layer only, and per
    anchor, on ``anchor_share`` of the batches, the probed layer and every later one."""
    rows = costs["layers"]
    size = [r["params"] * weight_bytes for r in rows]
    total = (1 + FITTING_PASSES) * sum(size)
    for position, row in enumerate(rows):
        if row["moe"] and row["k"] > 1:
            anchors = len({1, row["k"] - 1})
            total += (row["k"] - 1) * size[position] + anchor_share * anchors * sum(size[position:])
    return total


def activation_bytes(costs: dict, batch: int, seq_len: int) -> float:
    """Profiling's memory beyond the weights, per batch: every decoder layer's output and every MoE block's
    input and output (bf16), and five [B, S, V] float32 tensors: the reference's log-probabilities and
    probabilities, and a probe's logits, log-probabilities and KL terms (the last two in
    losses.Scratch's buffers)."""
    layers = len(costs["layers"])
    moe = sum(r["moe"] for r in costs["layers"])
    return (layers + 2 * moe) * batch * seq_len * costs["hidden"] * 2 + 5 * batch * seq_len * costs["vocab"] * 4
