"""allocplan bench: structure of its report on a tiny model (never timing assertions)."""

from __future__ import annotations

import json

import pytest

from click.testing import CliRunner
from tiny_models import build_tiny_model

from allocplan.bench import cost_model, presets, timing
from allocplan.bench.breakdown import time_breakdown
from allocplan.bench.cost_model import ideal_speedup
from allocplan.cli import cli
from allocplan.evaluation.methods import uniform_allocation
from allocplan.formats.config import RoutingConfig
from allocplan.runtime.layers import find_moe_layers


def test_ideal_speedup_by_hand():
    # Half the activations of a model that is all routed experts halves the work: 2x. Of one
    # that is 60% routed experts, 1 / (1 - 0.3) = 1.4286x. Nothing routed: no speed-up.
    assert ideal_speedup(1.0, 0.5) == 2.0
    assert abs(ideal_speedup(0.6, 0.5) - 1.4285714285714286) < 1e-12
    assert ideal_speedup(0.0, 0.25) == 1.0
    assert ideal_speedup(0.5, 1.0) == 1.0


def test_ratio_interval_by_hand():
    # Every round 5% slower: the ratio and both ends are 1.05.
    steady = timing.ratio_interval([1.05, 2.1, 0.525], [1.0, 2.0, 0.5])
    assert all(abs(steady[key] - 1.05) < 1e-12 for key in ("geomean", "low", "high"))
    # Ratios 1 and 4: geometric mean 2. A resample of two rounds is (1, 1), (1, 4) or (4, 4), each
    # pair a quarter, half, quarter of the time, so the 2.5th and 97.5th percentiles are 1 and 4.
    spread = timing.ratio_interval([1.0, 4.0], [1.0, 1.0])
    assert abs(spread["geomean"] - 2.0) < 1e-12 and abs(spread["low"] - 1.0) < 1e-12
    assert abs(spread["high"] - 4.0) < 1e-12


def test_bench_reports_both_models_and_the_bound():
    model = build_tiny_model("olmoe")
    plan = uniform_allocation(model, 0.5, RoutingConfig())
    result = timing.bench(model, plan, prompt_len=16, new_tokens=2, repeat=1)
    assert result["budget"] == 0.5 and 0.0 < result["f_moe_time"] < 1.0
    # Each bound is the hand-checked formula applied to its own share of the work.
    assert result["ideal_speedup_time"] == ideal_speedup(result["f_moe_time"], 0.5)
    assert result["ideal_speedup"]["prefill_s"] == ideal_speedup(result["f_routed_flops"], 0.5)
    assert result["ideal_speedup"]["decode_b1_s_per_token"] == ideal_speedup(result["f_routed_weights"], 0.5)
    for name in ("prefill_s", "decode_b1_s_per_token", "decode_b8_s_per_step"):
        r = result[name]
        assert r["untouched"]["median"] > 0 and r["planned"]["median"] > 0 and r["full_lean"]["median"] > 0
        # The fraction achieved uses the smaller of the two speed-ups.
        smaller = min(r["speedup"]["median"], r["speedup_same_path"]["median"])
        assert result["achieved_fraction"][name] == smaller / result["ideal_speedup"][name]
    assert not hasattr(model, "_allocplan_handle")  # the plan is removed after timing


def test_time_breakdown_structure():
    model = build_tiny_model("deepseek_v2")
    plan = uniform_allocation(model, 0.5, RoutingConfig())
    breakdown = time_breakdown(model, plan, prompt_len=16, new_tokens=2)
    for measure in ("prefill", "decode_b1"):
        for side in ("untouched", "planned"):
            part = breakdown[measure][side]
            assert part["router"] > 0 and part["experts_matmul"] > 0 and part["experts_other"] > 0
            assert part["total"] >= part["router"] + part["experts_matmul"] + part["experts_other"]
    assert not hasattr(model, "_allocplan_handle")


def test_routed_weight_share_of_presets():
    # The presets keep the proportions they claim (computed from their configs, no timing).
    assert 0.85 <= cost_model.routed_weight_share(presets.build_preset("mixtral-small")) <= 0.9


def test_routed_flop_share_counts_the_experts():
    import torch

    model = build_tiny_model("mixtral")
    config = model.config
    before = (config._experts_implementation, config._attn_implementation)
    ids = torch.randint(0, 128, (1, 8))
    share = cost_model.routed_flop_share(model, ids)
    assert (config._experts_implementation, config._attn_implementation) == before  # put back
    # By hand: per token and layer, the routed experts do k * 3 * H * I multiply-adds.
    layers = len(model.model.layers)
    routed = 2 * 8 * layers * config.num_experts_per_tok * 3 * config.hidden_size * config.intermediate_size
    assert 0.0 < share < 1.0
    from torch.utils.flop_counter import FlopCounterMode

    model.set_experts_implementation("eager")
    model.set_attn_implementation("eager")
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(input_ids=ids, use_cache=False)
    assert abs(share - routed / counter.get_total_flops()) < 1e-9


def test_profile_and_solver_cost_structure():
    """What the two profiling modes run, counted in decoder-layer calls on a tiny qwen3_moe (L = 4 MoE layers,
    K = 4, one batch): the fair naive baseline runs the reference forward and one full forward per probe the
    reuse path needs (k < K: k = K is S = 0 by definition), 4 + 4 x 3 x 4 = 52; the reuse path runs the
    reference, then per (l, k < K) only the layers after l, 4 + 3 x (3 + 2 + 1 + 0) = 22, plus one real re-run
    of each layer to check its residual form, 26."""
    import torch

    from allocplan.planner.profiling import measure_sensitivity
    from allocplan.runtime.layers import model_family

    model = build_tiny_model("qwen3_moe")
    windows = torch.randint(0, 128, (2, 32))
    decoder = model.get_submodule(model_family(model).layers_path)
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in decoder]
    try:
        for reuse, expected in ((False, 52), (True, 26)):
            calls.clear()
            measure_sensitivity(model, windows, reuse_prefix=reuse)
            assert len(calls) == expected, (reuse, len(calls))
    finally:
        for hook in hooks:
            hook.remove()
    cost = timing.profile_cost(model, windows, repeat=2)
    assert cost["reuse_s"] > 0 and cost["naive_s"] > 0 and cost["anchored"]["seconds"] > 0
    assert [entry["ratio"] for entry in cost["anchored"]["regret"]] == [0.33, 0.5, 0.67]
    assert cost["tokens"] == 64
    floor = cost["flop_floor"]
    # Reuse skips work, so its FLOP count lies strictly between none and the naive count.
    assert 0.0 < floor["ratio"] < 1.0 and 0.0 < floor["lm_head_share"] < 1.0
    solver = timing.solver_cost(num_layers=8, k_max=4, repeat=1)
    assert solver["layers"] == 8 and solver["dp_s"] > 0 and solver["ilp_s"] > 0


def test_bench_cli_errors_and_json(tmp_path):
    result = CliRunner().invoke(cli, ["bench"])
    assert result.exit_code == 2 and "--plan PLAN" in result.stderr
    result = CliRunner().invoke(cli, ["bench", "--config", "nope"])
    assert result.exit_code == 2


def test_bench_counts_distinct_experts_per_batched_decode_step():
    model = build_tiny_model("olmoe")
    plan = uniform_allocation(model, 0.5)
    result = timing.bench(model, plan, prompt_len=8, new_tokens=2, repeat=1, decode_batch_size=4)
    distinct = result["decode_b4_distinct_experts"]
    layer = find_moe_layers(model)[0]
    top_k, experts = layer.top_k, layer.experts.num_experts  # 4 of 8
    # 4 tokens per step: at least k distinct experts (one token's own), at most min(4 k, E).
    assert top_k <= distinct["untouched"] <= min(4 * top_k, experts)
    assert top_k // 2 <= distinct["planned"] <= min(4 * (top_k // 2), experts)
    assert distinct["planned"] < distinct["untouched"]


def test_slower_than_untouched_names_every_slower_measure():
    from allocplan.bench.run import slower_than_untouched

    def measure(median):
        return {"speedup": {"median": median, "min": median, "max": median}}

    result = {"ideal_speedup": {"prefill_s": 1.5, "decode_b1_s_per_token": 1.5, "decode_b8_s_per_step": 1.5},
              "prefill_s": measure(0.91), "decode_b1_s_per_token": measure(1.0), "decode_b8_s_per_step": measure(0.8)}
    line = slower_than_untouched(result)
    assert line.startswith("allocplan: warning: the plan measures slower than the untouched model")
    assert "prefill 0.91x, decode b8 0.80x;" in line and "decode b1" not in line and "\n" not in line
    result["prefill_s"], result["decode_b8_s_per_step"] = measure(1.2), measure(1.0)
    assert slower_than_untouched(result) is None  # as fast as untouched is not slower


def test_bench_plan_warns_when_slower(checkpoints, calib_file, tmp_path, monkeypatch):
    """bench --plan warns (one line, which the CLI prints on stderr) when the plan is slower (here made so by
    hand at decode b1), and names that measure."""
    import allocplan
    from allocplan.bench import run as run_module

    model_dir = str(checkpoints("olmoe"))
    plan = allocplan.compile_plan(model_dir, 0.5, profile=allocplan.ProfileConfig(
        calib=str(calib_file), calib_tokens=128, seq_len=64, compensation="off", weight_fit="off"))
    allocplan.save_plan(plan, tmp_path / "plan.yaml")
    real_bench = run_module.bench

    def slowed(*args, **kwargs):
        result = real_bench(*args, **kwargs)
        result["decode_b1_s_per_token"]["speedup"]["median"] = 0.5
        return result

    monkeypatch.setattr(run_module, "bench", slowed)
    with pytest.warns(UserWarning, match="slower than the untouched model") as caught:
        result = allocplan.run_bench(allocplan.BenchConfig(plan=str(tmp_path / "plan.yaml"), prompt_len=8,
                                                           new_tokens=2, repeat=1))
    slower = [str(w.message) for w in caught if "slower than" in str(w.message)]
    assert len(slower) == 1 and "decode b1 0.50x" in slower[0] and "\n" not in slower[0]
    assert result["work_per_token"]["stand_ins"] == 0  # no stand-ins: charged work is the experts'
    assert result["work_per_token"]["charged"] == result["work_per_token"]["experts"]
