"""allocplan eval and the baselines: JSON, measured activations, calibration to the budget."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from tiny_models import build_tiny_model, tiny_tokenizer

import allocplan
from allocplan import RoutingConfig
from allocplan.evaluation.methods import build_policy, measured_total, random_allocation, uniform_allocation
from allocplan.cli import cli
from allocplan.errors import AllocplanError
from allocplan.evaluation.metrics import read_arithmetic
from allocplan.planner.windows import pack_windows


@pytest.fixture(scope="module")
def arith_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("arith") / "arith.txt"
    path.write_text("1+2=3\n10-4=6\n7+7=14\n")
    return path


def run_eval(*args):
    result = CliRunner().invoke(cli, ["eval", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_json_and_plan_activations(checkpoints, calib_file, arith_file, tmp_path):
    ckpt = checkpoints("olmoe")
    plan = tmp_path / "plan.yaml"
    compiled = CliRunner().invoke(cli, ["compile", "--model", str(ckpt), "--budget", "0.5", "-o", str(plan),
                                        "--calib", str(calib_file), "--calib-tokens", "512", "--seq-len", "64",
                                        "--no-token-level"])
    assert compiled.exit_code == 0, compiled.output
    out = run_eval("--model", ckpt, "--plan", plan, "--data", calib_file, "--arith", arith_file,
                   "--max-tokens", "512", "--seq-len", "64")
    assert {"nll", "perplexity", "arith_accuracy", "arith_problems", "activations_per_layer",
            "activations_per_token", "tokens", "data"} <= out.keys()
    assert out["arith_problems"] == 3 and 0.0 <= out["arith_accuracy"] <= 1.0
    assert out["perplexity"] == pytest.approx(math.exp(out["nll"]))
    from allocplan import load_plan

    planned = {e.path: float(e.planned_k) for e in load_plan(plan).layers}
    assert out["activations_per_layer"] == planned  # counted at the experts, equal to the plan


def test_eval_alloc_t_activations_match_budget(checkpoints, calib_file):
    out = run_eval("--model", checkpoints("qwen3_moe"), "--method", "alloc-t", "--budget", "0.375",
                   "--data", calib_file, "--max-tokens", "512", "--seq-len", "64")
    # 16 original activations * 0.375 = 6 over 4 layers: 1.5 per layer, realised per forward exactly.
    assert out["activations_per_token"] == pytest.approx(6.0, abs=1e-9)
    assert out["target_activations_per_token"] == 6
    assert all(v == pytest.approx(1.5) for v in out["activations_per_layer"].values())


def test_eval_user_errors(checkpoints, calib_file):
    result = CliRunner().invoke(cli, ["eval", "--model", str(checkpoints("olmoe")), "--data", str(calib_file)])
    assert result.exit_code == 2 and "exactly one of --plan" in result.stderr
    result = CliRunner().invoke(cli, ["eval", "--model", str(checkpoints("olmoe")), "--data", str(calib_file),
                                      "--method", "uniform"])
    assert result.exit_code == 2 and "needs --budget" in result.stderr


@pytest.mark.parametrize("method", ["naee", "top-p"])
@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_threshold_baselines_calibrate_to_budget(method, family, calib_file):
    model = build_tiny_model(family)
    windows, _ = pack_windows(tiny_tokenizer(), calib_file, max_tokens=2048, seq_len=64)
    policy = build_policy(model, method, 0.5, calib_windows=windows)
    target = 0.5 * sum(layer.mlp.gate.top_k for layer in model.model.layers if hasattr(layer.mlp, "gate"))
    assert measured_total(model, policy, windows) == pytest.approx(target, rel=0.01)
    assert 0.0 < policy.parameter < 1.0


@pytest.mark.parametrize("method", ["uniform", "random", "alloc-t", "lexi"])
def test_plan_baselines_match_budget(method, calib_file):
    model = build_tiny_model("mixtral")
    windows, _ = pack_windows(tiny_tokenizer(), calib_file, max_tokens=1024, seq_len=64)
    for ratio in (0.33, 0.5, 0.8):
        policy = build_policy(model, method, ratio)
        total = math.floor(ratio * 16 + 0.5)
        assert policy.allocation.planned_activations == pytest.approx(total)
        assert measured_total(model, policy, windows) == pytest.approx(total, rel=0.01)


def test_uniform_routes_every_token_to_its_top_k(calib_file):
    """Uniform top-k is plain per-token routing: no pooling, so decode and prefill route alike."""
    from tiny_models import PairRecorder

    model = build_tiny_model("olmoe")
    policy = build_policy(model, "uniform", 0.5)
    assert not policy.allocation.token_level.enabled
    handle = policy.apply(model)
    recorder = PairRecorder(model)
    with torch.inference_mode():
        model(input_ids=torch.randint(1, 100, (2, 16)))
    recorder.remove()
    handle.remove()
    for layer in recorder.layers:
        assert (recorder.seen[layer.path][-1] < 8).sum(-1).eq(2).all()  # every token exactly 2 experts
    assert not build_policy(model, "random", 0.5).allocation.token_level.enabled


def test_random_and_uniform_plans():
    model = build_tiny_model("olmoe")
    ks = [e.planned_k for e in random_allocation(model, 9, seed=3).layers]
    assert sum(ks) == 9 and all(1 <= k <= 4 for k in ks)
    assert [e.planned_k for e in random_allocation(model, 9, seed=3).layers] == ks  # seeded
    fractional = uniform_allocation(model, 0.375)  # 6 of 16 activations
    assert fractional.token_level.enabled and fractional.token_level.k_base == 1
    assert all(e.planned_k == 1.5 for e in fractional.layers)


def test_read_arithmetic_rejects_bad_lines(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1+2=3\nnonsense\n")
    with pytest.raises(AllocplanError, match="bad.txt:2"):
        read_arithmetic(bad)
    bad.write_text("1+2=3\n\n4+5=9=10\n")  # a second '=' would make '9=10' the answer
    with pytest.raises(AllocplanError, match="bad.txt:3: expected a line like 12"):
        read_arithmetic(bad)
    bad.write_text("12+30=42\n\n 7+8 = 15 \n")
    assert read_arithmetic(bad) == [("12+30=", "42"), (" 7+8 =", "15")]


def test_unknown_method():
    with pytest.raises(AllocplanError, match="is not one of"):
        build_policy(build_tiny_model("olmoe"), "magic", 0.5)


def test_gap_closed_by_hand():
    from allocplan.evaluation.compare import gap_closed

    # Full 3.40, uniform 3.50: a method at 3.45 closes half the gap, at 3.40 all of it.
    assert gap_closed(3.45, 3.40, 3.50) == pytest.approx(0.5)
    assert gap_closed(3.40, 3.40, 3.50) == pytest.approx(1.0)
    assert gap_closed(3.55, 3.40, 3.50) == pytest.approx(-0.5)
    assert gap_closed(3.45, 3.50, 3.50) is None  # uniform lost nothing: no gap


def test_mean_over_seeds_by_hand():
    from allocplan.evaluation.compare import mean_over_seeds

    def row(nll, windows, per_token, per_layer, arith):
        return {"modes": {"prefill": {"nll": nll, "window_nll": windows, "activations_per_token": per_token,
                                      "activations_per_layer": per_layer}}, "arith_accuracy": arith}

    runs = [row(3.0, [30.0, 60.0], 12.0, {"a": 2.0}, 0.5), row(3.2, [32.0, 64.0], 11.0, {"a": 3.0}, 0.3)]
    mean = mean_over_seeds(runs)
    prefill = mean["modes"]["prefill"]
    assert prefill["nll"] == pytest.approx(3.1) and mean["arith_accuracy"] == pytest.approx(0.4)
    assert prefill["window_nll"] == pytest.approx([31.0, 62.0])  # window by window: still paired
    assert prefill["activations_per_token"] == pytest.approx(11.5)
    assert mean["seeds"] == 2 and prefill["activations_per_layer"] == {"a": 2.0}  # the first seed's


def test_paper_methods_profile_as_the_paper_and_run_per_layer_k_only(checkpoints, calib_file, tmp_path):
    """eval --method alloc-l without --profile measures plain top-k with no treatment or compensation
    (what docs/results.md's paper rows use): the same NLL as with that profile made by hand. Given
    allocplan's default profile instead, the paper's methods still run per-layer k only."""
    ckpt = checkpoints("olmoe")
    made = CliRunner().invoke(cli, ["profile", "--model", str(ckpt), "--calib", str(calib_file), "--weight-fit", "off",
                                    "--compensation", "off", "--no-token-level", "--seq-len", "64",
                                    "-o", str(tmp_path / "plain.yaml")])
    assert made.exit_code == 0, made.output
    common = ["--model", ckpt, "--method", "alloc-l", "--budget", "0.5", "--data", calib_file, "--max-tokens", "512",
              "--seq-len", "64", "--calib", calib_file]
    assert run_eval(*common)["nll"] == run_eval(*common, "--profile", tmp_path / "plain.yaml")["nll"]

    from allocplan import ProfileConfig
    from allocplan.planner.profiling import profile_model

    model = build_tiny_model("olmoe")
    compensated = profile_model(model, tiny_tokenizer(), ProfileConfig(calib=str(calib_file), calib_tokens=512,
                                                                      seq_len=64))
    assert compensated.compensation is not None and compensated.layers[0].gain is not None
    for method in ("alloc-l", "alloc-lt"):
        allocation = build_policy(model, method, 0.5, sensitivity=compensated).allocation
        assert allocation.compensation is None and not any(entry.treated for entry in allocation.layers)


def test_eval_decode_modes_through_the_cli(checkpoints, calib_file):
    """--mode decode-b1 scores token by token: plain top-k scores as in prefill (up to float rounding),
    Alloc-T loses its pooling there (another NLL), and the pooled forward equals real decoding."""
    ckpt = checkpoints("olmoe")
    common = ["--model", ckpt, "--budget", "0.5", "--data", calib_file, "--max-tokens", "256", "--seq-len", "32"]
    uniform = {mode: run_eval(*common, "--method", "uniform", "--mode", mode) for mode in ("prefill", "decode-b1")}
    assert uniform["decode-b1"]["mode"] == "decode-b1"
    assert uniform["decode-b1"]["nll"] == pytest.approx(uniform["prefill"]["nll"], rel=1e-5)
    alloc_t = {mode: run_eval(*common, "--method", "alloc-t", "--mode", mode) for mode in ("prefill", "decode-b1")}
    exact = run_eval(*common, "--method", "alloc-t", "--mode", "decode-b1", "--exact-decode")
    assert alloc_t["decode-b1"]["nll"] != pytest.approx(alloc_t["prefill"]["nll"], rel=1e-4)
    assert exact["nll"] == pytest.approx(alloc_t["decode-b1"]["nll"], rel=1e-5)
    assert exact["activations_per_token"] == pytest.approx(8.0) == alloc_t["decode-b1"]["activations_per_token"]
    bad = CliRunner().invoke(cli, ["eval", *map(str, common), "--method", "uniform", "--mode", "decode-b2"])
    assert bad.exit_code == 2 and "decode-b2" in bad.stderr


def test_arithmetic_without_a_pad_token_generates_as_with_one():
    """A Llama-style tokenizer has no pad token (some have no eos either); the arithmetic batches are
    left-padded by hand, so each prompt's greedy answer is what it is alone, with or without a pad token.
    It was a transformers ValueError traceback."""
    from transformers import PreTrainedTokenizerFast

    from allocplan.evaluation.metrics import arithmetic_accuracy

    model = build_tiny_model("olmoe")
    with_pad = tiny_tokenizer()
    prompts = ["1+2=", "10+25=", "7+7=", "123+456="]  # different lengths: the batch is padded
    answers = []
    for prompt in prompts:  # each alone: no padding at all
        ids = torch.tensor([with_pad(prompt, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        answers.append(with_pad.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip())
    problems = list(zip(prompts, answers))
    backend = with_pad.backend_tokenizer
    no_pad = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>")
    nothing = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert no_pad.pad_token is None and nothing.pad_token is None and nothing.eos_token is None
    for tokenizer in (with_pad, no_pad, nothing):
        assert arithmetic_accuracy(model, tokenizer, problems) == 1.0


def test_eval_counts_stand_in_work_in_expert_equivalents():
    """Work charged per token = routed experts run + stand-ins run, each stand-in at its multiply-adds over one
    expert's. Tiny olmoe: H = 32, each expert a gated MLP of 3 x 32 x 64 = 6144 weights. Plain top-2 of 4 on 4
    layers runs 8 experts per token and drops 8 candidates: rank-2 linear stand-ins cost 2 x 2 x 32 + 32 = 160
    multiply-adds each (8 x 160 / 6144 = 0.2083 expert-equivalents), constant ones 32 (8 x 32 / 6144)."""
    from allocplan.evaluation.metrics import nll_and_activations
    from allocplan.planner.treatments import compensation_tables, encode_tables
    from allocplan.runtime.allocation_builder import allocation_for

    model = build_tiny_model("olmoe")
    windows = torch.randint(5, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    for kind, rank, per_pair in (("linear", 2, 160), ("expert", None, 32)):
        tables = compensation_tables(model, windows, kind, batch_size=2, rank=rank, drop_order=False)
        allocation = allocation_for(model, 2, RoutingConfig(token_level=False), compensation=encode_tables(tables, kind))
        handle = allocplan.apply_plan(model, allocation)
        try:
            result = nll_and_activations(model, windows, handle, "prefill")
        finally:
            handle.remove()
        assert result["activations_per_token"] == 8
        assert result["stand_in_work_per_token"] == pytest.approx(8 * per_pair / 6144, rel=1e-12)
        assert result["charged_work_per_token"] == pytest.approx(8 + 8 * per_pair / 6144, rel=1e-12)
    # Without stand-ins a plan is charged exactly its experts.
    plain = allocation_for(model, 2, RoutingConfig(token_level=False))
    with allocplan.apply_plan(model, plain) as handle:
        result = nll_and_activations(model, windows, handle, "prefill")
    assert result["stand_in_work_per_token"] == 0 and result["charged_work_per_token"] == 8


def test_gap_closed_interval_by_hand():
    from allocplan.evaluation.compare import gap_closed_interval

    # Every window closes half of uniform's gap: every resample does too.
    same = gap_closed_interval([2.0, 2.0], [1.0, 1.0], [3.0, 3.0], rounds=200)
    assert same["gap_closed"] == pytest.approx(0.5) and same["low"] == pytest.approx(0.5)
    assert same["high"] == pytest.approx(0.5)
    # Window 0 closes all of its gap, window 1 none: 0.5 overall. A resample of window 0 twice closes 1, of
    # window 1 twice 0, one of each 0.5, a quarter, a quarter and half of the time: the interval is [0, 1].
    split = gap_closed_interval([1.0, 3.0], [1.0, 1.0], [3.0, 3.0], rounds=2000)
    assert split["gap_closed"] == pytest.approx(0.5) and split["low"] == pytest.approx(0.0)
    assert split["high"] == pytest.approx(1.0) and split["windows"] == 2
    with pytest.raises(ValueError):
        gap_closed_interval([1.0], [1.0, 2.0], [3.0, 3.0])
