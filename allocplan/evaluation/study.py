"""The results protocol of docs/results.md: what is evaluated, on what, and how it is compared.

For each bundled reference model and budget, every registered routing method
(:mod:`allocplan.evaluation.methods`), allocplan's default plan and its ablations are
applied and evaluated on held-out text in three modes (prefill, batch-1 decode, batch-8
decode; :mod:`allocplan.evaluation.metrics`) and on held-out arithmetic. Profiles,
stand-ins, thresholds and k2 use only the calibration text; the ``/eval-matched`` rows of
the threshold methods set their threshold from the eval windows' activation counts (never
their losses), to compare at exactly matched compute. Defaults are checked on a calibration
holdout (calibration tokens the profiles never saw). ``scripts/make_results.py`` runs this
and renders the page (:mod:`allocplan.evaluation.results_page`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from allocplan.bundled import DEFAULT_CALIBRATION
from allocplan.formats.config import EVAL_MODES, ProfileConfig, RefineConfig, RoutingConfig
from allocplan.loading import load_model
from allocplan.planner.compile import refined
from allocplan.planner.profiling import profile_model
from allocplan.planner.solve import allocation_from_profile, solve_profile
from allocplan.planner.windows import pack_windows
from allocplan.runtime.apply import apply_plan
from allocplan.runtime.layers import find_moe_layers
from allocplan.weight_treatments import WEIGHT_TREATMENTS

from .compare import gap_closed, gap_closed_interval, mean_over_seeds, paired_bootstrap
from .methods import METHODS, PAPER_PROFILE, PLAIN, build_policy
from .metrics import arithmetic_accuracy, nll_and_activations, read_arithmetic

MODELS = ["ref-dsv2", "ref-olmoe", "ref-qwen3", "ref-deep"]
BUDGETS = [0.25, 0.33, 0.5, 0.67, 0.83]
MAIN_BUDGET = 0.5
SEQ_LEN = 256
MODES = list(EVAL_MODES)
BASELINES = [name for name in METHODS if name != "full"]  # the registry's order: uniform first
MATCHED = {f"{m}/eval-matched": m for m in ("naee", "top-p")}
DEFAULT = "allocplan"
COMPARED = [m for m in BASELINES if m != DEFAULT] + list(MATCHED)  # what the default must beat
# The refinement's ablation switches it the other way from the shipped default.
REFINE_DEFAULT = RefineConfig().refine
REFINE_LABEL = "allocplan −refine" if REFINE_DEFAULT else "allocplan +refine"
# allocplan's ablation: the default with one element changed (profile variant, routing, refine, allocation).
ABLATIONS = {
    "allocplan −weight fit": {"profile": "no-fit"},
    "allocplan −compensation": {"profile": "no-compensation"},
    "allocplan compensation=expert": {"profile": "expert"},
    "allocplan −drop order": {"profile": "no-order"},
    REFINE_LABEL: {"refine": not REFINE_DEFAULT},
    "allocplan −Alloc-T": {"token_level": False},
    "allocplan −Alloc-L": {"single_option": True},
    "allocplan −deploy profiling": {"profile": "deploy-less"},
}
# allocplan's default with each sequence its own Alloc-T budget (batch-invariant outputs), in every mode.
SEQUENCE_SCOPE = "allocplan scope=sequence"
PROFILE_VARIANTS = {
    "default": ProfileConfig(),
    "no-fit": ProfileConfig(weight_fit="off"),
    "no-compensation": ProfileConfig(compensation="off"),
    "expert": ProfileConfig(compensation="expert"),
    "no-order": ProfileConfig(drop_order=False),
}


# The gap-closed targets: (budget, eval mode, least share of the gap closed between uniform top-k at the same
# charged work and full k), judged in the causal modes (decode-b8 routes as a causal prefill of 8 sequences: a
# token's experts never depend on later tokens) on the lower end of the ratio's 95% bootstrap interval.
QUALITY_TARGETS = ((MAIN_BUDGET, "decode-b1", 0.70), (MAIN_BUDGET, "decode-b8", 0.70), (0.33, "decode-b1", 0.50),
                   (0.33, "decode-b8", 0.50))
# The single (k, stand-in rank) for every layer, the best the profile finds within the charged budget: what the
# DP's per-layer choice is measured against.
SINGLE_OPTION = "allocplan single (k, r)"
# The frontier's curves beside uniform top-k at whole k: (label, row key) at each budget, then the peers.
FRONTIER_CURVES = (("Alloc-T alone (fractional uniform)", "alloc-t"), ("paper's Alloc-L+T", "alloc-lt"),
                   ("allocplan default", DEFAULT))
FRONTIER_PEERS = ("naee", "top-p", "k2-peer", "lexi")
UNIFORM_CURVE = "uniform top-k (whole k)"
# Methods that only apply to some families: name -> (test on the model, why not where it fails).
APPLICABLE = {"k2-peer": ("renormalising", "the family does not renormalise its top-k weights, so there is no"
                                           " normaliser width to change")}


def study_calib_tokens(quick: bool) -> int:
    """Calibration tokens the study's profiles use (fewer in a smoke run)."""
    return 2048 if quick else ProfileConfig().calib_tokens


def study_refine(quick: bool) -> RefineConfig:
    """The refinement settings of the study's plans (fewer tokens in a smoke run)."""
    return RefineConfig(refine_tokens=1024) if quick else RefineConfig()


# The budgets the quality targets are judged at: each scored on at least WELL_SCORED_TOKENS eval tokens, the
# others on fewer. The results page names the budgets that reach it, from the JSON it renders.
TARGET_BUDGETS = tuple(sorted({budget for budget, _, _ in QUALITY_TARGETS}))
WELL_SCORED_TOKENS = 20000


def eval_tokens(budget: float, quick: bool) -> int:
    """Eval tokens scored: at least WELL_SCORED_TOKENS at the budgets the quality targets are judged at
    (TARGET_BUDGETS), 8,192 at the others."""
    if quick:
        return 2048
    return 24576 if budget in TARGET_BUDGETS else 8192


def evaluate_row(model: Any, tokenizer: Any, target: Any, windows: torch.Tensor, modes: list[str],
                 problems: Any) -> dict:
    """One method's row: NLL per mode (with per-window sums), activations, arithmetic exact match.

    ``target``: a Policy, an Allocation, or None (the untouched model).
    """
    if target is None:
        handle = None
    elif hasattr(target, "apply"):
        handle = target.apply(model)
    else:
        handle = apply_plan(model, target)
    try:
        row = {"modes": {}}
        for mode in modes:
            result = nll_and_activations(model, windows, handle, mode)
            row["modes"][mode] = {key: result[key] for key in (
                "nll", "window_nll", "activations_per_token", "activations_per_layer", "stand_in_work_per_token",
                "charged_work_per_token")}
        if problems is not None:
            if handle is not None:
                handle.reset()
            row["arith_accuracy"] = arithmetic_accuracy(model, tokenizer, problems, handle)
        return row
    finally:
        if handle is not None:
            handle.remove()


def holdout_nll(model: Any, target: Any, windows: torch.Tensor) -> dict:
    """Prefill NLL on the calibration holdout (how defaults are chosen: never eval text): the mean
    per token (``nll``) and each window's sum (``window_nll``, for the paired intervals)."""
    handle = apply_plan(model, target)
    try:
        result = nll_and_activations(model, windows, handle, "prefill")
    finally:
        handle.remove()
    return {"nll": result["nll"], "window_nll": result["window_nll"]}


def renormalising(model: Any) -> bool:
    """Whether the model's family rescales its chosen top-k weights to sum to one."""
    from allocplan.planner.treatments import renormalises
    from allocplan.runtime.layers import model_family

    return renormalises(find_moe_layers(model)[0], model_family(model))


def uniform_k_rows(model: Any, tokenizer: Any, windows: torch.Tensor) -> dict[str, dict]:
    """Plain uniform top-k at every whole k below the original (every layer at min(k, K_l)), in every mode:
    the frontier's uniform points and the two ends of the time-sharing baseline at any work between them."""
    from allocplan.runtime.allocation_builder import allocation_for

    originals = [layer.top_k for layer in find_moe_layers(model)]
    return {str(k): evaluate_row(model, tokenizer, allocation_for(model, [min(k, o) for o in originals],
                                                                  RoutingConfig(token_level=False)), windows, MODES, None)
            for k in range(1, max(originals))}


def same_work_uniform(uniform_k: dict[str, dict], full: dict, mode: str, work: float, layers: int,
                      windows: int) -> dict:
    """Uniform top-k at ``work`` expert-equivalents per token by time-sharing: a share t of the text at the
    whole k above work / layers and 1 - t at the k below, so its NLL (and each window's) is the
    interpolation of the two rows' (first ``windows`` windows); at or above full work, the full model."""
    per_layer = work / layers
    low = max(1, min(int(per_layer), len(uniform_k) + 1))
    high = low + 1
    t = min(max(per_layer - low, 0.0), 1.0)

    def sums(k: int) -> list[float]:
        row = full if k > len(uniform_k) else uniform_k[str(k)]
        return row["modes"][mode]["window_nll"][:windows]

    window_nll = [(1 - t) * a + t * b for a, b in zip(sums(low), sums(high))]
    return {"work": work, "k_low": low, "k_high": high, "share_high": t, "window_nll": window_nll}


def single_option_allocation(profile: Any, budget: float, routing: RoutingConfig) -> Any:
    """One (k, stand-in rank) for every layer: the pair of least summed S whose charged work fits the budget."""
    from allocplan.formats.budget import BudgetRequest
    from allocplan.planner.solve import charged_work

    originals = [layer.original_k for layer in profile.layers]
    total = BudgetRequest(ratio=budget).resolve(sum(originals), len(originals))
    ranks = sorted({rank for layer in profile.layers for rank in (layer.stand_in_sensitivity or {})})
    best = None
    for k in range(1, max(originals) + 1):
        for rank in [None, *ranks]:
            ks = [min(k, o) for o in originals]
            layer_ranks = [None if kk == o else rank for kk, o in zip(ks, originals)]
            experts, stand_in = charged_work(profile, ks, layer_ranks)
            if experts + stand_in > total + 1e-9:
                continue
            cost = sum(layer.sensitivity[kk] if r is None else layer.stand_in_sensitivity[r][kk]
                       for layer, kk, r in zip(profile.layers, ks, layer_ranks))
            if best is None or cost < best[0]:
                best = (cost, ks, layer_ranks)
    return allocation_from_profile(profile, best[1], routing, best[2])


def calibration_windows(tokenizer: Any, calib_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the calibration holdout: the calibration windows right after the ones profiles use, the windows that
    set the threshold methods' thresholds: the first 4,096 tokens)."""
    all_calib, _ = pack_windows(tokenizer, DEFAULT_CALIBRATION, max_tokens=calib_tokens + 8192, seq_len=SEQ_LEN)
    return all_calib[calib_tokens // SEQ_LEN :], all_calib[: 4096 // SEQ_LEN]


def study_profile(model: Any, tokenizer: Any, name: str, config: ProfileConfig, calib_tokens: int,
                  routing: RoutingConfig) -> Any:
    """A profile of bundled model ``name`` with ``config`` on ``calib_tokens`` calibration tokens, probing with
    ``routing``."""
    return profile_model(model, tokenizer, dataclasses.replace(config, calib_tokens=calib_tokens), routing,
                         model_name=f"bundled:{name}")


def method_policy(model: Any, method: str, budget: float, plain_profile: Any, threshold_windows: torch.Tensor) -> Any:
    """Registered method ``method`` at ``budget``, given the paper's plain profile or the calibration windows
    where it needs them."""
    registered = METHODS[method]
    return build_policy(model, method, budget, sensitivity=plain_profile if registered.needs_profile else None,
                        calib_windows=threshold_windows if registered.needs_calibration else None)


def variant_plan(model: Any, tokenizer: Any, profiles: dict, budget: float, routing: RoutingConfig,
                 refine: RefineConfig, calib_tokens: int, variant: dict) -> tuple[Any, Any]:
    """(allocation, plan) of allocplan's default with one element changed by ``variant`` (``ABLATIONS``'
    values, or ``{}`` for the default itself; the plan is None for the single-option variant)."""
    profile = profiles[variant.get("profile", "default")]
    plan_routing = dataclasses.replace(routing, token_level=variant.get("token_level", routing.token_level),
                                       scope=variant.get("scope", routing.scope))
    if variant.get("single_option"):
        # Every element of the default but the per-layer choice: one (k, stand-in rank) for every layer, the
        # best the profile finds within the same charged budget (stand-ins and treatments included).
        return single_option_allocation(profile, budget, plan_routing), None
    plan = solve_profile(profile, budget, plan_routing)
    if variant.get("refine", refine.refine):
        plan = refined(model, tokenizer, plan, profile, dataclasses.replace(
            PROFILE_VARIANTS["default"], calib_tokens=calib_tokens), plan_routing, refine)
    return plan.allocation, plan


def evaluate_model(name: str, budgets: list[float], quick: bool, eval_text: Path, arith: Path) -> dict:
    """Every method, allocplan's default and its ablations on bundled model ``name`` at each budget, scored
    on ``eval_text`` (NLL, three modes) and ``arith`` (exact match, at the main budget): the JSON of
    docs/results.md for one model. ``quick``: fewer tokens and seeds (a smoke run)."""
    torch.manual_seed(0)
    started = time.time()
    model, tokenizer = load_model(f"bundled:{name}")
    problems = read_arithmetic(arith)
    calib_tokens = study_calib_tokens(quick)
    holdout, threshold_windows = calibration_windows(tokenizer, calib_tokens)
    routing = RoutingConfig()
    refine = study_refine(quick)

    def profiled(config: ProfileConfig, probe_routing: RoutingConfig = routing):
        return study_profile(model, tokenizer, name, config, calib_tokens, probe_routing)

    profiles = {key: profiled(config) for key, config in PROFILE_VARIANTS.items()}
    # The paper's Alloc-L profile: plain top-k probes, no treatment, no compensation.
    profiles["plain"] = profiled(PAPER_PROFILE, PLAIN)
    # Measured without the treatments in place, but deployed with them (element 4's ablation).
    plain_deploy = profiled(PAPER_PROFILE)
    default_profile = profiles["default"]
    # A profiler that measures without what the plan deploys sees no stand-ins either: every option reads the
    # plain sensitivity.
    profiles["deploy-less"] = dataclasses.replace(default_profile, layers=tuple(
        dataclasses.replace(row, sensitivity=plain.sensitivity, stand_in_sensitivity=None if row.stand_in_sensitivity
                            is None else {rank: plain.sensitivity for rank in row.stand_in_sensitivity})
        for row, plain in zip(default_profile.layers, plain_deploy.layers)))
    print(f"[{name}] profiles in {time.time() - started:.0f}s", flush=True)

    out = {"model": name, "budgets": {}, "eval_tokens": {}, "arith_problems": len(problems),
           "sensitivity": {row.path: row.sensitivity for row in default_profile.layers},
           "stand_in_sensitivity": {row.path: row.stand_in_sensitivity for row in default_profile.layers},
           "paper_sensitivity": {row.path: row.sensitivity for row in profiles["plain"].layers},
           "sensitivity_metric": default_profile.measurement.metric,
           "compensation": default_profile.measurement.compensation,
           "moe_layers": len(default_profile.layers)}
    not_applicable = {method: why for method, (test, why) in APPLICABLE.items()
                      if test == "renormalising" and not renormalising(model)}
    largest, _ = pack_windows(tokenizer, eval_text, max_tokens=max(eval_tokens(b, quick) for b in budgets),
                              seq_len=SEQ_LEN, what="eval")
    out["uniform_k"] = uniform_k_rows(model, tokenizer, largest)
    print(f"[{name}] uniform k rows at {time.time() - started:.0f}s", flush=True)
    for budget in budgets:
        windows, record = pack_windows(tokenizer, eval_text, max_tokens=eval_tokens(budget, quick), seq_len=SEQ_LEN,
                                       what="eval")
        out["eval_tokens"][str(budget)] = windows.shape[0] * (SEQ_LEN - 1)
        if not torch.equal(windows, largest[: windows.shape[0]]):  # the uniform k rows pair window by window
            raise RuntimeError("eval windows of a smaller budget are not a prefix of the largest set")
        arith = problems if budget == MAIN_BUDGET else None  # the arithmetic target is judged at 0.5
        full = evaluate_row(model, tokenizer, None, windows, MODES, arith)
        rows, holdout_rows, extra = {"full": full}, {}, {}
        for method in BASELINES:
            if method in not_applicable:
                continue
            if method == "random":
                rows[method] = mean_over_seeds([evaluate_row(model, tokenizer, build_policy(model, method, budget, seed=s),
                                                       windows, MODES, arith) for s in range(1 if quick else 3)])
                continue
            policy = method_policy(model, method, budget, profiles["plain"], threshold_windows)
            rows[method] = evaluate_row(model, tokenizer, policy, windows, MODES, arith)
            rows[method]["parameter"] = policy.parameter
        for matched, method in MATCHED.items():
            policy = build_policy(model, method, budget, calib_windows=windows)
            rows[matched] = evaluate_row(model, tokenizer, policy, windows, MODES, arith)
            rows[matched]["parameter"] = policy.parameter

        def plan_for(variant: dict):
            return variant_plan(model, tokenizer, profiles, budget, routing, refine, calib_tokens, variant)

        allocation, plan = plan_for({})
        rows[DEFAULT] = evaluate_row(model, tokenizer, allocation, windows, MODES, arith)
        rows[SEQUENCE_SCOPE] = evaluate_row(model, tokenizer, plan_for({"scope": "sequence"})[0], windows, MODES, arith)
        holdout_rows[DEFAULT] = holdout_nll(model, allocation, holdout)
        single = single_option_allocation(profiles["default"], budget, routing)
        rows[SINGLE_OPTION] = evaluate_row(model, tokenizer, single, windows, MODES, None)
        extra["plan"] = {"k": [e.planned_k for e in allocation.layers],
                         "stand_in_rank": [e.stand_in_rank for e in allocation.layers],
                         **{t.field: [e.treatment(t.field) for e in allocation.layers]
                            for t in WEIGHT_TREATMENTS.values()},
                         "refinement": dataclasses.asdict(plan.solver.refinement) if plan.solver.refinement else None,
                         "dp_objective": plan.solver.dp_objective,
                         "budget": dataclasses.asdict(plan.budget)}
        extra["single_option"] = {"k": [e.planned_k for e in single.layers],
                                  "stand_in_rank": [e.stand_in_rank for e in single.layers]}
        extra["paper_plan"] = {"k": [e.planned_k for e in solve_profile(profiles["plain"], budget, PLAIN).layers]}
        for label, variant in ABLATIONS.items():
            variant_allocation, _ = plan_for(variant)
            rows[label] = evaluate_row(model, tokenizer, variant_allocation, windows, ["prefill"], None)
            holdout_rows[label] = holdout_nll(model, variant_allocation, holdout)
        if budget == MAIN_BUDGET:
            extra["exact_decode"] = exact_decode_check(model, rows, windows, allocation,
                                                       build_policy(model, "uniform", budget))
        uniform = {mode: rows["uniform"]["modes"][mode]["nll"] for mode in MODES}
        for row in rows.values():
            for mode, values in row["modes"].items():
                values["gap_closed"] = gap_closed(values["nll"], full["modes"][mode]["nll"], uniform[mode])
        # The default against uniform top-k at the same charged work (time-sharing), each mode with the ratio's
        # window-bootstrap interval: what the targets are judged on.
        same_work = {}
        for mode in MODES:
            default_mode = rows[DEFAULT]["modes"][mode]
            baseline = same_work_uniform(out["uniform_k"], full, mode, default_mode["charged_work_per_token"],
                                         len(default_profile.layers), windows.shape[0])
            same_work[mode] = {**{key: value for key, value in baseline.items() if key != "window_nll"},
                               "uniform_nll": sum(baseline["window_nll"]) / (windows.shape[0] * (SEQ_LEN - 1)),
                               **gap_closed_interval(default_mode["window_nll"], full["modes"][mode]["window_nll"],
                                                     baseline["window_nll"])}
        bootstrap = {
            other: {mode: paired_bootstrap(rows[DEFAULT]["modes"][mode]["window_nll"], rows[other]["modes"][mode]
                                           ["window_nll"], SEQ_LEN - 1) for mode in MODES}
            for other in COMPARED if other in rows
        }
        # The per-layer part alone: the paper's Alloc-L against uniform k, and the DP's (k, r) against the best
        # single (k, r), default minus other in decode-b1.
        per_layer = {
            "alloc-l vs uniform": paired_bootstrap(rows["alloc-l"]["modes"]["decode-b1"]["window_nll"],
                                                   rows["uniform"]["modes"]["decode-b1"]["window_nll"], SEQ_LEN - 1),
            "default vs single (k, r)": paired_bootstrap(rows[DEFAULT]["modes"]["decode-b1"]["window_nll"],
                                                         rows[SINGLE_OPTION]["modes"]["decode-b1"]["window_nll"],
                                                         SEQ_LEN - 1)}
        out["budgets"][str(budget)] = {"rows": rows, "holdout_nll": holdout_rows, "bootstrap": bootstrap,
                                       "same_work": same_work, "per_layer": per_layer,
                                       "not_applicable": not_applicable,
                                       "target_activations": rows["uniform"]["modes"]["prefill"]["activations_per_token"],
                                       **extra}
        print(f"[{name}] budget {budget}: done at {time.time() - started:.0f}s", flush=True)
    out["seconds"] = round(time.time() - started)
    return out


def exact_decode_check(model: Any, rows: dict, windows: torch.Tensor, allocation: Any, uniform_policy: Any) -> dict:
    """Token-by-token decoding through the KV cache against the pooled decode modes, on a few windows."""
    checked = {"decode-b1": windows[:2], "decode-b8": windows[:8]}
    worst = 0.0
    for row_name, target in ((DEFAULT, allocation), ("uniform", uniform_policy)):
        handle = target.apply(model) if hasattr(target, "apply") else apply_plan(model, target)
        try:
            for mode, part in checked.items():
                exact = nll_and_activations(model, part, handle, mode, exact_decode=True)["window_nll"]
                pooled = rows[row_name]["modes"][mode]["window_nll"][: part.shape[0]]
                worst = max(worst, max(abs(a - b) for a, b in zip(exact, pooled)) / (part.shape[1] - 1))
        finally:
            handle.remove()
    return {"windows": {mode: part.shape[0] for mode, part in checked.items()}, "max_per_token_difference": worst}
