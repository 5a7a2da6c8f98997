"""Alloc-L step 1: measure each MoE layer's sensitivity to a smaller top-k.

For MoE layer l and every candidate k in [k_min, K_l] we run the calibration
windows with layer l at top-k and record the mean next-token loss increase
over the untouched model, S[l, k] = metric(l at k) - metric(all at K).
Strategies fix what the other layers do meanwhile:

* ``isolated``: every other layer keeps its original K (S[l, K_l] = 0 exactly).
* ``paper``: layers before l keep K, layers after l drop to k_min, and layers are
  profiled from the deepest to the shallowest, as described for Alloc-MoE (later
  layers cannot compensate for the loss introduced at l).
* ``anchored``: every other layer keeps K, as in ``isolated``, but S is approximate. Each
  probe of layer l runs l's block and the head only: the layers after l are replaced by
  the residual updates they made in the reference pass (:class:`~.replay.Carried`), so
  l's change reaches the head without the later layers' reaction to it. Two anchor probes
  per layer, on the first calibration batch of every ``ANCHOR_EVERY``, are also measured
  exactly, and their exact-to-carried ratios correct the layer's cells
  (:mod:`~allocplan.planner.anchoring`). A probe costs one block and the head instead of
  every later layer, so time grows linearly in depth but for the anchors; what the
  approximation costs a plan is measured in docs/benchmarks.md (the regret of its plans,
  judged by the exact S).

Profile what you deploy: each probe routes as the plan will (through the runtime,
with Alloc-T when the routing config has it), with each layer's fitted weight
treatment for its k and the compensation of dropped experts in place
(:mod:`~allocplan.planner.treatments`), so S holds the costs that will occur.

Work reused, per calibration batch (``reuse_prefix``; see :mod:`~allocplan.planner.replay`):

* across layers: each batch runs the untouched model once, recording every
  decoder layer's output, and each (l, k) re-runs only the layers after l.
* across k within layer l: attention and everything else before the MoE block
  do not depend on k. For each k only the block runs (on its recorded input),
  and layer l's output is its recorded output plus the block's change. That
  holds where the decoder layer adds the block's output to its residual stream
  unchanged; it is checked once per layer against a real re-run of the layer,
  and a layer that fails the check (e.g. a norm after the block) is re-run
  whole for every k.
* k = K_l under ``isolated`` is the reference configuration itself: S = 0
  without a forward.

``reuse_prefix=False`` is the naive reference: one full forward over the
calibration batch for every probe the reuse path needs (k < K_l under
``isolated``: S[l, K_l] = 0 by definition in both, so a fair baseline skips it too).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from allocplan._version import __version__
from allocplan.progress import progress
from allocplan.errors import AllocplanError
from allocplan.formats.config import ProfileConfig, RoutingConfig
from allocplan.formats.provenance import CalibrationRecord
from allocplan.weight_treatments import WEIGHT_TREATMENTS
from allocplan.formats.profile import (
    PROFILE_KIND,
    PROFILE_SCHEMA_VERSION,
    LayerSensitivity,
    Measurement,
    ProfileProvenance,
    SensitivityProfile,
    k_grid,
)
from allocplan.formats.profile_part import PART_KIND, PART_SCHEMA_VERSION, ProfilePart, Shard, owned_cells
from allocplan.formats.provenance import package_version
from allocplan.formats.sidecar import CompensationRecord
from ..runtime.allocation_builder import allocation_for
from ..runtime.apply import apply_plan
from ..runtime.layers import (MoELayer, expert_multiply_adds, find_moe_layers, input_device, model_family,
                              model_identity)
from .losses import Scratch, kl_sum, next_token_logprobs, token_nll
from .replay import (Carried, Passthrough, Replay, ReplayLayerAtK, block_change_is_additive, hidden_of,
                     record_outputs, replayed)
from .anchoring import Anchor, correction
from .determinism import planner_numerics
from allocplan.standins import get_stand_in_kind
from .treatments import (base_stand_in_rank, encode_options, fit_treatments, sidecar_dtype, stand_in_options,
                         stand_in_ranks)
from .windows import calibration_source, check_token_ids, check_window_length, pack_windows

logger = logging.getLogger("allocplan")

# Sensitivities are stored to 9 significant digits: far below calibration noise,
# and short, stable numbers keep profile and plan diffs readable.
SIGNIFICANT_DIGITS = 9


def rounded(value: float) -> float:
    """``value`` to the profile's 9 significant digits."""
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def layer_ks(strategy: str, originals: list[int], position: int, k: float, k_min: int) -> list[float]:
    """Top-k of every MoE layer while the layer at ``position`` is measured at ``k``."""
    if strategy != "paper":  # isolated, anchored
        later = originals[position + 1 :]
    else:  # paper
        later = [k_min] * (len(originals) - position - 1)
    return originals[:position] + [k] + later


@contextmanager
def top_ks(layers: list[MoELayer], ks: list[int]) -> Iterator[None]:
    """Route each layer natively at the given top-k for the duration of the block."""
    saved = [layer.snapshot() for layer in layers]
    try:
        for layer, k in zip(layers, ks):
            layer.set_top_k(k)
        yield
    finally:
        for layer, state in zip(layers, saved):
            layer.restore(state)


@dataclass(frozen=True)
class Deployment:
    """What a probe runs besides the k: the plan's routing, fitted treatments and compensation.

    Attributes:
        routing: the routing the plan will run (Alloc-T, k_base, weight mode).
        treatments: per layer path and k, the fitted weight treatments (field -> value).
        compensation: the sidecar record and bytes, or None.
        stand_ins: per layer path and stand-in rank, the stand-ins the solver may choose from
            (``StandIns``, in memory); with them every (l, k) is also measured with each rank's
            stand-ins serving layer l, and without any. None: the sidecar serves every layer.
        base_rank: per layer path, the rank of the stand-ins that serve the layers a probe drops
            candidates of besides the measured one (the later layers of the ``paper`` strategy).
    """

    routing: RoutingConfig = RoutingConfig(token_level=False)
    treatments: dict[str, dict[int | float, dict[str, Any]]] | None = None
    compensation: tuple[CompensationRecord, bytes] | None = None
    stand_ins: dict[str, dict[int, Any]] | None = None
    base_rank: dict[str, int] | None = None

    @property
    def plain(self) -> bool:
        """Nothing but top-k: probes can set the routers' k directly."""
        routing = self.routing
        return (not routing.token_level and routing.renormalize == "model" and self.treatments is None
                and self.compensation is None)


# The stand-in option of a probe that measures without stand-ins at the measured layer.
NO_STAND_INS = None
# The anchored strategy measures each layer's anchors exactly on every ANCHOR_EVERY-th calibration batch
# (the first, then every fourth): a ratio of two sums over the same tokens, steadier than the cells it corrects.
ANCHOR_EVERY = 4


def anchor_share(batches: int) -> float:
    """The share of ``batches`` calibration batches the anchored strategy measures its anchors on."""
    return -(-batches // ANCHOR_EVERY) / batches


def anchor_options(row: dict[int | float, float], original: int, layer_ranks: list[int | None]
                   ) -> dict[tuple[int | float, int | None], None]:
    """The anchored strategy's anchor probes (k, stand-in rank) of one layer (planner/anchoring.py): k_min
    without stand-ins, and the largest k below K with the highest rank offered (one anchor where they
    coincide, none where the layer has no k below K). An ordered dict, used as a set."""
    below = [k for k in row if k < original]
    if not below:
        return {}
    return dict.fromkeys([(min(below), NO_STAND_INS), (max(below), layer_ranks[-1])])


@contextmanager
def _probe(model: Any, layers: list[MoELayer], ks: list[float], deployment: Deployment,
           position: int = 0, rank: int | None = NO_STAND_INS) -> Iterator[None]:
    """Route with per-layer ks as the plan would: plain top-k, or through the runtime. With the deployment's
    stand-in options, the layer at ``position`` is served by its rank-``rank`` stand-ins (or none)."""
    if deployment.plain:
        with top_ks(layers, [int(k) for k in ks]):
            yield
        return
    treatments = None
    if deployment.treatments is not None:
        treatments = [deployment.treatments[layer.path][k] for layer, k in zip(layers, ks)]
    # Layers left at their original k (with no treatment there) are left untouched by apply_plan.
    allocation = allocation_for(model, ks, deployment.routing, treatments=treatments,
                                compensation=deployment.compensation)
    tables = None
    if deployment.stand_ins is not None:
        tables = {layer.path: deployment.stand_ins[layer.path][deployment.base_rank[layer.path]]
                  for i, (layer, k) in enumerate(zip(layers, ks)) if i > position and k < layer.top_k}
        if rank is not NO_STAND_INS:
            tables[layers[position].path] = deployment.stand_ins[layers[position].path][rank]
    with apply_plan(model, allocation, stand_ins=tables):
        yield


def _scorer(metric: str, reference: torch.Tensor, batch: torch.Tensor, scratch: Scratch
            ) -> Callable[[torch.Tensor], float]:
    """Summed loss increase of a probe's log-probabilities over the reference's, in ``metric``."""
    if metric == "nll":
        reference_nll = token_nll(reference, batch).double()  # [B, S-1]
        return lambda logprobs: (token_nll(logprobs, batch).double() - reference_nll).sum().item()
    reference_probs = reference.exp()  # [B, S-1, V], once per batch
    return lambda logprobs: kl_sum(reference, reference_probs, logprobs, scratch)


class _LayerReplay:
    """Per-batch recordings of the reference pass, and the probe forward that reuses them."""

    def __init__(self, model: Any, decoder_layers: torch.nn.ModuleList, layers: list[MoELayer]) -> None:
        self.model, self.decoder_layers, self.layers = model, decoder_layers, layers
        # Per MoE layer position: None until checked, then whether layer output = recorded + block change.
        self.additive: list[bool | None] = [None] * len(layers)
        self.outputs: list[Any] = []
        self.block_io: list[Any] = []
        # Per MoE layer position, what the later layers added to the residual stream in this batch's reference.
        self.carries: dict[int, torch.Tensor] = {}

    def reference(self, batch: torch.Tensor) -> torch.Tensor:
        """The untouched model's log-probabilities, recording every layer's output on the way."""
        self.outputs, self.block_io, hooks = record_outputs(self.decoder_layers, [l.block for l in self.layers])
        self.carries = {}
        try:
            return next_token_logprobs(self.model, batch)
        finally:
            for hook in hooks:
                hook.remove()

    def _replacements(self, batch: torch.Tensor, position: int) -> dict[int, torch.nn.Module]:
        """The layers before layer ``position`` replayed, and the layer itself as its block's change where
        that is additive (checked once per layer)."""
        index = self.layers[position].index
        replacements: dict[int, torch.nn.Module] = {j: Replay(self.outputs[j]) for j in range(index)}
        block_input, block_output = self.block_io[position]
        shortcut = ReplayLayerAtK(self.outputs[index], self.layers[position].block, block_input, block_output)
        if self.additive[position] is None:
            self.additive[position] = block_change_is_additive(
                self.model, batch, self.decoder_layers, self.outputs, index, shortcut)
            if not self.additive[position]:
                logger.info("layer %d: output is not additive in its block; re-running it", index)
        if self.additive[position]:
            replacements[index] = shortcut
        return replacements

    def probe(self, batch: torch.Tensor, position: int, scratch: Scratch) -> torch.Tensor:
        """Log-probabilities with the probe's k set, re-running only what layer ``position``'s k changes
        (in ``scratch``'s buffer)."""
        with replayed(self.decoder_layers, self._replacements(batch, position)):
            return next_token_logprobs(self.model, batch, scratch)

    def carried(self, batch: torch.Tensor, position: int, scratch: Scratch) -> torch.Tensor:
        """Log-probabilities with layer ``position``'s change carried straight to the head: the layers
        after it replaced by the residual updates they recorded (the anchored strategy's probe)."""
        index = self.layers[position].index
        replacements = self._replacements(batch, position)
        if position not in self.carries:  # once per batch and layer, for all of the layer's probes
            self.carries[position] = hidden_of(self.outputs[-1]) - hidden_of(self.outputs[index])  # [B, S, H]
        replacements[index] = Carried(replacements.get(index, self.decoder_layers[index]), self.carries[position])
        replacements.update({j: Passthrough(self.outputs[j]) for j in range(index + 1, len(self.decoder_layers))})
        with replayed(self.decoder_layers, replacements):
            return next_token_logprobs(self.model, batch, scratch)


def check_k_min(k_min: int, originals: list[int]) -> None:
    """Raise unless every layer can be profiled down to ``k_min``."""
    if min(originals) < 1:
        raise AllocplanError(f"the model's MoE layers route each token to as few as {min(originals)} experts (its"
                             " config's top-k), so there is nothing to plan; check the checkpoint's config")
    if k_min > min(originals):
        raise AllocplanError(f"--k-min {k_min} is above the smallest original top-k {min(originals)}; give at most"
                             f" {min(originals)}")


def check_k_max_for_profiling(routing: RoutingConfig, originals: list[int]) -> None:
    """Raise if ``routing`` does not fit the layers' original top-k (``RoutingConfig.check_fits``) or its
    ``k_max`` (Alloc-T's cap on one token's experts) is below a layer's original top-k.

    Profiling probes each layer up to its original top-k with the others at theirs, which such a
    cap forbids; a stored profile can be solved under the cap instead (``solve_profile``).
    """
    routing.check_fits(originals)
    k_max = routing.k_max
    if k_max is not None and k_max < max(originals):
        raise AllocplanError(
            f"profiling runs every MoE layer up to its original top-k ({max(originals)}), which --k-max {k_max}"
            f" forbids; profile without --k-max (compile --profile-out FILE), then allocplan solve FILE"
            f" --k-max {k_max}")


def measure_sensitivity(
    model: Any,
    windows: torch.Tensor,
    config: ProfileConfig | None = None,
    deployment: Deployment | None = None,
    *,
    reuse_prefix: bool = True,
    cells: set[tuple[int, int | float]] | None = None,
) -> tuple[list[dict[int | float, float]], float]:
    """S[l, k] for every MoE layer and candidate k, and the reference NLL (:func:`measure_sensitivities`
    without the stand-in options)."""
    rows, _, reference_nll = measure_sensitivities(model, windows, config, deployment, reuse_prefix=reuse_prefix,
                                                   cells=cells)
    return rows, reference_nll


def measure_sensitivities(
    model: Any,
    windows: torch.Tensor,
    config: ProfileConfig | None = None,
    deployment: Deployment | None = None,
    *,
    reuse_prefix: bool = True,
    cells: set[tuple[int, int | float]] | None = None,
) -> tuple[list[dict[int | float, float]], list[dict[int, dict[int | float, float]]] | None, float]:
    """S[l, k] for every MoE layer and candidate k, S[l, k, r] for every stand-in rank r of the
    deployment's options, and the reference NLL.

    Args:
        model: a loaded causal LM of a registered family, unmodified.
        windows: [W, S] calibration token ids.
        config: strategy, metric, k_min, k_step and batch size (calibration fields unused).
        deployment: what each probe runs besides its k (default: plain top-k; a
            half-expert grid needs Alloc-T routing).
        reuse_prefix: reuse work across layers and across k (module docstring); False
            runs one full forward per (l, k) that needs a probe (the naive reference, kept
            for tests and cost comparisons).
        cells: measure only these (layer position, k) cells (a shard's; the others are 0);
            None measures every cell. A cell's value does not depend on which others run.

    Returns:
        One ``{k: S}`` row per MoE layer (layer order; with stand-in options, S without stand-ins at
        the measured layer), one ``{r: {k: S}}`` row per layer (None without stand-in options) and the
        untouched model's mean NLL.
    """
    config = config or ProfileConfig()
    deployment = deployment or Deployment(RoutingConfig(token_level=config.k_step != 1.0))
    if config.k_step != 1.0 and not deployment.routing.token_level:
        raise AllocplanError("a half-expert grid (--k-step 0.5) is realised by token-level allocation;"
                             " profile with --token-level")
    layers = find_moe_layers(model)
    decoder_layers = model.get_submodule(model_family(model).layers_path)
    originals = [layer.top_k for layer in layers]
    check_k_min(config.k_min, originals)
    device = input_device(model)

    anchored = config.strategy == "anchored"
    if anchored and not reuse_prefix:
        raise ValueError("the anchored strategy's probes replay the reference pass; its naive reference is"
                         " the isolated strategy's")
    # float64 accumulators: sums over up to millions of token-level differences.
    increase = [{k: 0.0 for k in k_grid(config.k_min, original, config.k_step)} for original in originals]
    options = deployment.stand_ins
    # The stand-in options probed at each (l, k): none, then every rank (only the deployment's sidecar without them).
    ranks = [[NO_STAND_INS, *sorted(options[layer.path])] if options is not None else [NO_STAND_INS]
             for layer in layers]
    served = [{rank: {k: 0.0 for k in row} for rank in layer_ranks[1:]} for row, layer_ranks in zip(increase, ranks)]
    # Anchored: each layer's anchor probes (planner/anchoring.py), [carried, exact] summed over the anchor batches.
    anchors = [anchor_options(row, original, layer_ranks)
               for row, original, layer_ranks in zip(increase, originals, ranks)]
    anchor_sums = [{option: [0.0, 0.0] for option in options_} for options_ in anchors]
    anchor_tokens = 0
    reference_sum, scored = 0.0, 0
    replay = _LayerReplay(model, decoder_layers, layers)
    scratch = Scratch()  # every probe's log-probabilities and KL terms, in the same memory
    batches = windows.to(device).split(config.batch_size)
    with torch.inference_mode(), top_ks(layers, originals):
        for number, batch in enumerate(progress(batches, desc="profiling S[l, k]")):
            reference = replay.reference(batch) if reuse_prefix else next_token_logprobs(model, batch)
            reference_nll = token_nll(reference, batch)  # [B, S-1]
            reference_sum += reference_nll.double().sum().item()
            scored += reference_nll.numel()
            score = _scorer(config.metric, reference, batch, scratch)
            anchor_batch = anchored and number % ANCHOR_EVERY == 0
            anchor_tokens += reference_nll.numel() if anchor_batch else 0
            for position in reversed(range(len(layers))):  # deepest first, as the paper profiles
                # A shard measures a layer's anchors wherever it owns any of the layer's cells (which they correct).
                layer_anchors = anchors[position] if anchor_batch and (
                    cells is None or any((position, k) in cells for k in increase[position])) else {}
                for k in sorted(increase[position], reverse=True):
                    owned = cells is None or (position, k) in cells
                    if not owned and not any(anchor_k == k for anchor_k, _ in layer_anchors):
                        continue  # another shard's cell
                    if config.strategy != "paper" and k == originals[position]:
                        continue  # identical to the reference configuration: S = 0 exactly
                    ks = layer_ks(config.strategy, originals, position, k, config.k_min)
                    # At the layer's own k nothing is dropped there, so every stand-in option measures the same.
                    layer_ranks = ranks[position] if k != originals[position] else [NO_STAND_INS]
                    for rank in layer_ranks:
                        is_anchor = (k, rank) in layer_anchors
                        if not owned and not is_anchor:
                            continue
                        with _probe(model, layers, ks, deployment, position, rank):
                            if anchored:
                                value = score(replay.carried(batch, position, scratch))
                            else:
                                value = score(replay.probe(batch, position, scratch) if reuse_prefix
                                              else next_token_logprobs(model, batch, scratch))
                        if is_anchor:
                            # Each probe in a fresh plan, as every other probe is (no routing state carried over).
                            with _probe(model, layers, ks, deployment, position, rank):
                                anchor_sums[position][k, rank][1] += score(replay.probe(batch, position, scratch))
                            anchor_sums[position][k, rank][0] += value
                        if not owned:
                            continue
                        if rank is NO_STAND_INS:
                            increase[position][k] += value
                            if k == originals[position]:
                                for row in served[position].values():
                                    row[k] += value
                        else:
                            served[position][rank][k] += value
            logger.info("profiled batch of %d windows", batch.shape[0])

    found = [[Anchor(carried, exact, anchor_tokens) for carried, exact in sums.values()] for sums in anchor_sums]

    def cell(position: int, k: float, total: float) -> float:
        """A cell's mean S (the anchored strategy's: its carried sum, corrected by the layer's anchors)."""
        if cells is not None and (position, k) not in cells:
            return 0.0  # another shard's cell
        if anchored:
            # A carried KL sum a hair below 0 is float32 rounding of a KL near 0 (seen on tiny random models):
            # 0, before a correction of up to 20x could make it a visible negative S.
            total = max(total, 0.0)
            total *= correction(found[position], total / scored)
        return rounded(total / scored)

    rows = [{k: cell(position, k, total) for k, total in sorted(row.items())} for position, row in enumerate(increase)]
    stand_in_rows = None if options is None else [
        {rank: {k: cell(position, k, total) for k, total in sorted(row.items())} for rank, row in layer_rows.items()}
        for position, layer_rows in enumerate(served)]
    return rows, stand_in_rows, reference_sum / scored


def profile_model(
    model: Any,
    tokenizer: Any,
    config: ProfileConfig | None = None,
    routing: RoutingConfig | None = None,
    *,
    model_name: str | None = None,
    shard: Shard | None = None,
    windows: tuple[torch.Tensor, CalibrationRecord] | None = None,
) -> SensitivityProfile:
    """Profile a loaded model on calibration text as a plan with ``routing`` will run (module docstring).

    Args:
        model / tokenizer: a loaded causal LM of a registered family and its tokenizer.
        config: the profiling settings (default: :class:`~allocplan.formats.config.ProfileConfig`'s;
            ``calib`` None is the calibration text bundled with allocplan).
        routing: the routing the plan will run, used by every probe (default:
            :class:`~allocplan.formats.config.RoutingConfig`'s, Alloc-T on).
        model_name: recorded as the model's name (default ``model.name_or_path``).
        shard: measure only this shard's cells of the (layer, k) grid, leaving the others 0
            (use :func:`profile_part`, which records the shard).
        windows: calibration token windows [N, S] already packed, and the record of the text they
            came from, used instead of packing ``config.calib`` (cross-validation folds choose their
            own windows of one text this way).

    Returns:
        The :class:`SensitivityProfile` artifact (save it with ``save_profile``), holding its
        compensation sidecar's bytes when compensation is on.

    Raises:
        AllocplanError: a treatment or compensation asked for that the family cannot run.
    """
    with planner_numerics(model):  # the same plan under any thread count (planner/determinism.py)
        return _profile_model(model, tokenizer, config, routing, model_name=model_name, shard=shard, windows=windows)


def _profile_model(model: Any, tokenizer: Any, config: ProfileConfig | None, routing: RoutingConfig | None, *,
                   model_name: str | None, shard: Shard | None,
                   windows: tuple[torch.Tensor, CalibrationRecord] | None) -> SensitivityProfile:
    """:func:`profile_model`'s work, on the planner's fixed thread count."""
    config = config or ProfileConfig()
    routing = routing or RoutingConfig()
    identity = model_identity(model, model_name or getattr(model, "name_or_path", "") or "in-process")
    layers = find_moe_layers(model)
    check_k_min(config.k_min, [layer.top_k for layer in layers])
    check_k_max_for_profiling(routing, [layer.top_k for layer in layers])
    if config.k_step != 1 and not routing.token_level:
        raise AllocplanError(f"--k-step {config.k_step:g} profiles fractional k, which only token-level allocation"
                             " (Alloc-T) can run; drop --no-token-level or use --k-step 1")
    check_routing_runs(model, routing)
    weight_fit, compensation = resolve_treatments(model, config)
    if windows is None:
        windows = pack_windows(tokenizer, calibration_source(config, config.calib_tokens),
                               max_tokens=config.calib_tokens, seq_len=config.seq_len)
    windows, record = windows
    if record.tokens < config.calib_tokens // config.seq_len * config.seq_len:
        # Not an error (the plan records the tokens it used), but far from what was asked.
        warnings.warn(f"allocplan: warning: the calibration text gives {record.tokens} tokens ({record.windows}"
                      f" windows of {config.seq_len}), fewer than --calib-tokens {config.calib_tokens}; sensitivities"
                      " and stand-ins fitted on less text are noisier, so give more text for a plan you ship",
                      stacklevel=2)
    check_token_ids(windows, model)
    check_window_length(windows, model)
    sidecar = tables = options = base_rank = None
    hidden_size = model.get_input_embeddings().embedding_dim
    if compensation != "off":
        kind = get_stand_in_kind(compensation)
        ranks = {layer.path: stand_in_ranks(layer, hidden_size, compensation, config.compensation_share,
                                            config.compensation_rank, config.stand_in_choice) for layer in layers}
        # The treatments and the drop order are fitted with the stand-ins of the rank within the share.
        base_rank = {layer.path: base_stand_in_rank(layer, hidden_size, config.compensation_share,
                                                    config.compensation_rank) if kind.low_rank else 0
                     for layer in layers}
        options = stand_in_options(model, windows, compensation, config.batch_size, ranks, base_rank,
                                   config.drop_order)
        tables = {path: options[path][base_rank[path]] for path in options}
        sidecar = encode_options(options, compensation, sidecar_dtype(model))
    grid = {layer.path: k_grid(config.k_min, layer.top_k, config.k_step) for layer in layers}
    treatments = None
    if weight_fit == "fitted":
        treatments = fit_treatments(model, windows, grid, routing, tables, config.batch_size)
    cells = None
    if shard is not None:
        cells = owned_cells([layer.top_k for layer in layers], config.k_min, config.k_step, shard)
    rows, stand_in_rows, reference_nll = measure_sensitivities(
        model, windows, config, Deployment(routing, treatments, sidecar, options, base_rank), cells=cells)
    return build_profile(
        model, identity, rows, stand_in_rows=stand_in_rows, hidden_size=hidden_size,
        stand_in_choice=config.stand_in_choice,
        metric=config.metric, strategy=config.strategy, k_min=config.k_min, k_step=config.k_step,
        token_level=routing.token_level, weight_fit=weight_fit, compensation=compensation,
        reference_nll=rounded(reference_nll), calibration=record,
        treatments=treatments, sidecar=sidecar,
    )


def profile_part(model: Any, tokenizer: Any, shard: Shard, config: ProfileConfig | None = None,
                 routing: RoutingConfig | None = None, *, model_name: str | None = None) -> ProfilePart:
    """One shard of :func:`profile_model`: the cells of the (layer, k) grid ``shard`` owns.

    Every shard loads the model, packs the same calibration windows, and fits the same
    treatments and compensation (cheap next to the probes); only the probes are split.
    Merge the parts with :func:`~allocplan.formats.profile_part.merge_parts`
    (``allocplan profile merge``): the result is byte-identical to an unsharded run.
    """
    profile = profile_model(model, tokenizer, config, routing, model_name=model_name, shard=shard)
    return ProfilePart(PART_SCHEMA_VERSION, PART_KIND, shard, profile)


def check_routing_runs(model: Any, routing: RoutingConfig) -> None:
    """Raise, before any calibration work, if the family cannot run ``routing`` (naming the options to change).

    Weight treatments and compensation need no check here: ``auto`` resolves them for the family
    (:func:`resolve_treatments`).
    """
    family = model_family(model)
    if family.rewrite_unsupported is None:
        return
    fixes = [flag for flag, needed in (("--no-token-level", routing.token_level),
                                       ("--renormalize model", routing.renormalize != "model")) if needed]
    if fixes:
        raise AllocplanError(f"{family.model_type} runs plain per-layer top-k only ({family.rewrite_unsupported});"
                             f" add {' '.join(fixes)}")


def resolve_treatments(model: Any, config: ProfileConfig) -> tuple[str, str]:
    """(weight fit, compensation) as the profile will record them: ``auto`` resolved for the family.

    Raises:
        AllocplanError: compensation asked for by name on a family that cannot run it.
    """
    family = model_family(model)
    unsupported = family.rewrite_unsupported or family.treatments_unsupported
    if unsupported and config.compensation not in ("auto", "off"):
        raise AllocplanError(f"{family.model_type} cannot compensate dropped experts ({unsupported});"
                             " profile with --compensation off")
    weight_fit = "fitted" if config.weight_fit == "auto" and not unsupported else "off"
    compensation = ("linear" if not unsupported else "off") if config.compensation == "auto" else config.compensation
    return weight_fit, compensation


def build_profile(model: Any, identity: Any, rows: list[dict], *,
                  stand_in_rows: list[dict] | None = None,
                  treatments: dict[str, dict[int | float, dict[str, Any]]] | None = None,
                  sidecar: tuple[CompensationRecord, bytes] | None = None,
                  **measurement: Any) -> SensitivityProfile:
    """Wrap measured rows (and what was in place) into the profile artifact (device, dtype, versions filled in)."""
    layers = find_moe_layers(model)

    def treatment_rows(layer: MoELayer) -> tuple[tuple[str, dict], ...]:
        """Per treatment field, k -> its fitted value; a field never fitted away from neutral is left out."""
        if treatments is None:
            return ()
        fitted = treatments[layer.path]
        rows = []
        for treatment in WEIGHT_TREATMENTS.values():
            row = {k: values.get(treatment.field, treatment.neutral) for k, values in fitted.items()}
            if any(value != treatment.neutral for value in row.values()):
                rows.append((treatment.field, row))
        return tuple(rows)

    record, data = sidecar if sidecar is not None else (None, None)
    return SensitivityProfile(
        schema_version=PROFILE_SCHEMA_VERSION,
        kind=PROFILE_KIND,
        model=identity,
        measurement=Measurement(
            device=input_device(model).type, dtype=str(model.dtype).removeprefix("torch."), **measurement
        ),
        compensation=record,
        layers=tuple(
            LayerSensitivity(layer.path, layer.index, layer.top_k, row, treatment_rows(layer),
                             expert_multiply_adds=round(expert_multiply_adds(layer)),
                             stand_in_sensitivity=None if stand_in_rows is None else stand_in_rows[position])
            for position, (layer, row) in enumerate(zip(layers, rows))
        ),
        provenance=ProfileProvenance(
            allocplan_version=__version__,
            torch_version=package_version("torch"),
            transformers_version=package_version("transformers"),
        ),
        compensation_data=data,
    )
