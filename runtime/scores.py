"""Router rules: how each family ranks experts and whether it renormalises their weights.

Alloc-T compares candidates across tokens, so it needs the score the family
selects by, not the combine weight (DeepSeek-V3 selects by sigmoid + correction
bias but weights by the unbiased sigmoid). The registry names a rule of each
kind; each is recomputed from the router instance and its ``router_logits``.

Routers that select by top-k on raw logits (granite, gpt-oss, cohere2) rank the
same way within a token as their softmax; across tokens raw logits are not
comparable (softmax is shift-invariant), so Alloc-T compares their full-softmax
probabilities.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .routing_rules import as_dtype


def _softmax(router: Any, logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(as_dtype(logits, torch.float32), dim=-1)  # [T, E]


def _sigmoid_bias(router: Any, logits: torch.Tensor) -> torch.Tensor:
    bias = as_dtype(router.e_score_correction_bias, torch.float32)  # [E]
    return torch.sigmoid(as_dtype(logits, torch.float32)) + bias  # [T, E]


def _ernie(router: Any, logits: torch.Tensor) -> torch.Tensor:
    # Ernie 4.5 selects by probabilities plus its learned moe_statics bias.
    return router.moe_statics(torch.softmax(as_dtype(logits, torch.float32), dim=-1)).reshape(logits.shape)  # [T, E]


def _cohere2(router: Any, logits: torch.Tensor) -> torch.Tensor:
    if router.expert_selection_fn == "sigmoid":
        return torch.sigmoid(as_dtype(logits, torch.float32))  # [T, E]
    return torch.softmax(as_dtype(logits, torch.float32), dim=-1)  # [T, E]


def _probs(router: Any, probabilities: torch.Tensor) -> torch.Tensor:
    # gemma4's router returns its softmax probabilities in place of logits.
    return as_dtype(probabilities, torch.float32)  # [T, E]


SELECTION_SCORES: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    "softmax": _softmax,
    "probs": _probs,
    "sigmoid_bias": _sigmoid_bias,
    "ernie": _ernie,
    "cohere2": _cohere2,
}

# Rules whose scores can be negative (a correction bias is added): a drop order must divide those
# rather than multiply them, so that a larger factor still ranks a candidate higher.
SIGNED_SELECTIONS = frozenset({"sigmoid_bias", "ernie"})

# The p-norm a family normalises its chosen weights with (1.0 = they sum to one), or None.
NORMALIZATION_RULES: dict[str, Callable[[Any, Any], float | None]] = {
    "always": lambda router, block: 1.0,
    "never": lambda router, block: None,
    "norm_topk_prob": lambda router, block: 1.0 if router.norm_topk_prob else None,
    # cohere2: softmax over the chosen logits always sums to one; sigmoid only with norm_topk_prob.
    "cohere2": lambda router, block: (
        1.0 if router.expert_selection_fn == "softmax" or router.norm_topk_prob else None
    ),
    # dbrx: an optional p-norm, configured on the MoE block.
    "dbrx": lambda router, block: block.moe_normalize_expert_weights,
}
