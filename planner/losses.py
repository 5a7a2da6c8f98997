"""Next-token losses of a model on token windows, and their comparison with a reference.

The same functions score profiling probes, refinement candidates and evaluation,
so every sensitivity and every measured objective uses one definition.
"""

from __future__ import annotations

from typing import Any

import torch


class Scratch:
    """Reusable output buffers for scoring many forwards of one batch shape.

    A probe's log-probabilities and its KL terms are [B, S, V] float32 tensors, tens of MB
    for a batch of calibration windows. Allocated afresh, each costs the operating system's
    page faults and zeroing on every probe. Written into the same buffers, the same ops in
    the same order give bit-identical sums, and ``allocplan compile --model bundled:ref-dsv2
    --budget 0.5`` took 22 s instead of 27 s on a 2-core CPU (two runs each).

    What :func:`next_token_logprobs` returns with a scratch is valid until the next call
    with the same scratch.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised float32 tensor of ``like``'s shape and device, reused across calls."""
        found = self._buffers.get(name)
        if found is None or found.shape != like.shape or found.device != like.device:
            found = self._buffers[name] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return found


def next_token_logprobs(model: Any, batch: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """Log-probabilities [B, S-1, V] (float32) of each next token, from one forward over ``batch`` [B, S].

    ``scratch``: write them into its buffer (valid until its next use) instead of a new tensor.
    """
    logits = model(input_ids=batch, use_cache=False).logits.float()  # [B, S, V]
    out = scratch.buffer("logprobs", logits) if scratch is not None else None
    # log_softmax over the contiguous logits, then drop the last position (no copy of a strided slice).
    return torch.log_softmax(logits, dim=-1, out=out)[:, :-1]


def token_nll(logprobs: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [B, S-1] of the real next tokens of ``batch`` [B, S]."""
    return -logprobs.gather(-1, batch[:, 1:].unsqueeze(-1)).squeeze(-1)


def kl_sum(reference_logprobs: torch.Tensor, reference_probs: torch.Tensor, logprobs: torch.Tensor,
           scratch: Scratch | None = None) -> float:
    """Sum over positions of KL(reference || model) of the next-token distributions (float64).

    ``reference_probs`` is ``reference_logprobs.exp()``, passed in so that a caller scoring
    many candidates against one reference computes it once. ``scratch``: hold the [B, S-1, V]
    terms in its buffer rather than in two new tensors (the same values).
    """
    if scratch is None:
        return (reference_probs * (reference_logprobs - logprobs)).sum(-1).double().sum().item()
    terms = torch.sub(reference_logprobs, logprobs, out=scratch.buffer("kl", logprobs))  # [B, S-1, V]
    return terms.mul_(reference_probs).sum(-1).double().sum().item()


class Reference:
    """The untouched model's next-token distributions on fixed windows, kept to score candidates.

    Args:
        model: the model, as the reference should see it (no plan applied).
        windows: [W, S] token windows.
        batch_size: windows per forward.
    """

    def __init__(self, model: Any, windows: torch.Tensor, batch_size: int = 8) -> None:
        self.batches = list(windows.split(batch_size))
        with torch.inference_mode():
            logprobs = [next_token_logprobs(model, batch) for batch in self.batches]
        self.logprobs = logprobs  # per batch [B, S-1, V]
        self.probs = [lp.exp() for lp in logprobs]
        self.positions = sum(lp.shape[0] * lp.shape[1] for lp in logprobs)

    def mean_kl(self, model: Any) -> float:
        """Mean KL(reference || model as it is now) per scored position."""
        total, scratch = 0.0, Scratch()
        with torch.inference_mode():
            for batch, ref_logp, ref_probs in zip(self.batches, self.logprobs, self.probs):
                total += kl_sum(ref_logp, ref_probs, next_token_logprobs(model, batch, scratch), scratch)
        return total / self.positions
