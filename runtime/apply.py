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
from typing import Any, Callable

import torch

from allocplan.errors import AllocplanError
from allocplan.formats.allocation import Allocation, LayerAllocation
from allocplan.formats.plan import Plan, load_plan
from . import routing
from .families import MoEFamily
from .layers import MoELayer, find_moe_layers, identity_mismatch, model_family, module_device
from .router_formats import ROUTER_FORMATS
from .scores import NORMALIZATION_RULES, SELECTION_SCORES, SIGNED_SELECTIONS

_HANDLE_ATTR = "_allocplan_handle"

# (scores [T, K], weights [T, K], real [T]) -> keep [T, K]; candidates sorted by score per token.
TokenSelector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ForwardContext:
    """The current forward pass: its token grid and which flattened positions are real (not padding)."""

    real: torch.Tensor | None = None  # [B * S] bool, or None when every token is real
    shape: tuple[int, int] | None = None  # (B, S) of the model's input

# Which tokens of a forward share a layer's budget under Alloc-T (see LayerRouting):
# ``forward``: all of them (the plan's behaviour); ``position``: those at the same position of
# their sequence, which is what token-by-token decoding of B sequences pools (B = 1: one token,
# through the decode ledger), so one forward over whole windows reproduces decode routing.
POOLINGS = ("forward", "position")


@dataclass
class LayerCounter:
    """(token, expert) pairs and real tokens routed by one layer since the last reset."""

    pairs: int = 0
    tokens: int = 0

    @property
    def activations_per_token(self) -> float:
        return self.pairs / self.tokens if self.tokens else 0.0


@dataclass(frozen=True)
class RoutingDecision:
    """Which of each token's candidates run, and with what weight, in one layer's forward.

    Attributes:
        keep: [T, k_max] the candidates that run.
        weights: [T, k_max] every candidate's combine weight under the layer's weight mode
            (per-expert scales included, gain not), kept or not.
        indices: [T, k_max] the candidates' experts, sorted by selection score per token.
        real: [T] the tokens that are not padding.
        first: n where ``keep`` is known to hold each token's first n candidates (one token alone), else None.
    """

    keep: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    real: torch.Tensor
    first: int | None = None


class LayerRouting:
    """One MoE layer's routing under an allocation: the routing decision and the hooks that apply it.

    ``decide`` is the decision itself (also used by the planner to fit weight treatments
    on exactly the routing a plan runs); the hooks feed it the router's output and hand
    the rewritten routing to the experts.
    """

    # Batch-1 decode through the family's native top-n (module docstring); tests switch it off
    # to compare with the general rewrite.
    single_token_native = True
    # Batch-1 forwards that must rewrite (treated or compensated layers, other weight modes) skip the
    # general selection's bookkeeping for one token (``_single_token_keep``); tests switch it off to
    # compare with the general path.
    single_token_fast = True

    def __init__(self, layer: MoELayer, entry: LayerAllocation, allocation: Allocation, family: MoEFamily,
                 context: ForwardContext, token_selector: TokenSelector | None = None,
                 compensated: bool = False, drop_order: torch.Tensor | None = None) -> None:
        self.layer = layer
        self.token_selector = token_selector
        self.k = float(entry.planned_k)
        self.k_max = allocation.token_level.k_max or entry.original_k
        self.token_level = allocation.token_level.enabled
        # A token cannot be promised more experts than the layer's average allows.
        self.k_base = min(allocation.token_level.k_base, int(self.k))
        self.mode = allocation.weights.renormalize
        self.reference_k = min(allocation.weights.reference_k or entry.original_k, self.k_max)
        if entry.normalizer_k is not None:  # the layer's own normaliser width overrides the plan's mode
            self.mode, self.reference_k = "decoupled", min(entry.normalizer_k, self.k_max)
        self.gain = float(entry.gain)
        # Dropped candidates keep their expert (index + num_experts) and weight, for the experts
        # implementation to add their compensation vectors.
        self.compensated = compensated
        # [E] per-expert factors on the selection scores (StandIns.order): the candidates whose
        # stand-ins serve best rank last and are dropped first.
        self.drop_order = drop_order
        self.norm_order = NORMALIZATION_RULES[family.normalization](layer.router, layer.block)
        self.scale = float(getattr(layer.router, family.scaling_attr)) if family.scaling_attr else 1.0
        self.expert_scale_attr = family.expert_scale_attr
        self.selection = SELECTION_SCORES[family.selection]
        self.signed_selection = family.selection in SIGNED_SELECTIONS
        self.num_experts = layer.experts.num_experts
        router_format = ROUTER_FORMATS[family.router_format]
        self.to_candidates, self.from_candidates = router_format.to_candidates, router_format.from_candidates
        self.context = context
        self.scope = allocation.token_level.scope
        self.prefer_active = allocation.token_level.prefer == "active"
        self.ledger = routing.DecodeLedger()
        # Sequence scope: each row of the batch counts its own single-token forwards (row 0 shares
        # ``ledger``, so a batch of one routes alike under both scopes and the batch-1 shortcut).
        self.row_ledgers: dict[int, routing.DecodeLedger] = {0: self.ledger}
        self.counter = LayerCounter()
        self._constants: dict[tuple[str, torch.device], torch.Tensor] = {}
        # Batch-1 decode can take the native top-n only where the rewrite would equal it.
        self.single_token_shortcut = (
            self.single_token_native and self.token_level and token_selector is None and self.mode == "model"
            and not entry.treated and not compensated
        )
        # The k the router is set to for the current forward: k_max, or n on the batch-1 shortcut.
        self.router_k = self.k_max
        self.native = False
        self.pooling = "forward"

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
        return self._lone_token_is_real()

    def _lone_token_is_real(self) -> bool:
        """Whether the one token of a single-token forward is real (only a recorded one-token mask says not)."""
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

    def decide(self, router: Any, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
               *, count: bool = True) -> RoutingDecision:
        """The routing decision for a forward whose router gave ``weights``, ``indices`` [T, k_max].

        ``count``: record the pairs in the counters and the decode ledger (the hooks do;
        the planner's fitting does not).
        """
        num_tokens = indices.shape[0]
        real = self.context.real
        single = (self.single_token_fast and num_tokens == 1 and self.token_selector is None
                  and self._lone_token_is_real())
        if single:
            real = self._cached("real", indices.device, lambda: torch.ones(1, dtype=torch.bool, device=indices.device))
        elif real is None or real.numel() != num_tokens:
            real = torch.ones(num_tokens, dtype=torch.bool, device=indices.device)  # [T]
        selection = self.selection(router, logits)  # [T, E]
        if self.drop_order is not None:
            ranked = routing.rank_by_drop_order(selection, self.drop_order, self.signed_selection)  # [T, E]
            scores = ranked.gather(-1, indices)  # [T, k_max]
        else:
            scores = selection.gather(-1, indices)  # [T, k_max]
        if single and indices.device.type == "cpu":
            weights, indices = routing.sort_one_token(scores, weights, indices)  # the short form needs no scores
        else:
            scores, weights, indices = routing.sort_candidates(scores, weights, indices)
        # Decoupled renormalisation divides by the mass of the router's own top candidates, which a
        # drop order may have moved out of the first slots.
        reference_scores = (selection.gather(-1, indices) if self.drop_order is not None and self.mode == "decoupled"
                            else None)  # [T, k_max]
        expert_scale = None
        if self.expert_scale_attr:
            # Per-expert multipliers are applied after normalisation: undo them, reweight, redo.
            expert_scale = getattr(router, self.expert_scale_attr)[indices].float()  # [T, k_max]
            weights = weights.float() / torch.where(expert_scale == 0, 1.0, expert_scale)
        real_tokens = 1 if single else int(real.sum())
        # prefer: active: the remaining pairs go first to experts already running in the pool.
        prefer = {"indices": indices, "num_experts": self.num_experts} if self.prefer_active else {}
        if single:
            keep, kept_pairs = self._single_token_keep(indices, count)  # [1, k_max], n
        elif self.token_selector is not None:
            keep = self.token_selector(scores, weights.float(), real) & real[:, None]  # [T, k_max]
        elif self.token_level and self.pooling == "position" and self.context.shape is not None:
            keep = self._keep_by_position(scores, real, count, prefer)  # [T, k_max]
        elif self.token_level and self.scope == "sequence" and self.context.shape is not None \
                and self.context.shape[0] > 1:
            keep = self._keep_by_sequence(scores, real, count, prefer)  # [T, k_max]
        elif self.token_level:
            ledger = self.ledger if count else None
            pairs = routing.pairs_for(self.k, real_tokens, ledger)
            pairs = max(self.k_base * real_tokens, min(pairs, self.k_max * real_tokens))
            keep = routing.alloc_t_keep(scores, real, pairs, self.k_base, **prefer)  # [T, k_max]
        else:
            keep = routing.uniform_keep(real, indices.shape[1], int(self.k))  # [T, k_max]
        normalized = routing.normalize_weights(
            weights, keep, mode=self.mode, norm_order=self.norm_order, scale=self.scale,
            reference_k=self.reference_k, reference_scores=reference_scores,
        )  # [T, k_max]
        if expert_scale is not None:
            normalized = normalized * expert_scale
        if count:
            self.counter.pairs += kept_pairs if single else int(keep.sum())
            self.counter.tokens += real_tokens
        return RoutingDecision(keep=keep, weights=normalized, indices=indices, real=real,
                               first=kept_pairs if single else None)

    def _cached(self, name: str, device: torch.device, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A small constant tensor, built once per device (batch-1 decode asks for the same ones every step)."""
        key = (name, device)
        if key not in self._constants:
            self._constants[key] = make()
        return self._constants[key]

    def _single_token_keep(self, indices: torch.Tensor, count: bool) -> tuple[torch.Tensor, int]:
        """[1, k_max] keep mask of one real token alone in its forward (batch-1 decode), without the general
        selection's dozen small ops.

        Alone, a token gets its ledger's count n under every pooling and scope (round(k) uncounted, k
        without token-level allocation), and Alloc-T's best remaining candidates of one token are its
        next ones by score, so the mask keeps its first n candidates (ties in score go to the earlier
        rank). The cached mask is shared and never written.
        """
        width = indices.shape[1]
        if self.token_level:
            n = routing.pairs_for(self.k, 1, self.ledger if count else None)
            n = max(self.k_base, min(n, self.k_max))
        else:
            n = int(self.k)
        return self._cached(f"first-{n}-of-{width}", indices.device,
                            lambda: torch.arange(width, device=indices.device)[None, :] < n), n

    def _row_ledger(self, row: int) -> routing.DecodeLedger:
        if row not in self.row_ledgers:
            self.row_ledgers[row] = routing.DecodeLedger()
        return self.row_ledgers[row]

    def reset_ledgers(self) -> None:
        for ledger in self.row_ledgers.values():
            ledger.reset()

    def _grouped_keep(self, scores: torch.Tensor, real: torch.Tensor, groups: torch.Tensor, real_per_group: list[int],
                      ledgers: list[routing.DecodeLedger | None], prefer: dict[str, Any]) -> torch.Tensor:
        """Alloc-T within groups: a group of one real token counts through its ledger, others round(k n)."""
        pairs = [routing.pairs_for(self.k, n, ledger if n == 1 else None) if n else 0
                 for n, ledger in zip(real_per_group, ledgers)]
        pairs = [max(self.k_base * n, min(p, self.k_max * n)) for p, n in zip(pairs, real_per_group)]
        return routing.alloc_t_keep_grouped(scores, real, groups, torch.tensor(pairs, device=scores.device),
                                            self.k_base, **prefer)

    def _keep_by_sequence(self, scores: torch.Tensor, real: torch.Tensor, count: bool,
                          prefer: dict[str, Any]) -> torch.Tensor:
        """Alloc-T with each sequence (row) its own budget: batch-mates never change a row's routing."""
        batch, length = self.context.shape
        rows = torch.arange(scores.shape[0], device=scores.device) // length  # [T]
        real_per_row = torch.bincount(rows[real], minlength=batch).tolist()
        ledgers = [self._row_ledger(b) if count else None for b in range(batch)]
        return self._grouped_keep(scores, real, rows, real_per_row, ledgers, prefer)

    def _keep_by_position(self, scores: torch.Tensor, real: torch.Tensor, count: bool,
                          prefer: dict[str, Any]) -> torch.Tensor:
        """What decoding the forward's sequences token by token runs, in one forward (``pooling="position"``).

        Batch scope: the tokens at one position pool their budget, as one decode step does (a single
        sequence: each token through the ledger, step after step). Sequence scope: every token alone,
        through its own row's ledger.
        """
        batch, length = self.context.shape
        index = torch.arange(scores.shape[0], device=scores.device)  # [T]
        if self.scope == "sequence":
            real_list = real.tolist()
            ledgers = [self._row_ledger(t // length) if count else None for t in range(scores.shape[0])]
            # Position-major order: every row's ledger advances step by step, as in generation.
            order = sorted(range(scores.shape[0]), key=lambda t: (t % length, t // length))
            counted = {t: routing.pairs_for(self.k, 1, ledgers[t]) if real_list[t] else 0 for t in order}
            pairs = [max(self.k_base * int(real_list[t]), min(counted[t], self.k_max * int(real_list[t])))
                     for t in range(scores.shape[0])]
            return routing.alloc_t_keep_grouped(scores, real, index, torch.tensor(pairs, device=scores.device),
                                                self.k_base, **prefer)
        positions = index % length  # [T]
        real_at = torch.bincount(positions[real], minlength=length).tolist()  # real tokens per position
        ledgers = [self.ledger if count else None] * length
        return self._grouped_keep(scores, real, positions, real_at, ledgers, prefer)

    def rewrite(self, router: Any, logits: torch.Tensor, weights: torch.Tensor,
                indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New (weights, indices) [T, k_max]: dropped slots get the sentinel and weight 0 (or, compensated,
        index + num_experts and their weight)."""
        output_dtype = weights.dtype
        decision = self.decide(router, logits, weights, indices)
        if decision.first is not None:
            new_weights, new_indices = self._rewrite_first(decision)
        else:
            keep, normalized = decision.keep, decision.weights
            kept = normalized * self.gain if self.gain != 1.0 else normalized
            if self.compensated:
                new_weights = torch.where(keep, kept, torch.where(decision.real[:, None], normalized, 0.0))
                new_indices = torch.where(keep, decision.indices, decision.indices + self.num_experts)
            else:
                new_weights = torch.where(keep, kept, 0.0)
                new_indices = torch.where(keep, decision.indices, self.num_experts)  # sentinel for dropped slots
        return routing.as_dtype(new_weights, output_dtype), new_indices

    def _rewrite_first(self, decision: RoutingDecision) -> tuple[torch.Tensor, torch.Tensor]:
        """``rewrite``'s result when every token keeps its first n candidates (batch-1 decode), with one
        multiply by per-slot factors (gain on kept slots; 1 on compensated dropped ones, else 0) built once
        per n, in place of the general form's selects: the same values, fewer ops."""
        keep = decision.keep  # [1, K], the cached mask of the token's first n candidates
        n, width, device = decision.first, keep.shape[1], keep.device
        if self.gain == 1.0 and self.compensated:
            new_weights = decision.weights  # every slot keeps its weight: the factors would all be 1
        else:
            factors = self._cached(f"factors-{n}-of-{width}", device, lambda: torch.where(
                keep, self.gain, 1.0 if self.compensated else 0.0))  # [1, K]
            new_weights = decision.weights * factors
        if self.compensated:
            offsets = self._cached(f"offsets-{n}-of-{width}", device,
                                   lambda: torch.where(keep, 0, self.num_experts))  # [1, K]
            return new_weights, decision.indices + offsets
        return new_weights, torch.where(keep, decision.indices, self.num_experts)


def _record_padding(context: ForwardContext):
    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        tokens = kwargs.get("input_ids")
        if tokens is None and args:
            tokens = args[0]
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        context.real = None
        context.shape = tuple(tokens.shape[:2]) if tokens is not None and tokens.dim() >= 2 else None
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


_DECODED: dict[str, dict[str, torch.Tensor]] = {}  # sha256 -> tensors of the last sidecar decoded


def _decoded_sidecar(sha256: str, name: str, data: bytes) -> dict[str, torch.Tensor]:
    """The sidecar's tensors after checking its bytes' hash (the last decoding is kept: profiling
    applies the same sidecar for every probe)."""
    from safetensors.torch import load

    from allocplan.formats.records import sha256_bytes

    if sha256_bytes(data) != sha256:
        raise AllocplanError(f"the compensation vectors do not match the sha256 the plan records for {name!r};"
                             " restore the sidecar or recompile")
    if sha256 in _DECODED:
        return _DECODED[sha256]
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed bytes
        raise AllocplanError(f"compensation file {name!r} is not a readable safetensors file:"
                             f" {str(exc).splitlines()[0][:120]}") from None
    _DECODED.clear()
    _DECODED[sha256] = tensors
    return tensors


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

    stand_ins = {}
    for layer in layers:
        experts = 1 if record.kind == "layer" else layer.experts.num_experts
        bias = tensor(layer.path, (experts, hidden), layer)
        down = up = None
        if record.kind == "linear":
            down = tensor(f"{layer.path}.down", (experts, hidden, None), layer)
            up = tensor(f"{layer.path}.up", (experts, down.shape[-1], hidden), layer)
        order = None
        if f"{layer.path}.order" in tensors:  # optional: sidecars without a drop order stay valid
            # float32 like the selection scores it multiplies (beside the experts, like the stand-ins).
            order = tensor(f"{layer.path}.order", (layer.experts.num_experts,), layer, torch.float32)
            if not bool(torch.isfinite(order).all()) or bool((order <= 0).any()):
                raise AllocplanError(f"compensation file {record.file!r} holds a drop order for {layer.path} that"
                                     " is not positive and finite everywhere; recompile the plan")
        stand_ins[layer.path] = StandIns(bias, down, up, order)
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
        handle._hooks.append(model.register_forward_pre_hook(_record_padding(context), with_kwargs=True))
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
