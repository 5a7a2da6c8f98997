"""The layer-level allocation problem as plain data, shared by both solvers.

Instance: for every MoE layer l a set of candidate expert counts k (choices[l])
with a cost S[l, k] (costs[l], same order), and a budget B on the total.
Solution: one k per layer (a :class:`Solution`). Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from allocplan.errors import AllocplanError


@dataclass(frozen=True)
class AllocationProblem:
    """A multiple-choice knapsack instance.

    Attributes:
        choices: per layer, the candidate k values (distinct positive integers).
        costs: per layer, S[l, k] for each candidate, in the same order as ``choices``.
        budget: B, the largest allowed sum of the chosen k.
    """

    choices: tuple[tuple[int, ...], ...]
    costs: tuple[tuple[float, ...], ...]
    budget: int

    def __post_init__(self) -> None:
        if len(self.choices) != len(self.costs) or not self.choices:
            raise ValueError("choices and costs need one non-empty row per layer")
        for ks, cs in zip(self.choices, self.costs):
            if len(ks) != len(cs) or not ks or len(set(ks)) != len(ks) or min(ks) < 0:
                raise ValueError("each layer needs distinct non-negative k values, one cost each")
            if not all(math.isfinite(c) for c in cs):
                raise ValueError("costs must be finite")
        if self.min_activations > self.budget:
            raise AllocplanError(
                f"budget of {self.budget} activations is infeasible: the smallest feasible budget"
                f" is {self.min_activations} (the smallest k of every layer)"
            )

    @property
    def num_layers(self) -> int:
        return len(self.choices)

    @property
    def min_activations(self) -> int:
        """Smallest feasible total: every layer at its smallest candidate."""
        return sum(min(ks) for ks in self.choices)

    def objective(self, ks: tuple[int, ...]) -> float:
        """Sum of S[l, k_l], added left to right (both solvers are scored by this one function)."""
        total = 0.0
        for layer, k in enumerate(ks):
            total += self.costs[layer][self.choices[layer].index(k)]
        return total


@dataclass(frozen=True)
class Solution:
    """A solution: one k per layer, its objective and total activations."""

    ks: tuple[int, ...]
    objective: float
    activations: int


def solution_for(problem: AllocationProblem, ks: tuple[int, ...]) -> Solution:
    """Score ``ks`` on ``problem`` (checks that it is feasible)."""
    if len(ks) != problem.num_layers:
        raise ValueError("one k per layer expected")
    for layer, k in enumerate(ks):
        if k not in problem.choices[layer]:
            raise ValueError(f"k={k} is not a candidate of layer {layer}")
    if sum(ks) > problem.budget:
        raise ValueError(f"allocation uses {sum(ks)} activations, above the budget {problem.budget}")
    return Solution(ks=tuple(ks), objective=problem.objective(ks), activations=sum(ks))
