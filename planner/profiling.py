"""Alloc-L step 1: measure each MoE layer's sensitivity to a smaller top-k.

For MoE layer l and every candidate k in [k_min, K_l] we run the calibration
windows with layer l at top-k and record the mean next-token loss increase
over the untouched model, S[l, k] = metric(l at k) - metric(all at K).
Strategies fix what the other layers do meanwhile:

* ``isolated``: every other layer keeps its original K (S[l, K_l] = 0 exactly).
* ``paper``: layers before l keep K, layers after l drop to k_min, and layers are
  profiled from the deepest to the shallowest, as described for Alloc-MoE (later
  layers cannot compensate for the loss introduced at l).

Work reused, per calibration batch (``reuse_prefix``):

* across layers: the hidden states entering decoder layer l do not depend on the
  k of layer l or of any later layer, and under both strategies every earlier
  layer runs at its original K. So each batch runs the untouched model once,
  keeping every decoder layer's output, and each (l, k) re-runs only layers
  after l: earlier decoder layers are temporarily replaced by modules that
  return the kept outputs. The model's own forward still builds masks, rotary
  embeddings, the final norm and head, so no family-specific forward code is
  copied here.
* across k within layer l: attention and everything else before the MoE block
  do not depend on k. The reference pass keeps the block's input and output;
  for each k only the block runs (on the kept input), and layer l's output is
  its kept output plus (block output at k - block output at K). That holds
  where the decoder layer adds the block's output to its residual stream
  unchanged; it is checked once per layer against a real re-run of the layer,
  and a layer that fails the check (e.g. a norm after the block) is re-run
  whole for every k.
* k = K_l under ``isolated`` is the reference configuration itself: S = 0
  without a forward.

``reuse_prefix=False`` is the naive reference the issue defines: one full
forward over the calibration batch for every (layer, k), k = K_l included.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from allocplan._version import __version__
from allocplan.errors import AllocplanError
from allocplan.planner.profile_format import (
    METRICS,
    PROFILE_KIND,
    PROFILE_SCHEMA_VERSION,
    STRATEGIES,
    LayerSensitivity,
    Measurement,
    ProfileProvenance,
    SensitivityProfile,
    k_grid,
)
from allocplan.planner.provenance import CalibrationRecord, package_version
from allocplan.planner.records import sha256_file
from allocplan.runtime.apply import apply_plan
from allocplan.runtime.layers import MoELayer, find_moe_layers, model_family, model_identity
from allocplan.runtime.plans import manual_plan

logger = logging.getLogger("allocplan")

# Sensitivities are stored to 9 significant digits: far below calibration noise,
# and short, stable numbers keep profile and plan diffs readable.
_SIGNIFICANT = 9


def calibration_windows(
    tokenizer: Any, path: str | Path, *, calib_tokens: int, seq_len: int
) -> tuple[torch.Tensor, CalibrationRecord]:
    """Tokenize a UTF-8 text file and pack it into full windows.

    The whole file is tokenized once without special tokens; the first
    ``calib_tokens`` tokens are cut into ``calib_tokens // seq_len`` windows of
    ``seq_len`` tokens (a trailing partial window is dropped). Deterministic.

    Returns:
        ``windows`` [W, seq_len] int64 and the calibration record.

    Raises:
        AllocplanError: unreadable or non-UTF-8 file, bad sizes, or too little text for one window.
    """
    path = Path(path)
    if seq_len < 2:
        raise AllocplanError(f"--seq-len {seq_len} is too short; next-token loss needs at least 2 tokens")
    if calib_tokens < seq_len:
        raise AllocplanError(f"--calib-tokens {calib_tokens} is smaller than --seq-len {seq_len}; raise it")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AllocplanError(f"calibration file {str(path)!r} does not exist") from None
    except UnicodeDecodeError:
        raise AllocplanError(f"calibration file {str(path)!r} is not UTF-8 text") from None
    except OSError as exc:
        raise AllocplanError(f"cannot read calibration file {str(path)!r}: {exc}") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = min(len(ids), calib_tokens) // seq_len
    if windows == 0:
        raise AllocplanError(
            f"calibration file {str(path)!r} has {len(ids)} tokens, fewer than one --seq-len window of"
            f" {seq_len}; give more text or a shorter --seq-len"
        )
    tensor = torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)  # [W, S]
    record = CalibrationRecord(
        file=path.name, sha256=sha256_file(path), tokens=windows * seq_len, seq_len=seq_len, windows=windows
    )
    return tensor, record


def layer_ks(strategy: str, originals: list[int], position: int, k: float, k_min: int) -> list[float]:
    """Top-k of every MoE layer while the layer at ``position`` is measured at ``k``."""
    if strategy == "isolated":
        later = originals[position + 1 :]
    else:  # paper
        later = [k_min] * (len(originals) - position - 1)
    return originals[:position] + [k] + later


@contextmanager
def _top_ks(layers: list[MoELayer], ks: list[int]) -> Iterator[None]:
    saved = [layer.snapshot() for layer in layers]
    try:
        for layer, k in zip(layers, ks):
            layer.set_top_k(k)
        yield
    finally:
        for layer, state in zip(layers, saved):
            layer.restore(state)


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer and returns that layer's recorded output."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def _hidden(output: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's or block's output (a tensor or a tuple led by one)."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _ReplayLayerAtK(torch.nn.Module):
    """Stands in for decoder layer l at a new k: its kept output plus the block's change.

    ``forward`` returns kept_output + (block(kept_block_input) - kept_block_output),
    with the block running at whatever k the probe has set.
    """

    def __init__(self, layer_output: Any, block: Any, block_input: Any, block_output: torch.Tensor) -> None:
        super().__init__()
        self.layer_output, self.block = layer_output, block
        self.block_input, self.block_output = block_input, block_output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args_in, kwargs_in = self.block_input
        change = _hidden(self.block(*args_in, **kwargs_in)) - self.block_output
        return _with_hidden(self.layer_output, _hidden(self.layer_output) + change)


@contextmanager
def _replayed(decoder_layers: torch.nn.ModuleList, replacements: dict[int, torch.nn.Module]) -> Iterator[None]:
    """Replace decoder layers by index for the duration of the block."""
    originals = {j: decoder_layers[j] for j in replacements}
    try:
        for j, module in replacements.items():
            decoder_layers[j] = module
        yield
    finally:
        for j, module in originals.items():
            decoder_layers[j] = module


def _token_losses(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [B, S-1, V] in float32."""
    logits = model(input_ids=batch, use_cache=False).logits  # [B, S, V]
    # log_softmax over the contiguous logits, then drop the last position (no copy of a strided slice).
    return torch.log_softmax(logits.float(), dim=-1)[:, :-1]


@contextmanager
def _probe(model: Any, layers: list[MoELayer], ks: list[float], token_level: bool) -> Iterator[None]:
    """Route with per-layer ks: plain top-k, or Alloc-T through the runtime (fractional k)."""
    if not token_level:
        with _top_ks(layers, [int(k) for k in ks]):
            yield
        return
    # At k = K Alloc-T keeps every candidate, so layers left at their original k are unchanged.
    with apply_plan(model, manual_plan(model, ks, token_level=True, k_base=1)):
        yield


class _StopForward(Exception):
    """Raised from a forward hook to end a forward pass once the layer of interest has run."""


def _block_change_is_additive(
    model: Any, batch: torch.Tensor, decoder_layers: torch.nn.ModuleList, outputs: list[Any],
    index: int, shortcut: "_ReplayLayerAtK",
) -> bool:
    """Whether decoder layer ``index`` at the probe's k equals the shortcut's output.

    Runs the real layer once on the kept outputs of the layers before it (the
    forward stops right after it) and compares; called inside the probe, so both
    run at the k being measured. Float rounding differs between the two sums, so
    the comparison allows 1e-4 of the output's scale.
    """
    captured: list[torch.Tensor] = []

    def grab(_module: Any, _args: Any, out: Any) -> None:
        captured.append(_hidden(out))
        raise _StopForward

    hook = decoder_layers[index].register_forward_hook(grab)
    try:
        with _replayed(decoder_layers, {j: _Replay(outputs[j]) for j in range(index)}):
            model(input_ids=batch, use_cache=False)
    except _StopForward:
        pass
    finally:
        hook.remove()
    expected = captured[0].float()
    scale = expected.abs().max().item()
    return torch.allclose(_hidden(shortcut()).float(), expected, rtol=1e-4, atol=1e-4 * scale)


def measure_sensitivity(
    model: Any,
    windows: torch.Tensor,
    *,
    strategy: str = "isolated",
    metric: str = "kl",
    k_min: int = 1,
    k_step: float = 1.0,
    batch_size: int = 8,
    reuse_prefix: bool = True,
) -> tuple[list[dict[int | float, float]], float]:
    """S[l, k] for every MoE layer and candidate k, and the reference NLL.

    Args:
        model: a loaded causal LM of a registered family, unmodified.
        windows: [W, S] calibration token ids.
        strategy: ``isolated`` or ``paper`` (module docstring).
        metric: ``nll`` or ``kl``.
        k_min: smallest candidate k.
        k_step: 1 for whole experts, 0.5 for a half-expert grid; a fractional grid is
            measured with Alloc-T routing in the profiled layer (as the plan will run).
        batch_size: windows per forward pass.
        reuse_prefix: reuse work across layers and across k (module docstring); False
            runs one full forward per (l, k), k = K_l included (the naive reference,
            kept for tests and cost comparisons).

    Returns:
        One ``{k: S}`` row per MoE layer (layer order) and the untouched model's mean NLL.
    """
    if strategy not in STRATEGIES:
        raise AllocplanError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if metric not in METRICS:
        raise AllocplanError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    if batch_size < 1:
        raise AllocplanError(f"batch size {batch_size} must be at least 1")
    layers = find_moe_layers(model)
    decoder_layers = model.get_submodule(model_family(model).layers_path)
    originals = [layer.top_k for layer in layers]
    if k_min < 1 or k_min > min(originals):
        raise AllocplanError(f"k_min {k_min} must be between 1 and the smallest original top-k {min(originals)}")
    if k_step not in (1.0, 0.5):
        raise AllocplanError(f"k step {k_step} is not 1 or 0.5")
    token_level = k_step != 1.0
    device = next(model.parameters()).device

    # float64 accumulators: sums over up to millions of token-level differences.
    increase = [{k: 0.0 for k in k_grid(k_min, original, k_step)} for original in originals]
    reference_sum, scored = 0.0, 0
    # Per MoE layer position: None until checked, then whether layer output = kept + block change.
    additive: list[bool | None] = [None] * len(layers)
    with torch.inference_mode(), _top_ks(layers, originals):
        for batch in windows.to(device).split(batch_size):
            targets = batch[:, 1:].unsqueeze(-1)  # [B, S-1, 1]
            outputs: list[Any] = [None] * len(decoder_layers)
            block_io: list[Any] = [None] * len(layers)
            hooks = []
            if reuse_prefix:
                for j, decoder_layer in enumerate(decoder_layers):
                    hooks.append(decoder_layer.register_forward_hook(
                        lambda _m, _a, out, j=j: outputs.__setitem__(j, out)))
                for position, layer in enumerate(layers):
                    hooks.append(layer.block.register_forward_hook(
                        lambda _m, args, kwargs, out, p=position: block_io.__setitem__(
                            p, ((args, kwargs), _hidden(out))),
                        with_kwargs=True))
            try:
                reference = _token_losses(model, batch)  # [B, S-1, V]
            finally:
                for hook in hooks:
                    hook.remove()
            reference_nll = -reference.gather(-1, targets).squeeze(-1)  # [B, S-1]
            reference_probs = reference.exp() if metric == "kl" else None  # [B, S-1, V], once per batch
            reference_sum += reference_nll.double().sum().item()
            scored += reference_nll.numel()

            for position in reversed(range(len(layers))):  # deepest first, as the paper profiles
                index = layers[position].index
                for k in sorted(increase[position], reverse=True):
                    if reuse_prefix and strategy == "isolated" and k == originals[position]:
                        continue  # identical to the reference configuration: S = 0 exactly
                    ks = layer_ks(strategy, originals, position, k, k_min)
                    with _probe(model, layers, ks, token_level):
                        if reuse_prefix:
                            replacements: dict[int, torch.nn.Module] = {j: _Replay(outputs[j]) for j in range(index)}
                            args_kwargs, block_output = block_io[position]
                            shortcut = _ReplayLayerAtK(outputs[index], layers[position].block, args_kwargs, block_output)
                            if additive[position] is None:
                                additive[position] = _block_change_is_additive(
                                    model, batch, decoder_layers, outputs, index, shortcut)
                                if not additive[position]:
                                    logger.info("layer %d: output is not additive in its block; re-running it", index)
                            if additive[position]:
                                replacements[index] = shortcut
                            with _replayed(decoder_layers, replacements):
                                logp = _token_losses(model, batch)
                        else:
                            logp = _token_losses(model, batch)
                    if metric == "nll":
                        nll = -logp.gather(-1, targets).squeeze(-1)  # [B, S-1]
                        delta = (nll.double() - reference_nll.double()).sum().item()
                    else:  # KL(full || planned) per token, summed
                        delta = (reference_probs * (reference - logp)).sum(-1).double().sum().item()
                    increase[position][k] += delta
            logger.info("profiled batch of %d windows", batch.shape[0])

    rows = [
        {k: float(f"{total / scored:.{_SIGNIFICANT}g}") for k, total in sorted(row.items())}
        for row in increase
    ]
    return rows, reference_sum / scored


def profile_model(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    calib: str | Path,
    calib_tokens: int = 16384,
    seq_len: int = 256,
    strategy: str = "isolated",
    metric: str = "kl",
    k_min: int = 1,
    k_step: float = 1.0,
    batch_size: int = 8,
) -> SensitivityProfile:
    """Profile a loaded model on a calibration text file (see module docstring).

    Returns:
        The :class:`SensitivityProfile` artifact (save it with ``save_profile``).
    """
    identity = model_identity(model, model_name)
    layers = find_moe_layers(model)
    windows, record = calibration_windows(tokenizer, calib, calib_tokens=calib_tokens, seq_len=seq_len)
    rows, reference_nll = measure_sensitivity(
        model, windows, strategy=strategy, metric=metric, k_min=k_min, k_step=k_step, batch_size=batch_size
    )
    return _profile(
        model, identity, layers, rows,
        metric=metric, strategy=strategy, k_min=k_min, k_step=k_step, token_level=k_step != 1.0,
        reference_nll=float(f"{reference_nll:.{_SIGNIFICANT}g}"), calibration=record,
    )


def _profile(model: Any, identity: Any, layers: list[MoELayer], rows: list[dict], **measurement: Any) -> SensitivityProfile:
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
            for layer, row in zip(layers, rows)
        ),
        provenance=ProfileProvenance(
            allocplan_version=__version__,
            torch_version=package_version("torch"),
            transformers_version=package_version("transformers"),
        ),
    )


def profile_data_free(model: Any, *, tokens: int = 512, seed: int = 0, k_min: int = 1) -> SensitivityProfile:
    """LExI-style data-free sensitivities: no calibration text.

    Each MoE block alone gets the same ``tokens`` Gaussian input vectors; S[l, k]
    is the relative squared Frobenius change of its output at top-k versus its
    original K, ||y_k - y_K||^2 / ||y_K||^2.
    """
    layers = find_moe_layers(model)
    parameter = next(model.parameters())
    hidden_size = model.get_input_embeddings().embedding_dim
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(1, tokens, hidden_size, generator=generator).to(parameter)  # [1, N, H]

    def block_output(layer: MoELayer) -> torch.Tensor:
        out = layer.block(inputs)
        return (out[0] if isinstance(out, tuple) else out).float()  # [1, N, H]

    rows = []
    with torch.inference_mode():
        for layer in layers:
            reference = block_output(layer)
            row = {}
            for k in range(k_min, layer.top_k + 1):
                with _top_ks([layer], [k]):
                    change = (block_output(layer) - reference).pow(2).sum() / reference.pow(2).sum()
                row[k] = float(f"{change.item():.{_SIGNIFICANT}g}")
            rows.append(row)
    return _profile(
        model, model_identity(model, getattr(model, "name_or_path", "") or "in-process"), layers, rows,
        metric="output-change", strategy="data-free", k_min=k_min, k_step=1.0, token_level=False,
        reference_nll=0.0,
        calibration=CalibrationRecord(file="gaussian", sha256=f"seed:{seed}", tokens=tokens, seq_len=tokens, windows=1),
    )
