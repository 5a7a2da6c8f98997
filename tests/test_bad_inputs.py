"""Every bad input in tests/bad_inputs.py gets one stderr line, exit 2, no traceback and no new file."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from bad_inputs import CASES, build_workspace, console_script, run_case


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("bad-inputs"))


def test_the_matrix_covers_every_group():
    groups = {case.group for case in CASES}
    assert groups == {"yaml", "plan", "profile", "output", "input"} and len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.group}: {case.name}")
def test_bad_input_is_refused_cleanly(case, workspace):
    outcome = run_case(case, workspace)
    assert outcome.refused_cleanly, (outcome.returncode, outcome.stderr[-2000:], outcome.new_files)


def run(workspace, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*console_script(), *args], capture_output=True, text=True, cwd=workspace.root)


def test_dash_writes_the_plan_to_stdout_and_reads_it_from_stdin(workspace):
    solved = run(workspace, "solve", str(workspace.path("profile.yaml")), "--budget", "0.5", "-o", "-")
    assert solved.returncode == 0, solved.stderr
    assert solved.stdout == workspace.path("plan.yaml").read_text()  # the plan itself; the table went to stderr
    assert "wrote -" in solved.stderr
    validated = subprocess.run([*console_script(), "validate", "-"], input=solved.stdout, capture_output=True,
                               text=True, cwd=workspace.root)
    assert validated.returncode == 0 and "valid plan" in validated.stdout


def test_tiny_negative_sensitivities_solve_and_both_solvers_agree(workspace):
    # KL sensitivities can come out a hair below zero from float noise: a valid profile, solved normally.
    text = workspace.profile_text()
    first_value = text.split("sensitivity:\n", 1)[1].splitlines()[0]  # e.g. "    1: 0.0123"
    key = first_value.split(":")[0]
    path = workspace.write("negative.yaml", text.replace(first_value, f"{key}: -1.0e-09", 1))
    solved = run(workspace, "solve", path, "--budget", "0.5", "-o", str(workspace.path("negative-plan.yaml")))
    assert solved.returncode == 0, solved.stderr
    assert "objectives_agree: true" in workspace.path("negative-plan.yaml").read_text()


def test_written_files_follow_the_umask(workspace):
    target = workspace.path("umask-plan.yaml")
    previous = os.umask(0o027)
    try:
        assert run(workspace, "solve", str(workspace.path("profile.yaml")), "--budget", "0.5", "-o",
                   str(target)).returncode == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # 0666 under umask 027, not mkstemp's 0600


def test_empty_prompt_is_refused_before_the_model_loads(workspace):
    """apply shows nothing of the plan when its --prompt is refused: the check comes before any work."""
    refused = run(workspace, "apply", str(workspace.path("plan.yaml")), "--model", str(workspace.path("ckpt")),
                  "--prompt", " \n")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == "allocplan: error: --prompt is empty; give some text to continue"
