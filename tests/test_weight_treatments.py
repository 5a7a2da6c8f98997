"""The weight-treatment registry: a new treatment is one module and one registration
(allocplan/weight_treatments/), fitted by profiling, carried by plans, run by apply_plan, validated and reported."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model, tiny_tokenizer

import allocplan
from allocplan.errors import AllocplanError
from allocplan.weight_treatments import WEIGHT_TREATMENTS, WeightTreatment, get_weight_treatment, register_weight_treatment


def _accumulate(stats, value, a, b, y):
    stats["seen"] = stats.get("seen", 0) + a.shape[0]  # tokens seen: the fit ran on every batch


def _check(value, width):
    return None if 0.0 < value <= 1.0 else f"{value!r} is outside (0, 1]"


def _configure(routing, value):
    routing.gain *= value  # after gain's own step: registration order


# The toy: every treated layer's kept weights damped by a half (a test's toy, not a useful treatment).
DAMP = WeightTreatment("damp", "damp", 1.0, float, applies=lambda renormalises, k, width: not renormalises,
                       options=lambda k, width: [1.0], accumulate=_accumulate,
                       choose=lambda stats, values: 0.5 if stats["seen"] > 0 else 1.0, check=_check,
                       configure=_configure, header="damp", cell=lambda value: f"{value:g}")


@pytest.fixture
def damp():
    register_weight_treatment(DAMP)  # the one registration
    try:
        yield DAMP
    finally:
        del WEIGHT_TREATMENTS[DAMP.name]


def test_the_built_in_treatments():
    assert [(t.name, t.field, t.neutral) for t in WEIGHT_TREATMENTS.values()] == [
        ("normalizer_width", "normalizer_k", None), ("gain", "gain", 1.0)]
    with pytest.raises(AllocplanError, match="weight treatment 'bias' is not one of normalizer_width, gain"):
        get_weight_treatment("bias")
    with pytest.raises(ValueError, match="registered already"):
        register_weight_treatment(get_weight_treatment("gain"))
    # Treatments are stored in one form: neutral values left out, the rest in registration order.
    from allocplan.formats.allocation import LayerAllocation

    entry = LayerAllocation("model.layers.0.mlp", 0, 4, 2, (("gain", 1.2), ("normalizer_k", None)))
    assert entry.treatments == (("gain", 1.2),) and entry.gain == 1.2 and entry.normalizer_k is None
    assert entry == LayerAllocation("model.layers.0.mlp", 0, 4, 2).with_treatments(gain=1.2) and entry.treated
    with pytest.raises(AllocplanError, match="unknown weight treatment field"):
        LayerAllocation("model.layers.0.mlp", 0, 4, 2, (("bias", 0.1),))


def test_a_toy_treatment_compiles_applies_validates_and_reports(damp, calib_file, tmp_path):
    model, tokenizer = build_tiny_model("olmoe"), tiny_tokenizer()  # olmoe does not renormalise
    profile = allocplan.ProfileConfig(calib=str(calib_file), calib_tokens=256, seq_len=64, compensation="off")
    plan = allocplan.compile_plan(model, 0.5, profile=profile, tokenizer=tokenizer,
                                  routing=allocplan.RoutingConfig(token_level=False),
                                  profile_out=tmp_path / "profile.yaml")
    assert [e.treatment("damp") for e in plan.layers] == [0.5 if e.planned_k < e.original_k else 1.0
                                                         for e in plan.layers]
    allocplan.save_plan(plan, tmp_path / "plan.yaml")
    text = (tmp_path / "plan.yaml").read_text(encoding="utf-8")
    assert "  gain: " in text and "  damp: 0.5\n" in text  # written flat, after the built-in fields
    stored = allocplan.load_profile(tmp_path / "profile.yaml")
    assert all(row.damp is not None and set(row.damp.values()) <= {0.5, 1.0} for row in stored.layers)
    loaded = allocplan.load_plan(tmp_path / "plan.yaml")
    assert loaded.layers == plan.layers
    # The runtime step: the same plan with each damped layer's gain halved instead gives the same logits.
    halved = plan.allocation
    halved = type(halved)(**{**{f: getattr(halved, f) for f in ("model", "token_level", "weights", "compensation",
                                                                 "compensation_data")},
                             "layers": tuple(e.with_treatments(damp=1.0, gain=e.gain * e.damp) for e in halved.layers)})
    ids = torch.randint(5, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with allocplan.apply_plan(model, loaded):
            damped = model(input_ids=ids).logits
        with allocplan.apply_plan(model, halved):
            reference = model(input_ids=ids).logits
        plain_plan = type(halved)(**{**{f: getattr(halved, f) for f in ("model", "token_level", "weights",
                                                                        "compensation", "compensation_data")},
                                     "layers": tuple(e.with_treatments(damp=1.0) for e in loaded.layers)})
        with allocplan.apply_plan(model, plain_plan):
            undamped = model(input_ids=ids).logits
    assert torch.equal(damped, reference) and not torch.equal(damped, undamped)
    # Its validation: a value its check refuses is one line naming the field.
    (tmp_path / "bad.yaml").write_text(text.replace("  damp: 0.5\n", "  damp: 2.0\n", 1), encoding="utf-8")
    with pytest.raises(AllocplanError, match=r"layers\[\d\]\.damp: 2\.0 is outside \(0, 1\]"):
        allocplan.load_plan(tmp_path / "bad.yaml")
    # Its report column.
    paths = allocplan.write_report(loaded, tmp_path / "report", pictures=False)
    report = next(p for p in paths if str(p).endswith(".md")).read_text(encoding="utf-8")
    assert "| normaliser width | gain | damp |" in report and "| 0.5 |" in report


def test_plans_written_before_a_treatment_existed_still_load(damp):
    # A plan without the toy's field keeps the neutral value there.
    from pathlib import Path

    golden = Path(__file__).resolve().parent.parent / "plans" / "ref-olmoe-compiled-budget-0.5.yaml"
    if not golden.is_file():
        pytest.skip("plans/ is not beside the tests")
    plan = allocplan.load_plan(golden)
    assert all(e.damp == 1.0 for e in plan.layers)
