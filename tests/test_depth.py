"""Profiling time against depth (allocplan/bench/depth.py): the cut, the counts and the page's verdict."""

from __future__ import annotations

import math

import pytest
from tiny_models import build_tiny_model

from allocplan.bench.depth import (anchored_layer_forwards, depth_scaling, first_layers, growth_exponent,
                                  probe_layer_forwards)
from allocplan.bench.page import depth_lines
from allocplan.errors import AllocplanError
from allocplan.runtime.layers import find_moe_layers


def test_probe_layer_forwards_by_hand():
    # 3 probes per layer, 4 MoE layers: layer 0 re-runs 4 layers, layer 1 three, ... -> 3 * (4+3+2+1).
    assert probe_layer_forwards(4, 3) == 30
    assert probe_layer_forwards(1, 5) == 5


def test_growth_exponent_by_hand():
    assert growth_exponent([4, 16], [2.0, 8.0]) == pytest.approx(1.0)
    assert growth_exponent([4, 8, 16], [1.0, 3.0, 4.0]) == pytest.approx(1.0)  # ends only
    assert growth_exponent([2, 4], [1.0, 4.0]) == pytest.approx(2.0)


def test_first_layers_cuts_and_runs():
    model = build_tiny_model("mixtral")
    total = len(model.model.layers)
    first_layers(model, 1)
    assert len(model.model.layers) == 1 and model.config.num_hidden_layers == 1
    assert len(find_moe_layers(model)) == 1
    import torch
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    with pytest.raises(AllocplanError, match="from 1 to 1"):
        first_layers(model, total + 1)


def test_anchored_layer_forwards_by_hand():
    # 12 carried probes per layer run one block each: 12 * 4; two anchors per layer re-run 4+3+2+1 layers on
    # the first of every four batches: with 8 batches, 2 anchor batches, so 2 * 10 * 2 / 8 per batch.
    assert anchored_layer_forwards(4, 12, 8) == 48 + 5
    assert anchored_layer_forwards(4, 12, 1) == 48 + 20


def test_depth_scaling_on_a_tiny_checkpoint(checkpoints):
    result = depth_scaling(str(checkpoints("mixtral")), depths=(1, 2), calib_tokens=512, rounds=2,
                           seq_len=64)
    exact = result["strategies"]["isolated"]
    rows = exact["rows"]
    assert [row["moe_layers"] for row in rows] == [1, 2]
    probes = rows[0]["probes_per_layer"]
    assert probes == rows[1]["probes_per_layer"] and probes > 0
    assert [row["probe_layer_forwards"] for row in rows] == [probes, 3 * probes]
    assert exact["layer_forward_exponent"] == pytest.approx(math.log(3) / math.log(2))
    for measured in result["strategies"].values():
        for row in measured["rows"]:
            assert row["seconds"]["min"] <= row["seconds"]["median"] <= row["seconds"]["max"]
        assert measured["exponent"]["min"] <= measured["exponent"]["median"] <= measured["exponent"]["max"]
    # 8 windows of 64 are one batch: the anchors run on it. One MoE layer: 2 anchors re-run it.
    assert result["strategies"]["anchored"]["rows"][0]["probe_layer_forwards"] == probes + 2
    for entries in [*result["regret"].values(), result["yardstick"]]:
        assert [entry["ratio"] for entry in entries] == [0.33, 0.5, 0.67]
        assert all(entry["regret"] >= 0 and entry["optimum"] >= 0 for entry in entries)
    # The single layer's anchored rows are exact (nothing follows it), so its plans are the exact ones.
    assert all(entry["regret"] == 0 for entry in result["regret"][1])
    lines = "\n".join(depth_lines(result))
    assert "| anchored | 2 |" in lines and "| exact, other text | 2 |" in lines


def _depth(exponents: tuple[float, float, float]) -> dict:
    rows = [{"moe_layers": n, "depth": n, "seconds": {"median": 1.0, "min": 1.0, "max": 1.0},
             "seconds_per_moe_layer": 1 / n, "probes_per_layer": 12, "probe_layer_forwards": probe_layer_forwards(n, 12)}
            for n in (4, 16)]
    median, low, high = exponents
    return {"model": "bundled:ref-deep", "calib_tokens": 2048, "rounds": 3,
            "strategies": {"isolated": {"rows": rows, "exponent": {"median": median, "min": low, "max": high},
                                        "layer_forward_exponent": 1.85}}}


def test_depth_verdict_follows_the_worst_round():
    assert "**Faster than linear**" in "\n".join(depth_lines(_depth((1.3, 1.2, 1.4))))
    # Linear only when every round is: one round above 1 is not "no faster than linear".
    mixed = "\n".join(depth_lines(_depth((0.95, 0.9, 1.05))))
    assert "**Not linear in every round**" in mixed and "No faster than linear" not in mixed
    assert "No faster than linear in every round" in "\n".join(depth_lines(_depth((0.9, 0.85, 0.95))))
    assert depth_lines(None) == []
