"""Time per token and memory of every point on docs/results.md's frontier, measured on its reference.

The results protocol (:mod:`allocplan.evaluation.study`) scores each frontier point's quality; this
module rebuilds the same plans and policies (the same profiles, budgets and calibration windows, so
the same routing) and times each beside the untouched model, in one process:

* ``decode-b1``: seconds per generated token over ``new_tokens`` cached greedy steps of one sequence;
* ``decode-b8``: seconds per generated token over the same steps of 8 sequences (a step's time / 8);
* ``prefill``: seconds per token of one forward over one window of ``prefill_len`` tokens.

Every round applies each point in turn (untouched included) and takes all three measures under it;
rounds alternate the points' order, after one warm-up round. A point's figure is the median over
rounds, with its speed-up over the untouched model as the geometric mean of the per-round ratios and
a 95% bootstrap interval. Its memory is what the applied plan holds beyond the model's weights
(:meth:`~allocplan.runtime.apply.PlanHandle.added_bytes`): the stand-ins' tensors.

``scripts/make_results.py --times`` runs this for every reference in docs/results.json and renders
the page's frontier against time from it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from allocplan.formats.config import RoutingConfig
from allocplan.loading import load_model

from .study import (DEFAULT, FRONTIER_CURVES, FRONTIER_PEERS, PAPER_PROFILE, PLAIN, PROFILE_VARIANTS,
                    UNIFORM_CURVE, calibration_windows, method_policy, renormalising, study_calib_tokens,
                    study_profile, study_refine, variant_plan)

TIME_MEASURES = ("decode-b1", "decode-b8", "prefill")
# Interleaved rounds: the timings of one point sit within a few percent of each other round to round.
ROUNDS, NEW_TOKENS, PROMPT_LEN, PREFILL_LEN, DECODE_BATCH = 5, 32, 16, 256, 8


def frontier_targets(model: Any, tokenizer: Any, name: str, budgets: list[float], quick: bool,
                     scored_plans: dict[str, dict] | None = None) -> list[tuple]:
    """(curve label, point name, target) for every frontier point of bundled model ``name``: uniform top-k at
    every whole k and full (the untouched model, target None), then each curve and applicable peer at each
    budget, built as the results protocol builds them.

    ``scored_plans``: per budget (as the JSON keys it), the default plan's ``k`` and ``stand_in_rank`` that the
    quality run scored; a rebuilt default plan that differs means the code changed since, and is refused.

    Raises:
        RuntimeError: a rebuilt default plan differs from the one the quality run scored.
    """
    from allocplan.runtime.allocation_builder import allocation_for
    from allocplan.runtime.layers import find_moe_layers

    calib_tokens = study_calib_tokens(quick)
    _, threshold_windows = calibration_windows(tokenizer, calib_tokens)
    routing = RoutingConfig()
    profiles = {"default": study_profile(model, tokenizer, name, PROFILE_VARIANTS["default"], calib_tokens, routing),
                "plain": study_profile(model, tokenizer, name, PAPER_PROFILE, calib_tokens, PLAIN)}
    originals = [layer.top_k for layer in find_moe_layers(model)]
    targets = [(UNIFORM_CURVE, f"k={k}", allocation_for(model, [min(k, o) for o in originals],
                                                         RoutingConfig(token_level=False)))
               for k in range(1, max(originals))]
    targets.append((UNIFORM_CURVE, "full", None))
    skipped = set() if renormalising(model) else {"k2-peer"}
    for budget in budgets:
        for label, key in [*FRONTIER_CURVES, *((peer, peer) for peer in FRONTIER_PEERS if peer not in skipped)]:
            if key == DEFAULT:
                target = variant_plan(model, tokenizer, profiles, budget, routing, study_refine(quick), calib_tokens,
                                      {})[0]
                scored = (scored_plans or {}).get(str(budget))
                rebuilt = {"k": [e.planned_k for e in target.layers],
                           "stand_in_rank": [e.stand_in_rank for e in target.layers]}
                if scored is not None and rebuilt != {key: scored[key] for key in rebuilt}:
                    raise RuntimeError(f"{name} at {budget}: the rebuilt default plan {rebuilt} is not the one the"
                                       f" quality run scored ({scored}); rerun python scripts/make_results.py first")
            else:
                target = method_policy(model, key, budget, profiles["plain"], threshold_windows)
            targets.append((label, f"b={budget}", target))
    return targets


def _applied(model: Any, target: Any) -> Any:
    """The handle of ``target`` applied to ``model`` (an allocation or a policy), or None for the untouched model."""
    from allocplan.runtime.apply import apply_plan

    if target is None:
        return None
    return target.apply(model) if hasattr(target, "apply") else apply_plan(model, target)


def time_points(model: Any, targets: list[tuple], *, rounds: int = ROUNDS, new_tokens: int = NEW_TOKENS,
                prompt_len: int = PROMPT_LEN, prefill_len: int = PREFILL_LEN, decode_batch: int = DECODE_BATCH,
                seed: int = 0) -> dict:
    """Seconds per token of each target in each measure (module docstring), beside the untouched model.

    ``targets``: (curve label, point name, target): an allocation, a policy, or None for the untouched model.
    Returns ``{"untouched": {measure: spread}, "points": {label: {name: {measure: {"s_per_token": spread,
    "speedup": interval}, "added_bytes": n}}}}``.
    """
    from allocplan.bench.timing import median_spread, ratio_interval, time_decode, time_prefill

    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=generator)
    batch = torch.randint(0, vocab, (decode_batch, prompt_len), generator=generator)
    window = torch.randint(0, vocab, (1, prefill_len), generator=generator)
    measures = {"decode-b1": lambda: time_decode(model, prompt, new_tokens),
                "decode-b8": lambda: time_decode(model, batch, new_tokens) / decode_batch,
                "prefill": lambda: time_prefill(model, window) / prefill_len}
    entries = [(None, None, None), *targets]  # the untouched model first, timed every round like the points
    times: list[dict[str, list[float]]] = [{measure: [] for measure in measures} for _ in entries]
    added: list[int] = [0] * len(entries)
    for round_index in range(rounds + 1):  # round 0 warms every path up and is not kept
        order = list(range(len(entries)))
        if round_index % 2 == 0:
            order.reverse()
        for i in order:
            handle = _applied(model, entries[i][2])
            try:
                for measure, run in measures.items():
                    seconds = run()
                    if round_index:
                        times[i][measure].append(seconds)
                if handle is not None:
                    added[i] = handle.added_bytes()
            finally:
                if handle is not None:
                    handle.remove()
    untouched = times[0]
    points: dict[str, dict[str, dict]] = {}
    for (label, name, _), measured, held in zip(entries[1:], times[1:], added[1:]):
        points.setdefault(label, {})[name] = {
            **{measure: {"s_per_token": median_spread(values),
                         "speedup": ratio_interval(untouched[measure], values) if rounds > 1 else None}
               for measure, values in measured.items()},
            "added_bytes": held}
    return {"untouched": {measure: median_spread(values) for measure, values in untouched.items()},
            "points": points}


def expert_bytes(model: Any) -> int:
    """Bytes of the routed experts' weights (every MoE layer's experts module)."""
    from allocplan.runtime.layers import find_moe_layers

    return sum(p.numel() * p.element_size() for layer in find_moe_layers(model) for p in layer.experts.parameters())


def time_model(name: str, budgets: list[float], quick: bool, rounds: int = ROUNDS,
               scored_plans: dict[str, dict] | None = None) -> dict:
    """Every frontier point of bundled model ``name`` timed on it: the ``frontier_time`` entry of its results
    JSON (with the settings the page states). ``scored_plans``: as :func:`frontier_targets` checks them."""
    torch.manual_seed(0)
    started = time.time()
    model, tokenizer = load_model(f"bundled:{name}")
    targets = frontier_targets(model, tokenizer, name, budgets, quick, scored_plans)
    print(f"[{name}] {len(targets)} frontier points built at {time.time() - started:.0f}s", flush=True)
    new_tokens = 8 if quick else NEW_TOKENS
    result = time_points(model, targets, rounds=2 if quick else rounds, new_tokens=new_tokens)
    return {**result, "threads": torch.get_num_threads(), "rounds": 2 if quick else rounds,
            "new_tokens": new_tokens, "prompt_len": PROMPT_LEN, "prefill_len": PREFILL_LEN,
            "decode_batch": DECODE_BATCH, "expert_bytes": expert_bytes(model),
            "seconds": round(time.time() - started)}
