"""allocplan bench: structure of its report on a tiny model (never timing assertions)."""

from __future__ import annotations

import json

from click.testing import CliRunner
from tiny_models import build_tiny_model

from allocplan import benchmark
from allocplan.cli import cli


def test_bench_reports_both_models_and_the_bound():
    model = build_tiny_model("olmoe")
    plan = benchmark.uniform_budget_plan(model, 0.5, token_level=True)
    result = benchmark.bench(model, plan, prompt_len=16, new_tokens=2, repeat=1)
    assert result["budget"] == 0.5 and 0.0 < result["f_moe_time"] < 1.0
    assert result["ideal_speedup"] == 1 / (1 - result["f_moe_time"] * 0.5)
    for name in ("prefill_s", "decode_b1_s_per_token", "decode_b8_s_per_step"):
        assert result[name]["untouched"]["median"] > 0 and result[name]["planned"]["median"] > 0
    assert not hasattr(model, "_allocplan_handle")  # the plan is removed after timing


def test_routed_weight_share_of_presets():
    # The presets keep the proportions they claim (computed from their configs, no timing).
    assert 0.85 <= benchmark.routed_weight_share(benchmark.build_preset("mixtral-small")) <= 0.9


def test_profile_and_solver_cost_structure():
    import torch

    model = build_tiny_model("qwen3_moe")
    windows = torch.randint(0, 128, (2, 32))
    cost = benchmark.profile_cost(model, windows)
    assert cost["reuse_s"] > 0 and cost["naive_s"] > 0 and cost["ratio"] == cost["reuse_s"] / cost["naive_s"]
    solver = benchmark.solver_cost(num_layers=8, k_max=4, repeat=1)
    assert solver["layers"] == 8 and solver["dp_s"] > 0 and solver["ilp_s"] > 0


def test_bench_cli_errors_and_json(tmp_path):
    result = CliRunner().invoke(cli, ["bench"])
    assert result.exit_code == 2 and "--plan PLAN" in result.stderr
    result = CliRunner().invoke(cli, ["bench", "--config", "nope"])
    assert result.exit_code == 2
