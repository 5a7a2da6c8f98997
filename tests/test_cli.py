"""CLI end to end: CliRunner for each verb and each bad input, plus real subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from allocplan.cli import cli
from allocplan import load_plan

SMALL = ["--calib-tokens", "512", "--seq-len", "64"]


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> None:
    """Exit 2, one line on stderr, naming the problem; no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("allocplan: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def olmoe(checkpoints, calib_file, tmp_path_factory):
    """A compiled olmoe plan and its profile."""
    out = tmp_path_factory.mktemp("cli")
    ckpt = checkpoints("olmoe")
    result = run("compile", "--model", ckpt, "--budget", "0.5", "-o", out / "plan.yaml",
                 "--profile-out", out / "profile.yaml", "--calib", calib_file, *SMALL)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "model.layers.0.mlp" in result.output
    return ckpt, out / "plan.yaml", out / "profile.yaml"


def test_solve_from_profile_reproduces_compile(olmoe, calib_file, tmp_path):
    # solve has no model to refine with: it reproduces compile --no-refine byte for byte.
    ckpt, _, profile = olmoe
    result = run("compile", "--model", ckpt, "--budget", "0.5", "-o", tmp_path / "compiled.yaml", "--no-refine",
                 "--calib", calib_file, *SMALL)
    assert result.exit_code == 0, result.output
    result = run("solve", profile, "--budget", "0.5", "-o", tmp_path / "solved.yaml")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "solved.yaml").read_bytes() == (tmp_path / "compiled.yaml").read_bytes()


def test_solve_budget_activations(olmoe, tmp_path):
    _, _, profile = olmoe
    result = run("solve", profile, "--budget-activations", "5", "-o", tmp_path / "p.yaml")
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "p.yaml")
    assert plan.budget.ratio is None and plan.budget.total_activations == 5
    assert plan.budget.planned_activations <= 5


def test_compile_half_expert_grid(checkpoints, calib_file, tmp_path):
    result = run("compile", "--model", checkpoints("qwen3_moe"), "--budget", "0.45", "--k-step", "0.5",
                 "--calib", calib_file, *SMALL, "-o", tmp_path / "plan.yaml", "--profile-out", tmp_path / "p.yaml")
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "plan.yaml")
    assert plan.token_level.enabled and plan.budget.planned_activations <= 7
    assert all(float(e.planned_k * 2).is_integer() for e in plan.layers)
    assert_user_error(run("solve", tmp_path / "p.yaml", "--budget", "0.5", "--no-token-level", "-o",
                          tmp_path / "x.yaml"), "half-expert grid")


def test_validate(olmoe, checkpoints):
    ckpt, plan, _ = olmoe
    result = run("validate", plan, "--model", ckpt)
    assert result.exit_code == 0 and "matches" in result.output
    assert_user_error(run("validate", plan, "--model", checkpoints("mixtral")), "fingerprint", "compile a plan")


def test_apply_with_prompt(olmoe):
    _, plan, _ = olmoe
    result = run("apply", plan, "--prompt", "The if statement", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "applied" in result.output and "generated: The if statement" in result.output


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--budget", "1.5"], ["--budget", "0<x<=1"]),
        (["--budget", "0"], ["--budget"]),
        (["--budget-activations", "1"], ["smallest feasible budget of 4", "--budget-activations 4"]),
        (["--budget-activations", "99"], ["exceeds", "at most --budget-activations 16"]),
        (["--budget", "0.5", "--budget-activations", "8"], ["exactly one of"]),
        ([], ["exactly one of"]),
    ],
)
def test_bad_budgets(olmoe, tmp_path, args, fragments):
    _, _, profile = olmoe
    out = tmp_path / "plan.yaml"
    assert_user_error(run("solve", profile, *args, "-o", out), *fragments)
    assert not out.exists()


def test_compile_bad_inputs(checkpoints, calib_file, tmp_path):
    out = tmp_path / "plan.yaml"
    ckpt = checkpoints("olmoe")
    cases = [
        (["--model", tmp_path / "nope", "--budget", "0.5"], ["does not exist"]),
        (["--model", "bundled:nope", "--budget", "0.5"], ["no bundled model 'nope'"]),
        (["--model", ckpt, "--budget", "0.5", "--calib", tmp_path / "missing.txt"], ["missing.txt"]),
        (["--model", ckpt, "--budget", "0.2", "--k-min", "2", "--calib", calib_file], ["smallest feasible"]),
        (["--model", ckpt, "--budget", "0.5", "--k-min", "5", "--calib", calib_file], ["--k-min 5 is above"]),
        (["--model", ckpt, "--budget", "0.5", "--calib", calib_file, "--seq-len", "100000"],
         ["smaller than --seq-len"]),
        (["--model", ckpt, "--budget", "0.5", "--calib", calib_file, "--seq-len", "50000", "--calib-tokens", "99999"],
         ["fewer than one --seq-len window"]),
    ]
    for args, fragments in cases:
        assert_user_error(run("compile", *SMALL[:2], *args, "-o", out), *fragments)
        assert not out.exists()


def test_compile_unwritable_output_leaves_nothing(checkpoints, calib_file, tmp_path):
    out = tmp_path / "no-such-dir" / "plan.yaml"
    result = run("compile", "--model", checkpoints("olmoe"), "--budget", "0.5", "--calib", calib_file, *SMALL,
                 "-o", out)
    assert_user_error(result, "directory")
    assert not out.parent.exists()


def test_unknown_family(tmp_path, calib_file):
    from tiny_models import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    result = run("compile", "--model", tmp_path / "llama", "--budget", "0.5", "--calib", calib_file, *SMALL,
                 "-o", tmp_path / "plan.yaml")
    assert_user_error(result, "'llama' is not a supported MoE family", "mixtral", "olmoe")


def test_bad_plan_files(olmoe, tmp_path):
    _, plan, _ = olmoe
    text = plan.read_text()
    cases = {
        "version.yaml": (text.replace("schema_version: 3", "schema_version: 7"), "schema_version 7"),
        "unknown.yaml": (text + "notes: hi\n", "unknown key(s) notes"),
        "type.yaml": (text.replace("k_base: 1", "k_base: one"), "expected an integer"),
        "yaml.yaml": ("layers: [\n", "not valid YAML"),
        "profile.yaml": (text.replace("kind: allocplan-plan", "kind: allocplan-profile"), "is this an allocplan plan"),
    }
    for name, (content, fragment) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        assert_user_error(run("validate", path), fragment)
        assert_user_error(run("apply", path), fragment)
    assert_user_error(run("validate", tmp_path / "absent.yaml"), "does not exist")


def test_help_and_version():
    assert run("--help").exit_code == 0
    result = run("--version")
    assert result.exit_code == 0 and "allocplan" in result.output


def _console_script() -> list[str]:
    script = shutil.which("allocplan", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "allocplan.cli"]


def test_subprocess_compile_is_byte_identical(checkpoints, calib_file, tmp_path):
    ckpt = checkpoints("deepseek_v2")
    outputs = []
    for seed, name in (("1", "a.yaml"), ("2", "b.yaml")):
        proc = subprocess.run(
            [*_console_script(), "compile", "--model", str(ckpt), "--budget", "0.5", "--calib", str(calib_file),
             *SMALL, "-o", str(tmp_path / name)],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed}, cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]


def test_subprocess_user_error(tmp_path):
    proc = subprocess.run(
        [*_console_script(), "solve", str(tmp_path / "missing.yaml"), "--budget", "0.5", "-o",
         str(tmp_path / "p.yaml")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("allocplan: error: ")
    assert "Traceback" not in proc.stderr and not (tmp_path / "p.yaml").exists()


def test_solve_never_imports_torch(olmoe, tmp_path):
    # sys.modules["torch"] = None makes any torch import fail: solve and validate must not need it.
    _, _, profile = olmoe
    code = (
        "import sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:];"
        "from allocplan.cli import main; main()"
    )
    for args in (["solve", str(profile), "--budget", "0.5", "-o", str(tmp_path / "p.yaml")],
                 ["validate", str(tmp_path / "p.yaml")]):
        proc = subprocess.run([sys.executable, "-c", code, "allocplan", *args], capture_output=True, text=True,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr


def test_compensation_share_sets_the_stand_in_rank(olmoe, calib_file, tmp_path):
    """Tiny olmoe: an expert has 3 * 32 * 64 = 6144 multiply-adds and a rank-r stand-in 2 * r * 32, so a
    share s gives the largest r with 64 r <= 6144 s: r = 9 at the default 0.1 (640 > 614.4 for r = 10),
    19 at twice it, 24 at 0.25 and 48 at 0.5, which the hidden size caps at 32. The profile offers the
    constant (rank 0) and both."""
    from allocplan import load_profile

    def ranks(profile_path: Path) -> set[int]:
        return {rank for layer in load_profile(profile_path).layers for rank in layer.stand_in_sensitivity}

    ckpt, _, default_profile = olmoe
    assert ranks(default_profile) == {0, 9, 19}
    out = tmp_path / "wide"
    out.mkdir()
    result = run("profile", "--model", ckpt, "-o", out / "profile.yaml", "--calib", calib_file, *SMALL,
                 "--compensation-share", "0.25")
    assert result.exit_code == 0, result.output
    assert ranks(out / "profile.yaml") == {0, 24, 32}
    assert_user_error(run("profile", "--model", ckpt, "-o", tmp_path / "p.yaml", "--calib", calib_file,
                          "--compensation-share", "1.5"), "--compensation-share")
    assert not (tmp_path / "p.yaml").exists()


def test_calibration_from_standard_input_is_read_once_for_profiling_and_refinement(checkpoints, calib_file, tmp_path):
    """compile --calib - reads standard input once, though refinement reads the calibration text again after
    profiling (the second read found the stream empty): the plan equals the one from the same text as a file,
    but for the text's name. eval refuses --data - with --calib -: a method would calibrate on the eval text."""
    ckpt = checkpoints("olmoe")
    text = calib_file.read_text(encoding="utf-8")
    args = ["compile", "--model", str(ckpt), "--budget", "0.5", *SMALL, "--refine", "--refine-tokens", "128", "-q"]
    piped = subprocess.run([*_console_script(), *args, "--calib", "-", "-o", str(tmp_path / "piped.yaml")],
                           input=text, capture_output=True, text=True, timeout=600)
    assert piped.returncode == 0, piped.stderr
    subprocess.run([*_console_script(), *args, "--calib", str(calib_file), "-o", str(tmp_path / "file.yaml")],
                   check=True, capture_output=True, timeout=600)
    from_pipe, from_file = (load_plan(tmp_path / name) for name in ("piped.yaml", "file.yaml"))
    assert from_pipe.solver.refinement is not None and from_pipe.solver == from_file.solver
    assert from_pipe.allocation == from_file.allocation
    assert from_pipe.provenance.calibration.sha256 == from_file.provenance.calibration.sha256
    refused = subprocess.run([*_console_script(), "eval", "--model", str(ckpt), "--method", "naee", "--budget", "0.5",
                              "--data", "-", "--calib", "-"], input=text, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "both standard input" in refused.stderr
