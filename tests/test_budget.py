"""Budget resolution: half-up rounding, ranges, infeasibility messages."""

import pytest

from allocplan.errors import AllocplanError
from allocplan.formats.budget import BudgetRequest, round_half_up


def test_round_half_up():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 6.5, 2.4999)] == [1, 2, 3, 7, 2]
    assert round_half_up(0.1 * 15) == 2 and round_half_up(0.3 * 5) == 2


@pytest.mark.parametrize(
    "ratio, total", [(0.5, 78), (1 / 3, 52), (2 / 3, 104), (5 / 6, 130), (1.0, 156)]
)
def test_paper_budgets_for_deepseek_v2_lite(ratio, total):
    # 26 MoE layers x top-6 = 156; the paper's budgets are 52, 78, 104, 130.
    assert BudgetRequest(ratio=ratio).resolve(156, 26) == total


def test_absolute_budget():
    assert BudgetRequest(activations=60).resolve(156, 26) == 60


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=0.1), "smallest feasible budget of 26"),
        (dict(activations=10), "use --budget-activations 26"),
        (dict(activations=157), "at most --budget-activations 156"),
        (dict(ratio=1.5), "outside (0, 1]"),
        (dict(ratio=0.0), "outside (0, 1]"),
        (dict(ratio=float("nan")), "outside (0, 1]"),
        (dict(activations=0), "must be at least 1"),
        (dict(), "exactly one"),
        (dict(ratio=0.5, activations=3), "exactly one"),
    ],
)
def test_budget_errors(kwargs, message):
    with pytest.raises(AllocplanError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        BudgetRequest(**kwargs).resolve(156, 26)


def test_a_ratio_only_command_is_not_told_to_use_budget_activations():
    """eval --method and bench --config take --budget only: the infeasible-budget message then suggests the
    ratio alone (26 of 156 is 0.1667, rounded up to 0.167)."""
    with pytest.raises(AllocplanError) as told:
        BudgetRequest(ratio=0.1).resolve(156, 26)
    assert str(told.value).endswith("use --budget-activations 26 or --budget 0.167 or more")
    with pytest.raises(AllocplanError) as ratio_only:
        BudgetRequest(ratio=0.1).resolve(156, 26, count_option=False)
    assert str(ratio_only.value).endswith("(k_min in every MoE layer); use --budget 0.167 or more")


def test_eval_method_budget_message_names_only_its_own_option():
    from tiny_models import build_tiny_model

    from allocplan.evaluation.methods import build_policy

    with pytest.raises(AllocplanError, match=r"use --budget 0\.25 or more$"):
        build_policy(build_tiny_model("olmoe"), "uniform", 0.01)
