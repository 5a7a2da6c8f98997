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
from .formats.config import LoadConfig, ProfileConfig, RefineConfig, RoutingConfig
from .formats.plan import Plan
from .formats.profile import save_profile
from .loading import load_config, load_model, loaded_revision, resolve_model_source


def compile_plan(
    model: Any,
    budget: float | BudgetRequest,
    *,
    profile: ProfileConfig | None = None,
    routing: RoutingConfig | None = None,
    refine: RefineConfig | None = None,
    load: LoadConfig | None = None,
    tokenizer: Any = None,
    profile_out: str | os.PathLike[str] | None = None,
) -> Plan:
    """Compile an allocation plan for ``model`` at a budget (Alloc-L, recorded with Alloc-T settings).

    Args:
        model: a model name (local directory, ``bundled:<name>`` or hub id), recorded as the
            plan's model name; or a loaded transformers causal LM (then pass ``tokenizer``), recorded
            by its ``name_or_path`` (set that attribute to record another name).
        budget: a ratio in (0, 1] of the model's total original top-k, or a
            :class:`~allocplan.formats.budget.BudgetRequest` (ratio or absolute count).
        profile: how sensitivities are measured (:class:`~allocplan.formats.config.ProfileConfig`).
        routing: runtime routing recorded in the plan, and used by every profiling probe
            (:class:`~allocplan.formats.config.RoutingConfig`).
        refine: the measured refinement after the DP (:class:`~allocplan.formats.config.RefineConfig`).
        load: how a named model is loaded (:class:`~allocplan.formats.config.LoadConfig`).
        tokenizer: the tokenizer of a loaded ``model``.
        profile_out: also write the sensitivity profile here.

    Returns:
        The validated :class:`Plan`; write it with ``save_plan``.

    Raises:
        AllocplanError: any input problem, with a one-line reason.
    """
    from allocplan.planner.compile import compile_model

    request = BudgetRequest.of(budget)  # a typo in the budget fails before the model loads
    model_name = None
    if isinstance(model, (str, os.PathLike)):
        model_name = os.fspath(model)
        model, loaded_tokenizer = load_model(os.fspath(model), load)
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise AllocplanError("a loaded model needs its tokenizer: compile_plan(model, budget, tokenizer=...)")
    plan, measured = compile_model(model, tokenizer, request, profile=profile, routing=routing, refine=refine,
                                   model_name=model_name or getattr(model, "name_or_path", "") or "unnamed-model")
    if profile_out is not None:
        save_profile(measured, profile_out)
    return plan


def check_plan_for_model(plan: Plan, model_name: str, load: LoadConfig | None = None) -> None:
    """Check ``plan`` against ``model_name`` as ``apply_plan`` would, reading no weights.

    The fingerprint comes from the config; the MoE layer paths, their original k and the
    compensation sidecar's shapes from the architecture built on the meta device (no
    memory, no weights), so ``validate --model`` and ``apply`` accept the same plans.

    Raises:
        AllocplanError: an unsupported family, or a fingerprint, layer, k or sidecar shape
            other than the model's.
    """
    from allocplan.runtime.families import get_family, model_fingerprint

    load = load or LoadConfig()
    # A multimodal checkpoint loads as its text model under AutoModelForCausalLM.
    config = load_config(model_name, load).get_text_config()
    get_family(config.model_type)
    fingerprint = model_fingerprint(config.to_dict())
    if fingerprint != plan.model.fingerprint:
        raise AllocplanError(
            f"the plan was compiled for fingerprint {plan.model.fingerprint} ({plan.model.name})"
            f" but {model_name} has {fingerprint}; compile a plan for this model"
        )
    revision = loaded_revision(model_name, resolve_model_source(model_name), load.revision)
    if plan.model.revision and revision and revision != plan.model.revision:
        import warnings

        warnings.warn(f"allocplan: warning: the plan was compiled on revision {plan.model.revision} of"
                      f" {plan.model.name}, but {model_name} is at {revision}; its weights may differ, so"
                      " recompile if its quality matters", stacklevel=2)
    import torch
    from transformers import AutoModelForCausalLM

    from allocplan.runtime.apply import check_allocation_matches, load_compensation

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=load.trust_remote_code)
    layers = check_allocation_matches(plan.allocation, skeleton)
    if plan.compensation is not None:
        load_compensation(plan.allocation, layers, skeleton)


def check_prompt(prompt: str) -> None:
    """Refuse an empty prompt (before any model is loaded for it).

    Raises:
        AllocplanError: the prompt is empty or only white space.
    """
    if not prompt.strip():
        raise AllocplanError("--prompt is empty; give some text to continue")


def generate(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` by the model as it is now (with any plan applied), decoded.

    Raises:
        AllocplanError: an empty prompt, or one the tokenizer turns into no tokens.
    """
    import torch

    check_prompt(prompt)
    from allocplan.runtime.layers import input_device

    inputs = tokenizer(prompt, return_tensors="pt").to(input_device(model))
    if inputs["input_ids"].numel() == 0:
        raise AllocplanError("--prompt gives no tokens with this tokenizer; give other text")
    from .loading import pad_token_id
    from allocplan.planner.windows import check_token_ids

    check_token_ids(inputs["input_ids"], model)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_token_id(tokenizer))
    return tokenizer.decode(out[0], skip_special_tokens=True)
