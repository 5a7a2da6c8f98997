"""One MoE layer's routing under an allocation: the decision and the hooks that apply it.

:class:`LayerRouting` decides, for each forward, which (token, candidate) pairs of a layer
run and with what weight (uniform top-k or Alloc-T, the plan's weight mode, gain and
stand-ins), from the tensor rules of :mod:`allocplan.runtime.routing_rules`, and its hooks
hand that decision to the experts (docs/runtime.md). ``apply_plan``
(:mod:`allocplan.runtime.apply`) puts one on every MoE layer; the planner uses the same
decision to fit weight treatments on exactly the routing a plan runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from allocplan.formats.allocation import Allocation, LayerAllocation
from allocplan.weight_treatments import WEIGHT_TREATMENTS
from . import routing_rules as rules
from .families import MoEFamily
from .fast_paths import fast_paths
from .layers import MoELayer
from .router_formats import ROUTER_FORMATS
from .scores import NORMALIZATION_RULES, SELECTION_SCORES, SIGNED_SELECTIONS


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
        self.gain = 1.0
        # Each weight treatment's runtime step sets the layer's weight rule (mode, reference_k, gain).
        for treatment in WEIGHT_TREATMENTS.values():
            treatment.configure(self, entry.treatment(treatment.field))
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
        self.ledger = rules.DecodeLedger()
        # Sequence scope: each row of the batch counts its own single-token forwards (row 0 shares
        # ``ledger``, so a batch of one routes alike under both scopes and the batch-1 shortcut).
        self.row_ledgers: dict[int, rules.DecodeLedger] = {0: self.ledger}
        self.counter = LayerCounter()
        self._constants: dict[tuple[str, torch.device], torch.Tensor] = {}
        # Batch-1 decode can take the native top-n only where the rewrite would equal it.
        self.single_token_shortcut = (
            fast_paths().native_top_n and self.token_level and token_selector is None and self.mode == "model"
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
        single = (fast_paths().one_token_keep and num_tokens == 1 and self.token_selector is None
                  and self._lone_token_is_real())
        if single:
            real = self._cached("real", indices.device, lambda: torch.ones(1, dtype=torch.bool, device=indices.device))
        elif real is None or real.numel() != num_tokens:
            # Shared and never written, like the batch-1 one: batched decode asks for it in every layer and step.
            real = self._cached(f"real-{num_tokens}", indices.device,
                                lambda: torch.ones(num_tokens, dtype=torch.bool, device=indices.device))  # [T]
        selection = self.selection(router, logits)  # [T, E]
        if self.drop_order is not None:
            ranked = rules.rank_by_drop_order(selection, self.drop_order, self.signed_selection)  # [T, E]
            scores = ranked.gather(-1, indices)  # [T, k_max]
        else:
            scores = selection.gather(-1, indices)  # [T, k_max]
        few = None  # a few tokens' sorted scores as lists, where their selection runs in Python
        native_few = None  # (keep [T, k_max], pairs kept), where the native kernel made that selection
        real_list = None
        if single and indices.device.type == "cpu":
            weights, indices = rules.sort_one_token(scores, weights, indices)  # the short form needs no scores
        elif self._few_tokens(num_tokens, indices.device) and fast_paths().native_few_tokens_keep and (
                selected := self._native_few(scores, weights, indices, real, count)) is not None:
            weights, indices, native_few, real_list = selected
        elif self._few_tokens(num_tokens, indices.device) and (
                sorted_few := rules.sort_few_tokens(scores, weights, indices)) is not None:
            few, weights, indices = sorted_few
        else:
            scores, weights, indices = rules.sort_candidates(scores, weights, indices)
        # Decoupled renormalisation divides by the mass of the router's own top candidates, which a
        # drop order may have moved out of the first slots.
        reference_scores = (selection.gather(-1, indices) if self.drop_order is not None and self.mode == "decoupled"
                            else None)  # [T, k_max]
        expert_scale = None
        if self.expert_scale_attr:
            # Per-expert multipliers are applied after normalisation: undo them, reweight, redo.
            expert_scale = getattr(router, self.expert_scale_attr)[indices].float()  # [T, k_max]
            weights = weights.float() / torch.where(expert_scale == 0, 1.0, expert_scale)
        if few is not None:
            real_list = real.tolist()
        real_tokens = 1 if single else sum(real_list) if real_list is not None else int(real.sum())
        # prefer: active: the remaining pairs go first to experts already running in the pool.
        prefer = {"indices": indices, "num_experts": self.num_experts} if self.prefer_active else {}
        if single:
            keep, kept_pairs = self._single_token_keep(indices, count)  # [1, k_max], n
        elif native_few is not None:
            keep, kept_pairs = native_few
        elif few is not None:
            pairs = self._forward_pairs(real_tokens, count)
            rows, kept_pairs = rules.alloc_t_keep_few(few, real_list, pairs, self.k_base)
            keep = torch.tensor(rows, device=indices.device)  # [T, k_max]
        elif self.token_selector is not None:
            keep = self.token_selector(scores, weights.float(), real) & real[:, None]  # [T, k_max]
        elif self.token_level and self.pooling == "position" and self.context.shape is not None:
            keep = self._keep_by_position(scores, real, count, prefer)  # [T, k_max]
        elif self.token_level and self.scope == "sequence" and self.context.shape is not None \
                and self.context.shape[0] > 1:
            keep = self._keep_by_sequence(scores, real, count, prefer)  # [T, k_max]
        elif self.token_level:
            pairs = self._forward_pairs(real_tokens, count)
            keep = rules.alloc_t_keep(scores, real, pairs, self.k_base, **prefer)  # [T, k_max]
        else:
            keep = rules.uniform_keep(real, indices.shape[1], int(self.k))  # [T, k_max]
        normalized = rules.normalize_weights(
            weights, keep, mode=self.mode, norm_order=self.norm_order, scale=self.scale,
            reference_k=self.reference_k, reference_scores=reference_scores,
        )  # [T, k_max]
        if expert_scale is not None:
            normalized = normalized * expert_scale
        if count:
            counted_already = single or few is not None or native_few is not None
            self.counter.pairs += kept_pairs if counted_already else int(keep.sum())
            self.counter.tokens += real_tokens
        return RoutingDecision(keep=keep, weights=normalized, indices=indices, real=real,
                               first=kept_pairs if single else None)

    def _native_few(self, scores: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, real: torch.Tensor,
                    count: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, int], list[bool]] | None:
        """The few-token selection through the native kernel (``rules.alloc_t_keep_few_native``): (weights,
        indices sorted by score, (keep [T, k_max], pairs kept), the real tokens as a list), or None where it
        cannot serve the call, with the decode ledger as it was."""
        real_list = real.tolist()
        real_tokens = sum(real_list)
        before = (self.ledger.forwards, self.ledger.pairs)
        pairs = self._forward_pairs(real_tokens, count)
        selected = rules.alloc_t_keep_few_native(scores, weights, indices, real, pairs, self.k_base)
        if selected is None:
            self.ledger.forwards, self.ledger.pairs = before  # the fallback counts this forward itself
            return None
        new_weights, new_indices, keep, kept = selected
        return new_weights, new_indices, (keep, kept), real_list

    def _forward_pairs(self, real_tokens: int, count: bool) -> int:
        """Pairs this forward's pool runs: round(k T) (the ledger's count for one real token, when counting),
        at least k_base and at most k_max for each real token."""
        pairs = rules.pairs_for(self.k, real_tokens, self.ledger if count else None)
        return max(self.k_base * real_tokens, min(pairs, self.k_max * real_tokens))

    def _few_tokens(self, num_tokens: int, device: torch.device) -> bool:
        """Whether this forward's Alloc-T selection can run in Python (``rules.alloc_t_keep_few``): a few
        tokens on CPU pooling one budget by score (no selector, no ``prefer: active``, no per-row or
        per-position pools), as in batched decode."""
        return (fast_paths().few_tokens_keep and device.type == "cpu" and 1 < num_tokens <= rules.FEW_TOKENS
                and self.token_level and self.token_selector is None and not self.prefer_active
                and self.pooling == "forward"
                and not (self.scope == "sequence" and self.context.shape is not None and self.context.shape[0] > 1))

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
            n = rules.pairs_for(self.k, 1, self.ledger if count else None)
            n = max(self.k_base, min(n, self.k_max))
        else:
            n = int(self.k)
        return self._cached(f"first-{n}-of-{width}", indices.device,
                            lambda: torch.arange(width, device=indices.device)[None, :] < n), n

    def _row_ledger(self, row: int) -> rules.DecodeLedger:
        if row not in self.row_ledgers:
            self.row_ledgers[row] = rules.DecodeLedger()
        return self.row_ledgers[row]

    def reset_ledgers(self) -> None:
        for ledger in self.row_ledgers.values():
            ledger.reset()

    def _grouped_keep(self, scores: torch.Tensor, real: torch.Tensor, groups: torch.Tensor, real_per_group: list[int],
                      ledgers: list[rules.DecodeLedger | None], prefer: dict[str, Any]) -> torch.Tensor:
        """Alloc-T within groups: a group of one real token counts through its ledger, others round(k n)."""
        pairs = [rules.pairs_for(self.k, n, ledger if n == 1 else None) if n else 0
                 for n, ledger in zip(real_per_group, ledgers)]
        pairs = [max(self.k_base * n, min(p, self.k_max * n)) for p, n in zip(pairs, real_per_group)]
        return rules.alloc_t_keep_grouped(scores, real, groups, torch.tensor(pairs, device=scores.device),
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
            counted = {t: rules.pairs_for(self.k, 1, ledgers[t]) if real_list[t] else 0 for t in order}
            pairs = [max(self.k_base * int(real_list[t]), min(counted[t], self.k_max * int(real_list[t])))
                     for t in range(scores.shape[0])]
            return rules.alloc_t_keep_grouped(scores, real, index, torch.tensor(pairs, device=scores.device),
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
        elif (fast_paths().native_few_tokens_keep and 1 < decision.keep.shape[0] <= rules.FEW_TOKENS
              and (rewritten := rules.rewrite_few_native(
                decision.keep, decision.weights, decision.indices, decision.real, self.gain, self.compensated,
                self.num_experts)) is not None):
            # A few tokens' rewrite in one native call: the torch form's result for any mask and weights.
            new_weights, new_indices = rewritten
        else:
            keep, normalized = decision.keep, decision.weights
            kept = normalized * self.gain if self.gain != 1.0 else normalized
            if self.compensated:
                new_weights = torch.where(keep, kept, torch.where(decision.real[:, None], normalized, 0.0))
                new_indices = torch.where(keep, decision.indices, decision.indices + self.num_experts)
            else:
                new_weights = torch.where(keep, kept, 0.0)
                new_indices = torch.where(keep, decision.indices, self.num_experts)  # sentinel for dropped slots
        return rules.as_dtype(new_weights, output_dtype), new_indices

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


def record_padding(context: ForwardContext) -> Callable:
    """A forward pre-hook on the model that records its token grid and padding in ``context``."""
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
