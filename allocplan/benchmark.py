"""``allocplan bench``: time the untouched and the planned model side by side, in one process.

Timings alternate between the two models (untouched, planned, untouched, ...)
after a warm-up, so slow drift of the machine hits both; each figure is the
median of ``repeat`` runs with its min-max spread. Reported:

* prefill: one forward over batch x prompt_len tokens, no cache;
* decode: tokens per second over ``new_tokens`` greedy cached steps at batch 1
  and at batch 8 (after a short prefill);
* three models alternate: ``untouched`` (the model as loaded, transformers'
  stock experts path, full k), ``full_lean`` (full k through allocplan's
  experts path, where the family's experts are pluggable) and ``planned``.
  ``speedup`` is untouched / planned (what a user gets); ``speedup_same_path``
  is full_lean / planned (what the smaller activation count alone buys, with
  the experts implementation held fixed);
* the ideal speed-up bound 1 / (1 - f * (1 - b)) for the plan's budget b, with
  f the routed experts' share of the work at full k: of the weights a token
  reads for decode (``f_routed_weights``), of a prefill's FLOPs (counted with
  torch's FlopCounterMode, ``f_routed_flops``) for prefill; and the measured
  share of a full-k prefill's time inside the experts modules (``f_moe_time``)
  with its bound, for reference. ``achieved_fraction`` divides the smaller of
  the two speed-ups by the bound, so neither a faster experts implementation
  nor a slow baseline can inflate it.

``--config PRESET`` builds a randomly initialised model of a named shape (no
trained weights needed) and plans it uniformly at ``--budget``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from allocplan.errors import AllocplanError
from allocplan.runtime.apply import apply_plan
from allocplan.runtime.layers import find_moe_layers


def _preset_dsv2_lite_small() -> Any:
    from transformers import DeepseekV2Config

    # DeepSeek-V2-Lite's proportions at 1/4 width and half depth: hidden 2048 -> 512, routed
    # expert width 1408 -> 352 (64 experts, top-6, 2 shared), MLA with 16 heads so attention
    # keeps its ~1/16 share, 13 MoE layers after one dense layer, and a 12800 vocabulary so the
    # head keeps its share. Routed experts are then ~0.55 of the weights a token uses (V2-Lite:
    # ~0.55 by the same count).
    return DeepseekV2Config(
        vocab_size=12800, hidden_size=512, intermediate_size=1368, moe_intermediate_size=352,
        num_hidden_layers=14, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=128, q_lora_rank=None,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, head_dim=16, topk_method="greedy",
        n_group=1, topk_group=1, routed_scaling_factor=1.0, max_position_embeddings=2048,
    )


def _preset_mixtral_small() -> Any:
    from transformers import MixtralConfig

    # Mixtral-8x7B's shape (8 experts, top-2, expert width 3.5x hidden, GQA 4:1) at hidden 512;
    # a 2048 vocabulary keeps the head's share as small as Mixtral's, so routed experts hold
    # about 0.87 of the weights a token uses (Mixtral-8x7B: about 0.88).
    return MixtralConfig(
        vocab_size=2048, hidden_size=512, intermediate_size=1792, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048,
    )


PRESETS: dict[str, Callable[[], Any]] = {
    "dsv2-lite-small": _preset_dsv2_lite_small,
    "mixtral-small": _preset_mixtral_small,
}


def build_preset(name: str, seed: int = 0) -> Any:
    """A randomly initialised model of preset ``name`` in eval mode."""
    from transformers import AutoModelForCausalLM

    if name not in PRESETS:
        raise AllocplanError(f"no preset {name!r}; presets: {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(PRESETS[name]()).eval()


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
    experts_paths = {layer.path + "." + _experts_name(model) for layer in find_moe_layers(model)}
    return sum(flops.get(path, 0) for path in experts_paths) / flops[""]


def profiling_flop_floor(model: Any, ids: torch.Tensor) -> dict:
    """What allocplan's profiling reuse can save, counted in FLOPs (isolated strategy, k = 1..K).

    Naive: one full forward per (layer, k), k = K included. Reuse: per (layer l, k < K),
    layer l's MoE block, every decoder layer after l, and what follows the decoder
    layers (final norm, LM head); plus one reference forward per batch. The ratio is
    the floor the measured time ratio can reach when FLOPs set the time.
    """
    from allocplan.runtime.layers import model_family

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


def _experts_name(model: Any) -> str:
    from allocplan.runtime.layers import model_family

    return model_family(model).experts_attr


def _median_spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _time_prefill(model: Any, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def _time_decode(model: Any, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds per generated token over ``new_tokens`` cached greedy steps (prefill excluded)."""
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / new_tokens


def expert_time_share(model: Any, ids: torch.Tensor, repeat: int = 3) -> float:
    """Measured share of a prefill's time spent inside the routed experts modules."""
    spent = [0.0]
    starts: dict[int, float] = {}
    hooks = []
    for layer in find_moe_layers(model):
        hooks.append(layer.experts.register_forward_pre_hook(
            lambda m, _a: starts.__setitem__(id(m), time.perf_counter())))
        hooks.append(layer.experts.register_forward_hook(
            lambda m, _a, _o: spent.__setitem__(0, spent[0] + time.perf_counter() - starts[id(m)])))
    try:
        shares = []
        for _ in range(repeat):
            spent[0] = 0.0
            total = _time_prefill(model, ids)
            shares.append(spent[0] / total)
    finally:
        for hook in hooks:
            hook.remove()
    return statistics.median(shares)


def bench(
    model: Any,
    plan: Any,
    *,
    batch: int = 1,
    prompt_len: int = 256,
    new_tokens: int = 32,
    repeat: int = 5,
    seed: int = 0,
) -> dict:
    """Side-by-side timings of ``model`` without and with ``plan`` (see module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    prefill_ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator)
    decode_prompt = torch.randint(0, vocab, (1, 16), generator=generator)
    decode_batch = torch.randint(0, vocab, (8, 16), generator=generator)
    budget = plan.budget.planned_activations / plan.budget.original_activations
    f_moe = expert_time_share(model, prefill_ids)
    f_flops = routed_flop_share(model, prefill_ids)
    f_weights = routed_weight_share(model)

    def planned(fn: Callable[[], float]) -> float:
        with apply_plan(model, plan):
            return fn()

    lean = _lean_full_k(model)

    measures = {
        "prefill_s": lambda: _time_prefill(model, prefill_ids),
        "decode_b1_s_per_token": lambda: _time_decode(model, decode_prompt, new_tokens),
        "decode_b8_s_per_step": lambda: _time_decode(model, decode_batch, new_tokens),
    }
    results: dict[str, Any] = {}
    for name, measure in measures.items():
        measure(), planned(measure)  # warm-up every path
        if lean is not None:
            lean(measure)
        base, fast, full_lean = [], [], []
        for _ in range(repeat):
            base.append(measure())
            if lean is not None:
                full_lean.append(lean(measure))
            fast.append(planned(measure))
        results[name] = {"untouched": _median_spread(base), "planned": _median_spread(fast),
                         "speedup": _median_spread([b / f for b, f in zip(base, fast)])}
        if lean is not None:
            results[name]["full_lean"] = _median_spread(full_lean)
            results[name]["speedup_same_path"] = _median_spread([b / f for b, f in zip(full_lean, fast)])

    def bound(f: float) -> float:
        return 1 / (1 - f * (1 - budget))

    bounds = {"prefill_s": bound(f_flops), "decode_b1_s_per_token": bound(f_weights),
              "decode_b8_s_per_step": bound(f_weights)}

    def achieved(name: str) -> float:
        r = results[name]
        speedups = [r["speedup"]["median"]] + ([r["speedup_same_path"]["median"]] if "speedup_same_path" in r else [])
        return min(speedups) / bounds[name]

    return {
        "budget": budget,
        "f_moe_time": f_moe,
        "f_routed_weights": f_weights,
        "f_routed_flops": f_flops,
        "ideal_speedup_time": bound(f_moe),
        "ideal_speedup": bounds,
        "achieved_fraction": {name: achieved(name) for name in results},
        "token_level": plan.token_level.enabled,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeat": repeat,
        "threads": torch.get_num_threads(),
        **results,
    }


def _lean_full_k(model: Any) -> Callable[[Callable[[], float]], float] | None:
    """Runs a measure at full k through allocplan's experts path, or None where it does not apply."""
    from allocplan.runtime.experts import register
    from allocplan.runtime.layers import model_family

    if model_family(model).experts_swap is not None:
        return None

    def run(fn: Callable[[], float]) -> float:
        saved = model.config._experts_implementation
        model.set_experts_implementation(register())
        try:
            return fn()
        finally:
            model.set_experts_implementation(saved)

    return run


_MATMUL_OPS = {"aten::mm", "aten::_grouped_mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear"}


def time_breakdown(model: Any, plan: Any, *, prompt_len: int = 256, new_tokens: int = 16, seed: int = 0) -> dict:
    """Where a forward's time goes, untouched and planned, measured with torch's profiler.

    Ranges are opened around every MoE router call (its forward and any allocplan
    routing hooks) and every experts call; inside the experts, matmul ops are split
    from the rest (sorting and grouping the pairs, gathering rows, activation,
    weighting and combining). Reported in ms per prefill (batch 1 x ``prompt_len``)
    and per decoded token (batch 1), under the profiler, which adds a little to
    every op.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    prefill_ids = torch.randint(0, vocab, (1, prompt_len), generator=generator)
    decode_prompt = torch.randint(0, vocab, (1, 16), generator=generator)

    def measured(run: Callable[[], float], per: int) -> dict[str, float]:
        open_ranges: dict[tuple[int, str], Any] = {}
        hooks = []

        def enter(label: str):
            def hook(module: Any, _args: Any) -> None:
                open_ranges[(id(module), label)] = record_function(f"allocplan.bench::{label}")
                open_ranges[(id(module), label)].__enter__()
            return hook

        def leave(label: str):
            def hook(module: Any, _args: Any, _out: Any) -> None:
                open_ranges.pop((id(module), label)).__exit__(None, None, None)
            return hook

        for layer in find_moe_layers(model):
            experts = getattr(layer.block, _experts_name(model))  # the module in place now (dbrx swaps it)
            for module, label in ((layer.router, "router"), (experts, "experts")):
                hooks.append(module.register_forward_pre_hook(enter(label)))
                hooks.append(module.register_forward_hook(leave(label)))
        try:
            run()  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                run()
                total = time.perf_counter() - start
        finally:
            for hook in hooks:
                hook.remove()
        spent = {"router": 0.0, "experts_matmul": 0.0, "experts_other": 0.0}
        for event in prof.events():
            if event.name == "allocplan.bench::router":
                spent["router"] += event.cpu_time_total
            elif event.name == "allocplan.bench::experts":
                matmul = _matmul_time(event)
                spent["experts_matmul"] += matmul
                spent["experts_other"] += event.cpu_time_total - matmul
        result = {name: us / 1e3 / per for name, us in spent.items()}  # ms
        result["total"] = total * 1e3 / per
        result["rest_of_model"] = result["total"] - sum(spent.values()) / 1e3 / per
        return result

    def both(run: Callable[[], float], per: int) -> dict[str, dict[str, float]]:
        untouched = measured(run, per)
        with apply_plan(model, plan):
            planned = measured(run, per)
        return {"untouched": untouched, "planned": planned}

    return {
        "prefill": both(lambda: _time_prefill(model, prefill_ids), 1),
        "decode_b1": both(lambda: _time_decode(model, decode_prompt, new_tokens), new_tokens),
    }


def _matmul_time(event: Any) -> float:
    """Microseconds of matmul ops at the top of ``event``'s subtree (nested matmuls counted once)."""
    total = 0.0
    for child in event.cpu_children:
        if child.name in _MATMUL_OPS:
            total += child.cpu_time_total
        else:
            total += _matmul_time(child)
    return total


def uniform_budget_plan(model: Any, budget: float, token_level: bool) -> Any:
    """The plan ``--config`` runs: the baselines' ``uniform`` policy, or ``alloc-t`` (same k, Alloc-T on)."""
    from allocplan.baselines import build_policy

    return build_policy(model, "alloc-t" if token_level else "uniform", budget).plan


def profile_cost(model: Any, windows: torch.Tensor) -> dict:
    """Seconds to profile every (layer, k) with allocplan's reuse and naively (one full forward each)."""
    from allocplan.planner.profiling import measure_sensitivity

    timings = {}
    for label, reuse in (("reuse", True), ("naive", False)):
        start = time.perf_counter()
        measure_sensitivity(model, windows, reuse_prefix=reuse)
        timings[f"{label}_s"] = time.perf_counter() - start
    timings["ratio"] = timings["reuse_s"] / timings["naive_s"]
    timings["flop_floor"] = profiling_flop_floor(model, windows[:1])
    return timings


def solver_cost(num_layers: int = 60, k_max: int = 16, repeat: int = 3, seed: int = 0) -> dict:
    """DP and ILP time on a DeepSeek-V3-sized instance (60 layers, k in 1..16, budget half)."""
    import random

    from allocplan.planner.problem import AllocationProblem
    from allocplan.planner.solve_dp import solve_dp
    from allocplan.planner.solve_ilp import solve_ilp

    rng = random.Random(seed)
    choices = tuple(tuple(range(1, k_max + 1)) for _ in range(num_layers))
    costs = tuple(
        tuple(scale * (k_max - k) / k_max + rng.uniform(0, 0.01) for k in range(1, k_max + 1))
        for scale in (rng.uniform(0.01, 2.0) for _ in range(num_layers))
    )
    problem = AllocationProblem(choices, costs, num_layers * k_max // 2)
    result = {}
    for name, solve in (("dp_s", solve_dp), ("ilp_s", solve_ilp)):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            solve(problem)
            times.append(time.perf_counter() - start)
        result[name] = statistics.median(times)
    return {"layers": num_layers, "k_max": k_max, **result}
