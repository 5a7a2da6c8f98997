"""The benchmark protocol of docs/benchmarks.md: what is timed, beside what, and how often.

Every timing runs allocplan.bench in one process, untouched and planned side by side
(:func:`allocplan.bench.timing.bench`): the presets' uniform plans at budget 0.5 with the
stand-in and Alloc-T variants paired round by round, the golden compiled plan on its bundled
model (with the profiling cost), the solvers' cost, batched decode with ``prefer: active``
and, given a llama.cpp source tree, llama.cpp beside allocplan. ``scripts/make_benchmarks.py``
runs this and renders the page (:mod:`allocplan.bench.page`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from allocplan.bundled import BUNDLED_DIR, DEFAULT_CALIBRATION
from allocplan.formats.config import STAND_IN_SHARE, RoutingConfig
from allocplan.formats.plan import load_plan
from allocplan.loading import load_model
from allocplan.planner.windows import pack_windows

from ..evaluation.methods import uniform_allocation
from .batch_decode import compare_batched_decode
from .breakdown import time_breakdown
from .cost_model import ideal_speedup, routed_weight_share
from .presets import build_preset
from .run import with_compensation
from .timing import PROFILE_COST_CALIB_TOKENS, bench, median_spread, profile_cost, ratio_interval, solver_cost

# Interleaved rounds: the batch-1 ratios sit within a few percent of their targets, and with 5
# rounds their medians moved by about as much between runs; 11 rounds cut the median's spread by
# about sqrt(11 / 5) for about twice the run time.
REPEAT, NEW_TOKENS = 11, 32


# Variants timed beside each dsv2-lite-small plan: stand-ins of each kind over the plan alone, and the
# same over the plan with a per-layer gain, whose routing is rewritten anyway (compiled plans for a
# family that does not renormalise carry gains; one that does carries normaliser widths, the same cost).
# label: (kind, --compensation-share); the last is the cheaper setting for batch-1 latency.
LOW_SHARE = 0.05
BENCH_STAND_INS = {"expert": ("expert", STAND_IN_SHARE), "linear": ("linear", STAND_IN_SHARE),
                      f"linear (share {LOW_SHARE:g})": ("linear", LOW_SHARE)}
GAINS = "gains"
# The Alloc-T plan (same k), timed as a variant of each Alloc-T off run for the on-vs-off targets.
ALLOC_T_ON = "Alloc-T on"
# The gain given to every layer (its value does not change the time).
GAIN = 1.1


def with_gains(allocation: Any) -> Any:
    """``allocation`` with gain GAIN on every layer (its routing is then rewritten; the value does not change the time)."""
    return dataclasses.replace(allocation, layers=tuple(entry.with_treatments(gain=GAIN)
                                                        for entry in allocation.layers))


def compensation_variants(model: Any, plan: Any) -> dict:
    """The variants timed beside a dsv2-lite-small plan: stand-ins of each kind, over the plan and over the plan with gains."""
    variants = {f"{label} compensation": with_compensation(model, plan, kind, share)
                for label, (kind, share) in BENCH_STAND_INS.items()}
    variants[GAINS] = with_gains(plan)
    variants.update({f"{GAINS} + {label} compensation": with_compensation(model, with_gains(plan), kind, share)
                     for label, (kind, share) in BENCH_STAND_INS.items()})
    return variants


def over_gains(variants: dict, kind: str) -> dict:
    """Time of the plan with gains and stand-ins over the plan with gains alone, round by round."""
    return median_spread([v / g for v, g in zip(variants[f"{GAINS} + {kind} compensation"]["rounds"],
                                                 variants[GAINS]["rounds"])])


def over_gains_interval(variants: dict, kind: str) -> dict:
    """``over_gains`` as a geometric mean with its 95% interval over rounds."""
    return ratio_interval(variants[f"{GAINS} + {kind} compensation"]["rounds"], variants[GAINS]["rounds"])


# Calibration of the presets' compiled plans: random token ids (a preset has random weights and no
# tokenizer), 8 windows of 256 (one batch at the default batch size) to keep dsv2-lite-small's
# profiling within minutes; every other setting is the default recipe's.
PRESET_CALIB_TOKENS = 2048
# The bundled references whose compiled default plan at 0.5 is committed beside ref-olmoe's golden one
# (plans/<name>-compiled-budget-0.5.yaml, by `allocplan compile --model bundled:<name> --budget 0.5`);
# ref-olmoe's is the golden plan, timed in run_all with the profiling cost.
REFERENCE_PLANS = ("ref-dsv2", "ref-qwen3", "ref-deep")


def compiled_preset_plan(model: Any, preset: str) -> Any:
    """The default recipe's plan at budget 0.5 for a preset model, profiled on PRESET_CALIB_TOKENS random
    token ids (seeded: the same plan every run)."""
    import torch

    from allocplan.formats.config import ProfileConfig
    from allocplan.formats.provenance import CalibrationRecord
    from allocplan.planner.compile import compile_model

    seq_len = ProfileConfig().seq_len
    count = PRESET_CALIB_TOKENS // seq_len
    windows = torch.randint(0, model.config.vocab_size, (count, seq_len), generator=torch.Generator().manual_seed(0))
    record = CalibrationRecord("text", "random token ids (seed 0)", None, "sha256:" + "0" * 64,
                               PRESET_CALIB_TOKENS, seq_len, count)
    plan, _ = compile_model(model, None, 0.5, profile=ProfileConfig(calib_tokens=PRESET_CALIB_TOKENS),
                            model_name=f"preset:{preset}", windows=(windows, record))
    return plan


def plan_summary(plan: Any) -> dict:
    """What a timed compiled plan spends: per-layer k and stand-in rank, and its budget block's charges."""
    return {"ks": [layer.planned_k for layer in plan.layers],
            "ranks": [layer.stand_in_rank for layer in plan.layers],
            "charged_work": plan.budget.charged_work, "stand_in_work": plan.budget.stand_in_work,
            "original_activations": plan.budget.original_activations,
            "sidecar_share": plan.budget.sidecar_share}


def compiled_runs(plans_dir: Path) -> list[dict]:
    """The default plan at 0.5 on each preset (compiled here) and on each bundled reference (its committed
    plan), timed against the untouched model: the speed-up a compiled plan gives, and whether it is ever
    slower than the model it came from."""
    runs = []
    for preset in ("dsv2-lite-small", "mixtral-small"):
        model = build_preset(preset)
        plan = compiled_preset_plan(model, preset)
        result = bench(model, plan.allocation, batch=1, prompt_len=256, new_tokens=NEW_TOKENS, repeat=REPEAT)
        runs.append({"label": f"{preset}, compiled default 0.5", "compiled": plan_summary(plan),
                     "calibration": f"{PRESET_CALIB_TOKENS} random token ids", **result})
        del model
    for name in REFERENCE_PLANS:
        path = plans_dir / f"{name}-compiled-budget-0.5.yaml"
        if not path.exists():
            continue
        plan = load_plan(path)
        model, _ = load_model(plan.model.name)
        result = bench(model, plan.allocation, batch=1, prompt_len=256, new_tokens=NEW_TOKENS, repeat=REPEAT)
        runs.append({"label": f"{plan.model.name} with plans/{path.name}", "compiled": plan_summary(plan), **result})
    return runs


def run_all(golden_plan: Path, eval_text: Path) -> dict:
    """Every timing of docs/benchmarks.md but llama.cpp's: the presets' uniform plans with their variants and
    breakdowns, the golden plan on its bundled model with the profiling cost, the solver cost, batched decode."""
    runs = []
    for preset in ("dsv2-lite-small", "mixtral-small"):
        model = build_preset(preset)
        for token_level in (False, True):
            plan = uniform_allocation(model, 0.5, RoutingConfig() if token_level else None)
            # The cost of compensating the dropped experts, timed in the same rounds (DeepSeek-V2-Lite's shape).
            variants = compensation_variants(model, plan) if preset == "dsv2-lite-small" else {}
            if not token_level:  # Alloc-T's cost over the same k, paired round by round with the plan
                variants[ALLOC_T_ON] = uniform_allocation(model, 0.5, RoutingConfig())
            result = bench(model, plan, batch=1, prompt_len=256, new_tokens=NEW_TOKENS, repeat=REPEAT,
                           variants=variants)
            result["breakdown"] = time_breakdown(model, plan)
            runs.append({"label": f"{preset}, uniform 0.5, Alloc-T {'on' if token_level else 'off'}", **result})
        del model
    if golden_plan.exists():
        plan = load_plan(golden_plan)
        model, tokenizer = load_model(plan.model.name)
        result = bench(model, plan.allocation, batch=1, prompt_len=256, new_tokens=NEW_TOKENS, repeat=REPEAT)
        windows, _ = pack_windows(tokenizer, DEFAULT_CALIBRATION, max_tokens=PROFILE_COST_CALIB_TOKENS, seq_len=256)
        result["profile_cost"] = profile_cost(model, windows)
        runs.append({"label": f"{plan.model.name} with plans/{golden_plan.name}", "compiled": plan_summary(plan),
                     **result})
    runs += compiled_runs(golden_plan.parent)
    return {"runs": runs, "solver": solver_cost(), "batch_aware": batch_aware_run(golden_plan, eval_text)}


def batch_aware_run(golden_plan: Path, eval_text: Path) -> list[dict]:
    """Batched decode (batch 8) on the bundled references: uniform, Alloc-T and the default plan, each
    filled by score and with ``prefer: active``, side by side (allocplan.bench.batch_decode)."""
    runs = []
    for name in ("ref-olmoe", "ref-qwen3"):
        model, tokenizer = load_model(f"bundled:{name}")
        windows, _ = pack_windows(tokenizer, eval_text, max_tokens=8192, seq_len=256, what="eval")
        allocations = {"untouched": None,
                       "uniform k/2": uniform_allocation(model, 0.5, RoutingConfig(token_level=False)),
                       "Alloc-T k/2": uniform_allocation(model, 0.5, RoutingConfig()),
                       "Alloc-T k/2, prefer active": uniform_allocation(model, 0.5, RoutingConfig(prefer="active"))}
        if name == "ref-olmoe" and golden_plan.exists():
            default = load_plan(golden_plan).allocation
            allocations["default plan"] = default
            allocations["default plan, prefer active"] = dataclasses.replace(
                default, token_level=dataclasses.replace(default.token_level, prefer="active"))
        # Prompts: the first 16 tokens of 8 held-out windows, so that routing sees real text.
        result = compare_batched_decode(model, allocations, windows[:8, :16].contiguous(), windows,
                                        new_tokens=NEW_TOKENS, repeat=REPEAT)
        runs.append({"model": f"bundled:{name}", "tokens_per_window": windows.shape[1] - 1, "rows": result})
    return runs


def llama_cpp_run(llama_cpp_dir: str, golden_plan: Path, eval_text: Path) -> dict:
    """llama.cpp (llama-cpp-python) beside allocplan on bundled:ref-olmoe, batch-1 decode, 2 threads."""
    from .llama_cpp import convert_to_gguf, side_by_side

    model, tokenizer = load_model("bundled:ref-olmoe")
    allocations = {"uniform k/2": uniform_allocation(model, 0.5, RoutingConfig(token_level=False)),
                   "default plan": load_plan(golden_plan).allocation}
    windows, _ = pack_windows(tokenizer, eval_text, max_tokens=8192, seq_len=512, what="eval")
    tokens = windows[0, : 256 + NEW_TOKENS].tolist()
    with tempfile.TemporaryDirectory() as scratch:
        gguf = convert_to_gguf(BUNDLED_DIR / "ref-olmoe", llama_cpp_dir, Path(scratch) / "ref-olmoe-f32.gguf")
        result = side_by_side(model, gguf, allocations, tokens, prompt_len=256, new_tokens=NEW_TOKENS,
                              repeat=REPEAT, threads=2)
    share = routed_weight_share(model)
    return {"model": "bundled:ref-olmoe", "plan": f"plans/{golden_plan.name}", "f_routed_weights": share,
            "ideal_decode_speedup": ideal_speedup(share, 0.5), **result}
