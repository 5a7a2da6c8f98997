"""The charged budget: (k, stand-in rank) options in the DP and the ILP, the plan's budget block against what
runs, the plan's sidecar cut to each layer's rank, and plans written before the charge."""

import itertools
import random

import pytest
import torch

from allocplan import apply_plan, load_plan, save_plan
from allocplan.bench.cost_model import charged_budget
from allocplan.errors import AllocplanError
from allocplan.formats.config import ProfileConfig
from allocplan.formats.plan import plan_from_data
from allocplan.formats.provenance import CalibrationRecord
from allocplan.formats.records import to_data
from allocplan.formats.sidecar import sidecar_raw
from allocplan.planner.compile import compile_model
from allocplan.planner.crosscheck import objectives_agree
from allocplan.planner.problem import AllocationProblem
from allocplan.planner.solve import allocation_problem, solve_profile
from allocplan.planner.solve_dp import solve_dp
from allocplan.planner.solve_ilp import solve_ilp
from allocplan.runtime.measure import count_activations
from tiny_models import build_tiny_model

H, EXPERT_MULTIPLY_ADDS = 32, 6144  # tiny olmoe: hidden 32; gate, up and down of 32 x 64 each


def option_problem(rng: random.Random) -> AllocationProblem:
    """Layers of (k, r) options whose weights are k * M + (K - k) * (2 r + 1) * H on a small grid (M = 8, H = 1)."""
    choices, costs, weights = [], [], []
    for _ in range(rng.randint(1, 5)):
        big_k = rng.randint(1, 4)
        row_choices, row_costs, row_weights = [], [], []
        for k in range(1, big_k + 1):
            for rank in [None, 0, 1, 3] if k < big_k else [None]:
                row_choices.append((k, rank))
                row_costs.append(rng.uniform(0, 1) * (big_k - k) + (0 if rank is None else -0.1 * (rank + 1)))
                row_weights.append(8 * k + (0 if rank is None else (big_k - k) * (2 * rank + 1)))
        choices.append(tuple(row_choices))
        costs.append(tuple(row_costs))
        weights.append(tuple(row_weights))
    lo = sum(min(row) for row in weights)
    hi = sum(max(row) for row in weights)
    return AllocationProblem(tuple(choices), tuple(costs), rng.randint(lo, hi), tuple(weights))


def test_dp_and_ilp_agree_with_brute_force_on_k_and_rank_options():
    rng = random.Random(33)
    for _ in range(120):
        problem = option_problem(rng)
        best = min(
            (sum(problem.costs[l][i] for l, i in enumerate(pick)), pick)
            for pick in itertools.product(*(range(len(row)) for row in problem.choices))
            if sum(problem.weights[l][i] for l, i in enumerate(pick)) <= problem.budget)
        dp, ilp = solve_dp(problem), solve_ilp(problem)
        assert dp.objective == pytest.approx(best[0], abs=1e-12)
        assert objectives_agree(dp.objective, ilp.solution.objective)
        assert dp.activations <= problem.budget and ilp.solution.activations <= problem.budget


def test_dp_spends_on_stand_ins_where_they_pay_by_hand():
    # Two layers of K = 2; an expert weighs 4, a dropped candidate's stand-in 1 (rank 0) or 3 (rank 1).
    # Options (k, rank) weigh (2, -) 8, (1, -) 4, (1, 0) 5, (1, 1) 7.
    choices = (((2, None), (1, None), (1, 0), (1, 1)), ((2, None), (1, None), (1, 0), (1, 1)))
    costs = ((0.0, 1.0, 0.9, 0.2), (0.0, 0.3, 0.29, 0.28))
    weights = ((8, 4, 5, 7), (8, 4, 5, 7))
    # Budget 12: (2, -) + (1, -) = 12 costs 0.3; the next best, (1, 1) + (1, 0) = 12, costs 0.49.
    assert solve_dp(AllocationProblem(choices, costs, 12, weights)).ks == ((2, None), (1, None))
    # Budget 11: (2, -) fits beside nothing; (1, 1) + (1, -) = 11 costs 0.5, (1, 0) + (1, 0) = 10 costs 1.19,
    # (1, -) + (1, 1) = 11 costs 1.28: stand-ins go to the layer they help most.
    assert solve_dp(AllocationProblem(choices, costs, 11, weights)).ks == ((1, 1), (1, None))


@pytest.fixture(scope="module")
def compiled():
    model = build_tiny_model("olmoe")
    windows = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    record = CalibrationRecord("text", "random.txt", None, "sha256:" + "0" * 64, 256, 32, 8)
    plan, profile = compile_model(model, None, 0.5, profile=ProfileConfig(calib_tokens=256, seq_len=32, batch_size=4),
                                  windows=(windows, record))
    return model, plan, profile


def test_profile_offers_each_layer_every_rank_and_none(compiled):
    _, _, profile = compiled
    for layer in profile.layers:
        assert layer.expert_multiply_adds == EXPERT_MULTIPLY_ADDS
        # none, the constant, the rank within 10% of an expert (2 r H <= 614: r = 9) and within 20% (r = 19)
        assert sorted(layer.stand_in_sensitivity) == [0, 9, 19]
        for row in layer.stand_in_sensitivity.values():
            assert sorted(row) == sorted(layer.sensitivity) and row[layer.original_k] == layer.sensitivity[4]


def test_recorded_charged_work_is_what_runs(compiled):
    model, plan, _ = compiled
    by_hand = sum(layer.planned_k + (0 if layer.stand_in_rank is None else
                                     (layer.original_k - layer.planned_k) * (2 * layer.stand_in_rank * H + H)
                                     / EXPERT_MULTIPLY_ADDS) for layer in plan.layers)
    assert plan.budget.charged_work == pytest.approx(by_hand, abs=1e-8)
    assert plan.budget.charged_work <= plan.budget.total_activations == 8
    assert plan.budget.stand_in_work > 0  # the tiny model's stand-ins pay, so the DP buys some
    batch = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    with apply_plan(model, plan), count_activations(model) as counts, torch.no_grad():
        model(input_ids=batch)
    measured = counts.total_per_token() + counts.stand_in_work_per_token()
    assert counts.total_per_token() == pytest.approx(plan.budget.planned_activations, abs=1e-12)
    assert measured == pytest.approx(plan.budget.charged_work, abs=1e-8)
    # The speed-up bound's b (allocplan bench) reads the same charge off the applied plan.
    original = sum(layer.original_k for layer in plan.layers)
    assert charged_budget(model, plan.allocation) == pytest.approx(by_hand / original, abs=1e-10)


def test_plan_sidecar_holds_each_layer_at_its_rank(compiled, tmp_path):
    model, plan, _ = compiled
    save_plan(plan, tmp_path / "plan.yaml")
    loaded = load_plan(tmp_path / "plan.yaml")
    assert loaded == plan and plan.budget.sidecar_bytes == len(loaded.compensation_data)
    tensors = sidecar_raw(loaded.compensation_data)
    for layer in plan.layers:
        if layer.stand_in_rank is None:
            assert not any(name.startswith(layer.path) for name in tensors)
        elif layer.stand_in_rank == 0:
            assert f"{layer.path}.down" not in tensors and tensors[layer.path][1].shape == (8, H)
        else:
            assert tensors[f"{layer.path}.down"][1].shape == (8, H, layer.stand_in_rank)
            assert tensors[f"{layer.path}.up"][1].shape == (8, layer.stand_in_rank, H)
    before = model(input_ids=torch.arange(12)[None]).logits
    handle = apply_plan(model, loaded)
    assert not torch.equal(model(input_ids=torch.arange(12)[None]).logits, before)
    handle.remove()
    assert torch.equal(model(input_ids=torch.arange(12)[None]).logits, before)


def test_fixed_stand_ins_are_charged_too():
    model = build_tiny_model("olmoe")
    windows = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    record = CalibrationRecord("text", "random.txt", None, "sha256:" + "0" * 64, 128, 32, 4)
    plan, profile = compile_model(model, None, 0.5, profile=ProfileConfig(
        calib_tokens=128, seq_len=32, batch_size=4, stand_in_choice=False), windows=(windows, record))
    assert all(sorted(layer.stand_in_sensitivity) == [9] for layer in profile.layers)
    # Every layer at k = 2 with rank-9 stand-ins would charge 8 + 4 * 2 * 608 / 6144 > 8: the DP must give
    # something up, so no plan spends its experts' budget and its stand-ins' on top.
    assert plan.budget.charged_work <= 8 + 1e-9 and plan.budget.planned_activations < 8
    # Fixed: every layer that drops candidates runs the one rank.
    assert all(layer.stand_in_rank == (None if layer.planned_k == layer.original_k else 9) for layer in plan.layers)


def test_budget_that_cannot_be_charged(compiled):
    _, plan, profile = compiled
    data = to_data(plan)
    data["budget"]["charged_work"] = 9.5
    data["budget"]["stand_in_work"] = 9.5 - plan.budget.planned_activations
    with pytest.raises(AllocplanError, match="exceeds total_activations 8"):
        plan_from_data(data)
    data = to_data(plan)
    data["budget"]["stand_in_work"] = 0.0
    with pytest.raises(AllocplanError, match="charged_work: is"):
        plan_from_data(data)


def test_solver_grid_is_exact(compiled):
    _, _, profile = compiled
    problem = allocation_problem(profile, 8)
    # Charges in multiply-adds over their common divisor: the budget is 8 experts of 6144 on that grid.
    divisor = 8 * EXPERT_MULTIPLY_ADDS // problem.budget
    for layer, row, weights in zip(profile.layers, problem.choices, problem.weights):
        for (k, rank), weight in zip(row, weights):
            stand_in = 0 if rank is None else (layer.original_k - k) * (2 * rank * H + H)
            assert weight * divisor == k * EXPERT_MULTIPLY_ADDS + stand_in


def test_a_plan_before_the_charge_still_loads_and_applies(compiled, tmp_path):
    # A version-2 plan: no stand_in_rank, no charged fields, a sidecar that serves every layer at one rank.
    from allocplan.planner.treatments import compensation_tables, encode_tables

    model, plan, _ = compiled
    windows = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    record, data = encode_tables(compensation_tables(model, windows, "linear", batch_size=4, rank=3), "linear")
    (tmp_path / record.file).write_bytes(data)
    text = plan.to_yaml()
    old = []
    for line in text.splitlines():
        if line.strip().startswith(("stand_in_rank:", "stand_in_work:", "charged_work:", "sidecar_bytes:",
                                    "sidecar_share:")):
            continue
        old.append(line.replace("schema_version: 3", "schema_version: 2")
                   .replace(plan.compensation.file, record.file).replace(plan.compensation.sha256, record.sha256))
    (tmp_path / "old.yaml").write_text("\n".join(old) + "\n")
    loaded = load_plan(tmp_path / "old.yaml")
    assert loaded.budget.charged_work is None and all(layer.stand_in_rank is None for layer in loaded.layers)
    with apply_plan(model, loaded) as handle:
        assert all(routing.compensated for routing in handle._routings)
    # A profile before version 3 with stand-ins cannot be charged: the solver says to re-profile.
    with pytest.raises(AllocplanError, match="re-profile with this allocplan"):
        solve_profile(plan_profile_without_costs(compiled[2]), 0.5)


def plan_profile_without_costs(profile):
    import dataclasses

    return dataclasses.replace(profile, measurement=dataclasses.replace(profile.measurement, hidden_size=None),
                               layers=tuple(dataclasses.replace(layer, expert_multiply_adds=None,
                                                                stand_in_sensitivity=None)
                                            for layer in profile.layers))


def test_the_alloc_l_ablation_keeps_stand_ins_and_changes_only_the_per_layer_choice(compiled):
    """docs/results.md's "−Alloc-L" row: the default with one (k, stand-in rank) for every layer, at the same charged
    budget, so it measures the per-layer choice alone (it once dropped the stand-ins too)."""
    from allocplan.evaluation.study import ABLATIONS, variant_plan
    from allocplan.formats.config import RefineConfig, RoutingConfig
    from allocplan.planner.solve import charged_work

    model, plan, profile = compiled
    allocation, no_plan = variant_plan(model, None, {"default": profile}, 0.5, RoutingConfig(), RefineConfig(),
                                       256, ABLATIONS["allocplan −Alloc-L"])
    assert no_plan is None
    ks = [entry.planned_k for entry in allocation.layers]
    ranks = [entry.stand_in_rank for entry in allocation.layers]
    assert len(set(ks)) == 1 and len(set(ranks)) == 1
    budget = plan.budget.total_activations  # B = round(0.5 * 4 layers * top-4) = 8
    assert sum(charged_work(profile, ks, ranks)) <= budget + 1e-9
    # No other single option within the budget has a smaller summed S.
    chosen = sum(layer.sensitivity[ks[0]] if ranks[0] is None else layer.stand_in_sensitivity[ranks[0]][ks[0]]
                 for layer in profile.layers)
    searched = 0
    for k in range(1, 5):
        for rank in (None, 0, 9, 19):
            option_ranks = [None if k == 4 else rank] * len(ks)
            if sum(charged_work(profile, [k] * len(ks), option_ranks)) > budget + 1e-9:
                continue
            cost = sum(layer.sensitivity[k] if r is None else layer.stand_in_sensitivity[r][k]
                       for layer, r in zip(profile.layers, option_ranks))
            assert chosen <= cost + 1e-12
            searched += 1
    assert searched >= 3  # k = 1 with each rank, k = 2 without: more than the chosen one was in reach
