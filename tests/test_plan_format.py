"""Plan and profile format: round trip, canonical bytes, strict rejection, golden files."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from allocplan import RoutingConfig
from allocplan.errors import AllocplanError
from allocplan.formats.budget import BudgetRequest
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
        schema_version=3,
        kind="allocplan-profile",
        model=ModelIdentity("test/model", None, "olmoe", "sha256:0123456789abcdef", len(rows), 8),
        measurement=Measurement(
            metric="nll", strategy="isolated", k_min=1, k_step=1.0, token_level=False, weight_fit="off",
            compensation="off", reference_nll=3.25,
            calibration=CalibrationRecord("text", "calib.txt", None, "sha256:" + "0" * 64, 1024, 64, 16),
            device="cpu", dtype="float32",
        ),
        compensation=None,
        layers=layers,
        provenance=ProfileProvenance("0.1.0", "2.13.0+cpu", "5.24.0"),
    )


@pytest.fixture
def plan() -> Plan:
    return solve_profile(make_profile(), 0.5, RoutingConfig())  # Alloc-T on, as compile's default


def test_plan_round_trip_and_bytes(tmp_path, plan):
    path = tmp_path / "plan.yaml"
    save_plan(plan, path)
    loaded = load_plan(path)
    assert loaded == plan
    again = tmp_path / "again.yaml"
    save_plan(loaded, again)
    assert path.read_bytes() == again.read_bytes()


def test_solve_keeps_every_layer_within_k_max():
    # make_profile's rows, 8 activations. Uncapped, by hand: layer 0 keeps 4 (0.0), layer 1 takes 1
    # (0.05), layer 2 keeps 3 (1e-5) = 0.05001. With k_max 3 layer 0 cannot keep 4: (3, 2, 3) =
    # 0.1 + 0.02 + 1e-5 = 0.12001 beats (3, 1, 3) at 7 and (2, 3, 3) = 0.41001.
    budget = BudgetRequest(activations=8)
    assert [layer.planned_k for layer in solve_profile(make_profile(), budget).allocation.layers] == [4, 1, 3]
    capped = solve_profile(make_profile(), budget, RoutingConfig(k_max=3))
    assert [layer.planned_k for layer in capped.allocation.layers] == [3, 2, 3]
    assert capped.solver.dp_objective == pytest.approx(0.12001)
    with pytest.raises(AllocplanError, match="--k-max 2 lets the MoE layers run at most 6 activations per token,"
                                             " fewer than the budget's 8"):
        solve_profile(make_profile(), budget, RoutingConfig(k_max=2))
    # Every layer of make_profile routes top-4; a cap of 5 is named with the flag, not the plan field.
    with pytest.raises(AllocplanError, match="--k-max 5 is above the smallest original top-k of the model's MoE"
                                             " layers, 4; give at most 4"):
        solve_profile(make_profile(), budget, RoutingConfig(k_max=5))


def test_plan_is_deterministic(plan):
    assert solve_profile(make_profile(), 0.5, RoutingConfig()).to_yaml() == plan.to_yaml()


def test_solve_routes_as_the_profile_was_measured_unless_told():
    """A profile measured with plain top-k (make_profile's) gives a plain top-k plan by default, one measured
    with Alloc-T an Alloc-T plan; routing given explicitly wins."""
    plain = make_profile()
    assert plain.measurement.token_level is False
    assert solve_profile(plain, 0.5).allocation.token_level.enabled is False
    with_alloc_t = dataclasses.replace(plain, measurement=dataclasses.replace(plain.measurement, token_level=True))
    assert solve_profile(with_alloc_t, 0.5).allocation.token_level.enabled is True
    assert solve_profile(plain, 0.5, RoutingConfig(token_level=True)).allocation.token_level.enabled is True


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
        (lambda d: d["model"].update(commit="main"), "unknown key"),
        (lambda d: d["model"].update(revision="a\nb"), "model.revision: must be one non-empty line"),
        (lambda d: d["provenance"]["calibration"].update(source="web"), "calibration.source: 'web' is not one of"),
        (lambda d: d["provenance"]["calibration"].update(text_field="text"), "calibration.text_field: must name"),
        (lambda d: d["provenance"]["calibration"].update(source="jsonl"), "calibration.text_field: must name"),
        (lambda d: d["layers"][0].update(experts=[1, 2]), "unknown key"),
        (lambda d: d["model"].pop("fingerprint"), "missing key"),
        (lambda d: d.update(schema_version=4), "schema_version 4 is not supported"),
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
        (lambda d: d["solver"].update(objectives_agree=False), "objectives_agree: is false but the objectives"),
        (lambda d: d["solver"].update(ilp_status="FEASIBLE"), "ILP cross-check"),
        (lambda d: d["solver"].update(ilp_objective=1.0), "objectives_agree: is true but the objectives"),
        (lambda d: d["solver"].update(metric="banana"), "solver.metric: 'banana' is not one of"),
        (lambda d: d["model"].update(num_experts=-3), "num_experts: -3 is outside"),
        (lambda d: d["model"].update(num_experts=3), "original_k: 4 exceeds model.num_experts 3"),
        (lambda d: d["model"].update(fingerprint="abc"), "fingerprint: must be sha256: and 16 hex"),
        (lambda d: d["provenance"]["calibration"].update(tokens=1000), "tokens 1000 must equal windows 16 x seq_len 64"),
        (lambda d: d["provenance"].update(strategy="random"), "provenance.strategy: 'random' is not one of"),
        (lambda d: d["provenance"].update(profile_sha256="sha256:none"), "profile_sha256: must be sha256:"),
        (lambda d: d["token_level"].update(scope="global"), "scope: 'global' is not one of batch, sequence"),
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


def test_version_1_files_are_read_as_version_2():
    # Files written before per-layer treatments, compensation and refinement existed: every new
    # field takes the value that means "as version 1 did".
    data_dir = Path(__file__).resolve().parent / "data"
    plan = load_plan(data_dir / "plan-v1.yaml")
    assert plan.schema_version == 3 and plan.compensation is None and plan.solver.refinement is None
    assert (plan.token_level.scope, plan.token_level.prefer) == ("batch", "score")
    assert [(e.planned_k, e.normalizer_k, e.gain) for e in plan.layers] == [
        (3, None, 1.0), (2, None, 1.0), (1, None, 1.0), (2, None, 1.0), (2, None, 1.0), (2, None, 1.0)]
    assert plan.solver.dp_objective == 0.07736845477
    profile = load_profile(data_dir / "profile-v1.yaml")
    assert profile.schema_version == 3 and profile.compensation is None
    assert (profile.measurement.weight_fit, profile.measurement.compensation) == ("off", "off")
    assert all(row.normalizer_k is None and row.gain is None for row in profile.layers)
    # The upgraded profile still solves to the version-1 plan's allocation.
    assert solve_profile(profile, 0.5).allocation.planned_k_by_path() == plan.allocation.planned_k_by_path()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["layers"][0].update(gain=0.0), "gain: 0.0 is outside"),
        (lambda d: d["token_level"].update(prefer="shared"), "prefer: 'shared' is not one of score, active"),
        (lambda d: d["layers"][0].update(gain=11.0), "gain: 11.0 is outside"),
        (lambda d: d["layers"][0].update(normalizer_k=9), "normalizer_k: 9 must be between 1"),
        (lambda d: d.update(compensation={"file": "../x.safetensors", "sha256": "sha256:" + "0" * 64,
                                          "kind": "expert"}), "plain \\*.safetensors file name"),
        (lambda d: d.update(compensation={"file": "c.safetensors", "sha256": "sha256:00", "kind": "expert"}),
         "64 hex digits"),
        (lambda d: d.update(compensation={"file": "c.safetensors", "sha256": "sha256:" + "0" * 64,
                                          "kind": "magic"}), "kind 'magic' is not one of"),
        (lambda d: d["solver"].update(refinement={"metric": "kl", "unit": 1.0, "objective_before": 0.1,
                                                  "objective_after": 0.2, "steps": [], "measured": 1}),
         "objective_after: is 0.2 but the last measured objective is 0.1"),
        (lambda d: d["solver"].update(refinement={"metric": "kl", "unit": 1.0, "objective_before": 0.1,
                                                  "objective_after": 0.2, "steps": [
                                                      {"from_layer": 0, "to_layer": 1, "objective": 0.2}],
                                                  "measured": 9}), "every step must lower"),
        (lambda d: d["solver"].update(refinement={"metric": "kl", "unit": 1.0, "objective_before": 0.3,
                                                  "objective_after": 0.2, "steps": [
                                                      {"from_layer": 0, "to_layer": 7, "objective": 0.2}],
                                                  "measured": 9}), "between two different MoE layers"),
    ],
)
def test_plan_v2_fields_rejected(plan, edit, message):
    with pytest.raises(AllocplanError, match=message):
        plan_from_data(mutated(plan, edit))
