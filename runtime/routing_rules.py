"""Token-level routing (Alloc-T) and weight renormalisation, as plain tensor functions.

A layer's router runs at its candidate width k_max and returns, per token, k_max
candidate experts. allocplan then decides which (token, candidate) pairs run:

* uniform: every real token keeps its first k candidates (the family's own top-k).
* Alloc-T: every real token keeps its first k_base candidates; the remaining
  ``total_pairs - k_base * T`` pairs go to the highest-scoring candidates of
  rank k_base+1 .. k_max across all T real tokens of the forward pass, so the
  layer runs exactly ``total_pairs`` pairs and a hard token (flat scores) gets
  more experts than a confident one.

Candidates are ranked by the family's selection score (e.g. DeepSeek-V3's
bias-corrected sigmoid), not by position: some routers return them unsorted.
Dropped slots get the index ``num_experts`` (the "no expert" sentinel that the
experts implementations skip) and weight 0.
"""

from __future__ import annotations

import functools
import math

import torch

from allocplan.formats.budget import round_half_up

from .native import standins_kernel


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, skipping the dispatch when it already is (batch-1 decode pays for every op)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def sort_candidates(
    scores: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order each token's candidates by decreasing selection score.

    Args:
        scores: [T, K] selection scores of the candidates.
        weights: [T, K] the router's combine weights for them.
        indices: [T, K] expert ids.
    """
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)  # [T, K] each
    return sorted_scores, weights.gather(-1, order), indices.gather(-1, order)


def sort_one_token(scores: torch.Tensor, weights: torch.Tensor,
                   indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sort_candidates``' weights and indices for one token ([1, K] each) on CPU, ordered in Python.

    At batch 1 on CPU, ``torch.sort`` of K = 6 scores costs about 13 us, nearly all of it fixed
    cost, while reading K scores back costs about 1 us. Python's sort is stable with ``reverse``
    too, so ties keep their slot order as in the stable descending ``torch.sort``: the same order
    (NaN scores aside). Candidates already in order (routers return their top-k sorted by score;
    a drop order moves some) cost no gather at all.
    """
    values = scores.tolist()[0]  # (tolist of the [1, K] tensor itself: indexing first adds a view op)
    order = tuple(sorted(range(len(values)), key=values.__getitem__, reverse=True))
    if order == tuple(range(len(order))):
        return weights, indices
    permutation = _permutation(order, indices.device)  # [1, K]
    return weights.gather(-1, permutation), indices.gather(-1, permutation)


@functools.lru_cache(maxsize=4096)
def _permutation(order: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[1, K] index tensor of ``order``, built once: ``torch.tensor`` from a list costs about as much
    as the sort it replaces. Shared and never written."""
    return torch.tensor([order], device=device)


def rank_by_drop_order(selection: torch.Tensor, order: torch.Tensor, signed: bool) -> torch.Tensor:
    """[T, E] selection scores reranked by a drop order (``StandIns.order``): a larger factor ranks higher.

    Args:
        selection: [T, E] the family's selection scores.
        order: [E] positive per-expert factors (float32, on the scores' device).
        signed: the scores can be negative (a correction bias); those are divided by the factor.
    """
    if signed:
        return torch.where(selection >= 0, selection * order, selection / order)  # [T, E]
    return selection * order  # [T, E]


def uniform_keep(real: torch.Tensor, num_candidates: int, k: int) -> torch.Tensor:
    """[T, K] mask keeping the first k candidates of every real token."""
    keep = torch.zeros(real.shape[0], num_candidates, dtype=torch.bool, device=real.device)  # [T, K]
    keep[:, :k] = real[:, None]
    return keep


def running_candidates(indices: torch.Tensor, keep: torch.Tensor, real: torch.Tensor, groups: torch.Tensor,
                       num_groups: int, num_experts: int) -> torch.Tensor:
    """[T, K] mask of the candidates of real tokens whose expert already runs for a kept pair of their group.

    Args:
        indices: [T, K] candidate expert ids (below ``num_experts``).
        keep: [T, K] the pairs already kept.
        groups: [T] each token's pool, 0 .. num_groups-1.
    """
    running = torch.zeros(num_groups, num_experts, dtype=torch.bool, device=indices.device)  # [G, E]
    running[groups[:, None].expand_as(indices)[keep], indices[keep]] = True
    return running[groups[:, None], indices] & real[:, None]  # [T, K]


def _running_first(order: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
    """``order`` (flat candidate positions) with the running candidates first, each part's order kept."""
    return order[torch.argsort((~running[order]).to(torch.int8), stable=True)]


def alloc_t_keep(scores: torch.Tensor, real: torch.Tensor, total_pairs: int, k_base: int,
                 indices: torch.Tensor | None = None, num_experts: int = 0) -> torch.Tensor:
    """[T, K] mask of the pairs Alloc-T runs (scores sorted per token, descending).

    Every real token keeps its first ``k_base`` candidates; the rest of
    ``total_pairs`` are the highest-scoring remaining candidates of real tokens.
    Padding tokens (``real`` False) get nothing. ``total_pairs`` must lie in
    [k_base * T_real, K * T_real].

    With ``indices`` ([T, K] expert ids; ``prefer: active``), the remaining pairs go first to
    candidates whose expert already runs for a kept (first ``k_base``) pair, by score, and only
    then to the others: the same pairs over fewer distinct experts (OEA-style).
    """
    num_tokens, num_candidates = scores.shape
    keep = uniform_keep(real, num_candidates, k_base)  # [T, K]
    extra = total_pairs - k_base * int(real.sum())
    if extra > 0 and indices is not None:
        # One pool: the grouped selection with a single group orders the candidates the same way.
        groups = torch.zeros(num_tokens, dtype=torch.long, device=scores.device)  # [T]
        return alloc_t_keep_grouped(scores, real, groups, torch.tensor([total_pairs], device=scores.device),
                                    k_base, indices, num_experts)
    elif extra > 0:
        pool = scores[:, k_base:].float().masked_fill(~real[:, None], -math.inf)  # [T, K - k_base]
        chosen = torch.topk(pool.reshape(-1), extra, sorted=False).indices  # [extra]
        rest = torch.zeros(pool.numel(), dtype=torch.bool, device=scores.device)
        rest[chosen] = True
        keep[:, k_base:] = rest.view(num_tokens, num_candidates - k_base)
    return keep


# Up to this many tokens in a forward on CPU, Alloc-T's selection runs in Python on the scores read back
# (``sort_few_tokens``, ``alloc_t_keep_few``): batched decode's 8 tokens pay the general form's dozen small
# ops, each its fixed dispatch cost, for a decision over a few dozen numbers.
FEW_TOKENS = 16


def sort_few_tokens(scores: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
                    ) -> tuple[list[list[float]], torch.Tensor, torch.Tensor] | None:
    """``sort_candidates`` for a few tokens on CPU, ordered in Python: (each token's scores in decreasing
    order, weights [T, K], indices [T, K]), or None where a score is not finite (the general form's
    order of NaN and infinities is torch's to define).

    Python's sort is stable with ``reverse``, so ties keep their slot order as in the stable descending
    ``torch.sort``. Candidates already in order (routers return their top-k sorted) cost no gather.
    """
    values = scores.tolist()  # [T][K]
    if not all(math.isfinite(v) for row in values for v in row):
        return None
    orders = [sorted(range(len(row)), key=row.__getitem__, reverse=True) for row in values]
    identity = list(range(scores.shape[1]))
    if all(order == identity for order in orders):
        return values, weights, indices
    permutation = torch.tensor(orders, device=indices.device)  # [T, K]
    return ([[row[j] for j in order] for row, order in zip(values, orders)],
            weights.gather(-1, permutation), indices.gather(-1, permutation))


def alloc_t_keep_few(values: list[list[float]], real: list[bool], total_pairs: int, k_base: int
                     ) -> tuple[list[list[bool]], int]:
    """:func:`alloc_t_keep` on a few tokens' sorted scores read back as lists: (the keep mask as rows of
    bools, the pairs it keeps). Every real token keeps its first ``k_base``; the rest of ``total_pairs``
    go to the highest-scoring remaining candidates of real tokens, ties to the earlier token and slot
    (as :func:`alloc_t_keep_grouped` breaks them)."""
    keep = [[bool(r) and j < k_base for j in range(len(row))] for row, r in zip(values, real)]
    base = k_base * sum(map(bool, real))
    extra = total_pairs - base
    if extra > 0:
        pool = sorted(((-v, t, j) for t, (row, r) in enumerate(zip(values, real)) if r
                       for j, v in enumerate(row) if j >= k_base))
        for _, t, j in pool[:extra]:
            keep[t][j] = True
        return keep, base + min(extra, len(pool))
    return keep, sum(sum(row) for row in keep)


def alloc_t_keep_few_native(scores: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, real: torch.Tensor,
                            total_pairs: int, k_base: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """:func:`sort_few_tokens` and :func:`alloc_t_keep_few` in one call of the native kernel (runtime/native.py,
    ``alloc_t_few``): (weights [T, K], indices [T, K] sorted by score, the keep mask [T, K], the pairs kept), the
    same decisions; None where the kernel cannot serve the call (not built, not float32, a score not finite).

    At batch 8 the Python form's lists and the tensors built from them cost more than a bundled reference's
    layer saves on its experts; the kernel only compares, orders and copies the same numbers, so what follows
    from its decision is the Python form's result bit for bit.

    Args:
        scores: [T, K] float32 selection scores of each token's candidates, in the router's slot order.
        weights: [T, K] float32 router weights; indices: [T, K] int64 experts, in the same order.
        real: [T] bool, the tokens that are not padding.
    """
    kernel = standins_kernel()
    if (kernel is None or scores.dtype != torch.float32 or weights.dtype != torch.float32
            or indices.dtype != torch.int64 or real.dtype != torch.bool or scores.device.type != "cpu"
            or scores.dim() != 2 or weights.shape != scores.shape or indices.shape != scores.shape):
        return None
    scores, weights, indices, real = scores.contiguous(), weights.contiguous(), indices.contiguous(), real.contiguous()
    tokens, width = scores.shape
    sorted_weights = torch.empty(tokens, width, dtype=torch.float32)  # [T, K]
    sorted_indices = torch.empty(tokens, width, dtype=torch.int64)  # [T, K]
    keep = torch.empty(tokens, width, dtype=torch.bool)  # [T, K], written as bytes 0 and 1
    kept = kernel.alloc_t_few(tokens, width, scores.data_ptr(), weights.data_ptr(), indices.data_ptr(),
                              real.data_ptr(), total_pairs, k_base, sorted_weights.data_ptr(),
                              sorted_indices.data_ptr(), keep.data_ptr())
    if kept == -1:
        return None
    if kept < 0:
        raise MemoryError("native Alloc-T selection: no memory for its scratch")
    return sorted_weights, sorted_indices, keep, kept


def rewrite_few_native(keep: torch.Tensor, normalized: torch.Tensor, indices: torch.Tensor, real: torch.Tensor,
                       gain: float, compensated: bool, num_experts: int
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rewritten routing (weights [T, K] float32, indices [T, K]) of a few tokens in one call of the native
    kernel (``rewrite_few``), bit for bit ``LayerRouting.rewrite``'s torch form; None where it cannot serve."""
    kernel = standins_kernel()
    if (kernel is None or normalized.dtype != torch.float32 or keep.dtype != torch.bool
            or indices.dtype != torch.int64 or real.dtype != torch.bool or normalized.device.type != "cpu"
            or normalized.shape != keep.shape or indices.shape != keep.shape):
        return None
    keep, normalized = keep.contiguous(), normalized.contiguous()
    indices, real = indices.contiguous(), real.contiguous()
    new_weights = torch.empty(keep.shape, dtype=torch.float32)  # [T, K]
    new_indices = torch.empty(keep.shape, dtype=torch.int64)  # [T, K]
    kernel.rewrite_few(keep.shape[0], keep.shape[1], keep.data_ptr(), normalized.data_ptr(), indices.data_ptr(),
                       real.data_ptr(), gain, int(compensated), num_experts, new_weights.data_ptr(),
                       new_indices.data_ptr())
    return new_weights, new_indices


def alloc_t_keep_grouped(scores: torch.Tensor, real: torch.Tensor, groups: torch.Tensor, pairs: torch.Tensor,
                         k_base: int, indices: torch.Tensor | None = None, num_experts: int = 0) -> torch.Tensor:
    """[T, K] mask of the pairs Alloc-T runs when tokens pool their budget only within groups.

    Args:
        scores: [T, K] candidate scores, sorted per token, descending.
        real: [T] tokens that are not padding.
        groups: [T] each token's group, 0 .. G-1.
        pairs: [G] pairs each group runs, in [k_base * n_g, K * n_g] for its n_g real tokens.
        k_base: candidates every real token keeps.
        indices: [T, K] expert ids, given to prefer candidates whose expert already runs in the
            group (``prefer: active``).

    Within a group, as in :func:`alloc_t_keep`: every real token keeps its first ``k_base``
    candidates and the group's remaining pairs go to its highest-scoring other candidates
    (with ``indices``: first to those whose expert already runs for a kept pair of the group).
    """
    num_tokens, num_candidates = scores.shape
    keep = uniform_keep(real, num_candidates, k_base)  # [T, K]
    width = num_candidates - k_base
    if width == 0:
        return keep
    real_per_group = torch.bincount(groups[real], minlength=pairs.numel())  # [G]
    extra = pairs - k_base * real_per_group  # [G]
    pool = scores[:, k_base:].float().masked_fill(~real[:, None], -math.inf).reshape(-1)  # [T * width]
    pool_group = groups.repeat_interleave(width)  # [T * width]
    order = torch.argsort(pool, descending=True, stable=True)
    if indices is not None:
        running = running_candidates(indices, keep, real, groups, pairs.numel(), num_experts)  # [T, K]
        order = _running_first(order, running[:, k_base:].reshape(-1))
    order = order[torch.argsort(pool_group[order], stable=True)]  # by group, then (running first) by score
    sorted_group = pool_group[order]
    counts = torch.bincount(sorted_group, minlength=pairs.numel())
    starts = torch.cumsum(counts, 0) - counts  # [G]
    rank = torch.arange(order.numel(), device=scores.device) - starts[sorted_group]
    rest = torch.zeros(order.numel(), dtype=torch.bool, device=scores.device)
    rest[order[rank < extra[sorted_group]]] = True
    keep[:, k_base:] = rest.view(num_tokens, width)
    return keep


def normalize_weights(
    weights: torch.Tensor,
    keep: torch.Tensor,
    *,
    mode: str,
    norm_order: float | None,
    scale: float,
    reference_k: int,
    reference_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine weights [T, K] under a weight mode, for every candidate (kept or dropped).

    ``weights`` [T, K] are the router's own weights at k_max, sorted like ``keep``.
    They are p_j * c_t for the family's probabilities p and a per-token constant
    c_t (the scaling factor, divided by a norm of the top-k_max when the family
    normalises), so each mode only needs ratios of them:

    * ``model``: what the family does when it natively routes to the kept set: a
      family that normalises with a p-norm (``norm_order``, 1 = sum) rescales the
      kept weights to the norm all k_max had; others keep them unchanged.
    * ``none``: keep the router's weights at k_max unchanged.
    * ``renorm``: kept weights sum to the family's scaling factor (1 for most).
    * ``decoupled``: divide by the mass of the token's top-``reference_k``
      candidates, times the scaling factor (arXiv 2609.04575): a token that
      loses experts does not get its remaining weights inflated. The top ones are
      the first ``reference_k`` slots, or where ``reference_scores`` [T, K] is
      given (the router's own scores when a drop order reranked the slots), the
      ``reference_k`` slots with the highest of those.

    A dropped candidate's weight is what it would get under the same rescaling
    (compensation multiplies it by a stand-in output).
    """
    w = as_dtype(weights, torch.float32)  # [T, K]
    if mode == "none" or (mode == "model" and norm_order is None):
        return w
    if mode == "decoupled":
        top = w[:, :reference_k] if reference_scores is None else w.gather(
            -1, torch.topk(reference_scores, reference_k, dim=-1).indices)  # [T, reference_k]
        reference = top.sum(-1, keepdim=True).clamp_min(1e-30)  # [T, 1]
        # x * 1.0 is x in IEEE arithmetic: the common scale of 1 costs no op (one per layer and step in decode).
        return w / reference * scale if scale != 1.0 else w / reference
    kept = torch.where(keep, w, 0.0)  # [T, K]
    if mode == "model":
        full_norm = torch.linalg.vector_norm(w, ord=norm_order, dim=-1, keepdim=True)  # [T, 1]
        kept_norm = torch.linalg.vector_norm(kept, ord=norm_order, dim=-1, keepdim=True).clamp_min(1e-30)
        return w * (full_norm / kept_norm)
    if mode == "renorm":
        return w / kept.sum(-1, keepdim=True).clamp_min(1e-30) * scale
    raise ValueError(f"unknown renormalisation mode {mode!r}")


def reweight(weights: torch.Tensor, keep: torch.Tensor, **mode: object) -> torch.Tensor:
    """Combine weights of the kept pairs (``normalize_weights``' modes); dropped pairs get 0."""
    return torch.where(keep, normalize_weights(weights, keep, **mode), 0.0).to(weights.dtype)


class DecodeLedger:
    """Per-layer running count for single-token forwards (batch-1 decode).

    One token cannot run a fractional number of experts, so the n-th
    single-token forward runs ``round_half_up(n * k) - (pairs run so far)``:
    k = 2.5 gives 3, 2, 3, 2, ... and the long-run average is exactly k.
    """

    def __init__(self) -> None:
        self.forwards = 0
        self.pairs = 0

    def next_pairs(self, k: float) -> int:
        self.forwards += 1
        target = round_half_up(self.forwards * k)
        pairs = target - self.pairs
        self.pairs = target
        return pairs

    def reset(self) -> None:
        self.forwards = 0
        self.pairs = 0


def pairs_for(k: float, real_tokens: int, ledger: DecodeLedger | None = None) -> int:
    """Pairs a layer with average budget k runs for ``real_tokens`` tokens.

    round_half_up(k * T) for T > 1 (prefill, batched decode); the ledger's count for T = 1.
    """
    if real_tokens == 1 and ledger is not None:
        return ledger.next_pairs(k)
    return round_half_up(k * real_tokens)
