"""Generate docs/results.md (and its JSON and plot): every method at matched measured activations.

The protocol (what is evaluated, on what, and how it is compared) is
allocplan/evaluation/study.py; the page is rendered by allocplan/evaluation/results_page.py.
This script only parses arguments, runs models in parallel processes and writes the files.
Eval text: data/eval.txt; arithmetic: data/arith_eval.txt. Nothing in docs/results.md is
typed by hand.

Run:  python scripts/make_results.py --jobs 3     (24 to 88 minutes on 2 CPU cores, by machine; refinement off)
      python scripts/make_results.py --models ref-olmoe --budgets 0.5 --quick   (a smoke run)
      python scripts/make_results.py --render-only  (rewrite the page from docs/results.json)
      python scripts/make_results.py --models ref-qwen3 --update   (evaluate one model, keep the others'
                                                                     results from docs/results.json)
      python scripts/make_results.py --jobs 3 --update --budgets 0.33   (evaluate every model at one budget,
                                                keep the other budgets' results and, where that budget's plans are
                                                unchanged, the frontier's times)
      python scripts/make_results.py --times   (time every frontier point of each model in docs/results.json,
                                                in one process on one thread, about 30 minutes; store it in
                                                the JSON and rewrite the page)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from allocplan.evaluation.frontier_time import time_model
from allocplan.formats.records import atomic_write_text
from allocplan.evaluation.results_page import write_markdown, write_plot
from allocplan.evaluation.study import BUDGETS, MODELS, evaluate_model

ROOT = Path(__file__).resolve().parent.parent
EVAL_TEXT = ROOT / "data" / "eval.txt"
ARITH = ROOT / "data" / "arith_eval.txt"


def run_parts(models: list[str], args: argparse.Namespace) -> list[dict]:
    """Each model in its own process (one torch thread each), ``--jobs`` at a time."""
    running, results = [], {}
    directory = Path(tempfile.mkdtemp(prefix="allocplan-results-"))
    queue = list(models)
    while queue or running:
        while queue and len(running) < args.jobs:
            name = queue.pop(0)
            part = directory / f"{name}.json"
            command = [sys.executable, __file__, "--models", name, "--budgets", *map(str, args.budgets),
                       "--part-out", str(part), "--threads", "1"] + (["--quick"] if args.quick else [])
            running.append((name, part, subprocess.Popen(command)))
        time.sleep(5)
        for entry in list(running):
            name, part, proc = entry
            if proc.poll() is not None:
                running.remove(entry)
                if proc.returncode != 0:
                    for _, _, other in running:  # no orphans left computing for a run that failed
                        other.terminate()
                    raise SystemExit(f"results for {name} failed (exit {proc.returncode})")
                results[name] = json.loads(part.read_text())
    return [results[name] for name in models]


# What a model's quality run derives from calibration text alone: equal in two runs, they built the same policies.
CALIBRATION_FIELDS = ("sensitivity", "stand_in_sensitivity", "paper_sensitivity", "sensitivity_metric", "compensation",
                      "moe_layers", "uniform_k")
# A budget's plans, which its frontier times were measured on.
PLAN_FIELDS = ("plan", "paper_plan", "single_option")


def merge_budgets(previous: dict | None, fresh: dict) -> dict:
    """``fresh`` (a model evaluated at some budgets, ``--update --budgets ...``) merged into its ``previous``
    results: the fresh budgets replace theirs, the others are kept, with the frontier's times where every
    fresh budget's plans are the ones they were measured on. A fresh run of every budget replaces the model.

    Raises:
        SystemExit: exit code 2, after one line on stderr, where the two runs derived different profiles from the
            calibration text (the code changed what the kept budgets were built on): evaluate every budget instead.
    """
    if previous is None or set(fresh["budgets"]) >= set(previous["budgets"]):
        return fresh
    changed = [field for field in CALIBRATION_FIELDS if previous.get(field) != fresh.get(field)]
    if changed:
        print(f"[{fresh['model']}] --update --budgets: this run's {', '.join(changed)} differ from the kept"
              " budgets'; evaluate every budget (leave out --budgets)", file=sys.stderr)
        raise SystemExit(2)
    merged = dict(previous, budgets=dict(previous["budgets"]), eval_tokens=dict(previous["eval_tokens"]))
    for budget, data in fresh["budgets"].items():
        merged["budgets"][budget] = data
        merged["eval_tokens"][budget] = fresh["eval_tokens"][budget]
    moved = [budget for budget, data in fresh["budgets"].items() if budget in previous["budgets"] and any(
        data.get(field) != previous["budgets"][budget].get(field) for field in PLAN_FIELDS)]
    if moved and "frontier_time" in merged:
        del merged["frontier_time"]
        print(f"[{fresh['model']}] plans at {', '.join(moved)} changed: frontier times dropped (run --times)",
              flush=True)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and seeds (smoke test)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--jobs", type=int, default=1, help="models evaluated in parallel processes")
    # One thread by default, as --jobs runs each model: float sums can differ in their last digits between
    # thread counts, and the page must not depend on how the run was split.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the page and plot from the JSON of the last run, evaluating nothing")
    parser.add_argument("--times", action="store_true",
                        help="time every frontier point of --models (default: every model in the JSON of the last"
                             " run) on its reference, sequentially in this process, and store it in that JSON; the"
                             " code must not have changed since that run")
    parser.add_argument("--update", action="store_true",
                        help="evaluate only --models (at --budgets) and keep every other model's results, and with"
                             " fewer --budgets every other budget's, from the JSON of the last run (the code must not"
                             " have changed what they measure in between)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part_out:
        Path(args.part_out).write_text(json.dumps(evaluate_model(args.models[0], args.budgets, args.quick, EVAL_TEXT, ARITH)))
        return
    out = Path(args.out)
    if args.render_only or args.times:
        all_results = json.loads(out.with_suffix(".json").read_text())
        if args.times:
            # Timed one model after another in one process, so that no two timings share the machine.
            for res in all_results:
                if res["model"] in args.models:
                    budgets = [float(b) for b in res["budgets"]]
                    # Outside a smoke run, the rebuilt default plans must be the ones the quality run scored.
                    scored = None if args.quick else {b: data["plan"] for b, data in res["budgets"].items()}
                    res["frontier_time"] = time_model(res["model"], budgets, args.quick, scored_plans=scored)
                    print(f"[{res['model']}] frontier timed in {res['frontier_time']['seconds']}s", flush=True)
            atomic_write_text(out.with_suffix(".json"), json.dumps(all_results, indent=1) + "\n")
    else:
        if args.jobs > 1 and len(args.models) > 1:
            all_results = run_parts(args.models, args)
        else:
            all_results = [evaluate_model(name, args.budgets, args.quick, EVAL_TEXT, ARITH) for name in args.models]
        if args.update and out.with_suffix(".json").exists():
            previous = {res["model"]: res for res in json.loads(out.with_suffix(".json").read_text())}
            all_results = [merge_budgets(previous.get(res["model"]), res) for res in all_results]
            fresh = {res["model"] for res in all_results}
            kept_results = [res for res in previous.values() if res["model"] not in fresh]
            order = {name: i for i, name in enumerate(MODELS)}
            all_results = sorted(kept_results + all_results, key=lambda res: order.get(res["model"], len(order)))
        atomic_write_text(out.with_suffix(".json"), json.dumps(all_results, indent=1) + "\n")
    plot = out.with_name(out.stem + "-nll.png")
    # The page names the one command that gives it: over every model it holds (with --update or
    # --render-only, those may differ from this invocation's --models).
    kept, skipping = [], False
    for argument in sys.argv[1:]:  # without the options whose values the page's own models and budgets give
        if argument.startswith("--"):
            skipping = argument in ("--models", "--budgets")
        if not skipping and argument not in ("--render-only", "--update", "--times"):
            kept.append(argument)
    names = [res["model"] for res in all_results]
    held = sorted({float(b) for res in all_results for b in res["budgets"]})
    kept = ([] if names == MODELS else ["--models", *names]) + ([] if held == sorted(BUDGETS) else
                                                               ["--budgets", *map(str, held)]) + kept
    command = ("python scripts/make_results.py " + " ".join(kept)).strip()
    write_markdown(all_results, out, plot.name if write_plot(all_results, plot) else None, command)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
