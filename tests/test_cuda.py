"""The runtime on a CUDA device (skipped without one; scripts/gpu_check.sh runs these on a GPU machine).

The same checks as on the CPU, where the device changes what could break: tensors created by
the routing hooks and the experts path must land on the model's device, the pair count must
stay exact, ``remove()`` must restore the model bit for bit, and the planned model must agree
with the same plan on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import PairRecorder, build_tiny_model, plan_for

import allocplan
from allocplan.runtime.layers import find_moe_layers

# ALLOCPLAN_TEST_DEVICE=cpu runs the same checks on the CPU (how they are kept working without a GPU).
DEVICE = os.environ.get("ALLOCPLAN_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

FAMILIES = ["olmoe", "deepseek_v3", "qwen3_moe", "mixtral", "qwen2_moe"]
IDS = torch.randint(1, 100, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_on_cuda_matches_cpu_and_removes_exactly(family):
    cpu = build_tiny_model(family)
    gpu = build_tiny_model(family).to(DEVICE)
    ks = [max(1, layer.top_k - 1) + 0.5 for layer in find_moe_layers(cpu)]
    with torch.inference_mode():
        before = gpu(input_ids=IDS.to(DEVICE)).logits
        with allocplan.apply_plan(cpu, plan_for(cpu, ks, token_level=True)):
            expected = cpu(input_ids=IDS).logits
        with allocplan.apply_plan(gpu, plan_for(gpu, ks, token_level=True)):
            got = gpu(input_ids=IDS.to(DEVICE)).logits
        after = gpu(input_ids=IDS.to(DEVICE)).logits
    assert torch.equal(before, after)
    assert torch.allclose(got.cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_alloc_t_pair_count_is_exact_on_cuda(family):
    model = build_tiny_model(family).to(DEVICE)
    layers = find_moe_layers(model)
    ks = [max(1, layer.top_k - 1) + 0.5 for layer in layers]
    handle = allocplan.apply_plan(model, plan_for(model, ks, token_level=True))
    recorder = PairRecorder(model)
    try:
        with torch.inference_mode():
            model(input_ids=IDS.to(DEVICE))
    finally:
        recorder.remove()
        handle.remove()
    tokens = IDS.numel()
    for layer, k in zip(layers, ks):
        index = recorder.seen[layer.path][0]
        ran = int((index < layer.experts.num_experts).sum())
        assert ran == int(k * tokens + 0.5), (layer.path, ran, k * tokens)


def test_compensated_plan_runs_on_cuda_in_bfloat16():
    model = build_tiny_model("olmoe")
    from tiny_models import tiny_tokenizer

    profile = allocplan.profile_model(model, tiny_tokenizer(), allocplan.ProfileConfig(calib_tokens=128, seq_len=64))
    plan = allocplan.solve_profile(profile, 0.5)
    assert plan.compensation is not None
    gpu = model.to(device=DEVICE, dtype=torch.bfloat16)
    with torch.inference_mode(), allocplan.apply_plan(gpu, plan):
        logits = gpu(input_ids=IDS.to(DEVICE)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
