"""Time the untouched and the planned model side by side, in one process.

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

import contextlib
import math
import statistics
import time
from typing import Any, Callable

import torch

from ..formats.allocation import Allocation
from ..formats.config import ProfileConfig
from ..progress import progress
from allocplan.runtime.apply import apply_plan
from allocplan.runtime.measure import count_activations
from allocplan.runtime.layers import find_moe_layers, model_family
from .cost_model import charged_budget, ideal_speedup, profiling_flop_floor, routed_flop_share, routed_weight_share


def median_spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of per-round values (how every timing here is reported)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio_interval(numerators: list[float], denominators: list[float]) -> dict[str, float]:
    """Paired ratio of two timings taken in the same rounds: the geometric mean of the per-round
    ratios, with a 95% bootstrap interval over rounds (2000 resamples, seeded)."""
    from ..evaluation.compare import paired_bootstrap

    logs = paired_bootstrap([math.log(n) for n in numerators], [math.log(d) for d in denominators], 1)
    return {"geomean": math.exp(logs["mean"]), "low": math.exp(logs["low"]), "high": math.exp(logs["high"])}


def now(device: torch.device) -> float:
    """Wall-clock seconds once the device has finished its queued work: CUDA kernels run
    asynchronously, so reading the clock without a synchronise would time the launches only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def time_prefill(model: Any, ids: torch.Tensor) -> float:
    start = now(ids.device)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    return now(ids.device) - start


def greedy_decode(model: Any, ids: torch.Tensor, new_tokens: int, *, count: bool = False) -> tuple[float, Any]:
    """Prefill ``ids`` [B, P], then ``new_tokens`` cached greedy steps: (seconds the steps took,
    their :class:`~allocplan.runtime.measure.ActivationCounts` with ``count``, else None)."""
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # token [B, 1]
        with count_activations(model) if count else contextlib.nullcontext() as counts:
            start = now(ids.device)
            for _ in range(new_tokens):
                out = model(input_ids=token, cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            seconds = now(ids.device) - start
    return seconds, counts


def time_decode(model: Any, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds per generated token over ``new_tokens`` cached greedy steps (prefill excluded)."""
    return greedy_decode(model, ids, new_tokens)[0] / new_tokens


def decode_counts(model: Any, allocation: Allocation | None, prompts: torch.Tensor, new_tokens: int) -> dict:
    """Distinct experts per step (mean over MoE layers) and activations per token while ``prompts``
    [B, P] decode ``new_tokens`` greedy steps (the prefill is not counted)."""
    handle = apply_plan(model, allocation) if allocation is not None else None
    try:
        _, counts = greedy_decode(model, prompts, new_tokens, count=True)
    finally:
        if handle is not None:
            handle.remove()
    return {"distinct_experts_per_step": counts.distinct_per_forward(),
            "activations_per_token": counts.total_per_token(),
            "stand_in_work_per_token": counts.stand_in_work_per_token(),
            "charged_work_per_token": counts.total_per_token() + counts.stand_in_work_per_token()}


def expert_time_share(model: Any, ids: torch.Tensor, repeat: int = 3) -> float:
    """Measured share of a prefill's time spent inside the routed experts modules."""
    spent = [0.0]
    starts: dict[int, float] = {}
    hooks = []
    device = ids.device
    for layer in find_moe_layers(model):
        hooks.append(layer.experts.register_forward_pre_hook(
            lambda m, _a: starts.__setitem__(id(m), now(device))))
        hooks.append(layer.experts.register_forward_hook(
            lambda m, _a, _o: spent.__setitem__(0, spent[0] + now(device) - starts[id(m)])))
    try:
        shares = []
        for _ in range(repeat):
            spent[0] = 0.0
            total = time_prefill(model, ids)
            shares.append(spent[0] / total)
    finally:
        for hook in hooks:
            hook.remove()
    return statistics.median(shares)


def bench(
    model: Any,
    plan: Allocation,
    *,
    batch: int = 1,
    prompt_len: int = 256,
    new_tokens: int = 32,
    repeat: int = 5,
    seed: int = 0,
    variants: dict[str, Allocation] | None = None,
    decode_batch_size: int = 8,
) -> dict:
    """Side-by-side timings of ``model`` without and with ``plan`` (an allocation; see module docstring).

    Runs where the model's input embedding is (on CUDA, every reading waits for the queued
    kernels). ``variants``: other allocations timed in the same rounds (e.g. the plan with
    compensation), each reported under ``variants[label]`` with its time over the plan's,
    round by round (``over_planned``, and ``over_planned_interval``: the geometric mean with a 95%
    interval), and its time in each round (``rounds``, for ratios between variants; the plan's are
    ``planned_rounds``). ``decode_batch_size``: the batched decode measure's batch.
    """
    from allocplan.runtime.layers import input_device
    from allocplan.runtime.native import standins_kernel

    device = input_device(model)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    prefill_ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
    decode_prompt = torch.randint(0, vocab, (1, 16), generator=generator).to(device)
    decode_batch = torch.randint(0, vocab, (decode_batch_size, 16), generator=generator).to(device)
    # The bound's b is the plan's charged work (experts and stand-ins) over the original routed work.
    budget = charged_budget(model, plan)
    f_moe = expert_time_share(model, prefill_ids)
    f_flops = routed_flop_share(model, prefill_ids)
    f_weights = routed_weight_share(model)

    def under(allocation: Allocation) -> Callable[[Callable[[], float]], float]:
        def run(fn: Callable[[], float]) -> float:
            with apply_plan(model, allocation):
                return fn()
        return run

    planned = under(plan)
    others = {label: under(allocation) for label, allocation in (variants or {}).items()}

    lean = _lean_full_k(model)

    measures = {
        "prefill_s": lambda: time_prefill(model, prefill_ids),
        "decode_b1_s_per_token": lambda: time_decode(model, decode_prompt, new_tokens),
        f"decode_b{decode_batch_size}_s_per_step": lambda: time_decode(model, decode_batch, new_tokens),
    }
    results: dict[str, Any] = {}
    for name, measure in progress(measures.items(), desc="timing"):
        measure(), planned(measure)  # warm-up every path
        if lean is not None:
            lean(measure)
        for other in others.values():
            other(measure)
        base, fast, full_lean = [], [], []
        varied: dict[str, list[float]] = {label: [] for label in others}
        for _ in range(repeat):
            base.append(measure())
            if lean is not None:
                full_lean.append(lean(measure))
            fast.append(planned(measure))
            for label, other in others.items():
                varied[label].append(other(measure))
        results[name] = {"untouched": median_spread(base), "planned": median_spread(fast),
                         "speedup": median_spread([b / f for b, f in zip(base, fast)]),
                         "speedup_interval": ratio_interval(base, fast) if repeat > 1 else None}
        if others:
            results[name]["variants"] = {
                label: {"time": median_spread(times), "over_planned": median_spread(
                    [v / f for v, f in zip(times, fast)]), "over_planned_interval": ratio_interval(times, fast),
                    "rounds": times} for label, times in varied.items()}
            results[name]["planned_rounds"] = fast
        if lean is not None:
            results[name]["full_lean"] = median_spread(full_lean)
            results[name]["speedup_same_path"] = median_spread([b / f for b, f in zip(full_lean, fast)])

    # What a batched decode step reads: the distinct experts its tokens use (on real text these
    # differ more between tokens than on random ids; docs/benchmarks.md's batch-aware section).
    planned_counts = decode_counts(model, plan, decode_batch, new_tokens)
    distinct = {"untouched": decode_counts(model, None, decode_batch, new_tokens)["distinct_experts_per_step"],
                "planned": planned_counts["distinct_experts_per_step"]}
    # The plan's work per token as it ran (batched decode), at the experts and at the stand-ins, in
    # expert-equivalents: what a charged budget promises.
    work = {"experts": planned_counts["activations_per_token"], "stand_ins": planned_counts["stand_in_work_per_token"],
            "charged": planned_counts["charged_work_per_token"]}

    bounds = {"prefill_s": ideal_speedup(f_flops, budget), "decode_b1_s_per_token": ideal_speedup(f_weights, budget),
              f"decode_b{decode_batch_size}_s_per_step": ideal_speedup(f_weights, budget)}

    def achieved(name: str) -> float:
        r = results[name]
        speedups = [r["speedup"]["median"]] + ([r["speedup_same_path"]["median"]] if "speedup_same_path" in r else [])
        return min(speedups) / bounds[name]

    return {
        "budget": budget,
        "f_moe_time": f_moe,
        "f_routed_weights": f_weights,
        "f_routed_flops": f_flops,
        "ideal_speedup_time": ideal_speedup(f_moe, budget),
        "ideal_speedup": bounds,
        "achieved_fraction": {name: achieved(name) for name in results},
        f"decode_b{decode_batch_size}_distinct_experts": distinct,
        "work_per_token": work,
        "token_level": plan.token_level.enabled,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeat": repeat,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "decode_batch_size": decode_batch_size,
        # Whether batch-1 decode's linear stand-ins can run through the native kernel here (runtime/native.py).
        "native_stand_in_kernel": standins_kernel() is not None,
        **results,
    }


def _lean_full_k(model: Any) -> Callable[[Callable[[], float]], float] | None:
    """Runs a measure at full k through allocplan's experts path, or None where it does not apply."""
    from allocplan.runtime.experts import register

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


# Calibration tokens the profiling cost is measured on: the default profile's. The exact strategy's ratio
# to naive does not depend on it; the anchored one's anchors run on every fourth batch, so it does.
PROFILE_COST_CALIB_TOKENS = ProfileConfig().calib_tokens


def profile_cost(model: Any, windows: torch.Tensor, repeat: int = 5) -> dict:
    """Seconds to profile every (layer, k) with allocplan's reuse, naively (one full forward per probe the
    reuse path needs) and with the anchored strategy's approximate S, alternating in ``repeat`` rounds: the
    medians, and each per-round ratio to naive with its median, [min, max], and its geometric mean with a 95%
    interval over rounds; with the anchored plans' regret against the exact ones (:mod:`.fidelity`)."""
    from allocplan.planner.profiling import measure_sensitivity
    from .fidelity import rows_regrets

    modes = {"reuse": ({}, True), "naive": ({}, False), "anchored": ({"strategy": "anchored"}, True)}
    rounds: dict[str, list[float]] = {label: [] for label in modes}
    rows: dict[str, Any] = {}
    for _ in range(repeat):
        for label, (settings, reuse) in modes.items():
            start = time.perf_counter()
            rows[label], _ = measure_sensitivity(model, windows, ProfileConfig(**settings), reuse_prefix=reuse)
            rounds[label].append(time.perf_counter() - start)

    def against_naive(label: str) -> dict:
        ratios = [r / n for r, n in zip(rounds[label], rounds["naive"])]
        return {"ratio": statistics.median(ratios), "ratio_spread": median_spread(ratios),
                "ratio_interval": ratio_interval(rounds[label], rounds["naive"]) if repeat > 1 else None}

    return {"reuse_s": statistics.median(rounds["reuse"]), "naive_s": statistics.median(rounds["naive"]),
            **against_naive("reuse"), "rounds": repeat, "tokens": int(windows.numel()),
            "flop_floor": profiling_flop_floor(model, windows[:1]),
            "anchored": {"seconds": statistics.median(rounds["anchored"]), **against_naive("anchored"),
                         "regret": rows_regrets(rows["reuse"], rows["anchored"])}}


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
