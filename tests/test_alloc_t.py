"""Rewritten routing on every family: Alloc-T counts, selection, compute, weights, generate."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES
from tiny_models import PairRecorder as Recorder
from tiny_models import build_tiny_model, greedy_step_logits, plan_for

import allocplan.runtime.experts as experts_module
from allocplan.runtime.apply import apply_plan
from allocplan.runtime.fast_paths import using_fast_paths
from allocplan.runtime.layers import find_moe_layers
from allocplan.runtime.routing_rules import DecodeLedger, pairs_for, reweight
from allocplan.runtime.scores import SELECTION_SCORES
from allocplan.runtime.families import get_family

torch.manual_seed(0)
BATCH = torch.randint(1, 128, (3, 11))  # [B, S]
PADDED_MASK = torch.ones(3, 11, dtype=torch.long)
PADDED_MASK[1, :4] = 0  # left padding, as generate uses
PADDED_MASK[2, :7] = 0


def forward(model, input_ids=BATCH, attention_mask=None):
    with torch.inference_mode():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_with_alloc_t_keeps_routing(family):
    model = build_tiny_model(family)
    native_recorder = Recorder(model)
    before = forward(model)
    native_recorder.remove()
    native = [native_recorder.seen[l.path][0].sort(-1).values for l in native_recorder.layers]
    with apply_plan(model, plan_for(model, [l.top_k for l in native_recorder.layers], token_level=True)):
        recorder = Recorder(model)  # after apply: dbrx's experts module is swapped
        after = forward(model)
        recorder.remove()
    planned = [recorder.seen[l.path][0].sort(-1).values for l in recorder.layers]
    for a, b in zip(native, planned):
        assert torch.equal(a, b)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(forward(model), before)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1.5, 2, 2.5])
def test_alloc_t_runs_exact_pair_counts(family, k):
    model = build_tiny_model(family)
    ks = [min(k, layer.top_k) for layer in find_moe_layers(model)]  # hunyuan has a layer with top-2
    with apply_plan(model, plan_for(model, ks, token_level=True, k_base=1)) as handle:
        recorder = Recorder(model)
        forward(model, attention_mask=PADDED_MASK)
        real_tokens = int(PADDED_MASK.sum())
        real = PADDED_MASK.reshape(-1).bool()
        for layer, layer_k in zip(recorder.layers, ks):
            index = recorder.seen[layer.path][-1]  # [T, k_max]
            per_token = (index < layer.experts.num_experts).sum(-1)  # [T]
            if layer_k == layer.top_k:
                # A full-k layer with nothing to change gets no hook (a full budget changes nothing,
                # bit for bit): it routes natively, padding included, and counts nothing.
                assert per_token.eq(layer.top_k).all() and layer.path not in handle.counters()
                continue
            assert int(per_token.sum()) == math.floor(layer_k * real_tokens + 0.5)
            assert per_token[~real].eq(0).all()  # padding gets nothing
            assert per_token[real].min() >= 1 and per_token[real].max() <= layer.top_k
            assert handle.counters()[layer.path].pairs == int(per_token.sum())
            assert handle.counters()[layer.path].tokens == real_tokens
            if layer_k != int(layer_k):
                assert len(set(per_token[real].tolist())) > 1  # really redistributed
    recorder.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_alloc_t_picks_top_scoring_pairs(family):
    """Brute force: k_base per token by the family's selection score, then the best of the rest."""
    model = build_tiny_model(family)
    k_base = 1
    raw: dict[str, tuple] = {}
    layers = find_moe_layers(model)
    ks = [min(2.5, layer.top_k) for layer in layers]
    spec = get_family(model.config.model_type)
    def keep_raw(router, _args, out, path):
        if spec.routing_in_block:  # dbrx: the router gives logits, the block takes the softmax top-k
            out = (out, None, torch.topk(torch.softmax(out.float(), -1), router_k[path], dim=-1).indices)
        elif family == "jetmoe":  # sparse grouping: its candidates are the top-k of its logits
            out = (out[4], None, out[4].topk(router_k[path], dim=1).indices)
        raw[path] = (router, *[t.clone() if t is not None else None for t in out[:3]])

    router_k = {layer.path: layer.top_k for layer in layers}
    capture = [
        layer.router.register_forward_hook(lambda router, a, out, path=layer.path: keep_raw(router, a, out, path))
        for layer in layers
    ]
    ids = BATCH[:1, :7]  # T = 7: small enough to enumerate
    with apply_plan(model, plan_for(model, ks, token_level=True, k_base=k_base)):
        recorder = Recorder(model)
        forward(model, ids)
    for hook in capture:
        hook.remove()
    recorder.remove()
    for layer, k in zip(layers, ks):
        router, logits, _, indices = raw[layer.path]
        scores = SELECTION_SCORES[spec.selection](router, logits).gather(-1, indices)  # [T, K]
        num_tokens = indices.shape[0]
        expected = set()
        ranked = []
        for t in range(num_tokens):
            order = sorted(range(indices.shape[1]), key=lambda j: -scores[t, j].item())
            expected |= {(t, int(indices[t, j])) for j in order[:k_base]}
            ranked += [(scores[t, j].item(), t, int(indices[t, j])) for j in order[k_base:]]
        extra = math.floor(k * num_tokens + 0.5) - k_base * num_tokens
        expected |= {(t, e) for _, t, e in sorted(ranked, reverse=True)[:extra]}
        got_index = recorder.seen[layer.path][-1]
        got = {(t, int(e)) for t in range(num_tokens) for e in got_index[t] if e < layer.experts.num_experts}
        assert got == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("looped", [False, True], ids=["grouped", "looped"])
def test_matmul_rows_equal_active_pairs(family, looped, monkeypatch):
    model = build_tiny_model(family)
    rows: list[int] = []
    grouped, single = experts_module.grouped_matmul, experts_module._project

    def counting_grouped(x, weight, offsets, transposed):
        rows.append(x.shape[0])
        return grouped(x, weight, offsets, transposed)

    def counting_single(x, weight, transposed):
        rows.append(x.shape[0])
        return single(x, weight, transposed)

    monkeypatch.setattr(experts_module, "grouped_matmul", counting_grouped)
    monkeypatch.setattr(experts_module, "_project", counting_single)
    # Both ways of multiplying the grouped rows must run exactly the active pairs.
    monkeypatch.setattr(experts_module.ActivePairs, "use_loop", lambda self: looped)
    with apply_plan(model, plan_for(model, 1.5, token_level=True)):
        recorder = Recorder(model)
        if family == "jetmoe":  # its own experts split rows by expert: count the rows they receive
            for layer in recorder.layers:
                for linear in (layer.block.input_linear, layer.block.output_linear):
                    recorder.hooks.append(linear.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0])))
        forward(model, attention_mask=PADDED_MASK)
    recorder.remove()
    active = [int((recorder.seen[l.path][-1] < l.experts.num_experts).sum()) for l in recorder.layers]
    # Per layer, every projection (gate_up, down; dbrx: gate, up, down) multiplies exactly the active pairs,
    # in one grouped call or split over the experts that have rows.
    per_layer = 3 if family == "dbrx" else 2
    assert sum(rows) == per_layer * sum(active)
    if not looped or family == "jetmoe":
        assert rows == [n for n in active for _ in range(per_layer)]
    else:
        assert len(rows) > per_layer * len(active)  # split by expert
    assert sum(active) < sum(l.top_k for l in recorder.layers) * int(PADDED_MASK.sum())


def test_reweight_modes_by_hand():
    # One token, 4 candidates sorted by score; router weights at k_max are p * c.
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    keep = torch.tensor([[True, True, False, False]])
    common = dict(scale=1.0, reference_k=4)
    assert torch.allclose(reweight(p, keep, mode="none", norm_order=1.0, **common), torch.tensor([[0.4, 0.3, 0, 0]]))
    assert torch.allclose(reweight(p, keep, mode="model", norm_order=None, **common), torch.tensor([[0.4, 0.3, 0, 0]]))
    # A renormalising family routed natively to the kept pair: 0.4/0.7, 0.3/0.7 (times the k_max mass, 1 here).
    assert torch.allclose(reweight(p, keep, mode="model", norm_order=1.0, **common),
                          torch.tensor([[0.4 / 0.7, 0.3 / 0.7, 0, 0]]))
    # dbrx-style L2 normalisation: kept weights keep the L2 norm all four had.
    l2 = p / p.norm()
    assert torch.allclose(reweight(l2, keep, mode="model", norm_order=2.0, **common),
                          torch.tensor([[0.4, 0.3, 0, 0]]) / 0.5)
    assert torch.allclose(reweight(p * 2.5, keep, mode="renorm", norm_order=None, scale=2.5, reference_k=4),
                          torch.tensor([[2.5 * 0.4 / 0.7, 2.5 * 0.3 / 0.7, 0, 0]]))
    assert torch.allclose(reweight(p, keep, mode="decoupled", norm_order=None, scale=1.0, reference_k=3),
                          torch.tensor([[0.4 / 0.9, 0.3 / 0.9, 0, 0]]))


@pytest.mark.parametrize("mode", ["model", "none", "renorm", "decoupled"])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe", "gemma4_text"])
def test_reweight_modes_in_a_layer(family, mode):
    """Uniform k=2: the experts get the family's candidate weights rescaled as the mode says."""
    model = build_tiny_model(family)
    layer = find_moe_layers(model)[0]
    spec = get_family(model.config.model_type)
    raw = {}
    capture = layer.router.register_forward_hook(lambda r, _a, out: raw.update(out=[t.clone() for t in out], router=r))
    got = {}
    probe = layer.experts.register_forward_pre_hook(lambda _m, args: got.update(index=args[1], weight=args[2]))
    with apply_plan(model, plan_for(model, 2, renormalize=mode, reference_k=3 if mode == "decoupled" else None)):
        forward(model, BATCH[:1, :5])
    capture.remove(), probe.remove()
    logits, weights, indices = raw["out"]
    scores = SELECTION_SCORES[spec.selection](raw["router"], logits).gather(-1, indices)
    order = scores.argsort(-1, descending=True)
    w = weights.gather(-1, order).double()  # [T, 4], family weights sorted by selection score
    expert_scale = torch.ones_like(w)
    if family == "gemma4_text":  # per-expert multipliers come after normalisation: compare without them
        expert_scale = raw["router"].per_expert_scale[indices.gather(-1, order)].double()
        w = w / expert_scale
    kept = w[:, :2]
    scale = float(getattr(raw["router"], "routed_scaling_factor", 1.0))
    # Mixtral and gemma4 always renormalise; the others follow their router's norm_topk_prob.
    renormalizes = family in ("mixtral", "gemma4_text") or bool(getattr(raw["router"], "norm_topk_prob", False))
    expected = {
        "none": kept,
        "model": kept * w.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True) if renormalizes else kept,
        "renorm": kept / kept.sum(-1, keepdim=True) * scale,
        "decoupled": kept / w[:, :3].sum(-1, keepdim=True) * scale,
    }[mode]
    expected = expected * expert_scale[:, :2]
    got_w = got["weight"].double()
    assert torch.equal(got["index"][:, 2:], torch.full_like(got["index"][:, 2:], layer.experts.num_experts))
    torch.testing.assert_close(got_w[:, :2], expected, rtol=1e-5, atol=1e-6)
    assert got_w[:, 2:].eq(0).all()


def test_one_token_sort_by_hand():
    """Batch-1 CPU sort in Python: descending by score, ties in slot order (as the stable torch.sort);
    an already sorted token is returned as it came, without a gather."""
    from allocplan.runtime.routing_rules import sort_candidates, sort_one_token

    scores = torch.tensor([[0.25, 0.5, 0.25, 0.75, -0.0, 0.0]])  # ties: slots 0 and 2; -0.0 and 0.0
    weights = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    indices = torch.tensor([[10, 11, 12, 13, 14, 15]])
    new_weights, new_indices = sort_one_token(scores, weights, indices)
    assert new_indices.tolist() == [[13, 11, 10, 12, 14, 15]]
    assert new_weights.tolist() == [[4.0, 2.0, 1.0, 3.0, 5.0, 6.0]]
    _, general_weights, general_indices = sort_candidates(scores, weights, indices)
    assert torch.equal(new_indices, general_indices) and torch.equal(new_weights, general_weights)
    in_order, first_weights, first_indices = torch.tensor([[0.75, 0.5, 0.5, 0.25]]), weights[:, :4], indices[:, :4]
    same_weights, same_indices = sort_one_token(in_order, first_weights, first_indices)
    assert same_weights is first_weights and same_indices is first_indices


def test_few_tokens_sort_and_keep_by_hand():
    """A few tokens' selection in Python: each token sorted by score with ties in slot order, first k_base
    kept by every real token, the rest of the pairs to the best remaining scores of real tokens, ties to the
    earlier token; the same mask as the general form's (torch) where no scores tie."""
    from allocplan.runtime.routing_rules import alloc_t_keep, alloc_t_keep_few, sort_candidates, sort_few_tokens

    scores = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.5, 0.2], [0.9, 0.8, 0.7]])  # token 1 ties slots 0 and 1
    weights = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    indices = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    values, new_weights, new_indices = sort_few_tokens(scores, weights, indices)
    assert values == [[0.6, 0.3, 0.1], [0.5, 0.5, 0.2], [0.9, 0.8, 0.7]] or torch.allclose(
        torch.tensor(values), torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.5, 0.2], [0.9, 0.8, 0.7]]))
    assert new_indices.tolist() == [[1, 2, 0], [3, 4, 5], [6, 7, 8]]
    assert new_weights.tolist() == [[2.0, 3.0, 1.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
    _, general_weights, general_indices = sort_candidates(scores, weights, indices)
    assert torch.equal(new_indices, general_indices) and torch.equal(new_weights, general_weights)
    # Token 2 is padding. 2 real tokens at k_base 1 keep slot 0; 2 more pairs go to the best of
    # token 0's 0.3, 0.1 and token 1's 0.5, 0.2: token 1's slot 1 (0.5), then token 0's slot 1 (0.3).
    keep, kept = alloc_t_keep_few(values, [True, True, False], 4, 1)
    assert keep == [[True, True, False], [True, True, False], [False, False, False]] and kept == 4
    # Equal remaining scores go to the earlier token: one extra pair, 0.5 against 0.5.
    assert alloc_t_keep_few([[0.9, 0.5], [0.9, 0.5]], [True, True], 3, 1) == ([[True, True], [True, False]], 3)
    # Not finite: left to the general form.
    assert sort_few_tokens(torch.tensor([[float("nan"), 0.1]]), weights[:1, :2], indices[:1, :2]) is None
    generator = torch.Generator().manual_seed(3)
    for _ in range(50):
        tokens, width, k_base = 8, 6, int(torch.randint(0, 3, (1,), generator=generator))
        real = torch.rand(tokens, generator=generator) > 0.2
        sorted_scores = torch.sort(torch.rand(tokens, width, generator=generator), descending=True).values
        n = int(real.sum())
        total = int(torch.randint(k_base * n, width * n + 1, (1,), generator=generator))
        few, kept = alloc_t_keep_few(sorted_scores.tolist(), real.tolist(), total, k_base)
        general = alloc_t_keep(sorted_scores, real, total, k_base)
        assert torch.equal(torch.tensor(few), general) and kept == int(general.sum()) == total


# Four distinct prompts: identical rows would tie in score, where torch's topk and the few-token form may
# break the tie differently (both run the same number of pairs).
FOUR_PROMPTS = torch.randint(1, 128, (4, 5), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family", FAMILIES)
def test_few_tokens_decode_equals_the_general_rewrite(family, monkeypatch):
    """Batch-4 decode with Alloc-T: the few-token selection in Python gives the general rewrite's logits bit
    for bit and the same counted pairs, and it ran at every step of every layer (the native kernel's form, which
    would otherwise take its place, is switched off; tests/test_few_token_native.py compares it with this one)."""
    import allocplan.runtime.routing_rules as rules

    model = build_tiny_model(family)
    layers = find_moe_layers(model)
    plan = plan_for(model, [max(1.5, layer.top_k / 2) if layer.top_k > 1 else 1 for layer in layers],
                    token_level=True)
    taken = []
    few = rules.alloc_t_keep_few
    monkeypatch.setattr(rules, "alloc_t_keep_few", lambda *args: taken.append(1) or few(*args))
    runs = {}
    for fast in (False, True):
        with using_fast_paths(few_tokens_keep=fast, native_few_tokens_keep=False), apply_plan(model, plan) as handle:
            logits = greedy_step_logits(model, FOUR_PROMPTS, 3)
            runs[fast] = (logits, {p: (c.pairs, c.tokens) for p, c in handle.counters().items()})
    assert torch.equal(runs[True][0], runs[False][0]) and runs[True][1] == runs[False][1]
    assert len(taken) == 3 * len(layers)  # 3 steps of 4 tokens, every layer; the 20-token prefill is not few


def test_decode_ledger_alternates():
    ledger = DecodeLedger()
    assert [pairs_for(2.5, 1, ledger) for _ in range(6)] == [3, 2, 3, 2, 3, 2]
    quarter = DecodeLedger()
    assert [pairs_for(1.25, 1, quarter) for _ in range(4)] == [1, 2, 1, 1]
    assert pairs_for(2.5, 3, ledger) == 8  # batches use round(k * T)


def greedy_cached(model, ids, steps):
    """Step-by-step greedy decoding through the KV cache (same T per forward as generate)."""
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache, tokens = out.cache, ids
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, nxt], dim=-1)
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            cache = out.cache
    return tokens


def greedy_no_cache(model, ids, steps):
    with torch.inference_mode():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=-1)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_plans(family):
    model = build_tiny_model(family)
    ids = BATCH[:1, :6]
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    # Per-token routing (no Alloc-T): generate equals a full recompute without cache.
    with apply_plan(model, plan_for(model, 2, renormalize="renorm")):
        with torch.inference_mode():
            generated = model.generate(ids, **kwargs)
        static = model.generate(ids, cache_implementation="static", **kwargs)
        assert torch.equal(generated, greedy_no_cache(model, ids, 6))
        assert torch.equal(static, generated)
    # Alloc-T: routing depends on the tokens of each forward, so compare with the same
    # forwards done by hand through the cache (ledgers reset in between).
    with apply_plan(model, plan_for(model, [min(2.5, l.top_k) for l in find_moe_layers(model)],
                                    token_level=True)) as handle:
        with torch.inference_mode():
            generated = model.generate(ids, **kwargs)
        handle.reset()
        assert torch.equal(generated, greedy_cached(model, ids, 6))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("drop", [0.0, 0.4])
@pytest.mark.parametrize("looped", [False, True], ids=["grouped", "looped"])
def test_fast_experts_path_equals_eager(family, drop, looped, monkeypatch):
    """allocplan's experts execution gives transformers' eager result, with and without dropped slots."""
    if family == "jetmoe":
        pytest.skip("jetmoe's own experts run the kept pairs; allocplan does not replace them")
    monkeypatch.setattr(experts_module.ActivePairs, "use_loop", lambda self: looped)
    model = build_tiny_model(family)
    layer = find_moe_layers(model)[0]
    generator = torch.Generator().manual_seed(5)
    num_experts, tokens, k = layer.experts.num_experts, 9, layer.top_k
    hidden = torch.randn(tokens, model.get_input_embeddings().embedding_dim, generator=generator)
    index = torch.stack([torch.randperm(num_experts, generator=generator)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=generator)
    dropped = torch.rand(tokens, k, generator=generator) < drop
    index, weights = index.masked_fill(dropped, num_experts), weights.masked_fill(dropped, 0.0)
    # Loops without a sentinel slot (dbrx, gpt-oss eager) get weight-0 real experts instead: same sum.
    real_index = index.clamp(max=num_experts - 1)
    if family == "dbrx":
        from allocplan.runtime.experts import RaggedDbrxExperts

        reference = layer.experts(hidden[None], real_index, weights)[0]
        fast = RaggedDbrxExperts(layer.experts)(hidden[None], index, weights)[0]
    else:
        from allocplan.runtime.experts import ragged_experts_forward

        model.set_experts_implementation("eager")
        reference = layer.experts(hidden, real_index if family == "gpt_oss" else index, weights)
        fast = ragged_experts_forward(layer.experts, hidden, index, weights)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("jetmoe", "dbrx")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_one_token_experts_equal_the_general_form(family, dtype, monkeypatch):
    """One token on CPU skips active_pairs and combine (experts._one_token_experts): the general
    form's result bit for bit (its loop over experts; in bfloat16 too, where combine sums in float32),
    and eager's within float tolerance, with and without dropped slots; a greedy decode under an
    Alloc-T plan gives the same logits both ways."""
    from allocplan.runtime.experts import ragged_experts_forward

    model = build_tiny_model(family).to(dtype)
    layer = find_moe_layers(model)[0]
    generator = torch.Generator().manual_seed(7)
    num_experts, k = layer.experts.num_experts, layer.top_k
    hidden = torch.randn(1, model.get_input_embeddings().embedding_dim, generator=generator).to(dtype)  # [1, H]
    index = torch.randperm(num_experts, generator=generator)[:k][None]  # [1, K], not in expert order
    weights = torch.rand(1, k, generator=generator)
    calls = {"general": 0}
    general_pairs = experts_module.active_pairs

    def counted(*args):
        calls["general"] += 1
        return general_pairs(*args)

    monkeypatch.setattr(experts_module, "active_pairs", counted)
    monkeypatch.setattr(experts_module.ActivePairs, "use_loop", lambda self: True)
    for dropped in (0, k // 2, k):  # none, some, every slot dropped
        slots = index.clone()
        slots[0, :dropped] = num_experts  # sentinel slots first; the kept ones still sum in expert order
        runs = {}
        for fast in (True, False):
            before = calls["general"]
            # decoding's mode; with autograd on, the general form runs. The native experts kernel (equal up to
            # float rounding, tests/test_native_experts.py) is off: this compares the torch forms bit for bit.
            with using_fast_paths(one_token_experts=fast, native_few_token_experts=False), torch.inference_mode():
                runs[fast] = ragged_experts_forward(layer.experts, hidden, slots, weights)
            assert calls["general"] - before == (0 if fast else 1)
        assert torch.equal(runs[True], runs[False])
        with torch.enable_grad():  # autograd on: the general form, even with the short one switched on
            before = calls["general"]
            ragged_experts_forward(layer.experts, hidden, slots, weights)
            assert calls["general"] == before + 1
        model.set_experts_implementation("eager")
        eager_slots = slots.clamp(max=num_experts - 1) if family == "gpt_oss" else slots
        eager_weights = weights.masked_fill(slots == num_experts, 0.0)
        with torch.inference_mode():
            reference = layer.experts(hidden, eager_slots, eager_weights)
        model.set_experts_implementation(None)
        tolerance = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(runs[True], reference, rtol=tolerance, atol=tolerance)
    plan = plan_for(model, [min(2.5, l.top_k) for l in find_moe_layers(model)], token_level=True)
    decoded = {}
    for fast in (True, False):
        with using_fast_paths(one_token_experts=fast, native_few_token_experts=False), apply_plan(model, plan):
            decoded[fast] = greedy_step_logits(model, BATCH[:1, :6], 5)
    assert torch.equal(decoded[True], decoded[False])


@pytest.mark.parametrize("family", FAMILIES)
def test_batch1_decode_shortcut_equals_rewrite(family):
    """Single-token forwards through the family's native top-n route like the general Alloc-T rewrite."""
    model = build_tiny_model(family)
    plan = plan_for(model, [min(2.5, l.top_k) for l in find_moe_layers(model)], token_level=True)
    ids = BATCH[:1, :6]
    runs = {}
    for native in (True, False):
        with using_fast_paths(native_top_n=native), apply_plan(model, plan) as handle:
            logits = greedy_step_logits(model, ids, 5)
            counts = {path: (c.pairs, c.tokens) for path, c in handle.counters().items()}
            taken = [r.native for r in handle._routings]
        runs[native] = (logits, counts)
        # The shortcut ran on the last (single-token) forward exactly when it was enabled.
        assert all(flag == native for flag in taken)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-5)
    assert runs[True][1] == runs[False][1]
