"""Activation budgets: a ratio or an absolute count, resolved to an integer B.

B counts routed-expert activations per token summed over MoE layers; shared
experts are always on and not part of it. A ratio resolves as
B = round_half_up(ratio * sum_l K_l), K_l the model's original top-k of layer l
(half-up, not Python's banker's rounding, so 0.5 * 13 gives 7 on every platform).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import AllocplanError


def round_half_up(value: float) -> int:
    """Nearest integer, halves away from zero for positive values.

    The 1e-9 slack absorbs binary representation error (0.1 * 15 = 1.5000000000000002
    and 0.3 * 5 = 1.4999999999999998 must both round to 2).
    """
    return int(math.floor(value + 0.5 + 1e-9))


@dataclass(frozen=True)
class BudgetRequest:
    """The budget a user asks for: exactly one of a ratio or an absolute count.

    Attributes:
        ratio: fraction of the model's original activations per token, in (0, 1].
        activations: absolute routed activations per token over all MoE layers.

    Raises:
        AllocplanError: both or neither given, or a value out of range.
    """

    ratio: float | None = None
    activations: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.activations is None):
            raise AllocplanError("give exactly one of --budget RATIO or --budget-activations N")
        if self.ratio is not None and (math.isnan(self.ratio) or not 0.0 < self.ratio <= 1.0):
            raise AllocplanError(f"budget ratio {self.ratio} is outside (0, 1]; use e.g. --budget 0.5")
        if self.activations is not None and self.activations < 1:
            raise AllocplanError(f"--budget-activations {self.activations} must be at least 1")

    @classmethod
    def of(cls, budget: "float | BudgetRequest") -> "BudgetRequest":
        """A request from a ratio (any real number) or an existing request."""
        if isinstance(budget, BudgetRequest):
            return budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise AllocplanError(f"budget {budget!r} is neither a ratio nor a BudgetRequest; pass e.g. 0.5")
        return cls(ratio=float(budget))

    def resolve(self, original_activations: int, min_activations: int, *, count_option: bool = True) -> int:
        """Total activations B this request allows.

        Args:
            original_activations: sum of the model's original top-k over MoE layers.
            min_activations: smallest feasible total (sum of per-layer k_min).
            count_option: whether the command has ``--budget-activations`` for the message to suggest
                (``eval --method`` and ``bench --config`` take a ratio only).

        Raises:
            AllocplanError: above the model's own total, or infeasible; the message
                states the smallest feasible budget.
        """
        if self.ratio is not None:
            total = round_half_up(self.ratio * original_activations)
            given = f"--budget {self.ratio:g} gives {total} of {original_activations} activations"
        else:
            total = int(self.activations)
            given = f"--budget-activations {total}"
            if total > original_activations:
                raise AllocplanError(
                    f"{given} exceeds the model's own {original_activations} activations per token;"
                    f" use at most --budget-activations {original_activations}"
                )
        if total < min_activations:
            smallest_ratio = min_activations / original_activations
            count = f"--budget-activations {min_activations} or " if count_option else ""
            raise AllocplanError(
                f"{given}, below the smallest feasible budget of {min_activations} activations"
                f" (k_min in every MoE layer); use {count}--budget {math.ceil(smallest_ratio * 1000) / 1000:g} or more"
            )
        return total
