"""The frontier against time and memory (allocplan/evaluation/frontier_time.py and its page): the timing
loop on a tiny model, the memory an applied plan holds counted by hand, and the time verdicts by hand."""

from __future__ import annotations

import torch
from tiny_models import build_tiny_model

from allocplan import RoutingConfig
from allocplan.evaluation.frontier_time import TIME_MEASURES, time_points
from allocplan.evaluation.results_page import envelope, time_target_lines, time_verdicts
from allocplan.evaluation.study import MODES, UNIFORM_CURVE
from allocplan.planner.treatments import encode_tables
from allocplan.runtime.allocation_builder import allocation_for
from allocplan.runtime.experts import StandIns
from allocplan.runtime.layers import find_moe_layers


def test_time_points_and_added_memory_by_hand():
    """Each target is timed in every measure beside the untouched model; a plan's added memory is its stand-ins'
    tensors: per layer the [E, H] constants and the two padded factors, [1 + E, H, r'] and [1 + E, r', H] with
    r = 3 padded to 4 float32 columns (16 bytes), counted once however many views share them."""
    model = build_tiny_model("olmoe")  # E = 8 experts, H = 32, top-4
    layers = find_moe_layers(model)
    generator = torch.Generator().manual_seed(0)
    # Off the half grid, so the native kernel keeps no half-precision copy (its tables would add to the count).
    stand_ins = {layer.path: StandIns(torch.randn(8, 32, generator=generator), torch.randn(8, 32, 3, generator=generator)
                                      * 1.0001, torch.randn(8, 3, 32, generator=generator) * 1.0001)
                 for layer in layers}
    record, data = encode_tables(stand_ins, "linear")
    compensated = allocation_for(model, 2, RoutingConfig(), compensation=(record, data))
    plain = allocation_for(model, 1, RoutingConfig(token_level=False))
    result = time_points(model, [(UNIFORM_CURVE, "k=1", plain), ("allocplan default", "b=0.5", compensated),
                                 (UNIFORM_CURVE, "full", None)],
                         rounds=2, new_tokens=2, prompt_len=4, prefill_len=8, decode_batch=2)
    per_layer = 4 * (8 * 32 + 2 * (1 + 8) * 32 * 4)  # 10,240 bytes
    assert result["points"]["allocplan default"]["b=0.5"]["added_bytes"] == len(layers) * per_layer
    assert result["points"][UNIFORM_CURVE]["k=1"]["added_bytes"] == 0
    assert result["points"][UNIFORM_CURVE]["full"]["added_bytes"] == 0
    for point in (*result["points"][UNIFORM_CURVE].values(), result["points"]["allocplan default"]["b=0.5"]):
        for measure in TIME_MEASURES:
            spread = point[measure]["s_per_token"]
            assert 0 < spread["min"] <= spread["median"] <= spread["max"]
            assert point[measure]["speedup"]["low"] <= point[measure]["speedup"]["geomean"] <= point[measure]["speedup"]["high"]
    assert set(result["untouched"]) == set(TIME_MEASURES)


def test_envelope_by_hand():
    """The best NLL within a time: a faster point, or two points time-shared (the NLL interpolates theirs)."""
    points = [(1.0, 5.0), (3.0, 3.0), (2.0, 6.0)]  # (2.0, 6.0) is slower and worse than sharing its neighbours
    assert envelope(points, 0.5) is None  # every point is slower
    assert envelope(points, 1.0) == 5.0
    assert envelope(points, 2.0) == 4.0  # half the tokens at 1.0 s (5.0) and half at 3.0 s (3.0)
    assert envelope(points, 2.5) == 3.5
    assert envelope(points, 4.0) == 3.0  # the fastest point reaching the best NLL, run at its own speed


def _row(work: float, nll: float) -> dict:
    return {"modes": {mode: {"charged_work_per_token": work, "window_nll": [nll * 255]} for mode in MODES}}


def _timed(seconds: float) -> dict:
    return {**{m: {"s_per_token": {"median": seconds, "min": seconds, "max": seconds},
                   "speedup": None} for m in ("decode-b1", "decode-b8", "prefill")}, "added_bytes": 0}


def test_time_verdicts_by_hand():
    """The default at 2.0 ms and NLL 3.9 lies below uniform's time-shared 4.0 (k=1 at 1 ms and 5.0, full at 3 ms
    and 3.0); at 0.5 ms it is faster than any uniform point; the paper's point at 2.0 ms (3.8) beats it."""
    res = {"model": "m", "uniform_k": {"1": _row(1.0, 5.0)},
           "budgets": {"0.25": {"rows": {"full": _row(2.0, 3.0), "allocplan": _row(0.5, 6.0),
                                         "alloc-lt": _row(0.5, 6.5)}},
                       "0.5": {"rows": {"full": _row(2.0, 3.0), "allocplan": _row(1.0, 3.9),
                                        "alloc-lt": _row(1.0, 3.8)}}},
           "frontier_time": {"points": {UNIFORM_CURVE: {"k=1": _timed(1e-3), "full": _timed(3e-3)},
                                        "allocplan default": {"b=0.25": _timed(0.5e-3), "b=0.5": _timed(2e-3)},
                                        "paper's Alloc-L+T": {"b=0.25": _timed(0.4e-3), "b=0.5": _timed(2e-3)}}}}
    line = time_verdicts(res, "decode-b1")
    assert line == ("decode-b1 against decode-b1 time: the default lies below uniform top-k (whole k) at 1 of 1"
                    " points; faster than all of its points at b=0.25; below paper's Alloc-L+T at 1 of 2 points"
                    " (not at b=0.5 (+0.1000)).")
    # The target table: the same counts in every mode (the made-up timings serve all three), not met.
    assert time_target_lines([res])[-2] == "| m | 1/1, 1/2 | 1/1, 1/2 | 1/1, 1/2 | no |"
