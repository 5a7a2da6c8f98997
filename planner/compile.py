"""``compile_plan``: profile a model on calibration text, then solve the allocation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from allocplan.errors import AllocplanError
from allocplan.loading import DEFAULT_CALIBRATION, load_model
from allocplan.planner.from_profile import solve_profile
from allocplan.planner.plan import Plan
from allocplan.planner.profile_format import save_profile
from allocplan.planner.profiling import profile_model


def compile_plan(
    model: Any,
    budget: float | None = None,
    *,
    budget_activations: int | None = None,
    calib: str | os.PathLike[str] | None = None,
    tokenizer: Any = None,
    model_name: str | None = None,
    calib_tokens: int = 16384,
    seq_len: int = 256,
    strategy: str = "isolated",
    metric: str = "kl",
    k_min: int = 1,
    k_step: float = 1.0,
    token_level: bool = True,
    k_base: int = 1,
    k_max: int | None = None,
    renormalize: str = "model",
    reference_k: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    profile_out: str | os.PathLike[str] | None = None,
) -> Plan:
    """Compile an allocation plan for ``model`` at a budget (Alloc-L).

    Args:
        model: a model name (local directory, ``bundled:<name>`` or hub id), or a
            loaded transformers causal LM (then pass ``tokenizer``, and ``model_name``
            to record something other than ``model.name_or_path``).
        budget: budget ratio in (0, 1] of the model's total original top-k.
        budget_activations: absolute activations per token instead of ``budget``.
        calib: UTF-8 calibration text; defaults to the text bundled with allocplan.
        calib_tokens / seq_len: tokens scored and window length.
        strategy / metric / k_min / k_step: see :mod:`allocplan.planner.profiling`
            (``k_step=0.5``: a half-expert grid, needs ``token_level``).
        token_level / k_base / k_max / renormalize / reference_k: runtime routing settings
            recorded in the plan (see :func:`allocplan.solve_profile`).
        batch_size: calibration windows per forward pass.
        device / dtype / trust_remote_code: used when ``model`` is a name.
        profile_out: also write the sensitivity profile here.

    Returns:
        The validated :class:`Plan`; write it with ``save_plan``.

    Raises:
        AllocplanError: any input problem, with a one-line reason.
    """
    if isinstance(model, (str, os.PathLike)):
        model_name = model_name or os.fspath(model)
        model, loaded_tokenizer = load_model(
            os.fspath(model), device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise AllocplanError("a loaded model needs its tokenizer: compile_plan(model, budget, tokenizer=...)")
    model_name = model_name or getattr(model, "name_or_path", "") or "unnamed-model"
    # Check the budget before the expensive profiling, so a typo fails in a second.
    if (budget is None) == (budget_activations is None):
        raise AllocplanError("give exactly one of budget (a ratio) or budget_activations")
    if budget is not None and not (0 < budget <= 1):
        raise AllocplanError(f"budget ratio {budget} is outside (0, 1]; use e.g. 0.5")
    profile = profile_model(
        model,
        tokenizer,
        model_name=model_name,
        calib=Path(calib) if calib is not None else DEFAULT_CALIBRATION,
        calib_tokens=calib_tokens,
        seq_len=seq_len,
        strategy=strategy,
        metric=metric,
        k_min=k_min,
        k_step=k_step,
        batch_size=batch_size,
    )
    plan = solve_profile(
        profile,
        budget_ratio=budget,
        budget_activations=budget_activations,
        token_level=token_level,
        k_base=k_base,
        k_max=k_max,
        renormalize=renormalize,
        reference_k=reference_k,
    )
    if profile_out is not None:
        save_profile(profile, profile_out)
    return plan
