"""The layer-level allocation problem as plain data, shared by both solvers.

Instance: for every MoE layer l a set of options (choices[l]) with a cost S[l, o]
(costs[l]) and a non-negative integer weight w[l, o] (weights[l], the work the option
spends), and a budget B on the total weight. An option is an expert count k (its
weight is k unless weights are given) or any hashable label, such as a pair (k, stand-in
rank r) whose weight is its charged work on an integer grid (planner/solve.py).
Solution: one option per layer (a :class:`Solution`). Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable

from allocplan.errors import AllocplanError


@dataclass(frozen=True)
class AllocationProblem:
    """A multiple-choice knapsack instance.

    Attributes:
        choices: per layer, the candidate options (distinct labels; non-negative integers k
            when ``weights`` is None).
        costs: per layer, S[l, o] for each candidate, in the same order as ``choices``.
        budget: B, the largest allowed sum of the chosen options' weights.
        weights: per layer, each candidate's integer weight, in the same order; None: each
            option's weight is the option itself (an expert count k).
    """

    choices: tuple[tuple[Hashable, ...], ...]
    costs: tuple[tuple[float, ...], ...]
    budget: int
    weights: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if len(self.choices) != len(self.costs) or not self.choices:
            raise ValueError("choices and costs need one non-empty row per layer")
        if self.weights is None:
            if not all(isinstance(k, int) and k >= 0 for ks in self.choices for k in ks):
                raise ValueError("options without weights must be non-negative integers k")
            object.__setattr__(self, "weights", tuple(tuple(ks) for ks in self.choices))
        if len(self.weights) != len(self.choices):
            raise ValueError("weights need one row per layer")
        for ks, cs, ws in zip(self.choices, self.costs, self.weights):
            if len(ks) != len(cs) or len(ks) != len(ws) or not ks or len(set(ks)) != len(ks):
                raise ValueError("each layer needs distinct options, one cost and one weight each")
            if not all(isinstance(w, int) and w >= 0 for w in ws):
                raise ValueError("weights must be non-negative integers")
            if not all(math.isfinite(c) for c in cs):
                raise ValueError("costs must be finite")
        if self.min_activations > self.budget:
            raise AllocplanError(
                f"budget of {self.budget} is infeasible: the smallest feasible budget"
                f" is {self.min_activations} (the cheapest option of every layer)"
            )

    @property
    def num_layers(self) -> int:
        return len(self.choices)

    @property
    def min_activations(self) -> int:
        """Smallest feasible total weight: every layer at its cheapest option."""
        return sum(min(ws) for ws in self.weights)

    def weight(self, layer: int, option: Hashable) -> int:
        """The weight of ``option`` in ``layer``."""
        return self.weights[layer][self.choices[layer].index(option)]

    def objective(self, ks: tuple[Hashable, ...]) -> float:
        """Sum of S[l, o_l], added left to right (both solvers are scored by this one function)."""
        total = 0.0
        for layer, k in enumerate(ks):
            total += self.costs[layer][self.choices[layer].index(k)]
        return total


@dataclass(frozen=True)
class Solution:
    """A solution: one option per layer, its objective and total weight."""

    ks: tuple[Hashable, ...]
    objective: float
    activations: int


def solution_for(problem: AllocationProblem, ks: tuple[Hashable, ...]) -> Solution:
    """Score ``ks`` on ``problem`` (checks that it is feasible)."""
    if len(ks) != problem.num_layers:
        raise ValueError("one option per layer expected")
    for layer, k in enumerate(ks):
        if k not in problem.choices[layer]:
            raise ValueError(f"option {k} is not a candidate of layer {layer}")
    total = sum(problem.weight(layer, k) for layer, k in enumerate(ks))
    if total > problem.budget:
        raise ValueError(f"allocation uses {total}, above the budget {problem.budget}")
    return Solution(ks=tuple(ks), objective=problem.objective(ks), activations=total)
