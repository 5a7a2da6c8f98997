"""prefer: active (OEA-style batch-aware filling): hand-computed picks, exact pair counts, fewer experts."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model, plan_for

from allocplan import RoutingConfig
from allocplan.errors import AllocplanError
from allocplan.formats.allocation import TokenLevel
from allocplan.runtime.apply import apply_plan
from allocplan.runtime.layers import find_moe_layers
from allocplan.runtime.measure import count_activations
from allocplan.runtime.routing_rules import alloc_t_keep, alloc_t_keep_grouped

# Three tokens, candidates sorted by score. k_base 1 keeps experts 0, 1 and 2 (the running set).
SCORES = torch.tensor([[0.9, 0.8, 0.1],
                       [0.7, 0.6, 0.5],
                       [0.95, 0.4, 0.3]])
INDICES = torch.tensor([[0, 1, 2],
                        [1, 3, 0],
                        [2, 4, 1]])
REAL = torch.ones(3, dtype=torch.bool)


def test_score_fills_by_score_and_active_fills_running_experts_first():
    # Two extra pairs. By score: t0's expert 1 (0.8), then t1's expert 3 (0.6): experts {0, 1, 2, 3}.
    by_score = alloc_t_keep(SCORES, REAL, 5, 1)
    assert by_score.tolist() == [[True, True, False], [True, True, False], [True, False, False]]
    # Running first: t0's expert 1 (0.8), then t1's expert 0 (0.5), both already running: {0, 1, 2}.
    active = alloc_t_keep(SCORES, REAL, 5, 1, indices=INDICES, num_experts=5)
    assert active.tolist() == [[True, True, False], [True, False, True], [True, False, False]]
    # Five extra: the four running candidates (0.8, 0.5, 0.3, 0.1), then the best other (t1's 3 at 0.6).
    five = alloc_t_keep(SCORES, REAL, 8, 1, indices=INDICES, num_experts=5)
    assert five.tolist() == [[True, True, True], [True, True, True], [True, False, True]]


def test_padding_never_gets_a_pair_even_when_its_expert_runs():
    real = torch.tensor([True, False, True])
    # Real tokens t0, t2 keep experts 0 and 2 (t1 is padding: its expert 1 does not run). Running
    # candidates: t0's 2 (0.1); then by score: t0's 1 (0.8). t1's candidate 0 runs but t1 is padding.
    keep = alloc_t_keep(SCORES, real, 4, 1, indices=INDICES, num_experts=5)
    assert keep.tolist() == [[True, True, True], [False, False, False], [True, False, False]]


def test_grouped_pools_see_only_their_own_running_experts():
    # Group 0 = {t0, t1} keeps experts 0, 1; group 1 = {t2} keeps 2. One extra pair each.
    groups = torch.tensor([0, 0, 1])
    keep = alloc_t_keep_grouped(SCORES, REAL, groups, torch.tensor([3, 2]), 1, indices=INDICES, num_experts=5)
    # Group 0's running candidates: t0's 1 (0.8), t1's 0 (0.5) -> t0's 1. Group 1: t2's own 4 and
    # 1 are not running in group 1 (1 runs only in group 0) -> by score, t2's 4 (0.4).
    assert keep.tolist() == [[True, True, False], [True, False, False], [True, True, False]]
    plain = alloc_t_keep_grouped(SCORES, REAL, groups, torch.tensor([3, 2]), 1)
    assert plain.tolist() == keep.tolist()  # here the best candidates happen to be the running ones
    keep = alloc_t_keep_grouped(SCORES, REAL, groups, torch.tensor([4, 1]), 1, indices=INDICES, num_experts=5)
    assert keep.tolist() == [[True, True, False], [True, False, True], [True, False, False]]


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "deepseek_v3"])
def test_same_pairs_fewer_distinct_experts_and_full_budget_unchanged(family):
    model = build_tiny_model(family)
    layers = find_moe_layers(model)
    ids = torch.randint(1, 128, (8, 1), generator=torch.Generator().manual_seed(1))  # one decode step, batch 8
    ks = [max(1, layer.top_k // 2) + 0.5 for layer in layers]
    seen = {}
    for prefer in ("score", "active"):
        with apply_plan(model, plan_for(model, ks, token_level=True, prefer=prefer)), count_activations(model) as c:
            with torch.inference_mode():
                model(input_ids=ids)
        seen[prefer] = c
    for layer, k in zip(layers, ks):
        assert seen["active"].pairs[layer.path] == seen["score"].pairs[layer.path] == int(k * 8 + 0.5)
        assert seen["active"].distinct[layer.path] <= seen["score"].distinct[layer.path]
    assert seen["active"].distinct_per_forward() < seen["score"].distinct_per_forward()
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        with apply_plan(model, plan_for(model, [layer.top_k for layer in layers], token_level=True, prefer="active")):
            after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_prefer_is_a_validated_setting():
    assert RoutingConfig(prefer="active").token_level_record() == TokenLevel(True, 1, None, "batch", "active")
    with pytest.raises(AllocplanError, match="choose one of score, active"):
        RoutingConfig(prefer="shared")


@pytest.mark.slow  # times and scores three allocations
def test_batched_decode_comparison_counts_times_and_scores_each_allocation():
    from allocplan.bench.batch_decode import compare_batched_decode

    model = build_tiny_model("qwen3_moe")
    layers = find_moe_layers(model)
    ks = [max(1, layer.top_k // 2) + 0.5 for layer in layers]
    windows = torch.randint(1, 128, (8, 12), generator=torch.Generator().manual_seed(2))
    allocations = {"untouched": None, "score": plan_for(model, ks, token_level=True),
                   "active": plan_for(model, ks, token_level=True, prefer="active")}
    result = compare_batched_decode(model, allocations, windows[:, :4], windows, new_tokens=3, repeat=1)
    full = sum(layer.top_k for layer in layers)
    assert result["untouched"]["activations_per_token"] == full
    # Decode steps of 8 tokens: round_half_up(k * 8) pairs per layer, whichever way they are filled.
    planned = sum(int(k * 8 + 0.5) for k in ks) / 8
    assert result["score"]["activations_per_token"] == result["active"]["activations_per_token"] == planned
    assert result["active"]["distinct_experts_per_step"] <= result["score"]["distinct_experts_per_step"]
    assert result["untouched"]["step_over_first"]["median"] == 1.0
    assert all(len(r["window_nll"]) == 8 and r["nll"] > 0 for r in result.values())
