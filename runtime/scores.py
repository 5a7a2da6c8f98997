"""Selection scores: how each family's router ranks experts, recomputed from its logits.

Alloc-T compares candidates across tokens, so it needs the score the family
selects by, not the combine weight (DeepSeek-V3 selects by sigmoid + correction
bias but weights by the unbiased sigmoid). Each function maps
``(router module, router_logits [T, E])`` to scores [T, E].
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def _softmax(router: Any, logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)  # [T, E]


def _sigmoid_bias(router: Any, logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits.float()) + router.e_score_correction_bias.float()  # [T, E]


SELECTION_SCORES: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    "softmax": _softmax,
    "sigmoid_bias": _sigmoid_bias,
}
