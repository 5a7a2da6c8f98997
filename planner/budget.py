"""Activation budgets: a ratio or an absolute count, resolved to an integer B.

B counts routed-expert activations per token summed over MoE layers; shared
experts are always on and not part of it. A ratio resolves as
B = round_half_up(ratio * sum_l K_l), K_l the model's original top-k of layer l
(half-up, not Python's banker's rounding, so 0.5 * 13 gives 7 on every platform).
"""

from __future__ import annotations

import math

from allocplan.errors import AllocplanError


def round_half_up(value: float) -> int:
    """Nearest integer, halves away from zero for positive values.

    The 1e-9 slack absorbs binary representation error (0.1 * 15 = 1.5000000000000002
    and 0.3 * 5 = 1.4999999999999998 must both round to 2).
    """
    return int(math.floor(value + 0.5 + 1e-9))


def resolve_budget(
    original_activations: int,
    min_activations: int,
    *,
    budget_ratio: float | None = None,
    budget_activations: int | None = None,
) -> int:
    """Total activations B allowed by the user's budget.

    Args:
        original_activations: sum of the model's original top-k over MoE layers.
        min_activations: smallest feasible total (sum of per-layer k_min).
        budget_ratio: fraction of ``original_activations`` in (0, 1].
        budget_activations: absolute total; exactly one of the two must be given.

    Raises:
        AllocplanError: both or neither given, out of range, or infeasible; the
            message states the smallest feasible budget.
    """
    if (budget_ratio is None) == (budget_activations is None):
        raise AllocplanError("give exactly one of --budget RATIO or --budget-activations N")
    smallest_ratio = min_activations / original_activations
    if budget_ratio is not None:
        if not (0.0 < budget_ratio <= 1.0) or math.isnan(budget_ratio):
            raise AllocplanError(f"budget ratio {budget_ratio} is outside (0, 1]; use e.g. --budget 0.5")
        total = round_half_up(budget_ratio * original_activations)
        given = f"--budget {budget_ratio:g} gives {total} of {original_activations} activations"
    else:
        total = int(budget_activations)
        given = f"--budget-activations {total}"
        if total > original_activations:
            raise AllocplanError(
                f"{given} exceeds the model's own {original_activations} activations per token;"
                f" use at most --budget-activations {original_activations}"
            )
    if total < min_activations:
        raise AllocplanError(
            f"{given}, below the smallest feasible budget of {min_activations} activations"
            f" (k_min in every MoE layer); use --budget-activations {min_activations}"
            f" or --budget {math.ceil(smallest_ratio * 1000) / 1000:g} or more"
        )
    return total
