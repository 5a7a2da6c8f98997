"""Text the CLI prints: plan tables, and one-line summaries of eval and bench results.

Every function returns lines (no printing), so the CLI stays a thin layer and the
formats are tested without running a command.
"""

from __future__ import annotations

import json
from typing import Any

from .formats.plan import Plan
from .formats.records import to_data


def to_json(data: Any) -> str:
    """Stable JSON for stdout (sorted keys, indented)."""
    return json.dumps(data, indent=2, sort_keys=True)


def plan_data(plan: Plan) -> dict[str, Any]:
    """A plan as the plain data its YAML file holds (for ``--json``)."""
    return to_data(plan)


def plan_lines(plan: Plan) -> list[str]:
    """The per-layer table of a plan, then its budget and objectives."""
    rows = [("layer", "module", "original_k", "planned_k", "stand_in_rank")]
    rows += [(str(e.index), e.path, str(e.original_k), f"{e.planned_k:g}",
              "-" if e.stand_in_rank is None else str(e.stand_in_rank)) for e in plan.layers]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.rjust(w) if i != 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    budget = plan.budget
    ratio = f"ratio {budget.ratio:g}, " if budget.ratio is not None else ""
    lines.append(
        f"activations per token: {budget.planned_activations:g} of {budget.original_activations}"
        f" ({ratio}budget {budget.total_activations});"
        + (f" charged work {budget.planned_activations:g} + {budget.stand_in_work:.4g} stand-ins ="
           f" {budget.charged_work:.4g}; sidecar {budget.sidecar_share:.1%} of the expert weights;"
           if budget.charged_work is not None else "")
        + f" objective {plan.solver.dp_objective:.6g} {plan.solver.metric} (DP) ="
        f" {plan.solver.ilp_objective:.6g} (ILP, {plan.solver.ilp_status})"
    )
    return lines


def eval_lines(result: dict[str, Any]) -> list[str]:
    """NLL, arithmetic and activations of an ``allocplan eval`` result, then activations per layer."""
    arith = f", arithmetic {result['arith_accuracy']:.3f}" if "arith_accuracy" in result else ""
    lines = [f"{result['policy']}: {result.get('mode', 'prefill')} NLL {result['nll']:.4f}"
             f" (ppl {result['perplexity']:.2f}){arith}, {result['activations_per_token']:.3f} activations per token"
             + (f" + {result['stand_in_work_per_token']:.3f} stand-in work = {result['charged_work_per_token']:.3f}"
                " expert-equivalents charged" if result.get("stand_in_work_per_token") else "")]
    lines += [f"  {path}: {value:.3f}" for path, value in result["activations_per_layer"].items()]
    return lines


def bench_lines(result: dict[str, Any]) -> list[str]:
    """Shares of the work, then per measure: times, speed-ups with spread, and the bound."""
    lines = [f"{result['label']}: budget {result['budget']:.3f}, f_routed_weights {result['f_routed_weights']:.2f},"
             f" f_routed_flops {result['f_routed_flops']:.2f}, f_moe_time {result['f_moe_time']:.2f}"]
    for name in result["ideal_speedup"]:  # prefill_s, decode_b1_s_per_token, decode_b<N>_s_per_step
        r = result[name]
        same = r.get("speedup_same_path")
        lines.append(
            f"  {name}: {r['untouched']['median'] * 1e3:.1f} ms -> {r['planned']['median'] * 1e3:.1f} ms,"
            f" speed-up {r['speedup']['median']:.2f}x [{r['speedup']['min']:.2f}, {r['speedup']['max']:.2f}]"
            + (f", {same['median']:.2f}x against full k on the same experts path" if same else "")
            + f"; bound {result['ideal_speedup'][name]:.2f}x, {result['achieved_fraction'][name]:.0%} of it"
            + "".join(f"; {label} {v['over_planned']['median']:.3f}x the plan's time"
                      + (f" (95% interval {v['over_planned_interval']['low']:.3f}-{v['over_planned_interval']['high']:.3f}"
                         f" over {len(v['rounds'])} rounds)" if "over_planned_interval" in v else "")
                      for label, v in r.get("variants", {}).items())
        )
    work = result.get("work_per_token")
    if work is not None:
        lines.append(f"  work per token (batched decode): {work['experts']:.3f} at the experts + {work['stand_ins']:.3f}"
                     f" at the stand-ins = {work['charged']:.3f} expert-equivalents charged")
    for name, counts in result.items():
        if name.endswith("_distinct_experts"):  # decode_b<N>_distinct_experts
            lines.append(f"  {name}: {counts['untouched']:.1f} untouched -> {counts['planned']:.1f} planned"
                         " distinct experts per step and MoE layer")
    return lines


def diff_lines(result: Any, a_name: str, b_name: str) -> list[str]:
    """A plan diff (``allocplan.formats.diff.PlanDiff``): differences by kind, k changes with their Δ, a verdict."""
    if not result.differences:
        return [f"{a_name} and {b_name} are the same plan"]
    lines = []
    for kind in ("behaviour", "budget", "record"):
        rows = [d for d in result.differences if d.kind == kind]
        if rows:
            lines.append(f"{kind} ({len(rows)}):")
            for d in rows:
                delta = ""
                if d.field.endswith("planned_k") and all(isinstance(v, (int, float)) for v in (d.a, d.b)):
                    delta = f"  (Δk {d.b - d.a:+g})"
                lines.append(f"  {d.field}: {_short(d.a)} -> {_short(d.b)}{delta}")
    verdict = "equivalent (record differences only)" if result.equivalent else "different"
    return lines + [f"{a_name} vs {b_name}: {verdict}"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"
