"""Normaliser width (k2): decoupled renormalisation per layer, for families that renormalise their top-k.

The kept weights are divided by the router mass of the token's top-k2 candidates (times the
family's scaling factor) instead of the kept ones' (arXiv 2609.04575), so a token that loses
experts does not inflate the rest. k2 is chosen per (l, k) from {ceil(k), ..., width} and none
(the family's own renormalisation over the kept set) by the smallest squared error of the
layer's routed output against its full-k output on calibration tokens (ties: none, then the
smaller width). Plan field: ``normalizer_k`` (null: the plan's weight mode in charge).
"""

from __future__ import annotations

import math
from typing import Any

from .registry import WeightTreatment, register_weight_treatment


def applies(renormalises: bool, k: int | float, width: int) -> bool:
    """Fitted where the family renormalises and some width from ceil(k) fits the candidates."""
    return renormalises and math.ceil(k) <= width


def options(k: int | float, width: int) -> list[int | None]:
    """None (the family's own renormalisation), then every width from ceil(k) to the candidate width."""
    return [None, *range(math.ceil(k), width + 1)]


def accumulate(stats: dict, value: int | None, a: Any, b: Any, y: Any) -> None:
    """The squared error of option ``value``'s routed output (a + b) against the full-k output y."""
    stats[value] = stats.get(value, 0.0) + (a + b - y).double().pow(2).sum().item()


def choose(stats: dict, values: list[int | None]) -> int | None:
    """The width with the smallest error (ties: none, then the smaller width)."""
    return min(values, key=lambda w: (stats[w], -1 if w is None else w))


def check(value: int | None, width: int) -> str | None:
    if value is not None and not 1 <= value <= width:
        return f"{value} must be between 1 and the layer's candidate width {width} (or null)"
    return None


def configure(routing: Any, value: int | None) -> None:
    """The layer's own width overrides the plan's weight mode."""
    if value is not None:
        routing.mode, routing.reference_k = "decoupled", min(value, routing.k_max)


NORMALIZER_WIDTH = register_weight_treatment(WeightTreatment(
    "normalizer_width", "normalizer_k", None, int, applies, options, accumulate, choose, check, configure,
    "normaliser width", lambda value: "—" if value is None else str(value)))
