"""scripts/make_results.py's merge of a run at some budgets into the last run (``--update --budgets``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_results.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_results_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_result(budgets: dict[str, dict], tokens: dict[str, int], **fields) -> dict:
    base = {"model": "ref-x", "budgets": budgets, "eval_tokens": tokens, "sensitivity": {"l0": {"1": 0.5}},
            "stand_in_sensitivity": {"l0": None}, "paper_sensitivity": {"l0": {"1": 0.6}}, "sensitivity_metric": "kl",
            "compensation": "linear", "moe_layers": 1, "uniform_k": {"1": 4.2}, "seconds": 100}
    return {**base, **fields}


def budget(nll: float, k: int = 1) -> dict:
    return {"plan": {"k": [k]}, "paper_plan": {"k": [k]}, "single_option": {"k": [k]}, "nll": nll}


def test_fresh_budget_replaces_its_own_and_keeps_the_rest_with_times(script):
    previous = model_result({"0.33": budget(4.0), "0.5": budget(3.9, 2)}, {"0.33": 8160, "0.5": 24480},
                            frontier_time={"points": {"x": 1}})
    fresh = model_result({"0.33": budget(4.1)}, {"0.33": 24480}, seconds=50)
    merged = script.merge_budgets(previous, fresh)
    assert merged["budgets"] == {"0.33": budget(4.1), "0.5": budget(3.9, 2)}
    assert merged["eval_tokens"] == {"0.33": 24480, "0.5": 24480}
    assert merged["frontier_time"] == {"points": {"x": 1}}  # the same plans: their times stand
    assert merged["seconds"] == 100
    assert previous["budgets"]["0.33"] == budget(4.0) and previous["eval_tokens"]["0.33"] == 8160  # not edited


def test_a_changed_plan_drops_the_frontier_times(script):
    previous = model_result({"0.33": budget(4.0), "0.5": budget(3.9)}, {"0.33": 8160, "0.5": 24480},
                            frontier_time={"points": {}})
    merged = script.merge_budgets(previous, model_result({"0.33": budget(4.1, k=2)}, {"0.33": 24480}))
    assert "frontier_time" not in merged
    assert merged["budgets"]["0.33"]["plan"] == {"k": [2]}


def test_other_profiles_refuse_the_merge(script, capsys):
    previous = model_result({"0.33": budget(4.0), "0.5": budget(3.9)}, {"0.33": 8160, "0.5": 24480})
    fresh = model_result({"0.33": budget(4.1)}, {"0.33": 24480}, sensitivity={"l0": {"1": 0.7}})
    with pytest.raises(SystemExit) as exit_info:
        script.merge_budgets(previous, fresh)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "sensitivity differ from the kept budgets'" in message and message.count("\n") == 1


def test_every_budget_or_a_new_model_replaces_it_whole(script):
    previous = model_result({"0.33": budget(4.0)}, {"0.33": 8160}, frontier_time={"points": {}})
    fresh = model_result({"0.33": budget(4.1, k=2)}, {"0.33": 24480}, sensitivity={"l0": {"1": 0.7}})
    assert script.merge_budgets(previous, fresh) is fresh
    assert script.merge_budgets(None, fresh) is fresh
