"""Solve an allocation with the DP and confirm it with the ILP (every compile does both)."""

from __future__ import annotations

from dataclasses import dataclass

from allocplan.errors import SolverDisagreement
from allocplan.formats.plan import objectives_agree
from .problem import AllocationProblem, Solution
from .solve_dp import solve_dp
from .solve_ilp import solve_ilp



@dataclass(frozen=True)
class CheckedSolution:
    """The DP's allocation plus the ILP's confirmation of its objective."""

    solution: Solution
    dp_objective: float
    ilp_objective: float
    ilp_status: str


def solve_and_check(problem: AllocationProblem) -> CheckedSolution:
    """DP allocation, cross-checked by the ILP.

    Raises:
        SolverDisagreement: the two objectives differ by more than 1e-9, relative and absolute.
        RuntimeError: the ILP did not reach OPTIMAL.
    """
    dp = solve_dp(problem)
    ilp = solve_ilp(problem)
    if not objectives_agree(dp.objective, ilp.solution.objective):
        raise SolverDisagreement(
            f"DP objective {dp.objective!r} (k={dp.ks}) and ILP objective"
            f" {ilp.solution.objective!r} (k={ilp.solution.ks}) disagree"
        )
    return CheckedSolution(
        solution=dp,
        dp_objective=dp.objective,
        ilp_objective=ilp.solution.objective,
        ilp_status=ilp.status,
    )
