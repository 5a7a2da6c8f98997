"""The committed reference checkpoints reproduce the full-k NLL that docs/results.json documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from allocplan.bundled import bundled_model_names
from allocplan.evaluation.metrics import evaluate
from allocplan.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results.json"
REFERENCES = ["ref-dsv2", "ref-olmoe", "ref-qwen3", "ref-deep"]


def documented() -> dict[str, dict]:
    if not RESULTS.exists():
        return {}
    return {entry["model"]: entry for entry in json.loads(RESULTS.read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("name", REFERENCES)
def test_reference_checkpoint_reproduces_documented_nll(name):
    assert name in bundled_model_names(), f"reference checkpoint {name} is not committed"
    entry = documented().get(name)
    assert entry is not None, f"docs/results.json documents no results for {name}"
    model, tokenizer = load_model(f"bundled:{name}")
    # Budget 0.5's rows are scored on the most eval text (24,576 tokens packed into windows of 256).
    result = evaluate(model, tokenizer, data=ROOT / "data" / "eval.txt", max_tokens=24576)
    assert result["tokens"] == entry["eval_tokens"]["0.5"]
    assert result["nll"] == pytest.approx(entry["budgets"]["0.5"]["rows"]["full"]["modes"]["prefill"]["nll"], abs=1e-4)
