"""``apply_plan``: put a compiled plan (or any allocation) on a loaded model, reversibly.

Two paths, both instance-level (no transformers class or function is patched):

* **Native top-k** (token-level allocation off, ``renormalize: model``): each MoE
  router's ``top_k`` is set to the planned k; the family's own routing does the
  rest, exactly as if the model had been configured with that k, and the experts
  run through ``allocplan_ragged`` (:mod:`allocplan.runtime.experts`), whose cost
  follows the pairs that run (a plan that keeps every k leaves the model as is).
* **Rewritten routing** (Alloc-T, or another weight mode): each router runs at
  its candidate width k_max and a forward hook on the router instance chooses
  which (token, candidate) pairs run (:mod:`allocplan.runtime.routing`), marking
  the others with the ``num_experts`` sentinel. The model switches to the
  ``allocplan_ragged`` experts implementation, which never computes a sentinel
  slot (families whose experts are not pluggable get a stand-in experts module
  swapped in through the parent's attribute, see ``MoEFamily.experts_swap``;
  block-side routers are rewritten at the experts' input, JetMoE's sparse layout
  through :mod:`allocplan.runtime.router_formats`). A forward pre-hook on the
  model records the attention mask so that padding tokens get no experts and are
  not counted in T.

  Batch-1 decode (one real token per forward) takes a shortcut: Alloc-T then
  keeps that token's best n candidates (n from the decode ledger), which is
  exactly the family's native top-n, so a forward pre-hook sets the router's
  k to n and the rewrite is skipped (``renormalize: model`` only; the other
  weight modes always rewrite).

Every change is recorded so that ``handle.remove()`` puts back the exact
previous state (router ``top_k`` or config, hooks, experts implementation,
swapped modules).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import AllocplanError
from ..formats.allocation import Allocation, LayerAllocation
from ..formats.plan import Plan, load_plan
from . import routing
from .families import MoEFamily, model_fingerprint
from .layers import MoELayer, find_moe_layers, model_family
from .router_formats import ROUTER_FORMATS
from .scores import NORMALIZATION_RULES, SELECTION_SCORES

_HANDLE_ATTR = "_allocplan_handle"

# (scores [T, K], weights [T, K], real [T]) -> keep [T, K]; candidates sorted by score per token.
TokenSelector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _ForwardContext:
    """Which flattened token positions of the current forward pass are real (not padding)."""

    real: torch.Tensor | None = None  # [B * S] bool, or None when every token is real


@dataclass
class LayerCounter:
    """(token, expert) pairs and real tokens routed by one layer since the last reset."""

    pairs: int = 0
    tokens: int = 0

    @property
    def activations_per_token(self) -> float:
        return self.pairs / self.tokens if self.tokens else 0.0


class _LayerRouting:
    """The router forward hooks of one MoE layer under rewritten routing."""

    # Batch-1 decode through the family's native top-n (module docstring); tests switch it off
    # to compare with the general rewrite.
    single_token_native = True

    def __init__(self, layer: MoELayer, entry: LayerAllocation, allocation: Allocation, family: MoEFamily,
                 context: _ForwardContext, token_selector: TokenSelector | None = None) -> None:
        self.layer = layer
        self.token_selector = token_selector
        self.k = float(entry.planned_k)
        self.k_max = allocation.token_level.k_max or entry.original_k
        self.token_level = allocation.token_level.enabled
        # A token cannot be promised more experts than the layer's average allows.
        self.k_base = min(allocation.token_level.k_base, int(self.k))
        self.mode = allocation.weights.renormalize
        self.reference_k = min(allocation.weights.reference_k or entry.original_k, self.k_max)
        self.norm_order = NORMALIZATION_RULES[family.normalization](layer.router, layer.block)
        self.scale = float(getattr(layer.router, family.scaling_attr)) if family.scaling_attr else 1.0
        self.expert_scale_attr = family.expert_scale_attr
        self.selection = SELECTION_SCORES[family.selection]
        self.num_experts = layer.experts.num_experts
        router_format = ROUTER_FORMATS[family.router_format]
        self.to_candidates, self.from_candidates = router_format.to_candidates, router_format.from_candidates
        self.context = context
        self.ledger = routing.DecodeLedger()
        self.counter = LayerCounter()
        # Batch-1 decode can take the native top-n only where the rewrite would equal it.
        self.single_token_shortcut = (
            self.single_token_native and self.token_level and token_selector is None and self.mode == "model"
        )
        # The k the router is set to for the current forward: k_max, or n on the batch-1 shortcut.
        self.router_k = self.k_max
        self.native = False

    def router_pre_hook(self, router: Any, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the router: choose the batch-1 shortcut or the general rewrite."""
        self.native = self.single_token_forward(args)
        if self.native:
            pairs = min(max(self.ledger.next_pairs(self.k), self.k_base), self.k_max)
            self.counter.pairs += pairs
            self.counter.tokens += 1
        else:
            pairs = self.k_max
        if pairs != self.router_k:
            # apply_plan's set_top_k already gave this layer its own holder of k.
            self.layer.set_top_k(pairs, own_holder=True)
            self.router_k = pairs

    def single_token_forward(self, args: tuple[Any, ...]) -> bool:
        if not (args and isinstance(args[0], torch.Tensor)) or args[0].numel() != args[0].shape[-1]:
            return False  # no hidden states, or more than one token
        real = self.context.real
        return real is None or real.numel() != 1 or bool(real[0])

    def router_hook(self, router: Any, args: Any, output: tuple[Any, ...]) -> tuple[Any, ...]:
        """Forward hook on a router: its output at k_max in, the rewritten routing out."""
        if self.native:
            return output
        logits, weights, indices = self.to_candidates(router, output)  # [T, E], [T, k_max], [T, k_max]
        new_weights, new_indices = self.rewrite(router, logits, weights, indices)
        return self.from_candidates(router, output, new_weights, new_indices)

    def keep_logits(self, router: Any, args: Any, output: torch.Tensor) -> None:
        """Forward hook on a router that returns only logits (routing happens in the block)."""
        self.logits = None if self.native else output

    def experts_pre_hook(self, experts: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Forward pre-hook on experts called as (hidden_states, top_k_index, top_k_weights)."""
        if self.native:
            return args
        hidden_states, indices, weights = args[:3]
        new_weights, new_indices = self.rewrite(self.layer.router, self.logits, weights, indices)
        return (hidden_states, new_indices, new_weights, *args[3:])

    def rewrite(self, router: Any, logits: torch.Tensor, weights: torch.Tensor,
                indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New (weights, indices) [T, k_max]: dropped slots get the sentinel and weight 0."""
        output_dtype = weights.dtype
        num_tokens = indices.shape[0]
        real = self.context.real
        if real is None or real.numel() != num_tokens:
            real = torch.ones(num_tokens, dtype=torch.bool, device=indices.device)  # [T]
        scores = self.selection(router, logits).gather(-1, indices)  # [T, k_max]
        scores, weights, indices = routing.sort_candidates(scores, weights, indices)
        expert_scale = None
        if self.expert_scale_attr:
            # Per-expert multipliers are applied after normalisation: undo them, reweight, redo.
            expert_scale = getattr(router, self.expert_scale_attr)[indices].float()  # [T, k_max]
            weights = weights.float() / torch.where(expert_scale == 0, 1.0, expert_scale)
        real_tokens = int(real.sum())
        if self.token_selector is not None:
            keep = self.token_selector(scores, weights.float(), real) & real[:, None]  # [T, k_max]
        elif self.token_level:
            pairs = routing.pairs_for(self.k, real_tokens, self.ledger)
            pairs = max(self.k_base * real_tokens, min(pairs, self.k_max * real_tokens))
            keep = routing.alloc_t_keep(scores, real, pairs, self.k_base)  # [T, k_max]
        else:
            keep = routing.uniform_keep(real, indices.shape[1], int(self.k))  # [T, k_max]
        new_weights = routing.reweight(
            weights, keep, mode=self.mode, norm_order=self.norm_order, scale=self.scale,
            reference_k=self.reference_k,
        )
        if expert_scale is not None:
            new_weights = new_weights.float() * expert_scale
        new_indices = torch.where(keep, indices, self.num_experts)  # sentinel for dropped slots
        self.counter.pairs += int(keep.sum())
        self.counter.tokens += real_tokens
        return new_weights.to(output_dtype), new_indices


def _record_padding(context: _ForwardContext):
    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        tokens = kwargs.get("input_ids")
        if tokens is None and args:
            tokens = args[0]
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        context.real = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tokens is not None:
            seq_len = tokens.shape[1]
            context.real = mask[:, -seq_len:].reshape(-1).bool()  # [B * S]; decode keeps the last columns
    return hook


@dataclass
class PlanHandle:
    """What ``apply_plan`` changed, and the means to undo it.

    Attributes:
        allocation: the applied allocation (a plan's :attr:`~allocplan.formats.plan.Plan.allocation`).
        layers: the model's MoE layers, in allocation order.
    """

    allocation: Allocation
    layers: list[MoELayer]
    _model: Any = field(repr=False)
    _saved: list[Any] = field(repr=False)
    _hooks: list[Any] = field(default_factory=list, repr=False)
    _routings: list[_LayerRouting] = field(default_factory=list, repr=False)
    _saved_experts_implementation: str | None = field(default=None, repr=False)
    _swapped: list[tuple[Any, str, Any]] = field(default_factory=list, repr=False)
    _active: bool = True

    @property
    def active(self) -> bool:
        return self._active

    def counters(self) -> dict[str, LayerCounter]:
        """Pairs and tokens routed per layer path since the last reset (rewritten routing only)."""
        return {r.layer.path: r.counter for r in self._routings}

    def reset(self) -> None:
        """Zero the counters and the batch-1 decode ledgers (e.g. between generations)."""
        for r in self._routings:
            r.counter = LayerCounter()
            r.ledger.reset()

    def remove(self) -> None:
        """Restore the model exactly as it was before ``apply_plan`` (idempotent)."""
        if not self._active:
            return
        for hook in self._hooks:
            hook.remove()
        for parent, name, module in self._swapped:
            setattr(parent, name, module)
        for layer, state in zip(self.layers, self._saved):
            layer.restore(state)
        if self._saved_experts_implementation is not None:
            self._model.set_experts_implementation(self._saved_experts_implementation)
        if getattr(self._model, _HANDLE_ATTR, None) is self:
            delattr(self._model, _HANDLE_ATTR)
        self._active = False

    def __enter__(self) -> "PlanHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def check_allocation_matches(allocation: Allocation, model: Any) -> list[MoELayer]:
    """The model's MoE layers, after checking that ``allocation`` was made for this model.

    Raises:
        AllocplanError: different family or fingerprint, or layer paths / original k that differ.
    """
    family = model_family(model)
    fingerprint = model_fingerprint(model.config.to_dict())
    identity = allocation.model
    if family.model_type != identity.model_type or fingerprint != identity.fingerprint:
        raise AllocplanError(
            f"plan was compiled for {identity.name!r} ({identity.model_type}, {identity.fingerprint})"
            f" but the model is {family.model_type} with fingerprint {fingerprint};"
            " compile a plan for this model"
        )
    layers = find_moe_layers(model)
    model_paths = [layer.path for layer in layers]
    plan_paths = [entry.path for entry in allocation.layers]
    if model_paths != plan_paths:
        raise AllocplanError(
            f"plan layers {plan_paths} do not match the model's MoE layers {model_paths}; compile a plan for this model"
        )
    for layer, entry in zip(layers, allocation.layers):
        if layer.top_k != entry.original_k:
            raise AllocplanError(
                f"{layer.path} routes to top-{layer.top_k} but the plan expects original_k"
                f" {entry.original_k}; load the model unmodified before applying a plan"
            )
    return layers


def apply_plan(
    model: Any,
    plan: Allocation | Plan | str | os.PathLike[str],
    *,
    token_selector: TokenSelector | None = None,
) -> PlanHandle:
    """Apply an allocation to a loaded model: a Plan, a plan file, or an Allocation built in code.

    The model is edited in place (see the module docstring for what changes);
    keep the returned handle and call ``handle.remove()`` to restore it, or use
    it as a context manager.

    ``token_selector`` replaces the allocation's per-token choice in every layer
    (rewritten routing is then used whatever the allocation says); allocplan's
    baselines use it for threshold rules such as top-p or NAEE-style skipping.

    Raises:
        AllocplanError: the plan is invalid, belongs to another model, or a plan is
            already applied.
    """
    if isinstance(plan, Plan):
        allocation = plan.allocation
    elif isinstance(plan, Allocation):
        allocation = plan
    else:
        allocation = load_plan(plan).allocation
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise AllocplanError("a plan is already applied to this model; call handle.remove() first")
    layers = check_allocation_matches(allocation, model)
    family = model_family(model)
    rewrite = allocation.uses_routing_hooks or token_selector is not None
    if rewrite and family.rewrite_unsupported:
        raise AllocplanError(
            f"{family.model_type} cannot run token-level allocation or renormalize: {allocation.weights.renormalize}"
            f" ({family.rewrite_unsupported}); compile with --no-token-level --renormalize model"
        )
    if family.warning:
        warnings.warn(f"allocplan: {family.warning}", stacklevel=2)
    handle = PlanHandle(allocation=allocation, layers=layers, _model=model,
                        _saved=[layer.snapshot() for layer in layers])
    # Pluggable experts run through allocplan_ragged whenever routing changes; an allocation that
    # keeps every layer's k on the native path changes nothing, not even the float rounding.
    if family.experts_swap is None and (rewrite or any(e.planned_k < e.original_k for e in allocation.layers)):
        from .experts import register

        handle._saved_experts_implementation = model.config._experts_implementation
        model.set_experts_implementation(register())
    if rewrite:
        from .experts import EXPERTS_SWAPS

        context = _ForwardContext()
        handle._hooks.append(model.register_forward_pre_hook(_record_padding(context), with_kwargs=True))
        for layer, entry in zip(layers, allocation.layers):
            layer_routing = _LayerRouting(layer, entry, allocation, family, context, token_selector)
            layer.set_top_k(layer_routing.k_max)
            handle._routings.append(layer_routing)
            experts = layer.experts
            if family.experts_swap is not None:
                experts = EXPERTS_SWAPS[family.experts_swap](layer.experts)
                handle._swapped.append((layer.block, family.experts_attr, layer.experts))
                setattr(layer.block, family.experts_attr, experts)
            if family.routing_in_block:
                handle._hooks.append(layer.router.register_forward_hook(layer_routing.keep_logits))
                handle._hooks.append(experts.register_forward_pre_hook(layer_routing.experts_pre_hook))
            else:
                handle._hooks.append(layer.router.register_forward_hook(layer_routing.router_hook))
            if layer_routing.single_token_shortcut:
                handle._hooks.append(layer.router.register_forward_pre_hook(layer_routing.router_pre_hook))
    else:
        for layer, entry in zip(layers, allocation.layers):
            layer.set_top_k(int(entry.planned_k))
    setattr(model, _HANDLE_ATTR, handle)
    return handle
