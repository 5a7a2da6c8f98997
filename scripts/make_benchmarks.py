"""Generate docs/benchmarks.md: side-by-side CPU timings of untouched and planned models.

Every figure is produced by allocplan.bench in this run (JSON beside the page): the protocol is
allocplan/bench/study.py, the page and its target judging allocplan/bench/page.py; this script
parses arguments and writes the files.

Run:  python scripts/make_benchmarks.py        (about 65 minutes on 2 CPU cores, more with --llama-cpp; run it on an idle machine)
      python scripts/make_benchmarks.py --render-only   (rewrite the page from the last run's JSON)
      python scripts/make_benchmarks.py --profile-cost-only   (re-measure only the profiling cost)
      python scripts/make_benchmarks.py --breakdown-only      (re-measure only the time breakdowns)
      python scripts/make_benchmarks.py --batch-aware-only    (re-measure only batched decode, prefer: active)
      python scripts/make_benchmarks.py --solver-cost-only    (re-measure only the DP and ILP times)
      python scripts/make_benchmarks.py --compiled-only       (re-measure only the compiled default plans: presets, references)
      python scripts/make_benchmarks.py --depth-only          (re-measure only profiling time against depth, ref-deep, both strategies)
      python scripts/make_benchmarks.py --llama-cpp DIR       (also llama.cpp beside allocplan; DIR: a llama.cpp
                                                               source tree, needs the `llama` extra)
      python scripts/make_benchmarks.py --llama-cpp-only DIR  (re-measure only the llama.cpp comparison)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from allocplan.bench.breakdown import time_breakdown
from allocplan.bench.depth import depth_scaling
from allocplan.bench.page import render
from allocplan.bench.presets import PRESETS, build_preset
from allocplan.bench.study import batch_aware_run, compiled_runs, llama_cpp_run, run_all
from allocplan.bench.timing import PROFILE_COST_CALIB_TOKENS, profile_cost, solver_cost
from allocplan.bundled import DEFAULT_CALIBRATION
from allocplan.evaluation.methods import uniform_allocation
from allocplan.formats.config import RoutingConfig
from allocplan.formats.plan import load_plan
from allocplan.loading import load_model
from allocplan.planner.windows import pack_windows

ROOT = Path(__file__).resolve().parent.parent
# The quick start's compiled plan (bundled:ref-olmoe at budget 0.5), the default plan timed here.
GOLDEN_PLAN = ROOT / "plans" / "ref-olmoe-compiled-budget-0.5.yaml"
EVAL_TEXT = ROOT / "data" / "eval.txt"


def flag_value(flag: str) -> str:
    """The argument after ``flag``; a usage error (exit 2) when there is none."""
    at = sys.argv.index(flag) + 1
    if at >= len(sys.argv) or sys.argv[at].startswith("--"):
        print(f"make_benchmarks: {flag} needs a llama.cpp source directory: {flag} DIR", file=sys.stderr)
        sys.exit(2)
    return sys.argv[at]


def main() -> None:
    torch.set_num_threads(2)
    out = ROOT / "docs" / "benchmarks.json"
    if "--render-only" in sys.argv:
        data = json.loads(out.read_text())
    elif "--breakdown-only" in sys.argv:
        # Re-measure only the time breakdowns of the preset runs (about two minutes).
        data = json.loads(out.read_text())
        for preset in PRESETS:
            model = build_preset(preset)
            for run in data["runs"]:
                if run["label"].startswith(preset):
                    plan = uniform_allocation(model, 0.5, RoutingConfig() if run["token_level"] else None)
                    run["breakdown"] = time_breakdown(model, plan)
        out.write_text(json.dumps(data, indent=2) + "\n")
    elif "--profile-cost-only" in sys.argv:
        # Re-measure only the profiling cost (about five minutes) and keep the last run's timings.
        data = json.loads(out.read_text())
        plan = load_plan(GOLDEN_PLAN)
        model, tokenizer = load_model(plan.model.name)
        windows, _ = pack_windows(tokenizer, DEFAULT_CALIBRATION, max_tokens=PROFILE_COST_CALIB_TOKENS, seq_len=256)
        for run in data["runs"]:
            if "profile_cost" in run:
                run["profile_cost"] = profile_cost(model, windows)
        out.write_text(json.dumps(data, indent=2) + "\n")
    elif "--solver-cost-only" in sys.argv:
        # Re-measure only the DP and ILP times (seconds) and keep the last run's other timings.
        data = json.loads(out.read_text())
        data["solver"] = solver_cost()
        out.write_text(json.dumps(data, indent=2) + "\n")
    elif "--compiled-only" in sys.argv:
        # Re-measure only the compiled default plans at 0.5 (presets compiled here, the references' committed
        # plans) and keep the other timings.
        data = json.loads(out.read_text())
        data["runs"] = [run for run in data["runs"] if "compiled" not in run or "profile_cost" in run]
        data["runs"] += compiled_runs(GOLDEN_PLAN.parent)
        out.write_text(json.dumps(data, indent=2) + "\n")
    elif "--depth-only" in sys.argv:
        # Re-measure only profiling time against depth (about twelve minutes) and keep the other timings.
        data = json.loads(out.read_text())
        data["depth"] = depth_scaling()
        out.write_text(json.dumps(data, indent=2) + "\n")
    elif "--llama-cpp-only" in sys.argv:
        # Re-measure only llama.cpp beside allocplan and keep the last run's other timings.
        data = json.loads(out.read_text())
        data["llama_cpp"] = llama_cpp_run(flag_value("--llama-cpp-only"), GOLDEN_PLAN, EVAL_TEXT)
        out.write_text(json.dumps(data, indent=2) + "\n")
    elif "--batch-aware-only" in sys.argv:
        # Re-measure only the batched-decode comparison and keep the last run's other timings.
        data = json.loads(out.read_text())
        data["batch_aware"] = batch_aware_run(GOLDEN_PLAN, EVAL_TEXT)
        out.write_text(json.dumps(data, indent=2) + "\n")
    else:
        data = run_all(GOLDEN_PLAN, EVAL_TEXT)
        data["depth"] = depth_scaling()
        if "--llama-cpp" in sys.argv:
            data["llama_cpp"] = llama_cpp_run(flag_value("--llama-cpp"), GOLDEN_PLAN, EVAL_TEXT)
        out.write_text(json.dumps(data, indent=2) + "\n")

    (ROOT / "docs" / "benchmarks.md").write_text(render(data), encoding="utf-8")
    print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
