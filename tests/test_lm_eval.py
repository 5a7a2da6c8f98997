"""lm-evaluation-harness: `allocplan lm-eval --model allocplan` on a tiny multiple-choice task from local files."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from bad_inputs import console_script
from tiny_models import plan_for, plan_of

import allocplan


pytest.importorskip("lm_eval")

QUESTIONS = [
    ("The capital of France is", ["Paris", "banana", "seven"], 0),
    ("Two plus two equals", ["four", "tree", "blue"], 0),
    ("The if statement is used to", ["test a condition", "eat lunch", "sing"], 0),
    ("def main():", ["return", "elephant", "purple"], 0),
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A task defined from local files: a JSON-lines dataset and its YAML config."""
    folder = tmp_path_factory.mktemp("tasks")
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (folder / "tiny.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (folder / "tiny.yaml").write_text(f"""task: allocplan_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "tiny.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""", encoding="utf-8")
    return folder


def loglikelihoods(task_dir, out, model_type: str, model_args: str) -> list[float]:
    """Run the task through the allocplan console script; every choice's log-likelihood, in order."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "datasets-cache")}
    done = subprocess.run(
        [*console_script(), "lm-eval", "--model", model_type, "--model_args", model_args, "--tasks", "allocplan_tiny",
         "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1", "--output_path", str(out),
         "--log_samples"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    samples = sorted(out.rglob("samples_allocplan_tiny_*.jsonl"))
    assert len(samples) == 1
    rows = sorted((json.loads(line) for line in samples[0].read_text().splitlines()), key=lambda r: r["doc_id"])
    assert len(rows) == len(QUESTIONS)
    return [float(choice[0]) for row in rows for choice in row["filtered_resps"]]


@pytest.mark.slow  # three lm-eval runs in subprocesses: about a minute
def test_lm_eval_runs_a_plan_and_matches_its_export(task_dir, tmp_path):
    """A uniform k=1 plan through ``--model allocplan`` gives the same log-likelihoods as lm-eval's own
    ``hf`` model on the exported checkpoint (which routes at k=1 from config.json alone), and other
    ones than the untouched model."""
    model, _ = allocplan.load_model("bundled:ref-olmoe")
    plan = plan_of(plan_for(model, 1))
    allocplan.save_plan(plan, tmp_path / "plan.yaml")
    allocplan.export_plan(plan, "bundled:ref-olmoe", tmp_path / "exported")
    planned = loglikelihoods(task_dir, tmp_path / "a", "allocplan",
                             f"pretrained=bundled:ref-olmoe,plan={tmp_path / 'plan.yaml'}")
    exported = loglikelihoods(task_dir, tmp_path / "b", "hf", f"pretrained={tmp_path / 'exported'}")
    untouched = loglikelihoods(task_dir, tmp_path / "c", "allocplan", "pretrained=bundled:ref-olmoe")
    assert len(planned) == sum(len(c) for _, c, _ in QUESTIONS)
    assert max(abs(a - b) for a, b in zip(planned, exported)) < 1e-3
    assert max(abs(a - b) for a, b in zip(planned, untouched)) > 0.1


def test_a_batch_scoped_token_level_plan_warns_at_batch_size_above_one(tmp_path):
    from allocplan.lm_eval_model import AllocplanLM

    model, _ = allocplan.load_model("bundled:ref-olmoe")
    batch = plan_of(plan_for(model, 1.5, token_level=True, scope="batch"))
    sequence = plan_of(plan_for(model, 1.5, token_level=True, scope="sequence"))
    allocplan.save_plan(batch, tmp_path / "batch.yaml")
    allocplan.save_plan(sequence, tmp_path / "sequence.yaml")
    with pytest.warns(UserWarning, match="depend on --batch_size 4"):
        lm = AllocplanLM("bundled:ref-olmoe", plan=str(tmp_path / "batch.yaml"), device="cpu", batch_size=4)
    assert lm.allocplan_handle is not None and allocplan.plan_handle(lm.model) is lm.allocplan_handle
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        AllocplanLM("bundled:ref-olmoe", plan=str(tmp_path / "sequence.yaml"), device="cpu", batch_size=4)
        AllocplanLM("bundled:ref-olmoe", plan=str(tmp_path / "batch.yaml"), device="cpu", batch_size=1)


def test_a_hub_task_without_a_hub_is_one_line_within_seconds(tmp_path, checkpoints):
    """A task whose data is on the hub, with no hub: lm-eval runs with the datasets cache only, so the miss
    is one line, exit 2, at once (it was a traceback, exit 1, after half a minute of retries)."""
    import time

    (tmp_path / "hub.yaml").write_text("""task: allocplan_hub_task
dataset_path: allocplan-test/no-such-dataset
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""", encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "https://hub.invalid"  # unreachable, whatever network this machine has
    started = time.monotonic()
    done = subprocess.run(
        [*console_script(), "-q", "lm-eval", "--model", "allocplan", "--model_args",
         f"pretrained={checkpoints('olmoe')}", "--tasks", "allocplan_hub_task", "--include_path", str(tmp_path),
         "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("allocplan: error: ")]
    assert len(errors) == 1 and "allocplan-test/no-such-dataset" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 60
