"""``apply_plan``: put a compiled plan on a loaded model, reversibly.

Every edit is an instance-level attribute set (the router's ``top_k``), recorded
so that ``handle.remove()`` puts back the exact previous values; no
transformers class or function is patched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from allocplan.errors import AllocplanError
from allocplan.planner.plan import Plan, load_plan
from allocplan.runtime.families import model_fingerprint
from allocplan.runtime.layers import MoELayer, find_moe_layers, model_family

_HANDLE_ATTR = "_allocplan_handle"


@dataclass
class PlanHandle:
    """What ``apply_plan`` changed, and the means to undo it.

    Attributes:
        plan: the applied plan.
        layers: the model's MoE layers, in plan order.
    """

    plan: Plan
    layers: list[MoELayer]
    _model: Any = field(repr=False)
    _saved_k: list[int] = field(repr=False)
    _active: bool = True

    @property
    def active(self) -> bool:
        return self._active

    def remove(self) -> None:
        """Restore the model exactly as it was before ``apply_plan`` (idempotent)."""
        if not self._active:
            return
        for layer, k in zip(self.layers, self._saved_k):
            layer.set_top_k(k)
        if getattr(self._model, _HANDLE_ATTR, None) is self:
            delattr(self._model, _HANDLE_ATTR)
        self._active = False

    def __enter__(self) -> "PlanHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def check_plan_matches(plan: Plan, model: Any) -> list[MoELayer]:
    """The model's MoE layers, after checking that ``plan`` was compiled for this model.

    Raises:
        AllocplanError: different family or fingerprint, or layer paths / original k that differ.
    """
    family = model_family(model)
    fingerprint = model_fingerprint(model.config.to_dict())
    if family.model_type != plan.model.model_type or fingerprint != plan.model.fingerprint:
        raise AllocplanError(
            f"plan was compiled for {plan.model.name!r} ({plan.model.model_type}, {plan.model.fingerprint})"
            f" but the model is {family.model_type} with fingerprint {fingerprint};"
            " compile a plan for this model"
        )
    layers = find_moe_layers(model)
    model_paths = [layer.path for layer in layers]
    plan_paths = [entry.path for entry in plan.layers]
    if model_paths != plan_paths:
        raise AllocplanError(
            f"plan layers {plan_paths} do not match the model's MoE layers {model_paths}; compile a plan for this model"
        )
    for layer, entry in zip(layers, plan.layers):
        if layer.top_k != entry.original_k:
            raise AllocplanError(
                f"{layer.path} routes to top-{layer.top_k} but the plan expects original_k"
                f" {entry.original_k}; load the model unmodified before applying a plan"
            )
    return layers


def apply_plan(model: Any, plan: Plan | str | os.PathLike[str]) -> PlanHandle:
    """Apply ``plan`` (a Plan or a path to a plan file) to a loaded model.

    Sets each MoE layer's router top-k to the planned k. The model is edited in
    place; keep the returned handle and call ``handle.remove()`` to restore it.

    Raises:
        AllocplanError: the plan is invalid, belongs to another model, needs a
            runtime feature this version lacks, or a plan is already applied.
    """
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise AllocplanError("a plan is already applied to this model; call handle.remove() first")
    if plan.token_level.enabled:
        raise AllocplanError(
            "this plan enables token-level allocation (Alloc-T), which this allocplan version cannot run"
            " yet; recompile without --token-level"
        )
    layers = check_plan_matches(plan, model)
    saved = [layer.top_k for layer in layers]
    handle = PlanHandle(plan=plan, layers=layers, _model=model, _saved_k=saved)
    for layer, entry in zip(layers, plan.layers):
        layer.set_top_k(int(entry.planned_k))
    setattr(model, _HANDLE_ATTR, handle)
    return handle
