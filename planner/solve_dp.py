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

import math

from .problem import AllocationProblem, Solution, solution_for


def solve_dp(problem: AllocationProblem) -> Solution:
    """Optimal allocation by dynamic programming (see module docstring)."""
    budget = problem.budget
    inf = math.inf
    best = [0.0] + [inf] * budget  # D[l][b] for the current l
    choice_rows: list[list[int]] = []  # choice_rows[l][b] = k chosen for layer l at total b
    for layer in range(problem.num_layers):
        options = sorted(zip(problem.choices[layer], problem.costs[layer]), key=lambda kc: -kc[0])
        nxt = [inf] * (budget + 1)
        chosen = [-1] * (budget + 1)
        for b in range(budget + 1):
            for k, cost in options:
                if k > b or best[b - k] == inf:
                    continue
                value = best[b - k] + cost
                if value < nxt[b]:
                    nxt[b] = value
                    chosen[b] = k
        best = nxt
        choice_rows.append(chosen)

    end = min(range(budget + 1), key=lambda b: (best[b], b))
    if best[end] == inf:  # unreachable: AllocationProblem rejects infeasible budgets
        raise RuntimeError("no feasible allocation")
    ks: list[int] = []
    b = end
    for layer in reversed(range(problem.num_layers)):
        k = choice_rows[layer][b]
        ks.append(k)
        b -= k
    return solution_for(problem, tuple(reversed(ks)))
