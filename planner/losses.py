"""Next-token losses of a model on token windows, and their comparison with a reference.

The same functions score profiling probes, refinement candidates and evaluation,
so every sensitivity and every measured objective uses one definition.
"""

from __future__ import annotations

from typing import Any

import torch


def next_token_logprobs(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [B, S-1, V] (float32) of each next token, from one forward over ``batch`` [B, S]."""
    logits = model(input_ids=batch, use_cache=False).logits  # [B, S, V]
    # log_softmax over the contiguous logits, then drop the last position (no copy of a strided slice).
    return torch.log_softmax(logits.float(), dim=-1)[:, :-1]


def token_nll(logprobs: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [B, S-1] of the real next tokens of ``batch`` [B, S]."""
    return -logprobs.gather(-1, batch[:, 1:].unsqueeze(-1)).squeeze(-1)


def kl_sum(reference_logprobs: torch.Tensor, reference_probs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Sum over positions of KL(reference || model) of the next-token distributions (float64).

    ``reference_probs`` is ``reference_logprobs.exp()``, passed in so that a caller scoring
    many candidates against one reference computes it once.
    """
    return (reference_probs * (reference_logprobs - logprobs)).sum(-1).double().sum().item()


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
        total = 0.0
        with torch.inference_mode():
            for batch, ref_logp, ref_probs in zip(self.batches, self.logprobs, self.probs):
                total += kl_sum(ref_logp, ref_probs, next_token_logprobs(model, batch))
        return total / self.positions
