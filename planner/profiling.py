"""Alloc-L step 1: measure each MoE layer's sensitivity to a smaller top-k.

For MoE layer l and every candidate k in [k_min, K_l] we run the calibration
windows with layer l at top-k and record the mean next-token loss increase
over the untouched model, S[l, k] = metric(l at k) - metric(all at K).
Strategies fix what the other layers do meanwhile:

* ``isolated``: every other layer keeps its original K (S[l, K_l] = 0 exactly).
* ``paper``: layers before l keep K, layers after l drop to k_min, and layers are
  profiled from the deepest to the shallowest, as described for Alloc-MoE (later
  layers cannot compensate for the loss introduced at l).

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
from ..runtime.layers import MoELayer, find_moe_layers, input_device, model_family, model_identity
from .losses import Scratch, kl_sum, next_token_logprobs, token_nll
from .replay import Replay, ReplayLayerAtK, block_change_is_additive, record_outputs, replayed
from .determinism import fixed_threads
from .treatments import compensation_tables, encode_tables, fit_treatments, sidecar_dtype
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
    if strategy == "isolated":
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
    """

    routing: RoutingConfig = RoutingConfig(token_level=False)
    treatments: dict[str, dict[int | float, dict[str, Any]]] | None = None
    compensation: tuple[CompensationRecord, bytes] | None = None

    @property
    def plain(self) -> bool:
        """Nothing but top-k: probes can set the routers' k directly."""
        routing = self.routing
        return (not routing.token_level and routing.renormalize == "model" and self.treatments is None
                and self.compensation is None)


@contextmanager
def _probe(model: Any, layers: list[MoELayer], ks: list[float], deployment: Deployment) -> Iterator[None]:
    """Route with per-layer ks as the plan would: plain top-k, or through the runtime."""
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
    with apply_plan(model, allocation):
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

    def reference(self, batch: torch.Tensor) -> torch.Tensor:
        """The untouched model's log-probabilities, recording every layer's output on the way."""
        self.outputs, self.block_io, hooks = record_outputs(self.decoder_layers, [l.block for l in self.layers])
        try:
            return next_token_logprobs(self.model, batch)
        finally:
            for hook in hooks:
                hook.remove()

    def probe(self, batch: torch.Tensor, position: int, scratch: Scratch) -> torch.Tensor:
        """Log-probabilities with the probe's k set, re-running only what layer ``position``'s k changes
        (in ``scratch``'s buffer)."""
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
    """S[l, k] for every MoE layer and candidate k, and the reference NLL.

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
        One ``{k: S}`` row per MoE layer (layer order) and the untouched model's mean NLL.
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

    # float64 accumulators: sums over up to millions of token-level differences.
    increase = [{k: 0.0 for k in k_grid(config.k_min, original, config.k_step)} for original in originals]
    reference_sum, scored = 0.0, 0
    replay = _LayerReplay(model, decoder_layers, layers)
    scratch = Scratch()  # every probe's log-probabilities and KL terms, in the same memory
    batches = windows.to(device).split(config.batch_size)
    with torch.inference_mode(), top_ks(layers, originals):
        for batch in progress(batches, desc="profiling S[l, k]"):
            reference = replay.reference(batch) if reuse_prefix else next_token_logprobs(model, batch)
            reference_nll = token_nll(reference, batch)  # [B, S-1]
            reference_sum += reference_nll.double().sum().item()
            scored += reference_nll.numel()
            score = _scorer(config.metric, reference, batch, scratch)
            for position in reversed(range(len(layers))):  # deepest first, as the paper profiles
                for k in sorted(increase[position], reverse=True):
                    if cells is not None and (position, k) not in cells:
                        continue  # another shard's cell
                    if config.strategy == "isolated" and k == originals[position]:
                        continue  # identical to the reference configuration: S = 0 exactly
                    ks = layer_ks(config.strategy, originals, position, k, config.k_min)
                    with _probe(model, layers, ks, deployment):
                        logprobs = (replay.probe(batch, position, scratch) if reuse_prefix
                                    else next_token_logprobs(model, batch, scratch))
                    increase[position][k] += score(logprobs)
            logger.info("profiled batch of %d windows", batch.shape[0])

    rows = [{k: rounded(total / scored) for k, total in sorted(row.items())} for row in increase]
    return rows, reference_sum / scored


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
    with fixed_threads(model):  # the same plan under any thread count (planner/determinism.py)
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
    sidecar = tables = None
    if compensation != "off":
        tables = compensation_tables(model, windows, compensation, config.batch_size, config.compensation_rank,
                                     config.drop_order, share=config.compensation_share)
        sidecar = encode_tables(tables, compensation, sidecar_dtype(model))
    grid = {layer.path: k_grid(config.k_min, layer.top_k, config.k_step) for layer in layers}
    treatments = None
    if weight_fit == "fitted":
        treatments = fit_treatments(model, windows, grid, routing, tables, config.batch_size)
    cells = None
    if shard is not None:
        cells = owned_cells([layer.top_k for layer in layers], config.k_min, config.k_step, shard)
    rows, reference_nll = measure_sensitivity(model, windows, config, Deployment(routing, treatments, sidecar),
                                              cells=cells)
    return build_profile(
        model, identity, rows,
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
            LayerSensitivity(layer.path, layer.index, layer.top_k, row, treatment_rows(layer))
            for layer, row in zip(layers, rows)
        ),
        provenance=ProfileProvenance(
            allocplan_version=__version__,
            torch_version=package_version("torch"),
            transformers_version=package_version("transformers"),
        ),
        compensation_data=data,
    )
