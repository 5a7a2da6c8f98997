"""``allocplan report``: a plan as a reviewer reads it, in markdown, with pictures.

The markdown holds the budget arithmetic, one row per layer (k, what the layer
keeps, its treatment), the routing, compensation, solver and refinement, and
provenance. The pictures (PNG, drawn with matplotlib, an optional extra) are the
per-layer k against the original, and, with the profile the plan was solved
from, the heat map of S[l, k] with each layer's chosen k marked. No torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import AllocplanError
from .formats.plan import Plan
from .formats.profile import SensitivityProfile
from .formats.sidecar import sidecar_tensor_names
from .standins import get_stand_in_kind
from .weight_treatments import WEIGHT_TREATMENTS


def report_markdown(plan: Plan, profile: SensitivityProfile | None = None, pictures: list[str] | None = None) -> str:
    """The report's markdown (``pictures``: PNG file names to link, beside the markdown)."""
    budget, solver = plan.budget, plan.solver
    ratio = f"ratio {budget.ratio:g} of " if budget.ratio is not None else ""
    lines = [f"# allocplan plan for {plan.model.name}", "",
             f"{plan.model.model_type}, fingerprint `{plan.model.fingerprint}`, {plan.model.num_moe_layers} MoE layers"
             f" of {plan.model.num_experts} routed experts.", "",
             "## Budget", "",
             f"{budget.planned_activations:g} routed activations per token planned, against a budget of"
             f" {budget.total_activations} ({ratio}the model's {budget.original_activations});"
             f" {budget.planned_activations / budget.original_activations:.0%} of the original work in the routed"
             " experts.", ""]
    if budget.charged_work is not None:
        lines += [f"Charged work (experts plus the stand-ins that serve dropped candidates, in expert-equivalents"
                  f" per token): {budget.planned_activations:g} + {budget.stand_in_work:.4g} ="
                  f" {budget.charged_work:.4g} of {budget.total_activations}"
                  f" ({budget.charged_work / budget.original_activations:.1%} of the original work)."
                  f" The stand-ins' sidecar is {budget.sidecar_bytes:,} bytes,"
                  f" {budget.sidecar_share:.1%} of the routed experts' weights.", ""]
    else:
        lines += ["This plan predates the charged budget (schema version 2): its budget counts routed experts only,"
                  " not the stand-ins it runs.", ""]
    lines += ["## Layers", "",
              "| layer | module | original k | planned k | keeps | stand-in rank | "
              + " | ".join(t.header for t in WEIGHT_TREATMENTS.values()) + " |",
              "| --- | --- | --- | --- | --- | --- |" + " --- |" * len(WEIGHT_TREATMENTS)]
    for e in plan.layers:
        rank = "-" if e.stand_in_rank is None else ("constant" if e.stand_in_rank == 0 else str(e.stand_in_rank))
        if e.stand_in_rank is None and plan.compensation is not None and not plan.allocation.ranked_stand_ins:
            rank = "sidecar's"
        lines.append(f"| {e.index} | `{e.path}` | {e.original_k} | {e.planned_k:g} | {e.planned_k / e.original_k:.0%} |"
                     f" {rank} | " + " | ".join(t.cell(e.treatment(t.field)) for t in WEIGHT_TREATMENTS.values()) + " |")
    token_level, weights = plan.token_level, plan.weights
    lines += ["", "## Routing", ""]
    if token_level.enabled:
        lines.append(f"Token-level allocation (Alloc-T) on, scope {token_level.scope}: every real token keeps its"
                     f" best {token_level.k_base} expert(s); the layer's other pairs go to the best remaining"
                     f" candidates among the top-{token_level.k_max or 'K'} of each token.")
    else:
        lines.append("Every token routes to its top-k of the layer (no token-level allocation).")
    lines.append(f"Weights: `{weights.renormalize}`" + (f", reference k {weights.reference_k}" if weights.reference_k
                                                          else "") + ".")
    if plan.compensation is not None:
        ordered = plan.compensation_data is not None and any(
            name.endswith(".order") for name in sidecar_tensor_names(plan.compensation_data))
        lines.append(f"Compensation: `{plan.compensation.kind}` stand-ins for dropped experts"
                     f" ({get_stand_in_kind(plan.compensation.kind).summary})"
                     + (", with a drop order (each expert's selection score times a factor that grows with its"
                        " stand-in's miss, so the best-served candidates are dropped first)" if ordered else "")
                     + f", in `{plan.compensation.file}` ({plan.compensation.sha256[:23]}…).")
    lines += ["", "## Solver", "",
              f"Objective {solver.dp_objective:.6g} {solver.metric} (DP) = {solver.ilp_objective:.6g} (ILP,"
              f" {solver.ilp_status})."]
    if solver.refinement is not None:
        r = solver.refinement
        steps = "; ".join(f"layer {s.from_layer} -> layer {s.to_layer} ({s.objective:.6g})" for s in r.steps) or "none"
        lines.append(f"Refinement: measured calibration {r.metric} {r.objective_before:.6g} -> {r.objective_after:.6g},"
                     f" {r.measured} allocations measured; moves: {steps}.")
    provenance = plan.provenance
    lines += ["", "## Provenance", "",
              f"allocplan {provenance.allocplan_version}, torch {provenance.torch_version}, transformers"
              f" {provenance.transformers_version}; strategy {provenance.strategy}, k_min {provenance.k_min};"
              f" calibration {provenance.calibration.source} `{provenance.calibration.name}`"
              + (f" field `{provenance.calibration.text_field}`" if provenance.calibration.text_field else "")
              + f" ({provenance.calibration.tokens} tokens,"
              f" {provenance.calibration.sha256[:23]}…); profile {provenance.profile_sha256[:23]}…."]
    if profile is not None and profile.content_hash() != provenance.profile_sha256:
        lines += ["", f"**The given profile ({profile.content_hash()[:23]}…) is not the one this plan was solved"
                      " from.**"]
    for name in pictures or []:
        lines += ["", f"![{name}]({name})"]
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AllocplanError("pictures need matplotlib: pip install 'allocplan[report]' (or --no-pictures)") from None
    return plt


def draw_k_bars(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Per-layer original and planned k as bars."""
    plt = _pyplot()
    indices = [e.index for e in plan.layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(indices) + 2), 3.2))
    ax.bar(indices, [e.original_k for e in plan.layers], color="#d9d9d9", label="original k")
    ax.bar(indices, [e.planned_k for e in plan.layers], color="#3b75af", label="planned k")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("experts per token")
    ax.set_title(f"{plan.model.name}: {plan.budget.planned_activations:g} of {plan.budget.original_activations}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_sensitivity(plan: Plan, profile: SensitivityProfile, path: str | os.PathLike[str]) -> None:
    """Heat map of S[l, k] (rows: layers, columns: k), each layer's planned k outlined."""
    plt = _pyplot()
    grid = sorted({k for row in profile.layers for k in row.sensitivity})
    values = [[row.sensitivity.get(k, float("nan")) for k in grid] for row in profile.layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(grid) + 2), max(3.0, 0.35 * len(values) + 1.5)))
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label=f"S[l, k] ({profile.measurement.metric}, nats/token)")
    planned = {e.path: e.planned_k for e in plan.layers}
    for i, row in enumerate(profile.layers):
        k = planned.get(row.path)
        if k in grid:
            j = grid.index(k)
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(grid)), [f"{k:g}" for k in grid])
    ax.set_yticks(range(len(values)), [str(row.index) for row in profile.layers])
    ax.set_xlabel("k")
    ax.set_ylabel("decoder layer")
    ax.set_title("sensitivity, planned k outlined")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(plan: Plan, directory: str | os.PathLike[str], profile: SensitivityProfile | None = None,
                 pictures: bool = True) -> list[Path]:
    """Write report.md (and k.png, sensitivity.png) into ``directory`` (created if missing); returns
    the files written."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AllocplanError(f"report directory {str(directory)!r} is a file; give a directory")
    if profile is not None and (profile.model.model_type, profile.model.fingerprint) != (
            plan.model.model_type, plan.model.fingerprint):
        # Another profile of the same model is worth a report (it says it is not the plan's own); another
        # model's sensitivities drawn beside this plan's layers are not.
        raise AllocplanError(
            f"the profile is of {profile.model.name!r} ({profile.model.model_type}, {profile.model.fingerprint}) but"
            f" the plan is for {plan.model.name!r} ({plan.model.model_type}, {plan.model.fingerprint}); give the"
            " profile the plan was solved from, or leave --profile out")
    if pictures:
        _pyplot()  # a missing matplotlib fails before anything is written
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AllocplanError(f"cannot create report directory {str(directory)!r}: {exc.strerror or exc}") from None
    names = []
    if pictures:
        draw_k_bars(plan, directory / "k.png")
        names.append("k.png")
        if profile is not None:
            draw_sensitivity(plan, profile, directory / "sensitivity.png")
            names.append("sensitivity.png")
    from .formats.records import atomic_write_text

    atomic_write_text(directory / "report.md", report_markdown(plan, profile, names))
    return [directory / "report.md", *(directory / name for name in names)]
