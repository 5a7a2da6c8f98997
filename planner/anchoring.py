"""The anchored strategy's correction: from carried losses to end-to-end ones, per layer.

A carried probe of layer l (:class:`~allocplan.planner.replay.Carried`) runs l's block and the head
only: the layers after l add what they added in the reference pass, so how they would amplify or
damp l's change is missing. Two anchor probes per layer measure it, both carried and exactly (every
later layer re-run), on the anchor batches:

* the layer's largest change: k_min, without stand-ins;
* its smallest: the largest k below K_l, with the highest stand-in rank offered (without one where
  the profile has no stand-ins).

The exact-to-carried ratio grows as the change shrinks (measured on bundled:ref-deep: from about 1x
at a layer's k_min to 20x for its best stand-ins, the later layers amplifying small changes most),
so one scale per layer does not fit. For a cell whose mean carried loss is c, with the anchors'
mean carried losses c_a and ratios q_a, the correction is a straight line in (log c, log q) through
the two anchors, constant beyond them:

    S = c * exp(interp(log c; (log c_1, log q_1), (log c_2, log q_2)))

Pure: plain floats in and out, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Anchor:
    """One anchor probe's sums over the anchor batches.

    Attributes:
        carried: summed carried loss.
        exact: summed exact loss.
        tokens: positions scored in the anchor batches.
    """

    carried: float
    exact: float
    tokens: int

    @property
    def usable(self) -> bool:
        """Whether the anchor gives a ratio: both losses above 0 (a KL sum is 0 only where nothing changed)."""
        return self.carried > 0 and self.exact > 0 and self.tokens > 0


def correction(anchors: list[Anchor], carried_mean: float) -> float:
    """The factor exact / carried for a cell of mean carried loss ``carried_mean`` (module docstring).

    1 where no anchor is usable (nothing to learn the later layers' effect from); one usable anchor
    gives its own ratio everywhere.
    """
    points = sorted((math.log(a.carried / a.tokens), math.log(a.exact / a.carried)) for a in anchors if a.usable)
    if not points:
        return 1.0
    (x_low, y_low), (x_high, y_high) = points[0], points[-1]
    if carried_mean <= 0 or x_high == x_low:
        return math.exp(y_low)  # at or below the smallest anchor's change: its ratio
    x = math.log(carried_mean)
    if x <= x_low:
        return math.exp(y_low)
    if x >= x_high:
        return math.exp(y_high)
    return math.exp(y_low + (y_high - y_low) * (x - x_low) / (x_high - x_low))
