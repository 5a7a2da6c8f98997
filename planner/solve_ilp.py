"""Integer linear programme for the same allocation, solved with OR-Tools (SCIP).

Formulation. Binary x[l, o] = 1 iff layer l takes option o (k experts, or a pair
(k, stand-in rank r)) of integer weight w[l, o] (its charged work on the solver's grid):

    minimise    sum_{l, o in C_l} S[l, o] * x[l, o]
    subject to  sum_{o in C_l} x[l, o] = 1                 for every layer l
                sum_{l, o in C_l} w[l, o] * x[l, o] <= B
                x[l, o] in {0, 1}

SCIP is handed the costs shifted and scaled to [0, 1] (``normalized_costs``), which
changes no optimum. It exists to cross-check the dynamic programme on every compile: an
independent formulation and solver must reach the same optimum. A status other
than OPTIMAL raises. The returned objective is recomputed from the chosen k
with AllocationProblem.objective, so it is comparable float for float with
the DP's.
"""

from __future__ import annotations

from dataclasses import dataclass

from allocplan.errors import AllocplanError
from .problem import AllocationProblem, Solution, solution_for


@dataclass(frozen=True)
class IlpResult:
    """The ILP's allocation and its termination status name."""

    solution: Solution
    status: str


def normalized_costs(costs: tuple[tuple[float, ...], ...]) -> list[list[float]]:
    """The costs SCIP is given: each layer's less its smallest, over the largest of those.

    SCIP's tolerances are absolute (dual feasibility 1e-7), so the sensitivities of a nearly
    untrained model, about 1e-7, all looked alike to it, and it stopped "optimal" well above the
    optimum. Each layer takes exactly one choice, so subtracting a constant per layer and
    dividing every cost by one positive number change no optimum; the objective reported is
    recomputed from the original costs.
    """
    shifted = [[cost - min(row) for cost in row] for row in costs]
    span = max((cost for row in shifted for cost in row), default=0.0)
    return [[cost / span for cost in row] for row in shifted] if span > 0 else shifted


def solve_ilp(problem: AllocationProblem, *, time_limit_s: float = 60.0) -> IlpResult:
    """Optimal allocation by mixed-integer programming.

    Raises:
        AllocplanError: the solver stops with a status other than OPTIMAL (a one-line error:
            the profile's values are what it was given).
        RuntimeError: the solver is unavailable.
    """
    from ortools.linear_solver import pywraplp  # imported here: the DP path needs no OR-Tools

    solver = pywraplp.Solver.CreateSolver("SCIP")
    if solver is None:
        raise RuntimeError("OR-Tools was built without SCIP; cannot cross-check the allocation")
    solver.SetTimeLimit(int(time_limit_s * 1000))
    # Tight tolerances: the cross-check compares objectives to 1e-9 relative, so the
    # solver must not stop at its default 1e-4 relative gap.
    solver.SetSolverSpecificParametersAsString("limits/gap = 0\nlimits/absgap = 0\n")
    solver.SetNumThreads(1)

    x: list[list[object]] = []
    for layer, ks in enumerate(problem.choices):
        row = [solver.BoolVar(f"x_{layer}_{i}") for i in range(len(ks))]
        solver.Add(sum(row) == 1)
        x.append(row)
    solver.Add(
        sum(w * var for ws, row in zip(problem.weights, x) for w, var in zip(ws, row)) <= problem.budget
    )
    solver.Minimize(
        sum(cost * var for cs, row in zip(normalized_costs(problem.costs), x) for cost, var in zip(cs, row))
    )
    status = solver.Solve()
    names = {
        pywraplp.Solver.OPTIMAL: "OPTIMAL",
        pywraplp.Solver.FEASIBLE: "FEASIBLE",
        pywraplp.Solver.INFEASIBLE: "INFEASIBLE",
        pywraplp.Solver.UNBOUNDED: "UNBOUNDED",
        pywraplp.Solver.ABNORMAL: "ABNORMAL",
        pywraplp.Solver.NOT_SOLVED: "NOT_SOLVED",
    }
    status_name = names.get(status, f"status {status}")
    if status != pywraplp.Solver.OPTIMAL:
        raise AllocplanError(f"the ILP cross-check stopped with {status_name}, not OPTIMAL, on this profile;"
                             " check that its sensitivities are ordinary numbers, or re-profile")
    ks = tuple(
        next(k for k, var in zip(choices, row) if var.solution_value() > 0.5)
        for choices, row in zip(problem.choices, x)
    )
    return IlpResult(solution=solution_for(problem, ks), status=status_name)
