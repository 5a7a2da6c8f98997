"""Replaying recorded decoder-layer outputs, so that a probe re-runs only what its k changes.

The hidden states entering decoder layer l do not depend on the k of layer l or
of any later layer. Profiling therefore records every decoder layer's output
once per calibration batch and, while probing layer l, swaps the layers before
it for :class:`Replay` modules that return the recorded outputs; the model's
own forward still builds masks, rotary embeddings, the final norm and head, so
no family-specific forward code is copied. Within layer l, :class:`ReplayLayerAtK`
runs only the MoE block on its recorded input, where
:func:`block_change_is_additive` confirms that this equals a real re-run.
:class:`Carried` and :class:`Passthrough` skip the layers after l as well (the
anchored strategy's approximate probe).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


class Replay(torch.nn.Module):
    """Stands in for a decoder layer and returns that layer's recorded output."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's or block's output (a tensor or a tuple led by one)."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class ReplayLayerAtK(torch.nn.Module):
    """Stands in for decoder layer l at a new k: its recorded output plus the block's change.

    ``forward`` returns recorded_output + (block(recorded_block_input) - recorded_block_output),
    with the block running at whatever k the probe has set.
    """

    def __init__(self, layer_output: Any, block: Any, block_input: Any, block_output: torch.Tensor) -> None:
        super().__init__()
        self.layer_output, self.block = layer_output, block
        self.block_input, self.block_output = block_input, block_output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args_in, kwargs_in = self.block_input
        change = hidden_of(self.block(*args_in, **kwargs_in)) - self.block_output
        hidden = hidden_of(self.layer_output)
        # Some blocks return their tokens flattened ([B*S, H], llama4) and the layer restores the shape.
        return _with_hidden(self.layer_output, hidden + change.view(hidden.shape))


class Carried(torch.nn.Module):
    """Runs decoder layer l (or its :class:`ReplayLayerAtK`) and adds what the recorded later layers added to
    the residual stream, so that l's change reaches the final norm and head as if no later layer reacted to it.

    With :class:`Passthrough` in every later layer's place, a probe of layer l runs l's block and the head
    only: the anchored strategy's carried probe (:mod:`~allocplan.planner.profiling`).
    """

    def __init__(self, layer: torch.nn.Module, carry: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.carry = layer, carry  # carry: [B, S, H], final layer's output - layer l's output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.layer(*args, **kwargs)
        hidden = hidden_of(output)
        return _with_hidden(output, hidden + self.carry.view(hidden.shape))


class Passthrough(torch.nn.Module):
    """Stands in for a decoder layer after a :class:`Carried` one: hands its input on unchanged, in the
    structure of that layer's recorded output (a tensor, or a tuple led by one)."""

    def __init__(self, recorded_output: Any) -> None:
        super().__init__()
        self.recorded_output = recorded_output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return _with_hidden(self.recorded_output, hidden)


@contextmanager
def replayed(decoder_layers: torch.nn.ModuleList, replacements: dict[int, torch.nn.Module]) -> Iterator[None]:
    """Replace decoder layers by index for the duration of the block."""
    originals = {j: decoder_layers[j] for j in replacements}
    try:
        for j, module in replacements.items():
            decoder_layers[j] = module
        yield
    finally:
        for j, module in originals.items():
            decoder_layers[j] = module


class _StopForward(Exception):
    """Raised from a forward hook to end a forward pass once the layer of interest has run."""


def block_change_is_additive(
    model: Any, batch: torch.Tensor, decoder_layers: torch.nn.ModuleList, outputs: list[Any],
    index: int, shortcut: ReplayLayerAtK,
) -> bool:
    """Whether decoder layer ``index`` at the probe's k equals the shortcut's output.

    Runs the real layer once on the recorded outputs of the layers before it (the
    forward stops right after it) and compares; called inside the probe, so both
    run at the k being measured. Float rounding differs between the two sums, so
    the comparison allows 1e-4 of the output's scale.
    """
    captured: list[torch.Tensor] = []

    def grab(_module: Any, _args: Any, out: Any) -> None:
        captured.append(hidden_of(out))
        raise _StopForward

    hook = decoder_layers[index].register_forward_hook(grab)
    try:
        with replayed(decoder_layers, {j: Replay(outputs[j]) for j in range(index)}):
            model(input_ids=batch, use_cache=False)
    except _StopForward:
        pass
    finally:
        hook.remove()
    expected = captured[0].float()
    scale = expected.abs().max().item()
    return torch.allclose(hidden_of(shortcut()).float(), expected, rtol=1e-4, atol=1e-4 * scale)


def record_outputs(decoder_layers: torch.nn.ModuleList, blocks: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """Hooks that record every decoder layer's output and every MoE block's (input, output).

    Returns ``(layer_outputs, block_io, hooks)``: the two lists fill during the next
    forward; remove the hooks afterwards.
    """
    outputs: list[Any] = [None] * len(decoder_layers)
    block_io: list[Any] = [None] * len(blocks)
    hooks = []
    for j, decoder_layer in enumerate(decoder_layers):
        hooks.append(decoder_layer.register_forward_hook(lambda _m, _a, out, j=j: outputs.__setitem__(j, out)))
    for position, block in enumerate(blocks):
        hooks.append(block.register_forward_hook(
            lambda _m, args, kwargs, out, p=position: block_io.__setitem__(p, ((args, kwargs), hidden_of(out))),
            with_kwargs=True))
    return outputs, block_io, hooks
