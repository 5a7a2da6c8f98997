"""Exact dynamic programme for the layer-level allocation (multiple-choice knapsack).

Formulation. Layers l = 0..L-1, candidates k in C_l with cost S[l, k], budget B:

    minimise    sum_l S[l, k_l]
    subject to  sum_l k_l <= B,   k_l in C_l.

Recurrence over layers and exact activation totals b:

    D[0][0] = 0,  D[0][b > 0] = +inf
    D[l+1][b] = min_{k in C_l, k <= b} D[l][b - k] + S[l, k]

and the answer is min_{b <= B} D[L][b], recovered by backtracking. Cost
O(L * B * max|C_l|) time, O(L * B) memory; B <= sum_l K_l keeps it small
(60 layers x k <= 16 is under a million steps).

Tie-breaking is deterministic: equal objectives prefer the smaller total b, and
within a layer the larger k (candidates are tried in decreasing k and only a
strictly smaller cost replaces the incumbent). Costs are summed left to right,
exactly as AllocationProblem.objective sums them, so the DP value and the
objective of the returned allocation are the same float.
"""

from __future__ import annotations

import numpy as np

from .problem import AllocationProblem, Solution, solution_for


def solve_dp(problem: AllocationProblem) -> Solution:
    """Optimal allocation by dynamic programming (see module docstring)."""
    budget = problem.budget
    best = np.full(budget + 1, np.inf)  # D[l][b] for the current l, float64
    best[0] = 0.0
    choice_rows: list[np.ndarray] = []  # choice_rows[l][b] = k chosen for layer l at total b
    for layer in range(problem.num_layers):
        options = sorted(zip(problem.choices[layer], problem.costs[layer]), key=lambda kc: -kc[0])
        nxt = np.full(budget + 1, np.inf)
        chosen = np.full(budget + 1, -1, dtype=np.int64)
        # One whole row per candidate, in decreasing k: the same float64 additions as a scalar loop over
        # b, and only a strictly smaller value replaces the incumbent, so ties keep the larger k.
        for k, cost in options:
            if k > budget:
                continue
            value = best[: budget + 1 - k] + cost  # D[l][b - k] + S[l, k] for b = k..B; inf stays inf
            better = value < nxt[k:]
            nxt[k:][better] = value[better]
            chosen[k:][better] = k
        best = nxt
        choice_rows.append(chosen)

    end = int(np.argmin(best))  # the first minimum: equal objectives prefer the smaller total b
    if not np.isfinite(best[end]):  # unreachable: AllocationProblem rejects infeasible budgets
        raise RuntimeError("no feasible allocation")
    ks: list[int] = []
    b = end
    for layer in reversed(range(problem.num_layers)):
        k = int(choice_rows[layer][b])
        ks.append(k)
        b -= k
    return solution_for(problem, tuple(reversed(ks)))
