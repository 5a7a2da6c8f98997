"""Solvers: DP against the ILP on random instances, a hand instance, infeasible budgets."""

import itertools
import random

import pytest

from allocplan.errors import AllocplanError
from allocplan.planner.crosscheck import objectives_agree, solve_and_check
from allocplan.planner.problem import AllocationProblem, solution_for
from allocplan.planner.solve_dp import solve_dp
from allocplan.planner.solve_ilp import solve_ilp


def random_problem(rng: random.Random) -> AllocationProblem:
    num_layers = rng.randint(1, 12)
    choices, costs = [], []
    for _ in range(num_layers):
        k_max = rng.randint(1, 8)
        k_min = rng.randint(1, k_max)
        ks = tuple(range(k_min, k_max + 1))
        # Sensitivities fall with k like real ones, plus noise that breaks monotonicity sometimes.
        scale = rng.uniform(0.01, 3.0)
        row = tuple(scale * (k_max - k) / k_max + rng.uniform(-0.05, 0.05) for k in ks)
        choices.append(ks)
        costs.append(row)
    lo = sum(min(ks) for ks in choices)
    hi = sum(max(ks) for ks in choices)
    return AllocationProblem(tuple(choices), tuple(costs), rng.randint(lo, hi))


def test_dp_matches_ilp_on_random_instances():
    rng = random.Random(20260408)
    for _ in range(250):
        problem = random_problem(rng)
        dp = solve_dp(problem)
        ilp = solve_ilp(problem)
        assert ilp.status == "OPTIMAL"
        assert dp.activations <= problem.budget and ilp.solution.activations <= problem.budget
        assert objectives_agree(dp.objective, ilp.solution.objective), (problem, dp, ilp)


# A random-init tiny model's profile (qwen3_moe, 8 of 8 experts, 4 layers): KLs of about 1e-7.
TINY_PROFILE = (
    (3.75586198e-07, 2.56235435e-07, 1.8246469e-07, 1.37107086e-07, 8.78464735e-08, 5.76983825e-08, 3.45555305e-08, 0.0),
    (3.75873611e-07, 2.69227624e-07, 2.10572071e-07, 1.63370452e-07, 1.10481686e-07, 8.07634337e-08, 2.99835564e-08, 0.0),
    (3.58847302e-07, 2.65955239e-07, 1.99824326e-07, 1.5041142e-07, 1.02046691e-07, 6.38914608e-08, 3.18476506e-08, 0.0),
    (3.30702482e-07, 2.39425918e-07, 1.85571085e-07, 1.33577996e-07, 8.88008543e-08, 6.59510927e-08, 3.29284287e-08, 0.0),
)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e3])
def test_ilp_agrees_on_sensitivities_of_any_magnitude(scale):
    # SCIP's tolerances are absolute (1e-7 and below): unscaled, costs of 1e-7 all looked alike to it
    # and it stopped "OPTIMAL" at k=(2, 8, 2, 2), 7.6e-7, where the optimum is 6.8e-7.
    for budget in range(4, 33):
        problem = AllocationProblem(choices=tuple(tuple(range(1, 9)) for _ in TINY_PROFILE),
                                    costs=tuple(tuple(c * scale for c in row) for row in TINY_PROFILE), budget=budget)
        dp, ilp = solve_dp(problem), solve_ilp(problem)
        assert objectives_agree(dp.objective, ilp.solution.objective), (budget, dp, ilp)
        best = min(problem.objective(ks) for ks in itertools.product(*problem.choices) if sum(ks) <= budget)
        assert dp.objective == pytest.approx(best, rel=1e-12, abs=0)


def test_dp_matches_brute_force_on_small_instances():
    rng = random.Random(7)
    for _ in range(150):
        problem = random_problem(rng)
        if problem.num_layers > 5:
            continue
        best = min(
            (problem.objective(ks) for ks in itertools.product(*problem.choices) if sum(ks) <= problem.budget),
        )
        assert solve_dp(problem).objective == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_hand_instance_known_optimum():
    # Three layers, k in 1..3, budget 6. Layer 0 is very sensitive, layer 2 barely.
    # Optimum by hand: layer 0 keeps 3 (cost 0), layer 1 gets 2 (0.3), layer 2 gets 1 (0.1)
    # = 0.4; every other total-6 split costs more (e.g. 3/1/2 = 0.9 + 0.05 = 0.95).
    problem = AllocationProblem(
        choices=((1, 2, 3), (1, 2, 3), (1, 2, 3)),
        costs=((5.0, 1.0, 0.0), (0.9, 0.3, 0.0), (0.1, 0.05, 0.0)),
        budget=6,
    )
    checked = solve_and_check(problem)
    assert checked.solution.ks == (3, 2, 1)
    assert checked.dp_objective == pytest.approx(0.4)
    assert checked.ilp_objective == pytest.approx(0.4)


def test_dp_prefers_fewer_activations_on_ties():
    problem = AllocationProblem(choices=((1, 2), (1, 2)), costs=((0.0, 0.0), (0.0, 0.0)), budget=4)
    assert solve_dp(problem).ks == (1, 1)


def test_infeasible_budget_states_smallest_feasible():
    with pytest.raises(AllocplanError, match="smallest feasible budget is 6"):
        AllocationProblem(choices=((2, 3), (2, 3), (2, 3)), costs=((1, 0), (1, 0), (1, 0)), budget=5)


def test_allocation_for_rejects_over_budget():
    problem = AllocationProblem(choices=((1, 2),), costs=((1.0, 0.0),), budget=1)
    with pytest.raises(ValueError, match="above the budget"):
        solution_for(problem, (2,))
