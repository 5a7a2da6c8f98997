"""Gain: a per-layer factor on the kept routed weights, for families that do not renormalise.

Fitted in closed form by least squares over calibration tokens t,

    g = sum_t <a_t, y_t - b_t> / sum_t <a_t, a_t>,

a_t the token's kept routed output, b_t its compensation, y_t its full-k routed output; stored to
9 significant digits and kept in [1e-3, ``MAX_GAIN``]. Plan field: ``gain`` (1.0: unchanged).
"""

from __future__ import annotations

import math
from typing import Any

from .registry import WeightTreatment, register_weight_treatment

# A fitted number is stored to this many significant digits (as sensitivities are).
DIGITS = 9
# A layer gain outside (0, MAX_GAIN] is refused: fitted gains sit near 1, and a wild one is a broken file.
MAX_GAIN = 10.0


def applies(renormalises: bool, k: int | float, width: int) -> bool:
    """Fitted where no normaliser width can be: the family does not renormalise, or no width fits."""
    return not renormalises or math.ceil(k) > width


def accumulate(stats: dict, value: float, a: Any, b: Any, y: Any) -> None:
    """The closed form's numerator <a, y - b> and denominator <a, a>."""
    stats["numerator"] = stats.get("numerator", 0.0) + (a.double() * (y - b).double()).sum().item()
    stats["denominator"] = stats.get("denominator", 0.0) + a.double().pow(2).sum().item()


def choose(stats: dict, values: list[float]) -> float:
    gain = stats["numerator"] / stats["denominator"] if stats.get("denominator", 0.0) > 0 else 1.0
    return min(max(float(f"{gain:.{DIGITS}g}"), 1e-3), MAX_GAIN)


def check(value: float, width: int) -> str | None:
    if not 0.0 < value <= MAX_GAIN:
        return f"{value!r} is outside (0, {MAX_GAIN:g}]; 1.0 leaves the layer's weights as they are"
    return None


def configure(routing: Any, value: float) -> None:
    routing.gain = float(value)


GAIN = register_weight_treatment(WeightTreatment(
    "gain", "gain", 1.0, float, applies, lambda k, width: [1.0], accumulate, choose, check, configure,
    "gain", lambda value: f"{value:.4g}"))
