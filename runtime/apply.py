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
  weight modes always rewrite). Layers that must rewrite at batch 1 (weight
  treatments, stand-ins for dropped experts) take a short form of it: one token
  keeps its first n candidates, so the keep mask and the per-slot factors are
  small tensors built once per n, and the stand-ins are added over the token's
  K slots without ``nonzero`` (:mod:`allocplan.runtime.experts`); the values are
  the general rewrite's, bit for bit.

Every change is recorded so that ``handle.remove()`` puts back the exact
previous state (router ``top_k`` or config, hooks, experts implementation,
swapped modules).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from allocplan.errors import AllocplanError
from allocplan.formats.allocation import Allocation, LayerAllocation
from allocplan.formats.plan import Plan, load_plan
from allocplan.standins import get_stand_in_kind, sidecar_shapes
from .fast_paths import fast_paths
from .layers import MoELayer, find_moe_layers, identity_mismatch, model_family, module_device
from .routing import POOLINGS, ForwardContext, LayerCounter, LayerRouting, TokenSelector, record_padding

_HANDLE_ATTR = "_allocplan_handle"

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
    _routings: list[LayerRouting] = field(default_factory=list, repr=False)
    _saved_experts_implementation: str | None = field(default=None, repr=False)
    _swapped: list[tuple[Any, str, Any]] = field(default_factory=list, repr=False)
    _attributes: list[tuple[Any, str]] = field(default_factory=list, repr=False)
    _active: bool = True

    def _warn_on_save(self) -> None:
        """Wrap this model instance's ``save_pretrained``: it would save the model as loaded."""
        original = self._model.save_pretrained

        def save_pretrained(*args: Any, **kwargs: Any) -> Any:
            warnings.warn("allocplan: a plan is applied, but save_pretrained saves the model as loaded, without"
                          " the plan; use `allocplan export PLAN --model M -o DIR` (or allocplan.export_plan) to"
                          " write a checkpoint that carries it", stacklevel=2)
            return original(*args, **kwargs)

        self._model.save_pretrained = save_pretrained  # the instance only; the class is untouched
        self._attributes.append((self._model, "save_pretrained"))

    @property
    def active(self) -> bool:
        return self._active

    def counters(self) -> dict[str, LayerCounter]:
        """Pairs and tokens routed per layer path since the last reset (rewritten routing only)."""
        return {r.layer.path: r.counter for r in self._routings}

    def added_bytes(self) -> int:
        """Bytes of memory the applied plan holds beyond the model's own weights: its stand-ins' tensors (their
        constants and factors: the factors once, in the native kernel's half-precision tables where it serves
        them, else in the sidecar's dtype), each storage counted once. Routing keeps only a few small
        constants, which are not counted."""
        storages: dict[int, int] = {}
        for module, name in self._attributes:
            held = getattr(getattr(module, name, None), "held_tensors", None)
            for tensor in held() if held is not None else ():
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def reset(self) -> None:
        """Zero the counters and the batch-1 decode ledgers (e.g. between generations)."""
        for r in self._routings:
            r.counter = LayerCounter()
            r.reset_ledgers()

    def set_pooling(self, pooling: str) -> None:
        """Which tokens of a forward share each layer's budget (``POOLINGS``): evaluation uses
        ``position`` to reproduce token-by-token decoding within one forward."""
        if pooling not in POOLINGS:
            raise AllocplanError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        for r in self._routings:
            r.pooling = pooling

    def remove(self) -> None:
        """Restore the model exactly as it was before ``apply_plan`` (idempotent)."""
        if not self._active:
            return
        for hook in self._hooks:
            hook.remove()
        for module, name in self._attributes:
            delattr(module, name)
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


def _untouched(entry: LayerAllocation, allocation: Allocation, token_selector: TokenSelector | None) -> bool:
    """A layer the allocation leaves exactly as the model routes it: full k, no treatment, and a weight
    mode that is the identity at full k (``model`` and ``none`` are; ``renorm`` and ``decoupled`` rescale)."""
    return (token_selector is None and entry.planned_k == entry.original_k and not entry.treated
            and allocation.weights.renormalize in ("model", "none"))


def _decoded_sidecar(sha256: str, name: str, data: bytes) -> dict[str, torch.Tensor]:
    """The sidecar's tensors after checking its bytes' hash. Nothing keeps them once the stand-ins are
    built from them, so an applied plan holds one copy of its stand-ins (the planner's probes, which
    try many, pass them in memory instead: ``apply_plan(..., stand_ins=)``)."""
    from safetensors.torch import load

    from allocplan.formats.records import sha256_bytes

    if sha256_bytes(data) != sha256:
        raise AllocplanError(f"the compensation vectors do not match the sha256 the plan records for {name!r};"
                             " restore the sidecar or recompile")
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed bytes
        raise AllocplanError(f"compensation file {name!r} is not a readable safetensors file:"
                             f" {str(exc).splitlines()[0][:120]}") from None


def load_compensation(allocation: Allocation, layers: list[MoELayer], model: Any) -> dict[str, Any]:
    """The allocation's stand-ins (``StandIns``) per layer path, checked against the model's layers.

    Raises:
        AllocplanError: no vectors in memory, vectors whose hash differs from the record, a
            sidecar that is not safetensors, or a layer's tensors missing or of the wrong shape.
    """
    from .experts import StandIns

    record, data = allocation.compensation, allocation.compensation_data
    if data is None:
        raise AllocplanError(f"the plan names compensation file {record.file!r} but holds no vectors; load the"
                             " plan from its file (the sidecar beside it) or recompile")
    tensors = _decoded_sidecar(record.sha256, record.file, data)
    hidden = model.get_input_embeddings().embedding_dim

    def tensor(name: str, shape: tuple[int | None, ...], layer: MoELayer, dtype: torch.dtype | None = None
               ) -> torch.Tensor:
        found = tensors.get(name)
        ok = found is not None and found.dim() == len(shape) and all(
            want is None or got == want for got, want in zip(found.shape, shape))
        if not ok:
            got = "nothing" if found is None else f"shape {tuple(found.shape)}"
            want = tuple("r" if w is None else w for w in shape)
            raise AllocplanError(f"compensation file {record.file!r} holds {got} for {name}, which needs shape"
                                 f" {want}; the sidecar belongs to another model: recompile")
        if not found.is_floating_point():
            raise AllocplanError(f"compensation file {record.file!r} holds {found.dtype} values for {name}, which"
                                 " needs floating-point values; the sidecar is not allocplan's: recompile")
        if not bool(torch.isfinite(found).all()):  # NaN or inf stand-ins would silently poison every output
            raise AllocplanError(f"compensation file {record.file!r} holds NaN or infinite values for {name}; the"
                                 " stand-ins were fitted on a diverging model or edited: recompile")
        # Each layer's stand-ins live where its experts compute (layers may sit on different devices).
        dtype = dtype or next(layer.experts.parameters()).dtype
        return found.to(device=module_device(layer.experts), dtype=dtype)

    kind = get_stand_in_kind(record.kind)
    stand_ins = {}
    ranked = allocation.ranked_stand_ins
    # A ranked sidecar holds the layers that name a rank and nothing else (an earlier plan's serves every layer).
    expected = {f"{entry.path}{suffix}" for entry in allocation.layers if entry.stand_in_rank is not None
                for suffix in ("", ".down", ".up", ".order")}
    extra = sorted(name for name in tensors if name not in expected) if ranked else []
    if extra:
        raise AllocplanError(f"compensation file {record.file!r} holds {extra[0]}, which no layer of the plan runs"
                             " (its stand_in_rank is null); the sidecar belongs to another plan: recompile")
    for layer, entry in zip(layers, allocation.layers):
        if (ranked and entry.stand_in_rank is None) or entry.planned_k == entry.original_k:
            continue  # no stand-ins serve this layer's dropped candidates, or it drops none
        # The kind's terms (allocplan/standins/): its constants, and a low-rank map where it keeps one (a rank-0
        # entry of a kind with a map keeps the constant alone).
        shapes = sidecar_shapes(kind, layer.path, layer.experts.num_experts, hidden)
        bias = tensor(layer.path, shapes[layer.path], layer)
        down = up = None
        if kind.low_rank and entry.stand_in_rank != 0:
            down_shape = shapes[f"{layer.path}.down"]
            if entry.stand_in_rank is not None:
                down_shape = (*down_shape[:-1], entry.stand_in_rank)
            down = tensor(f"{layer.path}.down", down_shape, layer)
            up = tensor(f"{layer.path}.up", (shapes[f"{layer.path}.up"][0], down.shape[-1], hidden), layer)
        elif f"{layer.path}.down" in tensors:
            raise AllocplanError(f"compensation file {record.file!r} holds a map for {layer.path}, whose entry runs"
                                 " the constant stand-in alone (stand_in_rank 0); recompile the plan")
        order = None
        if f"{layer.path}.order" in tensors:  # optional: sidecars without a drop order stay valid
            # float32 like the selection scores it multiplies (beside the experts, like the stand-ins).
            order = tensor(f"{layer.path}.order", (layer.experts.num_experts,), layer, torch.float32)
            if not bool(torch.isfinite(order).all()) or bool((order <= 0).any()):
                raise AllocplanError(f"compensation file {record.file!r} holds a drop order for {layer.path} that"
                                     " is not positive and finite everywhere; recompile the plan")
        stand_ins[layer.path] = StandIns(bias, down, up, order, one_copy=fast_paths().one_copy_stand_ins)
    return stand_ins


def check_allocation_matches(allocation: Allocation, model: Any) -> list[MoELayer]:
    """The model's MoE layers, after checking that ``allocation`` was made for this model.

    Raises:
        AllocplanError: different family or fingerprint, or layer paths / original k that differ.
    """
    mismatch = identity_mismatch(allocation.model, model)
    if mismatch is not None:
        raise AllocplanError(f"plan was compiled for {mismatch}; compile a plan for this model")
    layers = find_moe_layers(model)
    model_paths = [layer.path for layer in layers]
    plan_paths = [entry.path for entry in allocation.layers]
    if model_paths != plan_paths:
        first = next((i for i, (a, b) in enumerate(zip(plan_paths, model_paths)) if a != b),
                     min(len(plan_paths), len(model_paths)))
        ours = plan_paths[first] if first < len(plan_paths) else "nothing"
        theirs = model_paths[first] if first < len(model_paths) else "nothing"
        raise AllocplanError(
            f"plan layers do not match the model's MoE layers: entry {first} is {ours} in the plan but {theirs} in"
            f" the model ({len(plan_paths)} against {len(model_paths)} layers); compile a plan for this model"
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
    stand_ins: dict[str, Any] | None = None,
) -> PlanHandle:
    """Apply an allocation to a loaded model: a Plan, a plan file, or an Allocation built in code.

    The model is edited in place (see the module docstring for what changes);
    keep the returned handle and call ``handle.remove()`` to restore it, or use
    it as a context manager.

    ``token_selector`` replaces the allocation's per-token choice in every layer
    (rewritten routing is then used whatever the allocation says); allocplan's
    baselines use it for threshold rules such as top-p or NAEE-style skipping.

    ``stand_ins``: stand-ins already decoded (``StandIns`` per layer path; a layer left out has none),
    run instead of decoding the allocation's sidecar: the planner's probes try many per-layer stand-ins
    with one fit in memory.

    Raises:
        AllocplanError: the plan is invalid, belongs to another model, or a plan is
            already applied.
    """
    if isinstance(plan, Plan):
        allocation = plan.allocation
    elif isinstance(plan, Allocation):
        allocation = plan
    elif isinstance(plan, (str, os.PathLike)):
        allocation = load_plan(plan).allocation
    else:
        raise AllocplanError(f"apply_plan takes a Plan, an Allocation or a plan file's path, not {type(plan).__name__};"
                             " load one with allocplan.load_plan")
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise AllocplanError("a plan is already applied to this model; call handle.remove() first")
    layers = check_allocation_matches(allocation, model)
    family = model_family(model)
    rewrite = allocation.uses_routing_hooks or token_selector is not None
    if rewrite and family.rewrite_unsupported:
        raise AllocplanError(
            f"{family.model_type} cannot run token-level allocation, weight treatments or compensation"
            f" ({family.rewrite_unsupported}); {_plain_top_k_fix(allocation)}"
        )
    if family.treatments_unsupported and (allocation.compensation is not None
                                          or any(entry.treated for entry in allocation.layers)):
        raise AllocplanError(f"{family.model_type} cannot run weight treatments or compensation"
                             f" ({family.treatments_unsupported}); compile with --weight-fit off --compensation off")
    if stand_ins is not None:
        tables = stand_ins
    else:
        tables = load_compensation(allocation, layers, model) if allocation.compensation is not None else {}
    # Layers the allocation leaves exactly as they are get no hooks at all, so a full-budget plan
    # changes nothing, not even the float rounding.
    touched = [not _untouched(entry, allocation, token_selector) for entry in allocation.layers]
    if family.warning and any(touched):  # a plan that changes nothing has nothing to warn about
        warnings.warn(f"allocplan: {family.warning}", stacklevel=2)
    handle = PlanHandle(allocation=allocation, layers=layers, _model=model,
                        _saved=[layer.snapshot() for layer in layers])
    if family.experts_swap is None and any(touched):
        from .experts import register

        handle._saved_experts_implementation = model.config._experts_implementation
        model.set_experts_implementation(register())
    if rewrite:
        from .experts import COMPENSATION_ATTR, EXPERTS_SWAPS

        context = ForwardContext()
        handle._hooks.append(model.register_forward_pre_hook(record_padding(context), with_kwargs=True))
        for layer, entry, changed in zip(layers, allocation.layers, touched):
            if not changed:
                continue
            stand_ins = tables.get(layer.path)
            layer_routing = LayerRouting(layer, entry, allocation, family, context, token_selector,
                                          compensated=stand_ins is not None,
                                          drop_order=None if stand_ins is None else stand_ins.order)
            layer.set_top_k(layer_routing.k_max)
            handle._routings.append(layer_routing)
            experts = layer.experts
            if family.experts_swap is not None:
                experts = EXPERTS_SWAPS[family.experts_swap](layer.experts)
                handle._swapped.append((layer.block, family.experts_attr, layer.experts))
                setattr(layer.block, family.experts_attr, experts)
            if layer.path in tables:
                setattr(experts, COMPENSATION_ATTR, tables[layer.path])
                handle._attributes.append((experts, COMPENSATION_ATTR))
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
    handle._warn_on_save()
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def _plain_top_k_fix(allocation: Allocation) -> str:
    """What to compile with instead, naming only the options this allocation sets."""
    fixes = [flag for flag, needed in (
        ("--no-token-level", allocation.token_level.enabled),
        ("--renormalize model", allocation.weights.renormalize != "model"),
        ("--weight-fit off", any(entry.treated for entry in allocation.layers)),
        ("--compensation off", allocation.compensation is not None)) if needed]
    if not fixes:  # the allocation is plain; a token selector (a threshold baseline) asked for the rewrite
        return "only plain per-layer top-k runs on it"
    return "compile with " + " ".join(fixes)


def plan_handle(model: Any) -> PlanHandle | None:
    """The handle of the plan applied to ``model`` (by ``apply_plan`` or ``from_pretrained``), or None."""
    return getattr(model, _HANDLE_ATTR, None)
