"""The same inputs give the same plan, profile and sidecar bytes under any thread count (planner/determinism.py).

Each compile runs in its own process under ``torch.set_num_threads(n)``. Without the planner's fixed thread
count (``ALLOCPLAN_PLANNER_THREADS=n``, the numerics then on n threads) this tiny deepseek_v2 gave another
plan under 4 threads than under 1 on the machine that wrote this test: its experts' float32 matmuls reduce in
an order that depends on the thread count.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CODE = """
import hashlib, sys, torch
torch.set_num_threads({threads})
sys.path.insert(0, {tests!r})
from tiny_models import build_tiny_model, tiny_tokenizer
import allocplan
from allocplan.bundled import DEFAULT_CALIBRATION

model = build_tiny_model("deepseek_v2")
plan = allocplan.compile_plan(model, 0.5, tokenizer=tiny_tokenizer(), profile_out={out!r},
                              profile=allocplan.ProfileConfig(calib=str(DEFAULT_CALIBRATION), calib_tokens=4096,
                                                              seq_len=128, strategy={strategy!r}))
assert torch.get_num_threads() == {threads}  # the process's own count is put back
print(hashlib.sha256(plan.to_yaml().encode()).hexdigest(), hashlib.sha256(plan.compensation_data).hexdigest())
"""


def compile_under(threads: int, tmp_path: Path, strategy: str = "isolated") -> tuple[str, bytes]:
    out = tmp_path / f"profile-{strategy}-{threads}.yaml"
    code = CODE.format(threads=threads, tests=str(TESTS), out=str(out), strategy=strategy)
    proc = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()[0] + proc.stdout.split()[1], out.read_bytes()


def test_plan_profile_and_sidecar_do_not_depend_on_the_thread_count(tmp_path):
    runs = {threads: compile_under(threads, tmp_path) for threads in (1, 2, 4)}
    assert runs[1][0] == runs[2][0] == runs[4][0]  # plan and sidecar
    assert runs[1][1] == runs[2][1] == runs[4][1]  # profile
    assert hashlib.sha256(runs[1][1]).hexdigest()  # (a real profile was written)


@pytest.mark.slow
def test_anchored_profiles_do_not_depend_on_the_thread_count(tmp_path):
    """The anchored strategy's carried probes and anchors run on the planner's fixed thread count too."""
    runs = {threads: compile_under(threads, tmp_path, "anchored") for threads in (1, 4)}
    assert runs[1] == runs[4]
    assert b"strategy: anchored" in runs[1][1]


def test_diff_judges_stand_ins_within_the_documented_tolerance():
    """Stand-ins that another machine's float32 kernels moved in their last digits are a record difference
    (exit 0, with its size); a change above STAND_IN_TOLERANCE of the tensor's largest value is behaviour."""
    import dataclasses

    import torch
    from safetensors.torch import load, save
    from tiny_models import build_tiny_model, tiny_tokenizer

    import allocplan
    from allocplan.bundled import DEFAULT_CALIBRATION
    from allocplan.formats.diff import STAND_IN_TOLERANCE
    from allocplan.formats.sidecar import record_for

    model = build_tiny_model("olmoe")
    plan = allocplan.compile_plan(model, 0.5, tokenizer=tiny_tokenizer(), profile=allocplan.ProfileConfig(
        calib=str(DEFAULT_CALIBRATION), calib_tokens=256, seq_len=64, compensation="linear"))
    tensors = load(plan.compensation_data)
    name = sorted(n for n in tensors if n.endswith(".down"))[0]

    def moved(by: float):
        changed = dict(tensors)
        changed[name] = tensors[name] + by * tensors[name].abs().max()
        data = save(changed)
        return dataclasses.replace(plan, compensation=record_for(data, plan.compensation.kind), compensation_data=data)

    near = allocplan.diff_plans(plan, moved(STAND_IN_TOLERANCE / 10))
    assert near.equivalent
    assert [(d.field, d.kind) for d in near.differences if d.field.startswith("compensation[")] == [
        (f"compensation[{name}]", "record")]
    far = allocplan.diff_plans(plan, moved(STAND_IN_TOLERANCE * 10))
    assert not far.equivalent and any(d.field == f"compensation[{name}]" and d.kind == "behaviour"
                                      for d in far.differences)
    assert torch.equal(load(plan.compensation_data)[name], tensors[name])


def test_the_planner_measures_through_the_general_stand_in_form(monkeypatch):
    """Profiling, fitting and refinement run every stand-in through the general form, never the native
    many-token form that prefill uses where it costs less (planner/determinism.py): a profile's bytes do not
    move with the runtime's speed forms. This tiny model's stand-ins are little enough work that, outside
    the planner, the many-token form would serve each forward of more than 16 tokens."""
    import torch
    from tiny_models import build_tiny_model, tiny_tokenizer

    import allocplan
    from allocplan.bundled import DEFAULT_CALIBRATION
    from allocplan.runtime import experts as experts_module
    from allocplan.runtime.fast_paths import fast_paths

    switches, original = [], experts_module.add_compensation

    def recording(result, module, hidden_states, *args):
        if getattr(module, experts_module.COMPENSATION_ATTR, None) is not None and hidden_states.shape[0] > 16:
            switches.append(fast_paths().many_token_stand_ins)
        return original(result, module, hidden_states, *args)

    monkeypatch.setattr(experts_module, "add_compensation", recording)
    model = build_tiny_model("olmoe")
    plan = allocplan.compile_plan(model, 0.5, tokenizer=tiny_tokenizer(), refine=allocplan.RefineConfig(refine=True),
                                  profile=allocplan.ProfileConfig(calib=str(DEFAULT_CALIBRATION), calib_tokens=512,
                                                                  seq_len=64))
    assert switches and not any(switches)  # stand-ins ran, all through the general form
    assert plan.solver.refinement is not None and plan.solver.refinement.measured > 0  # refinement measured too
    # Outside the planner the same layer's forward of 24 tokens takes the many-token form.
    switches.clear()
    with allocplan.apply_plan(model, plan):
        model(input_ids=torch.randint(1, 90, (2, 12), generator=torch.Generator().manual_seed(0)))
    assert switches and all(switches)
