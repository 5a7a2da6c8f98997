"""The public verbs that take a model by its name: compile a plan, check a plan against a model.

``compile_plan`` accepts a name (loaded with :func:`allocplan.load_model`) or an
already loaded model; the work itself is the planner's
(:func:`allocplan.planner.compile.compile_model`).
"""

from __future__ import annotations

import os
from typing import Any

from .errors import AllocplanError
from .formats.budget import BudgetRequest
from .formats.config import LoadConfig, ProfileConfig, RoutingConfig
from .formats.plan import Plan
from .formats.profile import save_profile
from .loading import load_config, load_model


def compile_plan(
    model: Any,
    budget: float | BudgetRequest,
    *,
    profile: ProfileConfig | None = None,
    routing: RoutingConfig | None = None,
    load: LoadConfig | None = None,
    tokenizer: Any = None,
    model_name: str | None = None,
    profile_out: str | os.PathLike[str] | None = None,
) -> Plan:
    """Compile an allocation plan for ``model`` at a budget (Alloc-L, recorded with Alloc-T settings).

    Args:
        model: a model name (local directory, ``bundled:<name>`` or hub id), or a
            loaded transformers causal LM (then pass ``tokenizer``, and ``model_name``
            to record something other than ``model.name_or_path``).
        budget: a ratio in (0, 1] of the model's total original top-k, or a
            :class:`~allocplan.formats.budget.BudgetRequest` (ratio or absolute count).
        profile: how sensitivities are measured (:class:`~allocplan.formats.config.ProfileConfig`).
        routing: runtime routing recorded in the plan (:class:`~allocplan.formats.config.RoutingConfig`).
        load: how a named model is loaded (:class:`~allocplan.formats.config.LoadConfig`).
        profile_out: also write the sensitivity profile here.

    Returns:
        The validated :class:`Plan`; write it with ``save_plan``.

    Raises:
        AllocplanError: any input problem, with a one-line reason.
    """
    from .planner.compile import compile_model

    request = BudgetRequest.of(budget)  # a typo in the budget fails before the model loads
    if isinstance(model, (str, os.PathLike)):
        model_name = model_name or os.fspath(model)
        model, loaded_tokenizer = load_model(os.fspath(model), load)
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise AllocplanError("a loaded model needs its tokenizer: compile_plan(model, budget, tokenizer=...)")
    plan, measured = compile_model(model, tokenizer, request, profile=profile, routing=routing,
                                   model_name=model_name or getattr(model, "name_or_path", "") or "unnamed-model")
    if profile_out is not None:
        save_profile(measured, profile_out)
    return plan


def check_plan_for_model(plan: Plan, model_name: str, load: LoadConfig | None = None) -> None:
    """Check that ``plan`` was compiled for ``model_name``'s architecture, from its config alone (no weights).

    Raises:
        AllocplanError: an unsupported family, or a config fingerprint other than the plan's.
    """
    from .runtime.families import get_family, model_fingerprint

    # A multimodal checkpoint loads as its text model under AutoModelForCausalLM.
    config = load_config(model_name, load).get_text_config()
    get_family(config.model_type)
    fingerprint = model_fingerprint(config.to_dict())
    if fingerprint != plan.model.fingerprint:
        raise AllocplanError(
            f"the plan was compiled for fingerprint {plan.model.fingerprint} ({plan.model.name})"
            f" but {model_name} has {fingerprint}; compile a plan for this model"
        )


def generate(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` by the model as it is now (with any plan applied), decoded."""
    import torch

    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
