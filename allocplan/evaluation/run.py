"""``allocplan eval``: load a model, apply a plan or a registered method, score it on held-out text."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..bundled import DEFAULT_CALIBRATION
from ..errors import AllocplanError
from ..formats.config import EvalConfig, LoadConfig
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


def _check_unused_inputs(registered: Any, config: EvalConfig) -> None:
    """Refuse an input the evaluation would not read, so that nobody believes it was used.

    Raises:
        AllocplanError: ``--budget`` with a plan or ``full``; ``--profile`` for a method that solves no
            profile; ``--calib`` for one that neither profiles nor calibrates (or with a plan); ``--seed``
            for one that draws nothing at random.
    """
    what = f"--method {registered.name}" if registered is not None else "a plan"
    if config.budget is not None and (registered is None or registered.name == "full"):
        reason = "it runs every expert" if registered is not None else "it carries its own"
        raise AllocplanError(f"{what} takes no --budget ({reason}); leave --budget out")
    if config.profile_file is not None and not (registered is not None and registered.needs_profile):
        users = ", ".join(name for name, m in METHODS.items() if m.needs_profile)
        raise AllocplanError(f"{what} reads no --profile (only --method {users} do); leave --profile out")
    if config.calib is not None and not (registered is not None
                                         and (registered.needs_profile or registered.needs_calibration)):
        raise AllocplanError(f"{what} reads no --calib (it calibrates nothing); leave --calib out")
    if config.seed is not None and not (registered is not None and registered.seeded):
        users = ", ".join(name for name, m in METHODS.items() if m.seeded)
        raise AllocplanError(f"{what} draws nothing at random (--seed seeds --method {users}); leave --seed out")


def check_eval_inputs(config: EvalConfig) -> Any:
    """Check ``config`` against the method registry before any model loads; the method, or None for a plan.

    Raises:
        AllocplanError: no ``data``, neither or both of plan and method, a method without a budget,
            standard input twice, or an input the evaluation would not read.
    """
    if config.data is None:
        raise AllocplanError("give --data TEXT: the text the NLL is measured on")
    if (config.plan is None) == (config.method is None):
        raise AllocplanError("give exactly one of --plan PLAN or --method NAME")
    if str(config.data) == "-" and config.calib is not None and str(config.calib) == "-":
        raise AllocplanError("--data and --calib are both standard input, so a method would calibrate on the eval"
                             " text; give one of them as a file")
    registered = get_method(config.method) if config.method is not None else None
    if registered is not None and registered.name != "full" and config.budget is None:
        raise AllocplanError(f"--method {config.method} needs --budget RATIO")
    _check_unused_inputs(registered, config)
    return registered


def run_eval(model_name: str, config: EvalConfig, load: LoadConfig | None = None) -> dict[str, Any]:
    """Evaluate ``model_name`` under a plan file or a registered method at a budget (``config``).

    Methods that need a sensitivity profile use ``config.profile_file`` or profile ``config.calib``
    now; threshold methods are calibrated on ``config.calib``; neither ever sees ``config.data``. The
    NLL is measured in ``config.mode`` (:data:`~allocplan.formats.config.EVAL_MODES`: prefill, or
    decoding token by token at batch 1 or 8, where Alloc-T has one or eight tokens to pool).

    Args:
        model_name: a local checkpoint, ``bundled:<name>`` or hub id.
        config: what is evaluated, on which text, in which mode.
        load: how the model is loaded.

    Returns:
        The JSON-ready result: NLL, perplexity, arithmetic, activations, and what was evaluated.

    Raises:
        AllocplanError: inputs that do not fit together (:func:`check_eval_inputs`), or bad inputs.
    """
    registered = check_eval_inputs(config)
    model, tokenizer = load_model(model_name, load)
    calib = config.calib or DEFAULT_CALIBRATION
    parameter = None
    if config.plan is not None:
        loaded = load_plan(config.plan)
        from allocplan.runtime.apply import apply_plan

        handle = apply_plan(model, loaded)
        label, target = f"plan {config.plan}", loaded.budget.total_activations
    else:
        measured = None
        if registered.needs_profile:
            from allocplan.planner.profiling import profile_model

            if config.profile_file:  # a stored profile may be another model's; one measured here is this model's
                measured = load_profile(config.profile_file)
                check_profile_matches(measured, model, config.profile_file)
            else:
                # Calibration windows as long as the eval's (the results' profiles and eval windows are both 256).
                profiling = replace(PAPER_PROFILE, calib=str(calib), seq_len=config.seq_len,
                                    calib_tokens=max(PAPER_PROFILE.calib_tokens, config.seq_len))
                measured = profile_model(model, tokenizer, profiling, PLAIN, model_name=model_name)
        windows = None
        if registered.needs_calibration:
            from allocplan.planner.windows import pack_windows

            windows, _ = pack_windows(tokenizer, calib, max_tokens=THRESHOLD_CALIBRATION_TOKENS,
                                      seq_len=config.seq_len)
        policy = build_policy(model, registered.name, config.budget or 1.0, sensitivity=measured,
                              calib_windows=windows, seed=DEFAULT_SEED if config.seed is None else config.seed)
        handle, parameter = policy.apply(model), policy.parameter
        label, target = registered.name, policy.target
    try:
        result = evaluate(model, tokenizer, data=config.data, arith=config.arith, handle=handle,
                          seq_len=config.seq_len, max_tokens=config.max_tokens, mode=config.mode,
                          exact_decode=config.exact_decode)
    finally:
        if handle is not None:
            handle.remove()
    return {"model": model_name, "policy": label, "budget_ratio": config.budget, "parameter": parameter,
            "target_activations_per_token": target, **result}
