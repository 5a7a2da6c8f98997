"""``allocplan eval``: load a model, apply a plan or a registered method, score it on held-out text."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..bundled import DEFAULT_CALIBRATION
from ..errors import AllocplanError
from ..formats.config import LoadConfig
from ..formats.plan import load_plan
from ..formats.profile import load_profile
from ..loading import load_model
from .methods import DEFAULT_SEED, METHODS, PAPER_PROFILE, PLAIN, build_policy, get_method
from .metrics import evaluate

# Calibration tokens that threshold methods are calibrated on (never the eval data).
THRESHOLD_CALIBRATION_TOKENS = 4096


def check_profile_matches(measured: Any, model: Any, path: Any) -> None:
    """Raise unless the profile ``measured`` (read from ``path``) was measured on ``model``'s architecture."""
    from allocplan.runtime.layers import identity_mismatch

    mismatch = identity_mismatch(measured.model, model)
    if mismatch is not None:
        raise AllocplanError(f"profile {str(path)!r} was measured on {mismatch}; profile this model"
                             " (allocplan profile --model ...)")


def _check_unused_inputs(registered: Any, budget_ratio: float | None, calib: Any, profile: Any,
                         seed: int | None) -> None:
    """Refuse an input the evaluation would not read, so that nobody believes it was used.

    Raises:
        AllocplanError: ``--budget`` with a plan or ``full``; ``--profile`` for a method that solves no
            profile; ``--calib`` for one that neither profiles nor calibrates (or with a plan); ``--seed``
            for one that draws nothing at random.
    """
    what = f"--method {registered.name}" if registered is not None else "a plan"
    if budget_ratio is not None and (registered is None or registered.name == "full"):
        reason = "it runs every expert" if registered is not None else "it carries its own"
        raise AllocplanError(f"{what} takes no --budget ({reason}); leave --budget out")
    if profile is not None and not (registered is not None and registered.needs_profile):
        users = ", ".join(name for name, m in METHODS.items() if m.needs_profile)
        raise AllocplanError(f"{what} reads no --profile (only --method {users} do); leave --profile out")
    if calib is not None and not (registered is not None and (registered.needs_profile or registered.needs_calibration)):
        raise AllocplanError(f"{what} reads no --calib (it calibrates nothing); leave --calib out")
    if seed is not None and not (registered is not None and registered.seeded):
        users = ", ".join(name for name, m in METHODS.items() if m.seeded)
        raise AllocplanError(f"{what} draws nothing at random (--seed seeds --method {users}); leave --seed out")


def run_eval(
    model_name: str,
    *,
    data: str | Path,
    plan: str | Path | None = None,
    method: str | None = None,
    budget_ratio: float | None = None,
    arith: str | Path | None = None,
    calib: str | Path | None = None,
    profile: str | Path | None = None,
    seed: int | None = None,
    seq_len: int = 256,
    max_tokens: int = 16384,
    load: LoadConfig | None = None,
    mode: str = "prefill",
    exact_decode: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model_name`` under a plan file or a registered method at a budget.

    Methods that need a sensitivity profile use ``profile`` or profile ``calib`` now;
    threshold methods are calibrated on ``calib``; neither ever sees ``data``. The NLL is
    measured in ``mode`` (:data:`~allocplan.evaluation.metrics.EVAL_MODES`: prefill, or decoding
    token by token at batch 1 or 8, where Alloc-T has one or eight tokens to pool);
    ``exact_decode`` decodes for real rather than by the equivalent pooled forward.

    Returns:
        The JSON-ready result: NLL, perplexity, arithmetic, activations, and what was evaluated.

    Raises:
        AllocplanError: neither or both of plan and method, a method without a budget, ``exact_decode`` in
            prefill mode, or bad inputs.
    """
    if (plan is None) == (method is None):
        raise AllocplanError("give exactly one of --plan PLAN or --method NAME")
    if str(data) == "-" and calib is not None and str(calib) == "-":
        raise AllocplanError("--data and --calib are both standard input, so a method would calibrate on the eval"
                             " text; give one of them as a file")
    if exact_decode and mode == "prefill":
        raise AllocplanError("--exact-decode applies to the decode modes only; add --mode decode-b1 or decode-b8,"
                             " or leave it out")
    registered = get_method(method) if method is not None else None
    if registered is not None and registered.name != "full" and budget_ratio is None:
        raise AllocplanError(f"--method {method} needs --budget RATIO")
    _check_unused_inputs(registered, budget_ratio, calib, profile, seed)
    model, tokenizer = load_model(model_name, load)
    calib = calib or DEFAULT_CALIBRATION
    parameter = None
    if plan is not None:
        loaded = load_plan(plan)
        from allocplan.runtime.apply import apply_plan

        handle = apply_plan(model, loaded)
        label, target = f"plan {plan}", loaded.budget.total_activations
    else:
        measured = None
        if registered.needs_profile:
            from allocplan.planner.profiling import profile_model

            if profile:  # a stored profile may be another model's; one measured here is this model's
                measured = load_profile(profile)
                check_profile_matches(measured, model, profile)
            else:
                # Calibration windows as long as the eval's (make_results' profiles and eval windows are both 256).
                config = replace(PAPER_PROFILE, calib=str(calib), seq_len=seq_len,
                                 calib_tokens=max(PAPER_PROFILE.calib_tokens, seq_len))
                measured = profile_model(model, tokenizer, config, PLAIN, model_name=model_name)
        windows = None
        if registered.needs_calibration:
            from allocplan.planner.windows import pack_windows

            windows, _ = pack_windows(tokenizer, calib, max_tokens=THRESHOLD_CALIBRATION_TOKENS, seq_len=seq_len)
        policy = build_policy(model, registered.name, budget_ratio or 1.0, profile=measured, calib_windows=windows,
                              seed=DEFAULT_SEED if seed is None else seed)
        handle, parameter = policy.apply(model), policy.parameter
        label, target = registered.name, policy.target
    try:
        result = evaluate(model, tokenizer, data=data, arith=arith, handle=handle, seq_len=seq_len,
                          max_tokens=max_tokens, mode=mode, exact_decode=exact_decode)
    finally:
        if handle is not None:
            handle.remove()
    return {"model": model_name, "policy": label, "budget_ratio": budget_ratio, "parameter": parameter,
            "target_activations_per_token": target, **result}
