"""Batched decode: distinct experts per step, time per step and NLL, for several allocations side by side.

At batched decode a step reads the weights of every distinct expert its tokens use, so
its cost tracks the distinct experts per step more than the pairs (OEA, arXiv 2511.02237).
This compares allocations at equal pairs (e.g. Alloc-T filled by score against
``prefer: active``) on three measures, each from one process:

* distinct experts per step and activations per token, counted at the experts modules
  while ``batch`` sequences decode greedily through the KV cache;
* seconds per decode step at that batch, the allocations timed in interleaved rounds
  after a warm-up (median and [min, max]; a ratio against the first allocation per round);
* eval NLL in the ``decode-b8`` mode of :mod:`allocplan.evaluation.metrics` (routing
  exactly as 8 sequences decoding together), per window, for paired comparisons.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from ..evaluation.metrics import nll_and_activations
from ..formats.allocation import Allocation
from allocplan.runtime.apply import apply_plan
from .timing import decode_counts, time_decode


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def compare_batched_decode(model: Any, allocations: dict[str, Allocation | None], prompts: torch.Tensor,
                           eval_windows: torch.Tensor, *, new_tokens: int = 32, repeat: int = 5) -> dict:
    """Each allocation (None: the untouched model) on the three measures of the module docstring.

    Args:
        prompts: [B, P] token ids; B is the decode batch.
        eval_windows: [W, S] held-out windows for the NLL (W a multiple of 8).
    Returns {label: {distinct_experts_per_step, activations_per_token, step_s, step_over_first, nll,
    window_nll}}; ``step_over_first`` is each round's time over the first allocation's.
    """
    labels = list(allocations)
    results = {label: decode_counts(model, allocations[label], prompts, new_tokens) for label in labels}

    def timed(label: str) -> float:
        allocation = allocations[label]
        if allocation is None:
            return time_decode(model, prompts, new_tokens)
        with apply_plan(model, allocation):
            return time_decode(model, prompts, new_tokens)

    for label in labels:  # warm-up: every path once
        timed(label)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for _ in range(repeat):
        for label in labels:
            times[label].append(timed(label))
    for label in labels:
        results[label]["step_s"] = _spread(times[label])
        results[label]["step_over_first"] = _spread([t / f for t, f in zip(times[label], times[labels[0]])])
        allocation = allocations[label]
        handle = apply_plan(model, allocation) if allocation is not None else None
        try:
            scored = nll_and_activations(model, eval_windows, handle, "decode-b8")
        finally:
            if handle is not None:
                handle.remove()
        results[label]["nll"] = scored["nll"]
        results[label]["window_nll"] = scored["window_nll"]
    return results
