"""The stand-in kind registry: a new kind is one module and one registration (allocplan/standins/)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model, tiny_tokenizer

import allocplan
from allocplan.errors import AllocplanError
from allocplan.standins import STAND_IN_KINDS, StandInKind, get_stand_in_kind, multiply_adds, register_stand_in_kind
from allocplan.standins import expert as expert_kind


def _half_mean(moments, rank):
    """The toy kind's fit: half of each expert's mean output."""
    return {"bias": expert_kind.fit(moments, rank)["bias"] / 2}


TOY = StandInKind("half-mean", "half of each routed expert's mean output (a test's toy)", per_expert=True,
                  low_rank=False, fit=_half_mean)


@pytest.fixture
def toy_kind():
    register_stand_in_kind(TOY)  # the one registration
    try:
        yield TOY
    finally:
        del STAND_IN_KINDS[TOY.name]


def test_the_built_in_kinds_and_their_costs():
    assert list(STAND_IN_KINDS) == ["expert", "layer", "linear"]
    assert allocplan.COMPENSATION_KINDS == ("expert", "layer", "linear")
    # Per dropped pair: the constant's H adds, plus 2 r H for a rank-r map (hidden 64, rank 4: 512 + 64).
    assert multiply_adds(64, 4) == 576
    assert multiply_adds(64, 0) == 64  # a constant stand-in: its add
    with pytest.raises(AllocplanError, match="compensation kind 'magic' is not one of expert, layer, linear"):
        get_stand_in_kind("magic")
    with pytest.raises(ValueError, match="registered already"):
        register_stand_in_kind(get_stand_in_kind("expert"))


def test_a_toy_kind_compiles_applies_and_reports(toy_kind, calib_file, tmp_path):
    """Registered, the toy is a --compensation choice, is fitted by profiling, runs under apply_plan, is
    named in the report, and its record validates; nothing else was edited to add it."""
    from allocplan.planner.treatments import compensation_tables

    model, tokenizer = build_tiny_model("olmoe"), tiny_tokenizer()
    profile = allocplan.ProfileConfig(calib=str(calib_file), calib_tokens=256, seq_len=64, compensation="half-mean",
                                      stand_in_choice=False)  # every layer that drops candidates runs the toy
    plan = allocplan.compile_plan(model, 0.5, profile=profile, tokenizer=tokenizer)
    assert plan.compensation.kind == "half-mean"
    allocplan.save_plan(plan, tmp_path / "plan.yaml")
    loaded = allocplan.load_plan(tmp_path / "plan.yaml")  # the record validates against the registry
    assert loaded.compensation == plan.compensation
    # Its stand-ins are half of the expert kind's, fitted on the same windows.
    windows = torch.randint(5, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    toy = compensation_tables(model, windows, "half-mean", batch_size=2, drop_order=False)
    mean = compensation_tables(model, windows, "expert", batch_size=2, drop_order=False)
    for path in toy:
        assert torch.equal(toy[path].bias * 2, mean[path].bias)
    ids = windows[:1]
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        with allocplan.apply_plan(model, loaded):
            planned = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.isfinite(planned).all() and not torch.equal(planned, before) and torch.equal(after, before)
    report = allocplan.write_report(loaded, tmp_path / "report", pictures=False)
    text = next(p for p in report if str(p).endswith(".md")).read_text(encoding="utf-8")
    assert "Compensation: `half-mean` stand-ins for dropped experts (half of each routed expert's mean output" in text


def test_a_kind_not_registered_is_refused_where_it_is_read(tmp_path):
    from allocplan.formats.sidecar import CompensationRecord

    with pytest.raises(AllocplanError, match="compensation.kind: compensation kind 'half-mean' is not one of"):
        CompensationRecord(file="compensation-0.safetensors", sha256="sha256:" + "0" * 64, kind="half-mean")
    with pytest.raises(AllocplanError, match="compensation \\(--compensation\\) is 'half-mean'; choose one of auto,"
                                             " expert, layer, linear, off"):
        allocplan.ProfileConfig(compensation="half-mean")
