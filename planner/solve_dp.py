"""Exact dynamic programme for the layer-level allocation (multiple-choice knapsack).

Formulation. Layers l = 0..L-1, options o in C_l with cost S[l, o] and integer
weight w[l, o] (an expert count k, or a (k, stand-in rank) pair's charged work on
an integer grid: planner/solve.py), budget B:

    minimise    sum_l S[l, o_l]
    subject to  sum_l w[l, o_l] <= B,   o_l in C_l.

Recurrence over layers and exact weight totals b:

    D[0][0] = 0,  D[0][b > 0] = +inf
    D[l+1][b] = min_{o in C_l, w[l, o] <= b} D[l][b - w[l, o]] + S[l, o]

and the answer is min_{b <= B} D[L][b], recovered by backtracking. Weights are
integers, so the recurrence is exact: no cost is rounded. Cost O(L * B * max|C_l|)
time, O(L * B) memory (B is the budget in grid units: 26 layers x 30 options x
330,000 units for a DeepSeek-V2-Lite-shaped model at 0.5, about a second in numpy).

Tie-breaking is deterministic: equal objectives prefer the smaller total b, and
within a layer the heavier option (candidates are tried in decreasing weight, then
in decreasing label order, and only a strictly smaller cost replaces the incumbent). Costs are summed left to right,
exactly as AllocationProblem.objective sums them, so the DP value and the
objective of the returned allocation are the same float.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .problem import AllocationProblem, Solution, solution_for


def solve_dp(problem: AllocationProblem) -> Solution:
    """Optimal allocation by dynamic programming (see module docstring)."""
    budget = problem.budget
    weights = problem.weights
    best = np.full(budget + 1, np.inf)  # D[l][b] for the current l, float64
    best[0] = 0.0
    choice_rows: list[np.ndarray] = []  # choice_rows[l][b] = k chosen for layer l at total b
    for layer in range(problem.num_layers):
        order = sorted(range(len(problem.choices[layer])),
                       key=lambda i: (-weights[layer][i], _descending(problem.choices[layer][i])))
        nxt = np.full(budget + 1, np.inf)
        chosen = np.full(budget + 1, -1, dtype=np.int64)  # index into choices[layer]
        # One whole row per candidate, heaviest first: the same float64 additions as a scalar loop over
        # b, and only a strictly smaller value replaces the incumbent, so ties keep the heavier option.
        for i in order:
            w, cost = weights[layer][i], problem.costs[layer][i]
            if w > budget:
                continue
            value = best[: budget + 1 - w] + cost  # D[l][b - w] + S[l, o] for b = w..B; inf stays inf
            better = value < nxt[w:]
            nxt[w:][better] = value[better]
            chosen[w:][better] = i
        best = nxt
        choice_rows.append(chosen)

    end = int(np.argmin(best))  # the first minimum: equal objectives prefer the smaller total b
    if not np.isfinite(best[end]):  # unreachable: AllocationProblem rejects infeasible budgets
        raise RuntimeError("no feasible allocation")
    ks = []
    b = end
    for layer in reversed(range(problem.num_layers)):
        i = int(choice_rows[layer][b])
        ks.append(problem.choices[layer][i])
        b -= weights[layer][i]
    return solution_for(problem, tuple(reversed(ks)))


def _descending(label: Any) -> tuple:
    """A sort key putting larger labels first (ints, or tuples of ints with None below every int)."""
    parts = label if isinstance(label, tuple) else (label,)
    return tuple((0, 0) if part is None else (-1, -part) for part in parts)
