"""The generated pages' judging, by hand, and the pages re-rendered from their JSON.

docs/results.md, docs/benchmarks.md and docs/scale.md are written by package code
(allocplan/evaluation/results_page.py, allocplan/bench/page.py, allocplan/bench/scale.py)
from the JSON beside them; the scripts only parse arguments. Here a target's verdict is
checked against numbers set by hand, on either side of its threshold.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
needs_docs = pytest.mark.skipif(not (DOCS / "results.json").is_file(), reason="docs/ is not beside the tests")


def test_target_verdict_by_hand():
    from allocplan.evaluation.results_page import beats, fmt, target_verdict

    assert target_verdict(0.74, 0.70) == "0.74 (met)"
    assert target_verdict(0.70, 0.70) == "0.70 (met)"  # a target is met at its value
    assert target_verdict(0.65, 0.70) == "0.65 (missed by 0.05)"
    assert target_verdict(-0.1, 0.50) == "-0.10 (missed by 0.60)"
    assert target_verdict(None, 0.70) == "— (missed)"  # uniform lost nothing: no gap to close
    # With an interval, the lower end is judged: a point estimate above the goal is not enough.
    assert target_verdict(0.74, 0.70, 0.65, 0.84) == "0.74 [0.65, 0.84] (missed by 0.05)"
    assert target_verdict(0.80, 0.70, 0.70, 0.90) == "0.80 [0.70, 0.90] (met)"
    assert fmt(-0.00001, 2) == "0.00" and fmt(None) == "—"
    # "beats" needs the whole interval below zero.
    assert beats({"mean": -0.02, "low": -0.03, "high": -0.001})
    assert not beats({"mean": -0.02, "low": -0.03, "high": 0.0})


def test_same_work_uniform_by_hand():
    from allocplan.evaluation.study import same_work_uniform

    # Two layers; uniform k = 1, 2, 3 of K = 4; windows' summed NLL 10, 8, 7 and full 6.
    rows = {str(k): {"modes": {"decode-b1": {"window_nll": [v, v]}}} for k, v in ((1, 10.0), (2, 8.0), (3, 7.0))}
    full = {"modes": {"decode-b1": {"window_nll": [6.0, 6.0]}}}
    # 5 expert-equivalents over 2 layers: 2.5 per layer, half the text at k = 2 and half at k = 3.
    same = same_work_uniform(rows, full, "decode-b1", 5.0, 2, 2)
    assert (same["k_low"], same["k_high"], same["share_high"]) == (2, 3, 0.5) and same["window_nll"] == [7.5, 7.5]
    # 7 per layer: between k = 3 and the full model (k = 4).
    assert same_work_uniform(rows, full, "decode-b1", 7.0, 2, 1)["window_nll"] == [6.5]
    # Below one expert per layer: uniform at k = 1 (the cheapest uniform there is).
    assert same_work_uniform(rows, full, "decode-b1", 1.5, 2, 1)["window_nll"] == [10.0]


@needs_docs
def test_results_targets_follow_the_numbers():
    from allocplan.evaluation.results_page import target_lines

    results = json.loads((DOCS / "results.json").read_text(encoding="utf-8"))
    changed = copy.deepcopy(results)
    dsv2 = next(res for res in changed if res["model"] == "ref-dsv2")
    main = dsv2["budgets"]["0.5"]
    main["same_work"]["decode-b1"].update(gap_closed=0.75, low=0.65, high=0.85)
    main["same_work"]["decode-b8"].update(gap_closed=0.80, low=0.70, high=0.90)
    # The default no longer beats uniform in decode-b8: its interval now reaches zero.
    main["bootstrap"]["uniform"]["decode-b8"] = {"mean": -0.01, "low": -0.02, "high": 0.001}
    main["bootstrap"]["naee"]["decode-b1"]["high"] = 0.0  # and no longer beats NAEE in decode-b1
    main["rows"]["allocplan"]["arith_accuracy"], main["rows"]["uniform"]["arith_accuracy"] = 0.25, 0.5
    row = next(line for line in target_lines(changed) if line.startswith("| ref-dsv2 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "0.75 [0.65, 0.85] (missed by 0.05)"
    assert cells[2] == "0.80 [0.70, 0.90] (met)"
    assert cells[5] == "no" and cells[6] == "no: not naee"
    assert cells[7] == "0.250 vs 0.500 (below)"
    # The models not touched keep the rows the committed page shows.
    committed = (DOCS / "results.md").read_text(encoding="utf-8").splitlines()
    for line in target_lines(results):
        if line.startswith("| ref-"):
            assert line in committed


@needs_docs
def test_benchmark_targets_follow_the_numbers():
    from allocplan.bench.page import target_lines

    data = json.loads((DOCS / "benchmarks.json").read_text(encoding="utf-8"))

    def verdicts(runs: list[dict]) -> dict[str, tuple[str, str]]:
        rows = [line for line in target_lines(runs, data["solver"]) if line.startswith("| ") and "---" not in line]
        return {cells[0]: (cells[1], cells[2]) for cells in
                ([cell.strip() for cell in line.strip("|").split("|")] for line in rows[1:])}

    runs = copy.deepcopy(data["runs"])
    dsv2 = next(run for run in runs if run["label"] == "dsv2-lite-small, uniform 0.5, Alloc-T off")
    olmoe = next(run for run in runs if "profile_cost" in run)
    dsv2["achieved_fraction"]["decode_b1_s_per_token"] = 0.95
    dsv2["achieved_fraction"]["prefill_s"] = 0.8999
    olmoe["profile_cost"]["ratio"] = 0.5
    judged = verdicts(runs)
    assert judged["DeepSeek-V2-Lite-shaped decode b1 ≥ 95% of its bound"] == ("0.9500", "yes")
    assert judged["DeepSeek-V2-Lite-shaped prefill ≥ 90% of its bound"] == ("0.8999", "no")
    exact, anchored = "profiling ≤ 0.5× naive, exact S (the default strategy)", \
        "profiling ≤ 0.5× naive, `--strategy anchored` (approximate S)"
    assert judged[exact] == ("0.500", "yes")
    olmoe["profile_cost"]["ratio"] = 0.5004
    assert verdicts(runs)[exact] == ("0.500", "no")  # judged on the value, not its rounding
    olmoe["profile_cost"]["anchored"]["ratio"] = 0.51
    assert verdicts(runs)[anchored] == ("0.510", "no")
    olmoe["profile_cost"]["anchored"]["ratio"] = 0.42
    assert verdicts(runs)[anchored] == ("0.420", "yes")
    # Alloc-T on vs off: at most 3% slower, from the paired ratio's median.
    on = dsv2["prefill_s"]["variants"]["Alloc-T on"]["over_planned"]
    on["median"] = 1.029
    assert verdicts(runs)["dsv2-lite-small prefill_s: Alloc-T on vs off ≤ 3% slower"][1] == "yes"
    on["median"] = 1.031
    assert verdicts(runs)["dsv2-lite-small prefill_s: Alloc-T on vs off ≤ 3% slower"][1] == "no"


@needs_docs
def test_compiled_plan_targets_follow_the_numbers():
    from allocplan.bench.page import compiled_lines, target_lines

    data = json.loads((DOCS / "benchmarks.json").read_text(encoding="utf-8"))
    base = next(run for run in data["runs"] if run["label"] == "dsv2-lite-small, uniform 0.5, Alloc-T off")
    compiled = {**copy.deepcopy(base), "label": "dsv2-lite-small, compiled default 0.5", "budget": 0.55,
                "compiled": {"ks": [3, 2], "ranks": [None, 0], "charged_work": 6.6, "stand_in_work": 1.6,
                             "original_activations": 12, "sidecar_share": 0.0123}}
    compiled["decode_b1_s_per_token"]["speedup"] = {"median": 1.30, "min": 1.2, "max": 1.4}
    compiled["achieved_fraction"] = {"decode_b1_s_per_token": 0.8999, "prefill_s": 0.85, "decode_b8_s_per_step": 1.0}
    compiled["prefill_s"]["speedup"] = {"median": 0.999, "min": 0.9, "max": 1.1}
    compiled["prefill_s"].pop("speedup_interval", None)  # a page from before the intervals shows [min, max]
    compiled["decode_b8_s_per_step"]["speedup"] = {"median": 1.0, "min": 0.9, "max": 1.1}
    compiled["decode_b8_s_per_step"]["speedup_interval"] = {"geomean": 1.01, "low": 0.95, "high": 1.07}
    rows = [line for line in target_lines([*data["runs"], compiled], data["solver"])
            if line.startswith("| ") and "---" not in line]
    judged = {cells[0]: (cells[1], cells[2]) for cells in
              ([cell.strip() for cell in line.strip("|").split("|")] for line in rows[1:])}
    assert judged["DeepSeek-V2-Lite-shaped compiled default decode b1 ≥ 1.30× untouched"] == ("1.3000", "yes")
    assert judged["DeepSeek-V2-Lite-shaped compiled default decode b1 ≥ 90% of its charged bound"][1] == "no"
    assert judged["DeepSeek-V2-Lite-shaped compiled default prefill ≥ 85% of its charged bound"][1] == "yes"
    where = "dsv2-lite-small, compiled default 0.5"
    assert judged[f"{where}: prefill not slower than untouched"] == ("0.999× ([0.900, 1.100])", "no")
    assert judged[f"{where}: decode b8 not slower than untouched"] == (
        "1.000× (geometric mean 1.010×, 95% interval [0.950, 1.070])", "yes")
    # The plan line states the charge the bound was computed from: 6.6 of 12 is b = 0.55.
    text = compiled_lines(compiled)[0]
    assert "k per layer [3, 2]" in text and "rank per layer [—, 0]" in text
    assert "charged work 6.60 of 12" in text and "b is 0.550" in text and "1.2%" in text


@needs_docs
def test_scale_page_renders_from_its_json():
    from allocplan.bench.scale import render

    data = json.loads((DOCS / "scale.json").read_text(encoding="utf-8"))
    assert render(data) == (DOCS / "scale.md").read_text(encoding="utf-8")


@needs_docs
def test_results_page_renders_from_its_json(tmp_path):
    from allocplan.evaluation.results_page import write_markdown

    page = (DOCS / "results.md").read_text(encoding="utf-8")
    command = page.split("Generated by `", 1)[1].split("`", 1)[0]
    write_markdown(json.loads((DOCS / "results.json").read_text(encoding="utf-8")), tmp_path / "results.md",
                   "results-nll.png", command)
    assert (tmp_path / "results.md").read_text(encoding="utf-8") == page


def test_scripts_only_parse_and_write():
    # The protocols live in the package (importable, tested); a page's script parses arguments and writes files.
    scripts = Path(__file__).resolve().parent.parent / "scripts"
    if not scripts.is_dir():
        pytest.skip("scripts/ is not beside the tests")
    lengths = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in scripts.glob("make_*.py")}
    assert lengths and all(n <= 200 for n in lengths.values()), lengths
    for path in scripts.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "monkeypatch" not in text and ".pack_windows =" not in text and ".drop_weights =" not in text, path
