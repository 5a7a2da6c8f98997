"""The bundled default model: its golden profile and plan are what compiling it gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import allocplan
from allocplan.bundled import bundled_model_names
from allocplan.formats.profile import load_profile
from allocplan.loading import load_model

ROOT = Path(__file__).resolve().parent.parent


def test_bundled_model_is_packaged():
    assert "ref-olmoe" in bundled_model_names()


@pytest.mark.slow  # a full default compile of the bundled model (the quick start runs one too)
def test_compiling_bundled_model_reproduces_golden_files(tmp_path):
    """Compiling the bundled model gives the committed profile and the committed allocation.

    Measured floats agree to 1e-6 (sensitivities, gains) and 1e-4 relative (the stand-ins):
    their 8th significant digit differs between CPUs, and with it the sidecar's hash. Everything
    else is equal: the profile's structure, the fitted normaliser widths, the compiled plan's
    per-layer k and refinement steps. The committed profile solves to the committed plans byte
    for byte (test_plan_format.test_golden_profiles_solve_to_golden_plans).
    """
    from safetensors.torch import load

    plan = allocplan.compile_plan("bundled:ref-olmoe", 0.5, profile_out=tmp_path / "profile.yaml")
    profile = load_profile(tmp_path / "profile.yaml")
    golden = load_profile(ROOT / "profiles" / "ref-olmoe.yaml")
    assert profile.model == golden.model and profile.provenance == golden.provenance
    assert dataclasses.replace(profile.measurement, reference_nll=0.0) == dataclasses.replace(
        golden.measurement, reference_nll=0.0)
    assert profile.measurement.reference_nll == pytest.approx(golden.measurement.reference_nll, abs=1e-6)
    for row, golden_row in zip(profile.layers, golden.layers, strict=True):
        assert (row.path, row.index, row.original_k) == (golden_row.path, golden_row.index, golden_row.original_k)
        assert list(row.sensitivity) == list(golden_row.sensitivity)
        assert row.sensitivity == pytest.approx(golden_row.sensitivity, abs=1e-6)
        assert row.normalizer_k == golden_row.normalizer_k
        assert row.gain == pytest.approx(golden_row.gain, abs=1e-6)
    ours, theirs = load(profile.compensation_data), load(golden.compensation_data)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)
    compiled = allocplan.load_plan(ROOT / "plans" / "ref-olmoe-compiled-budget-0.5.yaml")
    assert [e.planned_k for e in plan.layers] == [e.planned_k for e in compiled.layers]
    assert refinement_steps(plan) == refinement_steps(compiled)


@pytest.mark.slow  # a full default compile of each reference (2 to 4 minutes each)
@pytest.mark.parametrize("name", ["ref-dsv2", "ref-qwen3", "ref-deep"])
def test_compiling_each_reference_reproduces_its_committed_plan(name):
    """plans/<reference>-compiled-budget-0.5.yaml (timed by docs/benchmarks.md) is what its documented command
    gives: the same per-layer k and stand-in ranks, and the same charge to 1e-6 (the stand-ins' values may
    differ between CPUs in their 8th digit, so their hash is not compared)."""
    plan = allocplan.compile_plan(f"bundled:{name}", 0.5)
    committed = allocplan.load_plan(ROOT / "plans" / f"{name}-compiled-budget-0.5.yaml")
    assert [(e.planned_k, e.stand_in_rank) for e in plan.layers] == [
        (e.planned_k, e.stand_in_rank) for e in committed.layers]
    assert plan.budget.charged_work == pytest.approx(committed.budget.charged_work, abs=1e-6)
    assert plan.budget.sidecar_bytes == committed.budget.sidecar_bytes


def refinement_steps(plan) -> list[tuple[int, int]] | None:
    """The exchanges the refinement took, or None where the compile did not refine (the default)."""
    refinement = plan.solver.refinement
    return None if refinement is None else [(s.from_layer, s.to_layer) for s in refinement.steps]


def test_bundled_plan_changes_routing_and_keeps_text_readable():
    """The golden plan changes routing (another loss), removes exactly, and keeps text readable: its NLL on a
    sentence of the text's kind stays within 0.3 nats of the full model's (uniform half k costs 0.1 to 0.2 on
    eval text), and its greedy continuation is words of the bundled text, not fragments."""
    import re

    from allocplan.bundled import DEFAULT_CALIBRATION

    model, tokenizer = load_model("bundled:ref-olmoe")
    ids = tokenizer("The if statement is used for conditional execution", return_tensors="pt").input_ids
    with torch.inference_mode():
        full = model(input_ids=ids, labels=ids).loss
        with allocplan.apply_plan(model, ROOT / "plans" / "ref-olmoe-compiled-budget-0.5.yaml"):
            half = model(input_ids=ids, labels=ids).loss
            continuation = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
        restored = model(input_ids=ids, labels=ids).loss
    assert torch.equal(full, restored)
    assert half != full  # routing really changed
    assert float(half - full) < 0.3
    vocabulary = set(re.findall(r"[A-Za-z]+", DEFAULT_CALIBRATION.read_text(encoding="utf-8")))
    words = re.findall(r"[A-Za-z]+", tokenizer.decode(continuation))
    assert len(words) >= 8 and sum(word in vocabulary for word in words) >= 0.9 * len(words), words
