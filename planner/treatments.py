"""What a plan carries besides k: weight treatments and compensation, fitted on calibration tokens.

For every MoE layer l and candidate k the layer's routed output at k should stay
close to its output at full k. Two per-layer numbers and a set of stand-ins help:

* **Weight treatments**, registered in allocplan/weight_treatments/, one module each: the
  normaliser width k2 (families that renormalise their top-k weights: decoupled
  renormalisation, arXiv 2609.04575, k2 chosen per (l, k) by the smallest squared error of
  the layer's routed output against its full-k output) and the gain (families that do not:
  a closed-form least-squares factor on the kept weights). :func:`fit_treatments` routes
  each treatment's options through the runtime's own decision and hands it the kept
  output a, the stand-ins' part b and the full-k output y of every calibration batch.
* **Compensation**: a dropped candidate of expert e adds its routing weight times a
  stand-in for e's output, of a registered kind (allocplan/standins/): c_e, e's mean
  output over the calibration tokens routed to it (``expert``, MoNE, arXiv 2507.00390);
  the layer's mean routed expert output (``layer``); or c_e plus a rank-r linear map of
  the input (``linear``, the reduced-rank least-squares fit of e's output on its input,
  its factors on the half-precision grid). This module gathers the weighted moments
  every kind is fitted from; each kind's module fits its stand-ins from them. The
  stand-ins go in the plan's sidecar.
* **What the stand-ins are fitted on**: a stand-in only ever replaces a candidate a plan
  drops, and plans drop each token's lowest-ranked candidates, so the means and fits are
  weighted by :func:`drop_weights`: the candidate a token ranks r-th of K by selection
  score counts 2 r / K (r / K is the share of budget ratios at which uniform top-k drops
  it), and its first candidate not at all. Chosen on calibration text only by
  scripts/cv_stand_in_fit.py (4 folds over the bundled calibration text, default plan
  at budget 0.5, mean gap closed on each fold's held-out windows; every candidate
  counted alike -> these weights): ref-dsv2 0.782 -> 0.810, ref-olmoe 0.844 -> 0.927,
  ref-qwen3 0.901 -> 0.919. Only the later half of each token's candidates, counted
  alike: 0.810, 0.914, 0.896.
* **Stand-in rank**: by default each layer's linear stand-ins take the largest rank
  whose 2 r H multiply-adds cost at most ``compensation_share`` (``STAND_IN_SHARE``, 10%)
  of one expert's (:func:`stand_in_rank`); at budget 0.5 that is about 10% of the kept
  experts' work.
  Chosen on the same calibration folds (``--stand-in-share``, ``--extra-experts``), mean gap
  closed at share 0.05 / 0.10 / 0.15 / 0.20: ref-dsv2 0.810 / 0.871 / 0.895 / 0.914,
  ref-olmoe 0.927 / 0.967 / 0.963 / -, ref-qwen3 0.919 / 0.944 / - / -. Work spent on
  experts instead (ref-dsv2, share 0.05, budget 15 + j of 30, in expert-equivalents per
  token: share 0.10 is 16.5, 0.15 is 17.3, one more expert 16.7, two 17.6): one more
  expert closes 0.837, two 0.881. On ref-dsv2 rank is the better use of work at every
  share tried (0.15 closes more than two more experts with less work), but on ref-olmoe
  it stops paying after 0.10 while its cost keeps growing, so 0.10. (ref-dsv2 at 0.07: 0.850.)
* **Drop order**: with the stand-ins fitted, each expert's miss m_e, the root mean
  square of ||y - stand-in|| over the same (token, expert) pairs, weighted alike, gives
  a factor (m_e / mean_e m_e) ** ``DROP_ORDER_POWER`` that multiplies the expert's selection
  score when the runtime ranks a token's candidates. Dropping candidate e costs the
  layer about w_e m_e of error, so the candidates whose stand-ins serve best rank
  last and are the ones dropped. The factors go in the sidecar too.

Everything comes from one reference forward per calibration batch: hooks catch
each MoE layer's router output, its experts' input and their full-k output;
each candidate's unweighted expert output is computed once per (layer, batch)
and reused for every k and k2. The routing decision is the runtime's own
(:meth:`~allocplan.runtime.routing.LayerRouting.decide`), Alloc-T included, so the
fit sees exactly the routing the plan will run.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch

from allocplan.registries import lookup
from allocplan.standins import get_stand_in_kind, map_multiply_adds
from allocplan.standins.expert import positive
from allocplan.formats.config import STAND_IN_SHARE, ProfileConfig, RoutingConfig
from allocplan.formats.sidecar import CompensationRecord, rank_bias_name, record_for
from allocplan.progress import progress
from ..runtime.allocation_builder import allocation_for
from allocplan.weight_treatments import WEIGHT_TREATMENTS
from ..runtime.routing import ForwardContext, LayerRouting, RoutingDecision
from ..runtime.experts import StandIns, candidate_outputs
from ..runtime.families import MoEFamily
from ..runtime.layers import MoELayer, expert_multiply_adds, find_moe_layers, model_family
from ..runtime.router_formats import ROUTER_FORMATS
from ..runtime.scores import NORMALIZATION_RULES, SELECTION_SCORES

# A fitted number is stored to this many significant digits (as sensitivities are).
_DIGITS = 9
# Chosen on the calibration holdout, never eval text: holdout NLL of the default plan at budget 0.5
# with the drop order off / power 0.25 / 0.5 was 3.1412 / 3.1362 / 3.1371 (ref-dsv2; 3.1372 at 0.75,
# 3.1395 at 1), 3.0732 / 3.0722 / 3.0718 (ref-olmoe) and 3.3798 / 3.3772 / 3.3772 (ref-qwen3): the
# lowest sum at 0.25.
DROP_ORDER_POWER = 0.25


@dataclass
class LayerIO:
    """One MoE layer's part of a reference forward over one batch.

    Attributes:
        router: the router module; logits [T, E] its scores; weights / indices [T, K] its candidates.
        hidden: [T, H] the experts' input; output: [T, H] their full-k routed output.
    """

    router: Any
    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    hidden: torch.Tensor
    output: torch.Tensor


def capture_layer_io(model: Any, batch: torch.Tensor, layers: list[MoELayer], family: MoEFamily) -> list[LayerIO]:
    """One untouched forward over ``batch``, keeping every MoE layer's router output and experts' I/O."""
    caught: list[dict[str, Any]] = [{} for _ in layers]
    to_candidates = ROUTER_FORMATS[family.router_format].to_candidates
    hooks = []
    for slot, layer in zip(caught, layers):
        def router_hook(router: Any, _args: Any, out: Any, slot: dict = slot) -> None:
            slot["router"] = router
            # Routers that leave the top-k to the block return logits only (dbrx).
            slot["logits"] = out if isinstance(out, torch.Tensor) else to_candidates(router, out)[0]

        def experts_pre(_module: Any, args: tuple, slot: dict = slot) -> None:
            hidden, indices, weights = args[:3]
            slot.update(hidden=hidden.reshape(-1, hidden.shape[-1]), indices=indices, weights=weights)

        def experts_post(_module: Any, _args: Any, out: torch.Tensor, slot: dict = slot) -> None:
            slot["output"] = out.reshape(-1, out.shape[-1])

        hooks += [layer.router.register_forward_hook(router_hook),
                  layer.experts.register_forward_pre_hook(experts_pre),
                  layer.experts.register_forward_hook(experts_post)]
    try:
        with torch.inference_mode():
            model(input_ids=batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [LayerIO(**slot) for slot in caught]


class _ExpertMoments:
    """Weighted running sums over the (input x, output y) pairs of each expert of one layer (float64).

    ``pairs`` counts the pairs of positive weight, ``mass`` sums their weights.
    """

    def __init__(self, num_experts: int, linear: bool) -> None:
        self.num_experts, self.linear = num_experts, linear
        self.pairs = torch.zeros(num_experts, dtype=torch.float64)
        self.mass = torch.zeros(num_experts, dtype=torch.float64)
        self.sum_x = self.sum_y = self.sum_xx = self.sum_xy = None

    def add(self, inputs: torch.Tensor, outputs: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> None:
        """Pairs: inputs [P, H], outputs [P, H], experts [P], weights [P] (all positive)."""
        x, y, w = inputs.double(), outputs.double(), weights.double()
        if self.sum_y is None:
            h = y.shape[1]
            self.sum_x, self.sum_y = torch.zeros(self.num_experts, h, dtype=torch.float64), torch.zeros(
                self.num_experts, h, dtype=torch.float64)
            if self.linear:
                self.sum_xx = torch.zeros(self.num_experts, h, h, dtype=torch.float64)
                self.sum_xy = torch.zeros(self.num_experts, h, h, dtype=torch.float64)
        self.pairs += torch.bincount(experts, minlength=self.num_experts).double()
        self.mass.index_add_(0, experts, w)
        self.sum_x.index_add_(0, experts, w[:, None] * x)
        self.sum_y.index_add_(0, experts, w[:, None] * y)
        if self.linear:
            for e in experts.unique().tolist():
                rows = experts == e
                weighted = x[rows] * w[rows, None]  # [P_e, H]
                self.sum_xx[e] += weighted.T @ x[rows]
                self.sum_xy[e] += weighted.T @ y[rows]

    def stand_ins(self, kind: str, rank: int) -> StandIns:
        """The stand-ins of registered ``kind`` fitted on these moments (allocplan/standins/); an expert with no
        pair of positive weight (never routed to, or only ever a token's first candidate) gets zeros."""
        return StandIns(**get_stand_in_kind(kind).fit(self, rank))


def stand_in_rank(layer: MoELayer, hidden_size: int, share: float = STAND_IN_SHARE) -> int:
    """The largest rank r whose stand-in map costs at most ``share`` of one expert's multiply-adds, at most the
    hidden size (a map of H inputs to H outputs has no higher rank)."""
    return max(1, min(hidden_size, int(share * expert_multiply_adds(layer) // map_multiply_adds(hidden_size, 1))))


def stand_in_ranks(layer: MoELayer, hidden_size: int, kind: str, share: float = STAND_IN_SHARE,
                   rank: int | None = None, choose: bool = True) -> tuple[int, ...]:
    """The stand-in ranks profiled for ``layer`` (0: the constant alone), for the solver to choose from.

    A kind without a map has the constant only. ``linear`` offers the constant, the rank ``rank`` (or the
    largest within ``share``) and, with ``choose``, the largest within twice the share; without
    ``choose`` the one rank alone (today's fixed stand-ins, charged).
    """
    if not get_stand_in_kind(kind).low_rank:
        return (0,)
    base = base_stand_in_rank(layer, hidden_size, share, rank)
    if not choose:
        return (base,)
    wider = min(2 * rank, hidden_size) if rank else stand_in_rank(layer, hidden_size, min(1.0, 2 * share))
    return tuple(sorted({0, base, wider}))


def base_stand_in_rank(layer: MoELayer, hidden_size: int, share: float = STAND_IN_SHARE,
                       rank: int | None = None) -> int:
    """The rank of ``linear`` stand-ins a layer's weight treatments and drop order are fitted with: ``rank``, or
    the largest within ``share`` (:func:`stand_in_rank`), at most the hidden size."""
    return min(rank, hidden_size) if rank else stand_in_rank(layer, hidden_size, share)


def truncated(table: StandIns, moments: "_ExpertMoments", rank: int) -> StandIns:
    """``table`` (a ``linear`` fit, directions most explained first) cut to rank ``rank``, its constant refitted.

    The reduced-rank fit nests: its first r columns are the rank-r fit, and for a given map the
    least-squares constant is mean_y - mean_x @ down @ up, recomputed here in float64 from the
    stored (half-grid) factors, exactly as the fit computes it. Rank 0 keeps each expert's mean
    output alone (the constant stand-in). The drop order is kept.
    """
    if table.down is None:
        return table
    count = positive(moments.mass)[:, None]  # [E, 1]
    mean_x, mean_y = moments.sum_x / count, moments.sum_y / count  # [E, H]
    if rank == 0:
        return StandIns(mean_y.float(), None, None, table.order)
    down = table.down[..., :rank].contiguous()  # [E, H, r]
    up = table.up[:, :rank].contiguous()  # [E, r, H]
    bias = mean_y - torch.einsum("eh,ehr,erg->eg", mean_x, down.double(), up.double())  # [E, H]
    return StandIns(bias.float(), down, up, table.order)


def ramp_weights(scores: torch.Tensor) -> torch.Tensor:
    """[T, K] float64: how much each (token, candidate) pair counts in the stand-ins' fit (the default).

    ``scores`` [T, K] are the candidates' selection scores. The candidate a token ranks r-th
    (from 0, ties in slot order) gets 2 r / K: r / K is the share of budget ratios at which
    uniform top-k drops it, and the factor 2 makes the mean weight one over the candidates
    after the token's first. The first gets 0: a plan drops it only where a token may keep no
    expert at all (k_base 0), which the default routing never does. With K = 1 the one candidate is all a plan can drop (a k below
    one under Alloc-T), and every pair gets 1.
    """
    slots = scores.shape[1]
    if slots == 1:
        return torch.ones(scores.shape, dtype=torch.float64)
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices  # [T, K]: slot of each rank
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(slots).expand_as(order))  # [T, K]
    return rank.double() * (2.0 / slots)


def uniform_weights(scores: torch.Tensor) -> torch.Tensor:
    """[T, K] float64: every (token, candidate) pair counts 1 (the rule before the ramp)."""
    return torch.ones(scores.shape, dtype=torch.float64)


def half_weights(scores: torch.Tensor) -> torch.Tensor:
    """[T, K] float64: the later half of each token's candidates count 1 (2 r / K >= 1), the rest 0."""
    return (ramp_weights(scores) >= 1.0 - 1e-9).double() if scores.shape[1] > 1 else uniform_weights(scores)


# The weightings of the stand-ins' fit that scripts/cv_stand_in_fit.py cross-validates on calibration text;
# plans are fitted with "ramp" (the others exist for that comparison only, and no plan records them).
DROP_WEIGHTINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ramp": ramp_weights, "uniform": uniform_weights, "half": half_weights}
_DROP_WEIGHTING: contextvars.ContextVar[str] = contextvars.ContextVar("allocplan_drop_weighting", default="ramp")


def drop_weights(scores: torch.Tensor) -> torch.Tensor:
    """[T, K] float64: each (token, candidate) pair's weight in the stand-ins' fit, by the weighting in
    force (:func:`ramp_weights` unless a block runs under :func:`using_drop_weighting`)."""
    return DROP_WEIGHTINGS[_DROP_WEIGHTING.get()](scores)


@contextlib.contextmanager
def using_drop_weighting(name: str) -> Iterator[None]:
    """Fit stand-ins with weighting ``name`` (of :data:`DROP_WEIGHTINGS`) inside the block.

    Raises:
        AllocplanError: an unknown weighting, listing the known ones.
    """
    lookup(DROP_WEIGHTINGS, name, "drop weighting")
    token = _DROP_WEIGHTING.set(name)
    try:
        yield
    finally:
        _DROP_WEIGHTING.reset(token)


def _dropped_pairs(model: Any, windows: torch.Tensor, batch_size: int, layers: list[MoELayer], family: MoEFamily,
                   desc: str):
    """Per batch and layer: (layer index, inputs [P, H], unweighted outputs [P, H], experts [P], weights [P])
    of the (token, candidate) pairs of an untouched forward that a plan can drop, weighted by
    :func:`drop_weights`."""
    selection = SELECTION_SCORES[family.selection]
    for batch in progress(windows.split(batch_size), desc=desc):
        for position, (layer, io) in enumerate(zip(layers, capture_layer_io(model, batch, layers, family))):
            outputs = candidate_outputs(layer.experts, family.experts_swap, io.hidden, io.indices)  # [T, K, H]
            weights = drop_weights(selection(io.router, io.logits).gather(-1, io.indices))  # [T, K]
            fitted = weights > 0  # [T, K]
            inputs = io.hidden[:, None, :].expand(-1, io.indices.shape[1], -1)  # [T, K, H]
            yield position, inputs[fitted], outputs[fitted], io.indices[fitted], weights[fitted]


def _fitted_moments(model: Any, windows: torch.Tensor, kind: str, batch_size: int, layers: list[MoELayer],
                    family: MoEFamily) -> list[_ExpertMoments]:
    """Each layer's weighted moments of the (token, candidate) pairs a plan can drop (one untouched pass)."""
    moments = [_ExpertMoments(layer.experts.num_experts, get_stand_in_kind(kind).low_rank) for layer in layers]
    for position, inputs, outputs, experts, weights in _dropped_pairs(model, windows, batch_size, layers, family,
                                                                      f"fitting {kind} stand-ins"):
        moments[position].add(inputs, outputs, experts, weights)
    return moments


def _with_drop_order(model: Any, windows: torch.Tensor, batch_size: int, layers: list[MoELayer], family: MoEFamily,
                     tables: list[StandIns], moments: list[_ExpertMoments]) -> list[StandIns]:
    """``tables`` with each expert's drop-order factor, measured on a second pass over ``windows``."""
    squared = [torch.zeros(layer.experts.num_experts, dtype=torch.float64) for layer in layers]
    for position, inputs, outputs, experts, weights in _dropped_pairs(model, windows, batch_size, layers, family,
                                                                      "measuring the drop order"):
        miss = (outputs.float() - tables[position].rows(inputs.float(), experts)).double().pow(2).sum(-1)  # [P]
        squared[position].index_add_(0, experts, weights * miss)
    return [dataclasses.replace(table, order=drop_order_factors(total, moment.mass))
            for table, total, moment in zip(tables, squared, moments)]


@torch.inference_mode()
def stand_in_options(model: Any, windows: torch.Tensor, kind: str, batch_size: int,
                     ranks: dict[str, tuple[int, ...]], base_rank: dict[str, int], drop_order: bool,
                     ) -> dict[str, dict[int, StandIns]]:
    """Per MoE layer path and rank of ``ranks``, the stand-ins of ``kind`` the solver may choose from.

    One fit at each layer's largest rank, cut to every other (:func:`truncated`: the same fit, its
    constant refitted per rank). The drop order is measured with the stand-ins at ``base_rank`` (the
    rank the weight treatments are fitted with) and shared by every rank, so one routing order serves
    the whole profile.
    """
    layers = find_moe_layers(model)
    family = model_family(model)
    moments = _fitted_moments(model, windows, kind, batch_size, layers, family)
    low_rank = get_stand_in_kind(kind).low_rank
    tables = [moment.stand_ins(kind, max(ranks[layer.path]) if low_rank else 1)
              for layer, moment in zip(layers, moments)]
    base = [truncated(table, moment, base_rank[layer.path]) if low_rank else table
            for layer, table, moment in zip(layers, tables, moments)]
    if drop_order:
        ordered = _with_drop_order(model, windows, batch_size, layers, family, base, moments)
        tables = [dataclasses.replace(table, order=with_order.order) for table, with_order in zip(tables, ordered)]
    return {layer.path: {rank: truncated(table, moment, rank) if low_rank else table for rank in ranks[layer.path]}
            for layer, table, moment in zip(layers, tables, moments)}


@torch.inference_mode()
def compensation_tables(model: Any, windows: torch.Tensor, kind: str, batch_size: int,
                        rank: int | None = None, drop_order: bool | None = None,
                        share: float = STAND_IN_SHARE) -> dict[str, StandIns]:
    """Per MoE layer path, the stand-ins of ``kind`` (module docstring), fitted on the (token, candidate)
    pairs of an untouched forward weighted by :func:`drop_weights`.

    ``rank`` of linear stand-ins: None chooses per layer with :func:`stand_in_rank` at ``share``.
    ``drop_order``: also measure each expert's drop-order factor (a second pass over ``windows``);
    None: ``ProfileConfig``'s default.
    """
    if drop_order is None:
        drop_order = ProfileConfig().drop_order
    layers = find_moe_layers(model)
    family = model_family(model)
    moments = _fitted_moments(model, windows, kind, batch_size, layers, family)
    hidden_size = model.get_input_embeddings().embedding_dim
    tables = [moment.stand_ins(kind, rank or stand_in_rank(layer, hidden_size, share))
              for layer, moment in zip(layers, moments)]
    if drop_order:
        tables = _with_drop_order(model, windows, batch_size, layers, family, tables, moments)
    return {layer.path: table for layer, table in zip(layers, tables)}


def drop_order_factors(squared_miss: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[E] float32 drop-order factors from each expert's summed squared stand-in miss and the summed
    weight of its pairs (both weighted by :func:`drop_weights`).

    (m_e / mean m) ** DROP_ORDER_POWER with m_e = sqrt(squared_miss_e / count_e), the mean over the
    experts with pairs; an expert without pairs, or a layer whose stand-ins never miss, gets 1.
    """
    seen = count > 0
    miss = (squared_miss / positive(count)).sqrt()  # [E]
    mean = miss[seen].mean() if bool(seen.any()) else miss.new_zeros(())
    if not float(mean) > 0:
        return torch.ones_like(miss, dtype=torch.float32)
    factors = torch.where(seen, miss / mean, 1.0).clamp_min(1e-6) ** DROP_ORDER_POWER
    return torch.tensor([float(f"{f:.{_DIGITS}g}") for f in factors.tolist()], dtype=torch.float32)


# The precisions a sidecar stores its stand-ins in (the drop order is always float32).
SIDECAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sidecar_dtype(model: Any) -> torch.dtype:
    """The precision of a model's stand-ins in its sidecar: its experts' when that is a 16-bit float (the
    runtime casts stand-ins to the experts' dtype anyway, so float32 would only double the file), else
    float32 (a float64 model's stand-ins are fitted in float32 to begin with)."""
    layers = find_moe_layers(model)
    dtype = next(layers[0].experts.parameters()).dtype if layers else torch.float32
    return dtype if dtype in SIDECAR_DTYPES else torch.float32


def encode_tables(tables: dict[str, StandIns], kind: str, dtype: torch.dtype = torch.float32
                  ) -> tuple[CompensationRecord, bytes]:
    """The sidecar's bytes (safetensors, layers in path order) and the record naming them.

    ``dtype``: the stand-ins' precision, one of ``SIDECAR_DTYPES`` (:func:`sidecar_dtype` of the
    model they were fitted on); the drop order stays float32, as the selection scores it multiplies.
    """
    from safetensors.torch import save

    if dtype not in SIDECAR_DTYPES:
        raise ValueError(f"sidecar dtype {dtype} is not one of {', '.join(map(str, SIDECAR_DTYPES))}")
    tensors = {}
    for path in sorted(tables):
        stand_ins = tables[path]
        tensors[path] = stand_ins.bias.to(dtype).contiguous()
        if stand_ins.down is not None:
            tensors[f"{path}.down"] = stand_ins.down.to(dtype).contiguous()
            tensors[f"{path}.up"] = stand_ins.up.to(dtype).contiguous()
        if stand_ins.order is not None:
            tensors[f"{path}.order"] = stand_ins.order.float().clone()  # own storage: safetensors refuses shared
    data = save(tensors)
    return record_for(data, kind), data


def encode_options(options: dict[str, dict[int, StandIns]], kind: str, dtype: torch.dtype = torch.float32
                   ) -> tuple[CompensationRecord, bytes]:
    """A profile's sidecar of stand-in options (formats/sidecar.plan_sidecar cuts a plan's from it): per
    layer, the factors at its largest rank, one constant per rank and the drop order."""
    from safetensors.torch import save

    if dtype not in SIDECAR_DTYPES:
        raise ValueError(f"sidecar dtype {dtype} is not one of {', '.join(map(str, SIDECAR_DTYPES))}")
    tensors = {}
    for path in sorted(options):
        by_rank = options[path]
        largest = by_rank[max(by_rank)]
        for rank, table in by_rank.items():
            tensors[rank_bias_name(path, rank)] = table.bias.to(dtype).contiguous()
        if largest.down is not None:
            tensors[f"{path}.down"] = largest.down.to(dtype).contiguous()
            tensors[f"{path}.up"] = largest.up.to(dtype).contiguous()
        if largest.order is not None:
            tensors[f"{path}.order"] = largest.order.float().clone()
    data = save(tensors)
    return record_for(data, kind), data


def renormalises(layer: MoELayer, family: MoEFamily) -> bool:
    """Whether the family rescales its chosen weights to sum to one (then a normaliser width applies)."""
    return NORMALIZATION_RULES[family.normalization](layer.router, layer.block) == 1.0


def _parts(decision: RoutingDecision, outputs: torch.Tensor, stand_ins: torch.Tensor | None,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept routed output a, compensation b), each [T, H], of one routing decision.

    ``outputs`` and ``stand_ins`` are [T, K, H] in the captured candidates' order; the
    decision's candidates are sorted by score, so both are looked up by expert.
    """
    weights = decision.weights[..., None]  # [T, K, 1]
    keep = decision.keep[..., None]  # [T, K, 1]
    a = (torch.where(keep, weights, 0.0) * outputs).sum(1)  # [T, H]
    if stand_ins is None:
        return a, torch.zeros_like(a)
    b = (torch.where(keep, 0.0, weights) * stand_ins).sum(1)  # [T, H]
    return a, b


@torch.inference_mode()
def fit_treatments(
    model: Any,
    windows: torch.Tensor,
    grid: dict[str, list[int | float]],
    routing: RoutingConfig,
    tables: dict[str, StandIns] | None,
    batch_size: int,
) -> dict[str, dict[int | float, dict[str, Any]]]:
    """Per layer path and k of ``grid``: the fitted weight treatments, field -> value.

    Each registered treatment (allocplan/weight_treatments/) that applies to the family at (l, k)
    routes its options through the runtime's own decision and chooses from their statistics; the
    neutral option's decision is shared. k equal to the layer's original k keeps none: a layer at
    full k is left as it is.
    """
    layers = find_moe_layers(model)
    family = model_family(model)
    originals = [layer.top_k for layer in layers]
    context = ForwardContext()  # calibration windows have no padding

    def decider(position: int, k: int | float, treated: dict[str, Any]) -> LayerRouting:
        ks = [k if i == position else original for i, original in enumerate(originals)]
        treatments = [treated if i == position else {} for i in range(len(layers))]
        allocation = allocation_for(model, ks, routing, treatments=treatments)
        # The fit sees the candidates in the order the plan will rank them (drop order included).
        order = None if tables is None else tables[layers[position].path].order
        return LayerRouting(layers[position], allocation.layers[position], allocation, family, context,
                            drop_order=order)

    # Per (position, k): the routings to decide, the neutral one first (every treatment's neutral option
    # shares it), and each applicable treatment with its options (value, index of its routing) and its
    # statistics.
    deciders: dict[tuple[int, int | float], list[LayerRouting]] = {}
    fits: dict[tuple[int, int | float], list[tuple[Any, list[tuple[Any, int]], dict]]] = {}
    for position, layer in enumerate(layers):
        width = routing.k_max or layer.top_k
        for k in grid[layer.path]:
            if k == layer.top_k:
                continue
            applicable = [treatment for treatment in WEIGHT_TREATMENTS.values()
                          if treatment.applies(renormalises(layer, family), k, width)]
            if not applicable:
                continue
            routings = deciders[position, k] = [decider(position, k, {})]
            fits[position, k] = []
            for treatment in applicable:
                options = []
                for value in treatment.options(k, width):
                    if value != treatment.neutral:
                        routings.append(decider(position, k, {treatment.field: value}))
                    options.append((value, 0 if value == treatment.neutral else len(routings) - 1))
                fits[position, k].append((treatment, options, {}))
    for batch in progress(windows.split(batch_size), desc="fitting weight treatments"):
        captured = capture_layer_io(model, batch, layers, family)
        for position, (layer, io) in enumerate(zip(layers, captured)):
            target = io.output.float()  # [T, H]
            outputs = stand_ins = None
            for k in grid[layer.path]:
                if (position, k) not in fits:
                    continue
                parts = []  # (a, b) of each routing, in deciders' order
                for routing_k in deciders[position, k]:
                    decision = routing_k.decide(io.router, io.logits, io.weights, io.indices, count=False)
                    if outputs is None:
                        # Every candidate's output and stand-in, once per layer and batch, in the decision's
                        # order (candidates sorted by selection score, the same for every k and option).
                        sorted_indices = decision.indices
                        outputs = candidate_outputs(layer.experts, family.experts_swap, io.hidden,
                                                    sorted_indices).float()  # [T, K, H]
                        if tables is not None:
                            slots = sorted_indices.shape[1]
                            rows = tables[layer.path].rows(io.hidden.repeat_interleave(slots, dim=0).float(),
                                                           sorted_indices.reshape(-1))
                            stand_ins = rows.reshape(outputs.shape).float()  # [T, K, H]
                    parts.append(_parts(decision, outputs, stand_ins))
                for treatment, options, stats in fits[position, k]:
                    for value, at in options:
                        treatment.accumulate(stats, value, *parts[at], target)
    fitted: dict[str, dict[int | float, dict[str, Any]]] = {}
    for position, layer in enumerate(layers):
        row = fitted[layer.path] = {}
        for k in grid[layer.path]:
            row[k] = {treatment.field: treatment.choose(stats, [value for value, _ in options])
                      for treatment, options, stats in fits.get((position, k), [])}
    return fitted
