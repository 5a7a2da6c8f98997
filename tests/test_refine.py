"""Measured refinement: one-unit exchanges between layers, and the local search over them."""

from __future__ import annotations

import pytest
from tiny_models import build_tiny_model

import allocplan.planner.refine as refine
from allocplan import RoutingConfig, allocation_for
from allocplan.planner.losses import Reference
from allocplan.planner.refine import exchange_moves, refine_by_exchange


def test_exchange_moves_by_hand():
    # From (2, 1, 3) with k in [1, 4]: layer 1 cannot give (it would drop to 0).
    assert exchange_moves((2, 1, 3), (4, 4, 4)) == [(1, 2, 3), (1, 1, 4), (3, 1, 2), (2, 2, 2)]
    assert exchange_moves((4, 4), (4, 4)) == []  # nobody has room
    assert exchange_moves((1.5, 2), (4, 4), unit=0.5) == [(1, 2.5), (2, 1.5)]


def test_search_walks_to_the_optimum_of_a_known_objective(monkeypatch):
    # Objective sum (k - target)^2 with target (3, 2, 1) and total 6: from (2, 1, 3) the search must
    # take improving single moves until it reaches the target, then stop.
    target = (3, 2, 1)
    seen = []

    def fake(model, allocation, reference):
        seen.append(tuple(allocation))
        return float(sum((k - t) ** 2 for k, t in zip(allocation, target)))

    monkeypatch.setattr(refine, "measured_kl", fake)
    monkeypatch.setattr(refine, "find_moe_layers", lambda model: [type("L", (), {"top_k": 4})()] * 3)
    # The candidate "allocation" is its k themselves: the fake objective reads them.
    result = refine_by_exchange(None, (2, 1, 3), lambda ks: ks, None)
    assert result.start == ((2, 1, 3), 6.0)
    # (2,1,3) -> best move (3,1,2) [2.0] or (2,2,2) [2.0]: the tie goes to the smaller k, (2, 2, 2).
    assert [ks for ks, _ in result.steps] == [(2, 2, 2), (3, 2, 1)]
    assert result.best == ((3, 2, 1), 0.0)
    assert result.measured == len(seen)


def test_search_on_a_model_never_gets_worse(calib_file):
    from tiny_models import tiny_tokenizer

    from allocplan.planner.windows import pack_windows

    model = build_tiny_model("olmoe")
    windows, _ = pack_windows(tiny_tokenizer(), calib_file, max_tokens=256, seq_len=64)
    routing = RoutingConfig(token_level=True)

    def allocation_of(ks):
        return allocation_for(model, ks, routing)

    result = refine_by_exchange(model, (1, 2, 3, 2), allocation_of, Reference(model, windows), max_steps=2)
    values = [result.start[1]] + [value for _, value in result.steps]
    assert result.steps, "the search took no step, so 'never gets worse' was not tested"
    assert all(later < earlier for earlier, later in zip(values, values[1:]))
    assert all(sum(ks) == 8 for ks, _ in result.steps)
    # The measured objective is the real one: re-measuring the end point gives the same number.
    assert refine.measured_kl(model, allocation_of(result.best[0]), Reference(model, windows)) == pytest.approx(
        result.best[1], rel=1e-6)
    assert not hasattr(model, "_allocplan_handle")


def test_reference_kl_is_zero_for_the_untouched_model(calib_file):
    from tiny_models import tiny_tokenizer

    from allocplan.planner.windows import pack_windows

    model = build_tiny_model("mixtral")
    windows, _ = pack_windows(tiny_tokenizer(), calib_file, max_tokens=128, seq_len=64)
    assert Reference(model, windows).mean_kl(model) == 0.0
