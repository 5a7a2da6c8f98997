"""Review tooling through the real console script: diff, report, --json, and -q/-v after the verb."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
from bad_inputs import console_script
from test_plan_format import make_profile

from allocplan import save_plan, save_profile
from allocplan.formats.plan import load_plan, plan_from_data
from allocplan.formats.records import to_data
from allocplan.planner.solve import solve_profile


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*console_script(), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def plans(tmp_path):
    """A profile, its plan at 0.5, the same plan with a record number moved in its 9th digit, and a
    plan at another budget."""
    save_profile(make_profile(), tmp_path / "profile.yaml")
    plan = solve_profile(make_profile(), 0.5)
    save_plan(plan, tmp_path / "a.yaml")
    data = copy.deepcopy(to_data(plan))
    data["solver"]["dp_objective"] *= 1 + 1e-9
    data["solver"]["ilp_objective"] = data["solver"]["dp_objective"]
    data["provenance"]["allocplan_version"] = "9.9.9"
    save_plan(plan_from_data(data), tmp_path / "a-rerun.yaml")
    save_plan(solve_profile(make_profile(), 0.75), tmp_path / "b.yaml")
    return tmp_path


def edited(plans, name, edit):
    data = copy.deepcopy(to_data(load_plan(plans / "a.yaml")))
    edit(data)
    save_plan(plan_from_data(data), plans / name)
    return str(plans / name)


def test_diff_exit_codes(plans):
    a, rerun, b = (str(plans / n) for n in ("a.yaml", "a-rerun.yaml", "b.yaml"))
    same = run("diff", a, a)
    assert (same.returncode, same.stdout.strip().splitlines()[-1]) == (0, f"{a} and {a} are the same plan")
    record_only = run("diff", a, rerun)
    assert record_only.returncode == 0, record_only.stdout
    assert "provenance.allocplan_version: '0.1.0' -> '9.9.9'" in record_only.stdout
    assert record_only.stdout.splitlines()[0] == "record (1):" and "equivalent (record differences only)" in record_only.stdout
    different = run("diff", a, b)
    assert different.returncode == 1, different.stdout
    # make_profile's rows at 0.5 (6 of 12): k = (2, 1, 3); at 0.75 (9 of 12): (4, 2, 3), by the gains per
    # added expert (L2 1.3, 0.7; L0 0.5, 0.3, 0.1; L1 0.03).
    k_lines = [line for line in different.stdout.splitlines() if "planned_k" in line]
    assert len(k_lines) == 2 and "2 -> 4" in k_lines[0] and "1 -> 2" in k_lines[1], different.stdout
    bad = run("diff", a, str(plans / "profile.yaml"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "is this an allocplan plan" in bad.stderr


def test_diff_tolerance(plans):
    a = str(plans / "a.yaml")
    nudged = edited(plans, "nudged.yaml", lambda d: d["layers"][0].update(gain=1.0 + 1e-8))
    assert run("diff", a, nudged).returncode == 0  # within the default rtol 1e-6
    strict = run("diff", a, nudged, "--rtol", "0", "--atol", "0")
    assert strict.returncode == 1 and "gain" in strict.stdout
    moved = edited(plans, "moved.yaml", lambda d: d["layers"][0].update(gain=1.001))
    assert run("diff", a, moved).returncode == 1
    assert run("diff", a, moved, "--rtol", "0.01").returncode == 0


def test_diff_json(plans):
    done = run("diff", str(plans / "a.yaml"), str(plans / "b.yaml"), "--json")
    assert done.returncode == 1
    data = json.loads(done.stdout)
    assert data["equivalent"] is False
    kinds = {d["field"]: d["kind"] for d in data["differences"]}
    assert any(field.endswith("planned_k") and kind == "behaviour" for field, kind in kinds.items())
    assert kinds.get("budget.ratio") == "budget"


def test_report_writes_markdown_and_valid_pngs(plans):
    pytest.importorskip("matplotlib")
    from matplotlib import image

    out = plans / "report"
    done = run("report", str(plans / "a.yaml"), "--profile", str(plans / "profile.yaml"), "-o", str(out))
    assert done.returncode == 0, done.stderr
    text = (out / "report.md").read_text(encoding="utf-8")
    plan = load_plan(plans / "a.yaml")
    for layer in plan.layers:  # the per-layer table holds every layer's k
        assert f"| {layer.index} |" in text
    for name in ("k.png", "sensitivity.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = image.imread(out / name)
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100 and pixels.std() > 0  # a picture, not a blank
        assert f"]({name})" in text


def test_report_without_matplotlib_is_one_line(plans):
    code = ("import sys; sys.modules['matplotlib'] = None; sys.argv = ['allocplan'] + sys.argv[1:];"
            " from allocplan.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code, "report", str(plans / "a.yaml"), "-o", str(plans / "r")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "pip install 'allocplan[report]'" in done.stderr and "--no-pictures" in done.stderr
    assert not (plans / "r" / "report.md").exists()
    markdown_only = subprocess.run([sys.executable, "-c", code, "report", str(plans / "a.yaml"), "-o",
                                    str(plans / "r"), "--no-pictures"], capture_output=True, text=True)
    assert markdown_only.returncode == 0 and (plans / "r" / "report.md").is_file()


def test_json_on_solve_and_validate(plans):
    out = plans / "c.yaml"
    solved = run("solve", str(plans / "profile.yaml"), "--budget", "0.5", "-o", str(out), "--json")
    assert solved.returncode == 0, solved.stderr
    data = json.loads(solved.stdout)
    assert data["wrote"] == str(out) and data["plan"] == to_data(load_plan(out))
    assert [layer["planned_k"] for layer in data["plan"]["layers"]] == [2, 1, 3]  # by hand: see test_diff_exit_codes
    valid = run("validate", str(out), "--json")
    assert valid.returncode == 0 and json.loads(valid.stdout)["valid"] is True
    # An invalid plan: the verdict on stdout for CI to read, the same error as one line on stderr, exit 2.
    broken = plans / "broken.yaml"
    broken.write_text(out.read_text().replace("planned_k: 2", "planned_k: 3", 1))
    invalid = run("validate", str(broken), "--json")
    verdict = json.loads(invalid.stdout)
    assert invalid.returncode == 2 and verdict["valid"] is False and verdict["plan"] == str(broken)
    assert invalid.stderr == f"allocplan: error: {verdict['error']}\n" and "planned_activations" in verdict["error"]
    refused = run("solve", str(plans / "profile.yaml"), "--budget", "0.5", "-o", "-", "--json")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1


@pytest.mark.parametrize("flag", ["-q", "-v", "--quiet", "--verbose"])
def test_verbosity_after_the_verb(plans, flag):
    before = run(flag, "solve", str(plans / "profile.yaml"), "--budget", "0.5", "-o", str(plans / "x.yaml"))
    after = run("solve", str(plans / "profile.yaml"), "--budget", "0.5", "-o", str(plans / "y.yaml"), flag)
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert (plans / "x.yaml").read_bytes() == (plans / "y.yaml").read_bytes()


@pytest.mark.parametrize("committed, status", [("a.yaml", 0), ("b.yaml", 1)])
def test_ci_recipe_script(plans, committed, status):
    """scripts/ci_plan_check.sh re-solves the committed profile, diffs against the committed plan (exit 0
    equivalent, 1 different), and leaves plan, profile and report as artifacts plus a job summary."""
    import os
    import shutil
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "ci_plan_check.sh"
    command = shutil.which("allocplan", path=str(Path(sys.executable).parent))
    out, summary = plans / "artifacts", plans / "summary.md"
    env = {**os.environ, "PLAN": str(plans / committed), "PROFILE": str(plans / "profile.yaml"), "MODEL": "",
           "BUDGET": "0.5", "OUT": str(out), "ALLOCPLAN": command or f"{sys.executable} -m allocplan.cli",
           "GITHUB_STEP_SUMMARY": str(summary)}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == status, done.stdout + done.stderr
    for name in ("plan.yaml", "profile.yaml", "diff.txt", "report/report.md", "report/k.png", "report/sensitivity.png"):
        assert (out / name).is_file(), name
    assert (out / "plan.yaml").read_bytes() == (plans / "a.yaml").read_bytes()
    text = summary.read_text(encoding="utf-8")
    assert text.startswith(f"## allocplan: {plans / committed}") and "# allocplan plan for test/model" in text
    assert "](k.png)" not in text  # pictures stay in the artifact: a job summary cannot show relative links
    assert ("are the same plan" in text) == (status == 0)


def test_json_on_compile(checkpoints, calib_file, tmp_path):
    out = tmp_path / "plan.yaml"
    done = run("compile", "--model", str(checkpoints("olmoe")), "--budget", "0.5", "--calib", str(calib_file),
               "--calib-tokens", "128", "--seq-len", "64", "--no-refine", "-o", str(out), "--json", "-q")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["wrote"] == str(out) and data["plan"] == to_data(load_plan(out))
    assert data["plan"]["provenance"]["calibration"]["name"] == calib_file.name


def test_report_names_the_drop_order_of_a_plan_that_has_one():
    import dataclasses
    from pathlib import Path

    import torch
    from safetensors.torch import save

    from allocplan.errors import AllocplanError
    from allocplan.formats.sidecar import sidecar_tensor_names
    from allocplan.report import report_markdown

    root = Path(__file__).resolve().parent.parent
    plan = load_plan(root / "plans" / "ref-olmoe-compiled-budget-0.5.yaml")  # compiled with the default drop order
    names = sidecar_tensor_names(plan.compensation_data)
    assert "model.layers.0.mlp.order" in names and "model.layers.0.mlp.down" in names
    assert "with a drop order" in report_markdown(plan)
    without = save({"model.layers.0.mlp": torch.zeros(16, 128)})  # a sidecar of stand-ins alone
    assert "drop order" not in report_markdown(dataclasses.replace(
        plan, compensation_data=without, budget=dataclasses.replace(plan.budget, sidecar_bytes=len(without))))
    with pytest.raises(AllocplanError, match="not a safetensors file"):
        sidecar_tensor_names(b"\x05\x00\x00\x00\x00\x00\x00\x00[1, 2")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_diff_reads_stand_ins_in_every_sidecar_dtype(dtype):
    # Models loaded in bf16 write bf16 sidecars, which safetensors.numpy cannot read: diff used to crash.
    import dataclasses

    import torch
    from safetensors.torch import save

    from allocplan.formats.diff import diff_plans
    from allocplan.formats.sidecar import record_for, sidecar_arrays

    def with_vectors(values):
        data = save({"model.layers.0.mlp": torch.tensor(values, dtype=getattr(torch, dtype))})
        return dataclasses.replace(solve_profile(make_profile(), 0.5), compensation=record_for(data, "expert"),
                                   compensation_data=data)

    # Exact in all three dtypes: 1.5, -2.25, 3.125 and 0.5 need at most 5 significant bits.
    a, b = with_vectors([[1.5, -2.25], [3.125, 0.0]]), with_vectors([[1.5, -2.25], [3.125, 0.5]])
    assert sidecar_arrays(a.compensation_data)["model.layers.0.mlp"].tolist() == [[1.5, -2.25], [3.125, 0.0]]
    found = {d.field: d for d in diff_plans(a, b).differences}
    assert found["compensation[model.layers.0.mlp]"].b == "max |difference| 0.5"
    assert "compensation[model.layers.0.mlp]" not in {d.field for d in diff_plans(a, a).differences}


def test_report_refuses_another_models_profile_and_flags_another_profile_of_this_model(tmp_path):
    """A profile of another checkpoint (other fingerprint) is refused before anything is written; another
    profile of the plan's own model is reported, with the note that it is not the one the plan was solved from."""
    import dataclasses

    from allocplan.errors import AllocplanError
    from allocplan.report import write_report

    profile = make_profile()
    plan = solve_profile(profile, 0.5)
    other_model = dataclasses.replace(profile, model=dataclasses.replace(profile.model, fingerprint="sha256:" + "0" * 16))
    with pytest.raises(AllocplanError, match="give the profile the plan was solved from, or leave --profile out"):
        write_report(plan, tmp_path / "refused", other_model, pictures=False)
    assert not (tmp_path / "refused").exists()
    remeasured = dataclasses.replace(profile, measurement=dataclasses.replace(profile.measurement, reference_nll=9.0))
    write_report(plan, tmp_path / "other", remeasured, pictures=False)
    assert "is not the one this plan was solved from" in (tmp_path / "other" / "report.md").read_text(encoding="utf-8")
    write_report(plan, tmp_path / "own", profile, pictures=False)
    assert "is not the one" not in (tmp_path / "own" / "report.md").read_text(encoding="utf-8")
