"""Batched decode's short forms: Alloc-T's selection and the routing rewrite through the native kernel, and the
pairs grouped by expert in Python. Each gives the Python or torch form's result bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from test_native import needs_build
from tiny_models import build_tiny_model, greedy_step_logits

import allocplan
import allocplan.runtime.routing_rules as rules
from allocplan import RoutingConfig
from allocplan.planner.treatments import encode_tables
from allocplan.runtime.allocation_builder import allocation_for
from allocplan.runtime.experts import StandIns, active_pairs, few_active_pairs
from allocplan.runtime.families import FAMILIES as REGISTRY
from allocplan.runtime.fast_paths import using_fast_paths
from allocplan.runtime.layers import find_moe_layers

FOUR_PROMPTS = torch.randint(1, 128, (4, 5), generator=torch.Generator().manual_seed(7))


@needs_build
def test_native_selection_by_hand():
    """The by-hand case of the Python form (test_alloc_t): token 1 ties its slots 0 and 1 (slot order kept), token
    2 is padding. Sorted: [0.6, 0.3, 0.1], [0.5, 0.5, 0.2], [0.9, 0.8, 0.7]; k_base 1 keeps slot 0 of tokens 0 and
    1; the 2 more pairs go to token 1's second 0.5, then token 0's 0.3."""
    scores = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.5, 0.2], [0.9, 0.8, 0.7]])
    weights = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    indices = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    real = torch.tensor([True, True, False])
    new_weights, new_indices, keep, kept = rules.alloc_t_keep_few_native(scores, weights, indices, real, 4, 1)
    assert new_indices.tolist() == [[1, 2, 0], [3, 4, 5], [6, 7, 8]]
    assert new_weights.tolist() == [[2.0, 3.0, 1.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
    assert keep.tolist() == [[True, True, False], [True, True, False], [False, False, False]] and kept == 4
    # Equal remaining scores go to the earlier token: one extra pair, 0.5 against 0.5.
    two = torch.tensor([[0.9, 0.5], [0.9, 0.5]])
    _, _, keep, kept = rules.alloc_t_keep_few_native(two, two, torch.zeros(2, 2, dtype=torch.int64),
                                                     torch.tensor([True, True]), 3, 1)
    assert keep.tolist() == [[True, True], [True, False]] and kept == 3
    # More pairs asked than real candidates: every real candidate, and the count says how many.
    _, _, keep, kept = rules.alloc_t_keep_few_native(scores, weights, indices, real, 9, 1)
    assert keep.tolist() == [[True] * 3, [True] * 3, [False] * 3] and kept == 6
    # Not finite: nothing decided, left to the general form.
    nan = torch.tensor([[float("nan"), 0.1]])
    assert rules.alloc_t_keep_few_native(nan, nan, indices[:1, :2], real[:1], 1, 1) is None
    # Not float32: declined.
    assert rules.alloc_t_keep_few_native(scores.double(), weights, indices, real, 4, 1) is None


@needs_build
def test_native_selection_equals_the_python_form_with_ties_and_padding():
    """Random scores on a coarse grid (many ties within and across tokens), padding, k_base 0 to 2 and every
    pair count from the base up to beyond the candidates: the Python form's sort and mask, every time."""
    generator = torch.Generator().manual_seed(11)
    for trial in range(300):
        tokens, width = int(torch.randint(2, 17, (1,), generator=generator)), int(torch.randint(1, 9, (1,),
                                                                                              generator=generator))
        k_base = int(torch.randint(0, min(width, 2) + 1, (1,), generator=generator))
        real = torch.rand(tokens, generator=generator) > 0.25
        scores = torch.randint(0, 5, (tokens, width), generator=generator).float() / 4  # [T, K]
        weights = torch.rand(tokens, width, generator=generator)
        indices = torch.randint(0, 64, (tokens, width), generator=generator)
        n = int(real.sum())
        total = int(torch.randint(k_base * n, width * n + 3, (1,), generator=generator))
        values, python_weights, python_indices = rules.sort_few_tokens(scores, weights, indices)
        python_keep, python_kept = rules.alloc_t_keep_few(values, real.tolist(), total, k_base)
        new_weights, new_indices, keep, kept = rules.alloc_t_keep_few_native(scores, weights, indices, real, total,
                                                                              k_base)
        assert torch.equal(new_weights, python_weights) and torch.equal(new_indices, python_indices), trial
        assert keep.tolist() == python_keep and kept == python_kept, trial


@needs_build
def test_native_rewrite_by_hand():
    """Two real tokens and one padding token, K = 3, gain 1.25, 10 experts. Kept slots: weight x 1.25, own expert.
    Dropped: compensated, expert + 10 with its weight (0 on padding); plain, the sentinel 10 with weight 0."""
    keep = torch.tensor([[True, False, False], [True, True, False], [False, False, False]])
    normalized = torch.tensor([[0.5, 0.25, 0.125], [0.75, 0.5, 0.25], [0.5, 0.25, 0.125]])
    indices = torch.tensor([[3, 1, 7], [0, 9, 2], [4, 5, 6]])
    real = torch.tensor([True, True, False])
    weights, experts = rules.rewrite_few_native(keep, normalized, indices, real, 1.25, True, 10)
    assert weights.tolist() == [[0.625, 0.25, 0.125], [0.9375, 0.625, 0.25], [0.0, 0.0, 0.0]]
    assert experts.tolist() == [[3, 11, 17], [0, 9, 12], [14, 15, 16]]
    weights, experts = rules.rewrite_few_native(keep, normalized, indices, real, 1.25, False, 10)
    assert weights.tolist() == [[0.625, 0.0, 0.0], [0.9375, 0.625, 0.0], [0.0, 0.0, 0.0]]
    assert experts.tolist() == [[3, 10, 10], [0, 9, 10], [10, 10, 10]]
    # The gain is multiplied in float32, as torch multiplies a float32 tensor by a Python float.
    odd = torch.rand(4, 3, generator=torch.Generator().manual_seed(2))
    everything = torch.ones(4, 3, dtype=torch.bool)
    weights, _ = rules.rewrite_few_native(everything, odd, indices[:1].expand(4, 3), torch.ones(4, dtype=torch.bool),
                                          1.0387447234, False, 10)
    assert torch.equal(weights, odd * 1.0387447234)


def test_few_active_pairs_by_hand_and_against_the_general_form():
    """Three tokens, K = 3, 4 experts: slots of index >= 4 (sentinel 4, dropped 4 + e) do not run. The pairs
    sorted by expert, each expert's in slot order: expert 0 token 2; expert 1 tokens 0, 1; expert 3 token 0."""
    index = torch.tensor([[1, 3, 4], [5, 1, 4], [0, 7, 4]])
    weights = torch.tensor([[0.5, 0.25, 0.0], [0.125, 0.75, 0.0], [1.0, 0.5, 0.0]])
    pairs = few_active_pairs(index, weights, 4)
    assert pairs.tokens.tolist() == [2, 0, 1, 0] and pairs.expert_ids.tolist() == [0, 1, 1, 3]
    assert pairs.weights.tolist() == [1.0, 0.5, 0.75, 0.25] and pairs.counts.tolist() == [1, 2, 0, 1]
    assert pairs.offsets.tolist() == [1, 3, 3, 4] and pairs.offsets.dtype == torch.int32
    assert pairs.active_experts == 3 and pairs.use_loop() == active_pairs(index, weights, 4).use_loop()
    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for _ in range(30):
            index = torch.randint(0, 20, (8, 6), generator=generator)  # 10 experts: half the slots do not run
            weights = torch.rand(8, 6, generator=generator).to(dtype)
            short, general = few_active_pairs(index, weights, 10), active_pairs(index, weights, 10)
            for name in ("tokens", "weights", "expert_ids", "offsets", "counts"):
                a, b = getattr(short, name), getattr(general, name)
                assert a.dtype == b.dtype and torch.equal(a, b), name
            assert short.active_experts == int((general.counts > 0).sum())


def linear_plan(model, seed: int = 2):
    """A treated plan at k 2.5 (Alloc-T across the batch) with random linear stand-ins on the half grid, a gain
    and, on even layers, a normaliser width: every step of the rewrite has work to do."""
    layers = find_moe_layers(model)
    generator = torch.Generator().manual_seed(seed)
    stand_ins = {}
    for layer in layers:
        experts, hidden = layer.experts.num_experts, model.config.hidden_size
        stand_ins[layer.path] = StandIns(torch.randn(experts, hidden, generator=generator) * 0.1,
                                         (torch.randn(experts, hidden, 2, generator=generator) * 0.1).half().float(),
                                         (torch.randn(experts, 2, hidden, generator=generator) * 0.1).half().float())
    treatments = [{"normalizer_k": layer.top_k if i % 2 == 0 else None, "gain": 1.25} for i, layer in enumerate(layers)]
    ks = [min(2.5, layer.top_k) for layer in layers]
    return allocation_for(model, ks, RoutingConfig(), treatments=treatments,
                          compensation=encode_tables(stand_ins, "linear"))


@needs_build
@pytest.mark.parametrize("family", [f for f in FAMILIES if REGISTRY[f].treatments_unsupported is None
                                    and REGISTRY[f].rewrite_unsupported is None])
def test_batched_decode_short_forms_equal_the_python_and_torch_forms(family, monkeypatch):
    """Batch-4 decode under a treated plan with stand-ins: the native selection and rewrite and the Python
    grouping of pairs give the logits of the Python selection, torch rewrite and torch grouping bit for bit, with
    the same counted pairs, and each short form ran at every step of every layer."""
    import allocplan.runtime.experts as experts_module

    model = build_tiny_model(family)
    layers = find_moe_layers(model)
    allocation = linear_plan(model)
    taken = {"select": 0, "rewrite": 0, "pairs": 0}

    def counted(module, name, key):
        function = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args: taken.__setitem__(key, taken[key] + 1) or function(*args))

    counted(rules, "alloc_t_keep_few_native", "select")
    counted(rules, "rewrite_few_native", "rewrite")
    counted(experts_module, "few_active_pairs", "pairs")
    runs = {}
    for short in (False, True):
        # The native experts (tested below, equal up to float rounding) off in both: this compares bit for bit.
        with using_fast_paths(native_few_tokens_keep=short, few_token_pairs=short, native_few_token_experts=False), \
                allocplan.apply_plan(model, allocation) as handle:
            logits = greedy_step_logits(model, FOUR_PROMPTS, 3)
            runs[short] = (logits, {p: (c.pairs, c.tokens) for p, c in handle.counters().items()})
    assert torch.equal(runs[True][0], runs[False][0]) and runs[True][1] == runs[False][1]
    # 3 steps of 4 tokens in every layer (the 20-token prefill is not few).
    assert taken == {"select": 3 * len(layers), "rewrite": 3 * len(layers), "pairs": 3 * len(layers)}


@needs_build
def test_padded_few_token_forwards_equal_the_python_and_torch_forms(monkeypatch):
    """The same with left padding (as generate pads a batch): a 3 x 4 prompt is 12 tokens, few enough for the
    short forms, 3 of them padding. Padding tokens get no experts and no stand-ins in either form, and the logits
    and counted pairs agree bit for bit over the prompt and 3 decode steps."""
    model = build_tiny_model("olmoe")
    allocation = linear_plan(model, seed=4)
    prompts = FOUR_PROMPTS[:3, :4]
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :1] = 0
    selected = []
    native = rules.alloc_t_keep_few_native
    monkeypatch.setattr(rules, "alloc_t_keep_few_native",
                        lambda scores, weights, indices, real, *rest: selected.append(real.tolist())
                        or native(scores, weights, indices, real, *rest))
    runs = {}
    for short in (False, True):
        with using_fast_paths(native_few_tokens_keep=short, few_token_pairs=short, native_few_token_experts=False), \
                allocplan.apply_plan(model, allocation) as handle, torch.inference_mode():
            out = model(input_ids=prompts, attention_mask=mask, use_cache=True)
            cache, logits, step_mask = out.cache, [out.logits], mask
            for _ in range(3):
                step_mask = torch.cat([step_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
                out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=step_mask, cache=cache,
                            use_cache=True)
                cache = out.cache
                logits.append(out.logits)
            runs[short] = (torch.cat(logits, dim=1), {p: (c.pairs, c.tokens) for p, c in handle.counters().items()})
    assert torch.equal(runs[True][0], runs[False][0]) and runs[True][1] == runs[False][1]
    layers = len(find_moe_layers(model))
    # The prompt's forward in every layer saw its 3 padding tokens; each decode step's 3 tokens are all real.
    padded = [True, True, True, True, False, False, True, True, False, True, True, True]
    assert selected == [padded] * layers + [[True] * 3] * (3 * layers)
