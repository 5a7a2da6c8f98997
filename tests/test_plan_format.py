"""Plan and profile format: round trip, canonical bytes, strict rejection, golden files."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from allocplan import RoutingConfig
from allocplan.errors import AllocplanError
from allocplan.formats.plan import Plan, load_plan, plan_from_data, save_plan
from allocplan.formats.profile import (
    LayerSensitivity,
    Measurement,
    ProfileProvenance,
    SensitivityProfile,
    load_profile,
    profile_from_data,
    save_profile,
)
from allocplan.formats.provenance import CalibrationRecord, ModelIdentity
from allocplan.formats.records import to_data
from allocplan.planner.solve import solve_profile

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_PLANS = sorted((ROOT / "plans").glob("*.yaml"))
GOLDEN_PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))


def make_profile(rows=((0.9, 0.4, 0.1, 0.0), (0.05, 0.02, 0.01, 0.0), (2.0, 0.7, 1.0e-5, 0.0))):
    layers = tuple(
        LayerSensitivity(
            path=f"model.layers.{i}.mlp", index=i, original_k=len(row),
            sensitivity={k + 1: value for k, value in enumerate(row)},
        )
        for i, row in enumerate(rows)
    )
    return SensitivityProfile(
        schema_version=1,
        kind="allocplan-profile",
        model=ModelIdentity("test/model", "olmoe", "sha256:0123456789abcdef", len(rows), 8),
        measurement=Measurement(
            metric="nll", strategy="isolated", k_min=1, k_step=1.0, token_level=False, reference_nll=3.25,
            calibration=CalibrationRecord("calib.txt", "sha256:" + "0" * 64, 1024, 64, 16),
            device="cpu", dtype="float32",
        ),
        layers=layers,
        provenance=ProfileProvenance("0.1.0", "2.13.0+cpu", "5.24.0"),
    )


@pytest.fixture
def plan() -> Plan:
    return solve_profile(make_profile(), 0.5)


def test_plan_round_trip_and_bytes(tmp_path, plan):
    path = tmp_path / "plan.yaml"
    save_plan(plan, path)
    loaded = load_plan(path)
    assert loaded == plan
    again = tmp_path / "again.yaml"
    save_plan(loaded, again)
    assert path.read_bytes() == again.read_bytes()


def test_plan_is_deterministic(plan):
    assert solve_profile(make_profile(), 0.5).to_yaml() == plan.to_yaml()


def test_fractional_k_allowed_with_token_level(plan):
    data = to_data(plan)
    data["layers"][0]["planned_k"] = 1.5
    data["budget"]["planned_activations"] = plan.budget.planned_activations - 0.5
    assert plan_from_data(data).layers[0].planned_k == 1.5


def test_plan_content(plan):
    assert plan.budget.total_activations == 6  # round(0.5 * 12)
    assert plan.budget.planned_activations == sum(l.planned_k for l in plan.layers) <= 6
    assert [l.path for l in plan.layers] == ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp"]
    # Layer 1 is cheap to cut, layer 2 expensive below k=3: the optimum is (2, 1, 3) = 0.4 + 0.05 + 1e-5.
    assert [l.planned_k for l in plan.layers] == [2, 1, 3]
    assert plan.solver.dp_objective == pytest.approx(0.45001)
    assert plan.solver.ilp_status == "OPTIMAL" and plan.solver.objectives_agree


def test_profile_round_trip(tmp_path):
    profile = make_profile()
    path = tmp_path / "profile.yaml"
    save_profile(profile, path)
    assert load_profile(path) == profile
    assert "1.0e-05" in path.read_text()  # written so that YAML 1.1 reads it back as a float


def mutated(plan: Plan, edit) -> dict:
    data = copy.deepcopy(to_data(plan))
    edit(data)
    return data


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(extra=1), "unknown key"),
        (lambda d: d["model"].update(revision="main"), "unknown key"),
        (lambda d: d["layers"][0].update(experts=[1, 2]), "unknown key"),
        (lambda d: d["model"].pop("fingerprint"), "missing key"),
        (lambda d: d.update(schema_version=2), "schema_version 2 is not supported"),
        (lambda d: d.update(schema_version="1"), "schema_version '1' is not supported"),
        (lambda d: d.update(kind="allocplan-profile"), "is this an allocplan plan"),
        (lambda d: d["layers"][0].update(planned_k="2"), "expected a number"),
        (lambda d: d["layers"][0].update(index=1.0), "expected an integer"),
        (lambda d: d["layers"][0].update(index=True), "expected an integer"),
        (lambda d: d["token_level"].update(enabled="yes"), "expected true or false"),
        (lambda d: d["solver"].update(dp_objective="1e-3"), "write 1.0e-3"),
        (lambda d: d["budget"].update(ratio=float("nan")), "finite"),
        (lambda d: d["layers"].reverse(), "sorted by increasing index"),
        (lambda d: d["layers"][0].update(planned_k=5), "outside"),
        (lambda d: (d["layers"][0].update(planned_k=1.5), d["token_level"].update(enabled=False)), "fractional"),
        (lambda d: d["weights"].update(renormalize="softmax"), "is not one of model, none, renorm, decoupled"),
        (lambda d: d["weights"].update(reference_k=2), "only used with renormalize: decoupled"),
        (lambda d: d["weights"].update(renormalize="decoupled", reference_k=9), "between 1 and the smallest"),
        (lambda d: d["token_level"].update(k_max=1, k_base=2), "below k_base"),
        (lambda d: d["token_level"].update(k_max=2), "exceeds token_level.k_max"),
        (lambda d: d["token_level"].update(k_base=7), "smallest original_k"),
        (lambda d: d["budget"].update(total_activations=7), "rounds to 6"),
        (lambda d: d["budget"].update(planned_activations=99), "planned_k sum"),
        (lambda d: d["solver"].update(objectives_agree=False), "ILP cross-check"),
        (lambda d: d["layers"][0].update(path="model.layers.9.mlp"), "does not contain its layer index"),
    ],
)
def test_plan_strict_rejection(plan, edit, message):
    with pytest.raises(AllocplanError, match=message):
        plan_from_data(mutated(plan, edit))


def test_yaml_exponent_string_trap(tmp_path, plan):
    # A hand edit writing 1e-3 (no dot) is a string under YAML 1.1; the loader must say so.
    text = plan.to_yaml().replace(f"dp_objective: {plan.solver.dp_objective!r}", "dp_objective: 1e-3")
    assert "dp_objective: 1e-3" in text
    path = tmp_path / "edited.yaml"
    path.write_text(text)
    with pytest.raises(AllocplanError, match=r"string '1e-3'.*1\.0e-3"):
        load_plan(path)


def test_load_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: [1\n")
    for path, message in [(bad, "not valid YAML"), (tmp_path / "missing.yaml", "does not exist")]:
        with pytest.raises(AllocplanError, match=message) as info:
            load_plan(path)
        assert "\n" not in str(info.value)


def test_half_expert_grid_solves_to_fractional_plan():
    rows = ((0.9, 0.6, 0.4, 0.2, 0.1, 0.05, 0.0), (0.3, 0.04, 0.02, 0.015, 0.01, 0.005, 0.0))
    layers = tuple(
        LayerSensitivity(f"model.layers.{i}.mlp", i, 4, {k: v for k, v in zip([1, 1.5, 2, 2.5, 3, 3.5, 4], row)})
        for i, row in enumerate(rows)
    )
    base = make_profile()
    profile = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, num_moe_layers=2),
        measurement=dataclasses.replace(base.measurement, k_step=0.5, token_level=True),
        layers=layers,
    )
    plan = solve_profile(profile, 0.5)  # B = 4 over two layers of top-4
    assert [l.planned_k for l in plan.layers] == [2.5, 1.5]  # 0.2 + 0.04 beats 3 + 1 (0.1 + 0.3)
    assert plan.budget.planned_activations == 4 and plan.token_level.enabled
    with pytest.raises(AllocplanError, match="half-expert grid"):
        solve_profile(profile, 0.5, RoutingConfig(token_level=False))
    bad = to_data(profile)
    bad["measurement"]["token_level"] = False
    with pytest.raises(AllocplanError, match="needs token_level: true"):
        profile_from_data(bad)


def test_profile_strict_rejection():
    data = to_data(make_profile())
    data["layers"][0]["sensitivity"] = {1: 0.5, 3: 0.0}
    with pytest.raises(AllocplanError, match="keys must be exactly"):
        profile_from_data(data)
    data = to_data(make_profile())
    data["measurement"]["metric"] = "ppl"
    with pytest.raises(AllocplanError, match="metric"):
        profile_from_data(data)


def test_save_is_atomic_on_failure(tmp_path, plan, monkeypatch):
    path = tmp_path / "plan.yaml"
    path.write_text("old contents\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(OSError):
        save_plan(plan, path)
    assert path.read_text() == "old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]


def test_golden_files_exist():
    assert GOLDEN_PLANS and GOLDEN_PROFILES


@pytest.mark.parametrize("path", GOLDEN_PLANS, ids=lambda p: p.name)
def test_golden_plans_load_and_are_canonical(path):
    plan = load_plan(path)
    assert plan.to_yaml() == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", GOLDEN_PROFILES, ids=lambda p: p.name)
def test_golden_profiles_solve_to_golden_plans(path):
    # Every golden plan named after a profile (<profile>-<budget>.yaml) is exactly what
    # solving that profile at that budget gives today: byte for byte.
    profile = load_profile(path)
    assert profile.to_yaml() == path.read_text(encoding="utf-8")
    matching = [p for p in GOLDEN_PLANS if p.name.startswith(path.stem + "-budget-")]
    assert matching, f"no golden plan for {path.name}"
    for plan_path in matching:
        ratio = float(plan_path.stem.rsplit("-budget-", 1)[1])
        plan = solve_profile(profile, ratio)
        assert plan.to_yaml() == plan_path.read_text(encoding="utf-8"), plan_path.name


def test_plan_is_its_allocation_plus_budget_solver_and_provenance(plan):
    allocation = plan.allocation
    assert [(e.path, e.planned_k) for e in allocation.layers] == [
        ("model.layers.0.mlp", 2), ("model.layers.1.mlp", 1), ("model.layers.2.mlp", 3)]
    assert allocation.planned_activations == 6 and allocation.original_activations == 12
    assert Plan.build(allocation, plan.budget, plan.solver, plan.provenance) == plan
    # A plan's own invariants still hold when it is rebuilt from parts: budget 5 < 6 planned.
    with pytest.raises(AllocplanError, match="exceed total_activations 5"):
        Plan.build(allocation, dataclasses.replace(plan.budget, ratio=None, total_activations=5),
                   plan.solver, plan.provenance)


def test_yaml_is_safe_loaded(tmp_path, plan):
    # A python/object tag must not construct anything: safe_load refuses it.
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(AllocplanError, match="not valid YAML"):
        load_plan(path)
    assert yaml.safe_load(plan.to_yaml())["kind"] == "allocplan-plan"
