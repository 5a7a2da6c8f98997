"""The bundled default model: its golden profile and plan are what compiling it gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import allocplan
from allocplan.loading import bundled_model_names, load_model
from allocplan.planner.profile_format import load_profile

ROOT = Path(__file__).resolve().parent.parent


def test_bundled_model_is_packaged():
    assert "ref-olmoe" in bundled_model_names()


def test_compiling_bundled_model_reproduces_golden_files(tmp_path):
    golden_profile = load_profile(ROOT / "profiles" / "ref-olmoe.yaml")
    plan = allocplan.compile_plan("bundled:ref-olmoe", 0.5, profile_out=tmp_path / "profile.yaml")
    profile = load_profile(tmp_path / "profile.yaml")
    assert profile.model == golden_profile.model
    assert profile.measurement == golden_profile.measurement or (
        profile.measurement.reference_nll == pytest.approx(golden_profile.measurement.reference_nll, abs=1e-6)
    )
    for row, golden in zip(profile.layers, golden_profile.layers):
        assert row.sensitivity == pytest.approx(golden.sensitivity, abs=1e-6)
    golden_plan = allocplan.load_plan(ROOT / "plans" / "ref-olmoe-budget-0.5.yaml")
    assert [l.planned_k for l in plan.layers] == [l.planned_k for l in golden_plan.layers]


def test_bundled_plan_changes_routing_and_keeps_text_readable():
    model, tokenizer = load_model("bundled:ref-olmoe")
    ids = tokenizer("The if statement is used for conditional execution", return_tensors="pt").input_ids
    with torch.inference_mode():
        full = model(input_ids=ids, labels=ids).loss
        with allocplan.apply_plan(model, ROOT / "plans" / "ref-olmoe-budget-0.5.yaml"):
            half = model(input_ids=ids, labels=ids).loss
        restored = model(input_ids=ids, labels=ids).loss
    assert torch.equal(full, restored)
    assert half != full  # routing really changed
