"""Batched decode's routed experts through the native kernel (native/experts_few.c, runtime/experts.py's
``_native_few_experts``): what it computes, by hand and against the general form, and where it declines."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from test_few_token_native import linear_plan
from test_native import needs_build
from tiny_models import build_tiny_model

import allocplan
import allocplan.runtime.experts as experts_module
from allocplan.runtime.families import FAMILIES as REGISTRY
from allocplan.runtime.fast_paths import using_fast_paths
from allocplan.runtime.layers import find_moe_layers
from allocplan.runtime.native import standins_kernel

# Families whose tiny experts are float32 SwiGLU with [gate; up] weights and no bias: the kernel must serve them.
SERVED = {"deepseek_v2", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"}


def run_kernel(indices, weights, x, gate_up, down):
    """The kernel's output [T, H] and its return value, on contiguous tensors."""
    out = torch.full_like(x, float("nan"))  # overwritten, rows without pairs included
    ran = standins_kernel().experts_few(indices.shape[0], indices.shape[1], indices.data_ptr(), weights.data_ptr(),
                                        gate_up.shape[0], x.shape[1], down.shape[-1], x.data_ptr(),
                                        gate_up.data_ptr(), down.data_ptr(), out.data_ptr())
    return out, ran


@needs_build
def test_native_experts_by_hand():
    """Two experts, H = 2, I = 1. Gates of 20, 30 and 40 have silu(g) = g in float32 (1 + e^-20 rounds to 1).
    Expert 0: gate row [10, 0], up row [0, 1], down [1, 2]; expert 1: gate [0, 10], up [1, 1], down [3, -1].
    Token 0 [2, 3] takes expert 1 (weight 0.5) and expert 0 (0.25): expert 0 gives 20 * 3 = 60 -> [60, 120],
    expert 1 gives 30 * 5 = 150 -> [450, -150], so 0.25 [60, 120] + 0.5 [450, -150] = [240, -45]. Token 1 [1, 4]
    takes expert 1 (weight 2) and the sentinel 2: 40 * 5 = 200 -> [600, -200], doubled. Token 2 has only a
    dropped slot (index 2 + 1) and the sentinel: zeros. Three pairs ran."""
    gate_up = torch.tensor([[[10.0, 0.0], [0.0, 1.0]], [[0.0, 10.0], [1.0, 1.0]]])  # [E=2, 2I=2, H=2]
    down = torch.tensor([[[1.0], [2.0]], [[3.0], [-1.0]]])  # [E, H, I=1]
    x = torch.tensor([[2.0, 3.0], [1.0, 4.0], [5.0, 5.0]])  # [T=3, H]
    indices = torch.tensor([[1, 0], [1, 2], [3, 2]])  # [T, K=2]
    weights = torch.tensor([[0.5, 0.25], [2.0, 0.0], [0.75, 0.0]])
    out, ran = run_kernel(indices, weights, x, gate_up, down)
    assert ran == 3
    assert out.tolist() == [[240.0, -45.0], [1200.0, -400.0], [0.0, 0.0]]


@needs_build
@pytest.mark.parametrize("hidden,inter", [(64, 64), (37, 11), (8, 3), (5, 16)])
def test_native_experts_equal_the_general_form_on_random_experts(hidden, inter):
    """Random experts and routing with sentinels and dropped slots, widths on and off the 8-float vector: the
    kernel's output is the general form's (grouped matmuls, silu gate, combine) up to float rounding."""
    generator = torch.Generator().manual_seed(hidden * 100 + inter)
    experts, tokens, k = 6, 7, 3
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=generator) / hidden ** 0.5
    down = torch.randn(experts, hidden, inter, generator=generator) / inter ** 0.5
    x = torch.randn(tokens, hidden, generator=generator)
    indices = torch.randint(0, 2 * experts + 1, (tokens, k), generator=generator)  # >= experts: runs nothing
    weights = torch.rand(tokens, k, generator=generator)
    out, ran = run_kernel(indices, weights, x, gate_up, down)
    expected = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(k):
            e = int(indices[t, j])
            if e < experts:
                gate, up = (gate_up[e] @ x[t]).chunk(2)
                expected[t] += weights[t, j] * (down[e] @ (torch.nn.functional.silu(gate) * up))
    assert ran == int((indices < experts).sum())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _decode_logits(model, allocation, native: bool, calls: list[int], batch: int):
    """Logits of a batch x 20 prompt and 3 teacher-forced steps of ``batch`` tokens under ``allocation`` (fixed
    next tokens, so a rounding difference cannot change what the next step sees), and each forward's count of
    layers whose experts the native kernel ran."""
    prompts = torch.randint(1, 128, (batch, 20), generator=torch.Generator().manual_seed(3))
    steps = torch.randint(1, 128, (3, batch, 1), generator=torch.Generator().manual_seed(4))
    native_forward = experts_module._native_few_experts

    def counted(*args):
        result = native_forward(*args)
        calls[-1] += result is not None
        return result

    experts_module._native_few_experts = counted
    try:
        with using_fast_paths(native_few_token_experts=native), allocplan.apply_plan(model, allocation) as handle, \
                torch.inference_mode():
            calls.append(0)
            out = model(input_ids=prompts, use_cache=True)
            cache, logits = out.cache, [out.logits]
            for step in steps:
                calls.append(0)
                out = model(input_ids=step, cache=cache, use_cache=True)
                cache = out.cache
                logits.append(out.logits)
            counts = {p: (c.pairs, c.tokens) for p, c in handle.counters().items()}
    finally:
        experts_module._native_few_experts = native_forward
    return torch.cat(logits, dim=1), counts


@needs_build
@pytest.mark.parametrize("batch", [4, 1])
@pytest.mark.parametrize("family", [f for f in FAMILIES if REGISTRY[f].treatments_unsupported is None
                                    and REGISTRY[f].rewrite_unsupported is None])
def test_decode_experts_equal_the_general_form(family, batch):
    """Batch-4 and batch-1 decode under a treated plan with linear stand-ins, on every family: with the native
    experts the logits are the torch forms' (grouped, or one token's loop) up to float rounding and the counted
    pairs are the same. The kernel serves every decode step of every layer where the experts are float32 SwiGLU
    (every family in SERVED must be one), never a prompt of more than 16 tokens, and nothing elsewhere."""
    model = build_tiny_model(family)
    layers = find_moe_layers(model)
    allocation = linear_plan(model)
    served = experts_module._native_swiglu(layers[0].experts)
    assert served or family not in SERVED
    runs = {}
    for native in (False, True):
        calls: list[int] = []
        runs[native] = _decode_logits(model, allocation, native, calls, batch)
        assert calls == ([0, len(layers), len(layers), len(layers)] if native and served else [0, 0, 0, 0])
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-5)
    assert runs[True][1] == runs[False][1]


@needs_build
def test_native_experts_decline_what_they_do_not_compute():
    """Switched off, half-precision inputs or weights, a bias and autograd: declined, the general form runs."""
    model = build_tiny_model("mixtral")
    experts = find_moe_layers(model)[0].experts
    assert experts_module._native_swiglu(experts)
    x = torch.randn(4, model.config.hidden_size)
    index = torch.zeros(4, 2, dtype=torch.int64)
    weights = torch.ones(4, 2)
    with torch.no_grad():
        assert experts_module._native_few_experts(experts, x, index, weights) is not None
        with using_fast_paths(native_few_token_experts=False):
            assert experts_module._native_few_experts(experts, x, index, weights) is None
        assert experts_module._native_few_experts(experts, x.half(), index, weights) is None
    assert experts_module._native_few_experts(experts, x, index, weights) is None  # autograd on
    experts.has_bias = True
    assert not experts_module._native_swiglu(experts)
    experts.has_bias = False
    experts.to(torch.bfloat16)
    assert not experts_module._native_swiglu(experts)
