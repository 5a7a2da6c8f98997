"""Measured refinement: search allocations around a solved one by their real calibration loss.

The DP minimises the sum of per-layer sensitivities measured one layer at a
time, but layers cut together can lose more (or less) than the sum of their
separate losses. Here candidate allocations are run whole, every layer reduced
at once and routed as the plan will run, and scored by the mean KL divergence
of their next-token distributions from the untouched model's on calibration
windows (:class:`~allocplan.planner.losses.Reference`).

Search: from the current per-layer k, every move of one unit (one expert, or a
half on a half-expert grid) from one layer to another is measured; the best
move that lowers the objective is taken, and the search repeats from there
until no move helps or ``max_steps`` moves were taken. Ties go to the
lexicographically smallest k, so the search is deterministic.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from allocplan.formats.allocation import Allocation
from allocplan.progress import progress
from ..runtime.apply import apply_plan
from ..runtime.layers import find_moe_layers
from .losses import Reference

Ks = tuple[float, ...]
AllocationOf = Callable[[list[float]], Allocation]


def exchange_moves(ks: Sequence[float], originals: Sequence[int], *, k_min: int = 1, unit: float = 1) -> list[Ks]:
    """Every allocation that moves ``unit`` of k from one layer to another within [k_min, original k]."""
    moves = []
    for a, b in itertools.permutations(range(len(ks)), 2):
        if ks[a] - unit >= k_min and ks[b] + unit <= originals[b]:
            moved = list(ks)
            moved[a] -= unit
            moved[b] += unit
            moves.append(tuple(int(k) if float(k).is_integer() else k for k in moved))
    return moves


@dataclass(frozen=True)
class Refinement:
    """What the search measured.

    Attributes:
        start: the allocation it started from, and its measured objective.
        steps: each move taken, as (allocation, measured objective), in order.
        measured: how many allocations were run in all.
    """

    start: tuple[Ks, float]
    steps: tuple[tuple[Ks, float], ...]
    measured: int

    @property
    def best(self) -> tuple[Ks, float]:
        """The allocation the search ended at and its objective."""
        return self.steps[-1] if self.steps else self.start


def measured_kl(model: Any, allocation: Allocation, reference: Reference) -> float:
    """Mean KL from the untouched model on the reference's windows, with ``allocation`` applied.

    To 9 significant digits, as sensitivities are: a move must beat the current allocation by
    more than float noise, and the stored objectives stay short and stable.
    """
    with apply_plan(model, allocation):
        return float(f"{reference.mean_kl(model):.9g}")


def refine_by_exchange(
    model: Any,
    ks: Sequence[float],
    allocation_of: AllocationOf,
    reference: Reference,
    *,
    k_min: int = 1,
    unit: float = 1,
    max_steps: int | None = None,
    allowed: Callable[[tuple], bool] | None = None,
) -> Refinement:
    """Local search over one-unit exchanges between layers (module docstring).

    ``allocation_of(ks)`` builds the allocation a candidate runs (its k, treatments, compensation);
    ``allowed(ks)``: whether a move may be taken (the charged budget), None: every move.
    """
    originals = [layer.top_k for layer in find_moe_layers(model)]
    current = tuple(ks)
    current_value = measured_kl(model, allocation_of(list(current)), reference)
    start, steps, measured = (current, current_value), [], 1
    while max_steps is None or len(steps) < max_steps:
        moves = [move for move in exchange_moves(current, originals, k_min=k_min, unit=unit)
                 if allowed is None or allowed(move)]
        scored = {move: measured_kl(model, allocation_of(list(move)), reference)
                  for move in progress(moves, desc=f"refining, step {len(steps) + 1}")}
        measured += len(scored)
        if not scored:
            break
        best = min(scored, key=lambda move: (scored[move], move))
        if scored[best] >= current_value:
            break
        current, current_value = best, scored[best]
        steps.append((current, current_value))
    return Refinement(start=start, steps=tuple(steps), measured=measured)
