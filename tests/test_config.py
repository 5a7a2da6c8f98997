"""Configs and recipes: defaults written once, validated from their metadata, round-tripped as YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from allocplan import (
    BenchConfig,
    BudgetRequest,
    EvalConfig,
    LoadConfig,
    ProfileConfig,
    Recipe,
    RefineConfig,
    RoutingConfig,
    load_recipe,
    save_recipe,
)
from allocplan.cli import cli
from allocplan.errors import AllocplanError
from allocplan.formats.config import recipe_from_data

# The recipe `allocplan recipe --budget 0.5` writes: every default, typed out by hand.
DEFAULT_RECIPE = """\
kind: allocplan-recipe
schema_version: 1
budget:
  ratio: 0.5
  activations: null
profile:
  calib: null
  calib_dataset: null
  text_field: text
  calib_tokens: 16384
  seq_len: 256
  strategy: isolated
  metric: kl
  k_min: 1
  k_step: 1.0
  batch_size: 8
  weight_fit: auto
  compensation: auto
  compensation_rank: null
  compensation_share: 0.1
  stand_in_choice: true
  drop_order: true
routing:
  token_level: true
  k_base: 1
  k_max: null
  renormalize: model
  reference_k: null
  scope: batch
  prefer: score
refine:
  refine: false
  refine_steps: 8
  refine_tokens: 4096
eval:
  data: null
  plan: null
  method: null
  budget: null
  arith: null
  calib: null
  profile_file: null
  seed: null
  seq_len: 256
  max_tokens: 16384
  mode: prefill
  exact_decode: false
bench:
  plan: null
  model: null
  preset: null
  budget: null
  token_level: null
  compensation: null
  batch: 1
  prompt_len: 256
  new_tokens: 32
  repeat: 5
  decode_batch: 8
  profile_cost: false
  solver_cost: false
  breakdown: false
  threads: null
  device: cpu
  dtype: float32
"""


def test_recipe_command_writes_every_default():
    result = CliRunner().invoke(cli, ["recipe", "--budget", "0.5"])
    assert result.exit_code == 0, result.output
    assert result.stdout == DEFAULT_RECIPE


def test_cli_option_defaults_are_the_configs():
    help_text = " ".join(CliRunner().invoke(cli, ["compile", "--help"]).stdout.split())
    assert "Tokens of calibration text to score. [default: 16384; x>=2]" in help_text
    assert "--metric [kl|nll]" in help_text and "[default: kl]" in help_text
    assert "--token-level / --no-token-level" in help_text


def test_recipe_round_trip(tmp_path):
    recipe = Recipe(budget=BudgetRequest(activations=9), profile=ProfileConfig(metric="nll", k_step=0.5, seq_len=64,
                                                                               calib_tokens=512),
                    routing=RoutingConfig(token_level=True, k_base=0, renormalize="decoupled", reference_k=3))
    save_recipe(recipe, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == recipe
    save_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_bytes() == (tmp_path / "r.yaml").read_bytes()


def test_partial_recipe_takes_defaults():
    recipe = recipe_from_data({"kind": "allocplan-recipe", "schema_version": 1, "routing": {"k_base": 2}})
    assert recipe.budget is None and recipe.profile == ProfileConfig()
    assert recipe.routing == RoutingConfig(k_base=2) and recipe.routing.token_level is True


@pytest.mark.parametrize("data, message", [
    ({"kind": "allocplan-recipe", "schema_version": 1, "profile": {"metrc": "kl"}}, "unknown key(s) metrc"),
    ({"kind": "allocplan-recipe", "schema_version": 1, "profile": {"seq_len": "long"}}, "expected an integer"),
    ({"kind": "allocplan-recipe", "schema_version": 1, "profile": {"metric": "ppl"}}, "choose one of kl, nll"),
    ({"kind": "allocplan-recipe", "schema_version": 2}, "schema_version 2 is not supported"),
    ({"kind": "allocplan-plan", "schema_version": 1}, "is this a recipe"),
    ({"kind": "allocplan-recipe", "schema_version": 1, "budget": {"ratio": 0.5, "activations": 3}}, "exactly one"),
])
def test_recipe_rejects(data, message):
    with pytest.raises(AllocplanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe_from_data(data)


def test_recipe_setting_errors_name_the_file(tmp_path):
    """A setting's own check speaks in flags; from a recipe file the one line names the file first."""
    path = tmp_path / "r.yaml"
    path.write_text("kind: allocplan-recipe\nschema_version: 1\nprofile:\n  compensation: expert\n"
                    "  compensation_rank: 4\n")
    with pytest.raises(AllocplanError, match=f"^recipe '{path}': --compensation-rank shapes linear stand-ins"):
        load_recipe(path)


@pytest.mark.parametrize("build, message", [
    (lambda: ProfileConfig(metric="banana"), "metric (--metric) is 'banana'; choose one of kl, nll"),
    (lambda: ProfileConfig(k_min=0), "k_min (--k-min) must be at least 1, got 0"),
    (lambda: ProfileConfig(k_step=0.25), "choose one of 1.0, 0.5"),
    (lambda: ProfileConfig(calib_tokens=100, seq_len=256), "--calib-tokens 100 is smaller than --seq-len 256"),
    (lambda: RoutingConfig(k_base=-1), "k_base (--k-base) must be at least 0"),
    (lambda: RoutingConfig(k_base=3, k_max=2), "--k-max 2 is below --k-base 3"),
    (lambda: RoutingConfig(reference_k=2), "--reference-k is only used with --renormalize decoupled"),
    (lambda: RoutingConfig(renormalize="softmax"), "choose one of model, none, renorm, decoupled"),
    (lambda: LoadConfig(dtype="float64"), "choose one of float32, bfloat16, float16"),
    (lambda: ProfileConfig(compensation="magic"), "choose one of auto, expert, layer, linear, off"),
    (lambda: ProfileConfig(compensation_rank=0), "compensation_rank (--compensation-rank) must be at least 1"),
    (lambda: ProfileConfig(compensation_share=0.0), "compensation_share (--compensation-share) must be at least 0.01"),
    (lambda: ProfileConfig(compensation_share=1.5), "compensation_share (--compensation-share) must be at most 1.0"),
    (lambda: RoutingConfig(scope="request"), "choose one of batch, sequence"),
    (lambda: RefineConfig(refine_steps=0), "refine_steps (--refine-steps) must be at least 1"),
    # Settings nothing would read.
    (lambda: RoutingConfig(token_level=False, k_base=2), "--k-base 2 applies to token-level allocation (Alloc-T)"),
    (lambda: RoutingConfig(token_level=False, scope="sequence"), "--scope sequence applies to token-level"),
    (lambda: RoutingConfig(token_level=False, prefer="active"), "--prefer active applies to token-level"),
    (lambda: ProfileConfig(compensation="expert", compensation_rank=4),
     "--compensation-rank shapes linear stand-ins, which --compensation expert does not fit"),
    (lambda: ProfileConfig(compensation="off", compensation_share=0.2),
     "--compensation-share shapes linear stand-ins, which --compensation off does not fit"),
    (lambda: ProfileConfig(compensation_rank=4, compensation_share=0.2),
     "--compensation-share chooses the rank that --compensation-rank gives; give one"),
    (lambda: ProfileConfig(compensation="off", drop_order=False), "--no-drop-order changes the order of stand-ins"),
    (lambda: ProfileConfig(text_field="body"), "--text-field body names the field of a .jsonl --calib"),
    (lambda: ProfileConfig(calib="notes.txt", text_field="body"), "plain calibration text has none"),
    (lambda: EvalConfig(exact_decode=True), "--exact-decode applies to the decode modes only"),
    (lambda: EvalConfig(mode="decode-b4"), "mode (--mode) is 'decode-b4'; choose one of prefill, decode-b1, decode-b8"),
    (lambda: EvalConfig(budget=0.0), "budget (--budget) must be above 0.0, got 0.0"),
    (lambda: EvalConfig(seq_len=1), "seq_len (--seq-len) must be at least 2, got 1"),
    (lambda: BenchConfig(budget=1.5), "budget (--budget) must be at most 1.0, got 1.5"),
    (lambda: BenchConfig(dtype="auto"), "dtype (--dtype) is 'auto'; choose one of float32, bfloat16, float16"),
    (lambda: BenchConfig(decode_batch=1), "decode_batch (--decode-batch) must be at least 2"),
    (lambda: BenchConfig(device="cuda 0"), "must be one word"),
])
def test_config_validation(build, message):
    with pytest.raises(AllocplanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_routing_config_gives_the_plan_records():
    routing = RoutingConfig(token_level=True, k_base=2, k_max=3, renormalize="decoupled", reference_k=4)
    assert (routing.token_level_record().enabled, routing.token_level_record().k_base,
            routing.token_level_record().k_max) == (True, 2, 3)
    assert (routing.weights_record().renormalize, routing.weights_record().reference_k) == ("decoupled", 4)


def test_compile_with_recipe_and_override(checkpoints, calib_file, tmp_path):
    recipe = Recipe(budget=BudgetRequest(ratio=0.5),
                    profile=ProfileConfig(metric="nll", calib_tokens=512, seq_len=64, calib=str(calib_file)),
                    routing=RoutingConfig(token_level=False))
    recipe = Recipe(budget=recipe.budget, profile=recipe.profile, routing=recipe.routing,
                    refine=RefineConfig(refine=False))
    save_recipe(recipe, tmp_path / "recipe.yaml")
    ckpt = str(checkpoints("olmoe"))
    run = CliRunner().invoke
    assert run(cli, ["compile", "--model", ckpt, "--recipe", str(tmp_path / "recipe.yaml"),
                     "-o", str(tmp_path / "a.yaml")]).exit_code == 0
    result = run(cli, ["compile", "--model", ckpt, "--recipe", str(tmp_path / "recipe.yaml"), "--metric", "kl",
                       "--budget", "0.75", "-o", str(tmp_path / "b.yaml")])
    assert result.exit_code == 0, result.output
    from allocplan import load_plan

    a, b = load_plan(tmp_path / "a.yaml"), load_plan(tmp_path / "b.yaml")
    assert (a.solver.metric, a.token_level.enabled, a.budget.ratio) == ("nll", False, 0.5)  # the recipe's
    assert (b.solver.metric, b.token_level.enabled, b.budget.ratio) == ("kl", False, 0.75)  # flags win
    assert a.provenance.calibration.tokens == 512 and a.provenance.calibration.seq_len == 64


def test_eval_and_bench_take_their_recipe_sections(checkpoints, calib_file, tmp_path):
    # A recipe's eval and bench sections are what those commands run; flags given override them.
    ckpt = str(checkpoints("olmoe"))
    recipe = Recipe(eval=EvalConfig(data=str(calib_file), method="uniform", budget=0.5, seq_len=32, max_tokens=64),
                    bench=BenchConfig(plan=None, preset="nope-not-a-preset"))
    save_recipe(recipe, tmp_path / "recipe.yaml")
    assert load_recipe(tmp_path / "recipe.yaml") == recipe
    run = CliRunner().invoke
    result = run(cli, ["eval", "--model", ckpt, "--recipe", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    import json

    first = json.loads(result.stdout)
    assert (first["policy"], first["budget_ratio"], first["tokens"]) == ("uniform", 0.5, 62)  # 2 windows of 31
    result = run(cli, ["eval", "--model", ckpt, "--recipe", str(tmp_path / "recipe.yaml"), "--budget", "0.75"])
    assert result.exit_code == 0 and json.loads(result.stdout)["budget_ratio"] == 0.75
    # The bench section's preset is checked against the registry when the run starts, before anything loads.
    result = run(cli, ["bench", "--recipe", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 2 and "no preset 'nope-not-a-preset'; presets: dsv2-lite-small" in result.stderr


def test_entry_points_take_configs():
    # Settings travel as configs: the verbs take a handful of parameters, and the CLI stays a thin layer.
    import inspect

    from allocplan import compile_plan, run_bench, run_eval

    assert len(inspect.signature(run_eval).parameters) <= 3
    assert len(inspect.signature(run_bench).parameters) <= 3
    assert len(inspect.signature(compile_plan).parameters) <= 8
    import allocplan.cli

    assert len(Path(allocplan.cli.__file__).read_text(encoding="utf-8").splitlines()) <= 350


def test_docs_cli_names_every_command_and_option():
    """docs/cli.md is written by hand; this keeps it from falling behind the commands."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = []
    for name, command in cli.commands.items():
        if f"`{name}" not in text:
            missing.append(name)
        for param in command.params:
            for flag in [*param.opts, *param.secondary_opts]:
                if flag.startswith("--") and flag not in ("--help",) and flag not in text:
                    missing.append(f"{name} {flag}")
    assert not missing, missing


def test_docs_state_the_defaults_and_constants_they_name():
    """Values docs/cli.md and docs/runtime.md write by hand: each on/off flag row's default (the option
    tables of compile, solve and recipe) is the option's, the stand-ins' share is ProfileConfig's, and
    the drop order's power is planner.treatments.DROP_ORDER_POWER."""
    import re
    from pathlib import Path

    from allocplan.planner.treatments import DROP_ORDER_POWER

    docs = Path(__file__).resolve().parent.parent / "docs"
    rows = dict(re.findall(r"^\| `(--[a-z-]+)/--no-[a-z-]+` \| (on|off) \|", (docs / "cli.md").read_text(encoding="utf-8"),
                           re.MULTILINE))
    assert {"--drop-order", "--token-level", "--refine"} <= set(rows)
    stated = {}
    for name in ("compile", "solve", "recipe"):
        for param in cli.commands[name].params:
            flag = next((opt for opt in param.opts if opt in rows), None)
            if flag is not None and param.secondary_opts:
                stated.setdefault(flag, set()).add(param.default)
    assert stated.keys() == rows.keys()
    for flag, defaults in stated.items():
        assert defaults == {rows[flag] == "on"}, (flag, defaults, rows[flag])
    share = re.search(r"^\| `--compensation-share S` \| ([0-9.]+) \|", (docs / "cli.md").read_text(encoding="utf-8"),
                      re.MULTILINE)
    assert share is not None and float(share.group(1)) == ProfileConfig().compensation_share
    runtime = (docs / "runtime.md").read_text(encoding="utf-8")
    assert f"(m_e / mean m) ** {DROP_ORDER_POWER}," in runtime


def test_k_min_checks_name_the_flag_and_a_broken_config():
    from allocplan.planner.profiling import check_k_min

    check_k_min(2, [2, 4])  # down to 2 in every layer: fine
    with pytest.raises(AllocplanError, match="--k-min 3 is above the smallest original top-k 2; give at most 2"):
        check_k_min(3, [2, 4])
    with pytest.raises(AllocplanError, match="route each token to as few as 0 experts"):
        check_k_min(1, [4, 0])
