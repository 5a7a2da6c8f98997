"""``expert`` stand-ins: each routed expert's mean output (MoNE, arXiv 2507.00390).

Expert e's stand-in is its mean output over the calibration (token, candidate) pairs routed
to it, weighted as the planner weights the candidates a plan can drop; an expert with no such
pair gets zeros.
"""

from __future__ import annotations

from typing import Any

from .registry import StandInKind, register_stand_in_kind


def positive(total: Any) -> Any:
    """Sums of weights as divisors: a sum of no pairs becomes 1, so its mean is zero."""
    import torch

    return torch.where(total > 0, total, 1.0)


def fit(moments: Any, rank: int) -> dict[str, Any]:
    """Each expert's weighted mean output: bias [E, H]."""
    return {"bias": (moments.sum_y / positive(moments.mass)[:, None]).float()}


EXPERT = register_stand_in_kind(StandInKind(
    "expert", "each routed expert's mean output on the calibration tokens routed to it (MoNE)",
    per_expert=True, low_rank=False, fit=fit))
