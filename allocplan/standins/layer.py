"""``layer`` stand-ins: one vector per MoE layer, the mean output of any of its routed experts."""

from __future__ import annotations

from typing import Any

from .expert import positive
from .registry import StandInKind, register_stand_in_kind


def fit(moments: Any, rank: int) -> dict[str, Any]:
    """The layer's weighted mean routed-expert output: bias [1, H]."""
    return {"bias": (moments.sum_y.sum(0, keepdim=True) / positive(moments.mass.sum())).float()}


LAYER = register_stand_in_kind(StandInKind(
    "layer", "the layer's mean routed-expert output, one vector for all its experts",
    per_expert=False, low_rank=False, fit=fit))
