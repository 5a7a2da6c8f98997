"""Where a forward's time goes, untouched and planned, measured with torch's profiler."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from allocplan.runtime.apply import apply_plan
from allocplan.runtime.experts import NATIVE_EXPERTS_RANGE
from allocplan.runtime.layers import find_moe_layers
from .timing import time_decode, time_prefill

# The native experts kernel's call (runtime/experts.py) counts whole as matmuls: its gate and combine run inside
# it, a small share of its arithmetic.
_MATMUL_OPS = {"aten::mm", "aten::_grouped_mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear",
               NATIVE_EXPERTS_RANGE}


def time_breakdown(model: Any, plan: Any, *, prompt_len: int = 256, new_tokens: int = 16, seed: int = 0) -> dict:
    """Where a forward's time goes, untouched and planned, measured with torch's profiler.

    Ranges are opened around every MoE router call (its forward and any allocplan
    routing hooks) and every experts call; inside the experts, matmul ops are split
    from the rest (sorting and grouping the pairs, gathering rows, activation,
    weighting and combining); a call of the native experts kernel, which does all of
    these in one, counts as matmuls. Reported in ms per prefill (batch 1 x ``prompt_len``)
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
            experts = getattr(layer.block, layer.experts_attr)  # the module in place now (dbrx swaps it)
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
        "prefill": both(lambda: time_prefill(model, prefill_ids), 1),
        "decode_b1": both(lambda: time_decode(model, decode_prompt, new_tokens), new_tokens),
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
