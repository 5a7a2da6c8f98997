"""Alloc-L step 1: measure each MoE layer's sensitivity to a smaller top-k.

For MoE layer l and every candidate k in [k_min, K_l] we run the calibration
windows with layer l at top-k and record the mean next-token loss increase
over the untouched model, S[l, k] = metric(l at k) - metric(all at K).
Strategies fix what the other layers do meanwhile:

* ``isolated``: every other layer keeps its original K (S[l, K_l] = 0 exactly).
* ``paper``: layers before l keep K, layers after l drop to k_min, and layers are
  profiled from the deepest to the shallowest, as described for Alloc-MoE (later
  layers cannot compensate for the loss introduced at l).

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
calibration batch for every (layer, k), k = K_l included.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from .._version import __version__
from ..bundled import DEFAULT_CALIBRATION
from ..errors import AllocplanError
from ..formats.config import ProfileConfig, RoutingConfig
from ..formats.profile import (
    PROFILE_KIND,
    PROFILE_SCHEMA_VERSION,
    LayerSensitivity,
    Measurement,
    ProfileProvenance,
    SensitivityProfile,
    k_grid,
)
from ..formats.provenance import package_version
from ..runtime.allocations import allocation_for
from ..runtime.apply import apply_plan
from ..runtime.layers import MoELayer, find_moe_layers, model_family, model_identity
from .losses import kl_sum, next_token_logprobs, token_nll
from .replay import Replay, ReplayLayerAtK, block_change_is_additive, record_outputs, replayed
from .windows import pack_windows

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


@contextmanager
def _probe(model: Any, layers: list[MoELayer], ks: list[float], token_level: bool) -> Iterator[None]:
    """Route with per-layer ks: plain top-k, or Alloc-T through the runtime (fractional k)."""
    if not token_level:
        with top_ks(layers, [int(k) for k in ks]):
            yield
        return
    # At k = K Alloc-T keeps every candidate, so layers left at their original k are unchanged.
    with apply_plan(model, allocation_for(model, ks, RoutingConfig(token_level=True, k_base=1))):
        yield


def _scorer(metric: str, reference: torch.Tensor, batch: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """Summed loss increase of a probe's log-probabilities over the reference's, in ``metric``."""
    if metric == "nll":
        reference_nll = token_nll(reference, batch).double()  # [B, S-1]
        return lambda logprobs: (token_nll(logprobs, batch).double() - reference_nll).sum().item()
    reference_probs = reference.exp()  # [B, S-1, V], once per batch
    return lambda logprobs: kl_sum(reference, reference_probs, logprobs)


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

    def probe(self, batch: torch.Tensor, position: int) -> torch.Tensor:
        """Log-probabilities with the probe's k set, re-running only what layer ``position``'s k changes."""
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
            return next_token_logprobs(self.model, batch)


def check_k_min(k_min: int, originals: list[int]) -> None:
    """Raise unless every layer can be profiled down to ``k_min``."""
    if k_min > min(originals):
        raise AllocplanError(f"k_min {k_min} must be between 1 and the smallest original top-k {min(originals)}")


def measure_sensitivity(
    model: Any,
    windows: torch.Tensor,
    config: ProfileConfig | None = None,
    *,
    reuse_prefix: bool = True,
) -> tuple[list[dict[int | float, float]], float]:
    """S[l, k] for every MoE layer and candidate k, and the reference NLL.

    Args:
        model: a loaded causal LM of a registered family, unmodified.
        windows: [W, S] calibration token ids.
        config: strategy, metric, k_min, k_step and batch size (calibration fields unused);
            a fractional grid is measured with Alloc-T routing in the profiled layer (as
            the plan will run).
        reuse_prefix: reuse work across layers and across k (module docstring); False
            runs one full forward per (l, k), k = K_l included (the naive reference,
            kept for tests and cost comparisons).

    Returns:
        One ``{k: S}`` row per MoE layer (layer order) and the untouched model's mean NLL.
    """
    config = config or ProfileConfig()
    layers = find_moe_layers(model)
    decoder_layers = model.get_submodule(model_family(model).layers_path)
    originals = [layer.top_k for layer in layers]
    check_k_min(config.k_min, originals)
    device = next(model.parameters()).device

    # float64 accumulators: sums over up to millions of token-level differences.
    increase = [{k: 0.0 for k in k_grid(config.k_min, original, config.k_step)} for original in originals]
    reference_sum, scored = 0.0, 0
    replay = _LayerReplay(model, decoder_layers, layers)
    with torch.inference_mode(), top_ks(layers, originals):
        for batch in windows.to(device).split(config.batch_size):
            reference = replay.reference(batch) if reuse_prefix else next_token_logprobs(model, batch)
            reference_nll = token_nll(reference, batch)  # [B, S-1]
            reference_sum += reference_nll.double().sum().item()
            scored += reference_nll.numel()
            score = _scorer(config.metric, reference, batch)
            for position in reversed(range(len(layers))):  # deepest first, as the paper profiles
                for k in sorted(increase[position], reverse=True):
                    if reuse_prefix and config.strategy == "isolated" and k == originals[position]:
                        continue  # identical to the reference configuration: S = 0 exactly
                    ks = layer_ks(config.strategy, originals, position, k, config.k_min)
                    with _probe(model, layers, ks, config.token_level):
                        logprobs = replay.probe(batch, position) if reuse_prefix else next_token_logprobs(model, batch)
                    increase[position][k] += score(logprobs)
            logger.info("profiled batch of %d windows", batch.shape[0])

    rows = [{k: rounded(total / scored) for k, total in sorted(row.items())} for row in increase]
    return rows, reference_sum / scored


def profile_model(
    model: Any,
    tokenizer: Any,
    config: ProfileConfig | None = None,
    *,
    model_name: str | None = None,
) -> SensitivityProfile:
    """Profile a loaded model on calibration text (see module docstring).

    Args:
        model / tokenizer: a loaded causal LM of a registered family and its tokenizer.
        config: the profiling settings (default: :class:`~allocplan.formats.config.ProfileConfig`'s;
            ``calib`` None is the calibration text bundled with allocplan).
        model_name: recorded as the model's name (default ``model.name_or_path``).

    Returns:
        The :class:`SensitivityProfile` artifact (save it with ``save_profile``).
    """
    config = config or ProfileConfig()
    identity = model_identity(model, model_name or getattr(model, "name_or_path", "") or "in-process")
    windows, record = pack_windows(tokenizer, config.calib or DEFAULT_CALIBRATION, max_tokens=config.calib_tokens,
                                   seq_len=config.seq_len)
    rows, reference_nll = measure_sensitivity(model, windows, config)
    return build_profile(
        model, identity, rows,
        metric=config.metric, strategy=config.strategy, k_min=config.k_min, k_step=config.k_step,
        token_level=config.token_level, reference_nll=rounded(reference_nll), calibration=record,
    )


def build_profile(model: Any, identity: Any, rows: list[dict], **measurement: Any) -> SensitivityProfile:
    """Wrap measured rows into the profile artifact (device, dtype and versions filled in)."""
    parameter = next(model.parameters())
    return SensitivityProfile(
        schema_version=PROFILE_SCHEMA_VERSION,
        kind=PROFILE_KIND,
        model=identity,
        measurement=Measurement(
            device=parameter.device.type, dtype=str(parameter.dtype).removeprefix("torch."), **measurement
        ),
        layers=tuple(
            LayerSensitivity(path=layer.path, index=layer.index, original_k=layer.top_k, sensitivity=row)
            for layer, row in zip(find_moe_layers(model), rows)
        ),
        provenance=ProfileProvenance(
            allocplan_version=__version__,
            torch_version=package_version("torch"),
            transformers_version=package_version("transformers"),
        ),
    )
