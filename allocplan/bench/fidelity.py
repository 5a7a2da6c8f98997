"""How far an approximate profile's plans land from the exact profile's, judged by the exact S.

The anchored strategy (``--strategy anchored``, :mod:`allocplan.planner.anchoring`) trades exact
sensitivities for time. What a user loses is not the error in S itself but the plan it leads to:
the regret of a budget is the exact objective sum_l S[l, o_l] of the options the approximate
profile's optimum picks, minus the exact profile's own optimum. The same measure applied to an exact
profile of other calibration text gives the yardstick: how far plans move by the text alone.

Pure: profiles and rows in, floats out (the DP solves both sides).
"""

from __future__ import annotations

from typing import Any

from allocplan.planner.problem import AllocationProblem
from allocplan.planner.solve import allocation_problem
from allocplan.planner.solve_dp import solve_dp

# The budgets judged: the frontier's middle, where the DP trades layers against each other.
REGRET_RATIOS = (0.33, 0.5, 0.67)


def regret(truth: AllocationProblem, approximate: AllocationProblem) -> dict:
    """``truth``'s objective at ``approximate``'s optimum, against ``truth``'s own optimum (same options and
    budget): ``regret`` in the objective's unit (nats per token for KL profiles), ``optimum``, and
    ``relative`` (regret over optimum; 0 where the optimum is 0)."""
    best = truth.objective(solve_dp(truth).ks)
    chosen = truth.objective(solve_dp(approximate).ks)
    return {"regret": chosen - best, "optimum": best, "relative": (chosen - best) / best if best > 0 else 0.0}


def rows_problem(rows: list[dict[int | float, float]], total: int) -> AllocationProblem:
    """Plain per-layer top-k (whole k) with ``rows[l][k]`` = S[l, k], under a budget of ``total`` experts."""
    return AllocationProblem(tuple(tuple(int(k) for k in row) for row in rows),
                             tuple(tuple(row.values()) for row in rows), total)


def rows_regrets(truth: list[dict[int | float, float]], approximate: list[dict[int | float, float]],
                 ratios: tuple[float, ...] = REGRET_RATIOS) -> list[dict]:
    """:func:`regret` of plain top-k rows at each budget ratio of the layers' total original k."""
    original = sum(max(row) for row in truth)
    return [{"ratio": ratio, **regret(rows_problem(truth, round(ratio * original)),
                                      rows_problem(approximate, round(ratio * original)))} for ratio in ratios]


def profile_regrets(truth: Any, approximate: Any, ratios: tuple[float, ...] = REGRET_RATIOS) -> list[dict]:
    """:func:`regret` of two profiles of one model, (k, stand-in rank) options and charges as ``solve``
    builds them, at each budget ratio of the model's total original k."""
    original = sum(layer.original_k for layer in truth.layers)
    return [{"ratio": ratio, **regret(allocation_problem(truth, round(ratio * original)),
                                      allocation_problem(approximate, round(ratio * original)))}
            for ratio in ratios]
