"""Weight treatments, compensation stand-ins, the sidecar and the decode modes: hand and brute-force checks."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import FAMILIES
from tiny_models import build_tiny_model, greedy_step_logits, plan_for, tiny_tokenizer

import allocplan
from allocplan import RoutingConfig
from allocplan.errors import AllocplanError
from allocplan.evaluation.compare import paired_bootstrap
from allocplan.evaluation.metrics import nll_and_activations
from allocplan.planner.treatments import compensation_tables, drop_weights, encode_tables, fit_treatments
from allocplan.planner.windows import pack_windows
from allocplan.runtime.allocation_builder import allocation_for
from allocplan.runtime.experts import COMPENSATION_ATTR, StandIns, ragged_experts_forward
from allocplan.runtime.families import FAMILIES as REGISTRY
from allocplan.runtime.fast_paths import using_fast_paths
from allocplan.runtime.layers import find_moe_layers
from allocplan.runtime.native import standins_kernel

IDS = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def windows(calib_file):
    tensor, _ = pack_windows(tiny_tokenizer(), calib_file, max_tokens=256, seq_len=64)
    return tensor  # [4, 64]


def experts_io(model, layer_position: int, run):
    """(inputs (hidden, index, weights), output) the experts of one MoE layer saw during ``run()``."""
    layer = find_moe_layers(model)[layer_position]
    experts = getattr(layer.block, layer.experts_attr)
    seen = {}
    hooks = [experts.register_forward_pre_hook(lambda _m, args: seen.update(args=[a.clone() for a in args[:3]])),
             experts.register_forward_hook(lambda _m, _a, out: seen.update(out=out.clone()))]
    try:
        with torch.inference_mode():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen["args"], seen["out"]


def test_normalizer_width_weights_by_hand():
    # mixtral renormalises: its native weights are p / sum of the top-4 p. With k = 2 and a
    # normaliser width of 3, the kept weights are p / (sum of the top-3 p), from the full softmax.
    model = build_tiny_model("mixtral")
    router = find_moe_layers(model)[0].router
    logits = {}
    hook = router.register_forward_hook(lambda _m, _a, out: logits.update(value=out[0].clone()))
    allocation = allocation_for(model, 2, RoutingConfig(token_level=False), treatments=[{"normalizer_k": 3}] + [{}] * 3)
    with allocplan.apply_plan(model, allocation):
        (_, index, weights), _ = experts_io(model, 0, lambda: model(input_ids=IDS))
    hook.remove()
    p = torch.softmax(logits["value"].double(), dim=-1)  # [T, E]
    top = p.topk(3, dim=-1).values  # [T, 3], sorted
    expected = top[:, :2] / top.sum(-1, keepdim=True)  # [T, 2]
    kept = index < 8
    assert kept.sum(-1).eq(2).all()
    got = weights.double()[kept].view(-1, 2)
    torch.testing.assert_close(got.sort(-1, descending=True).values, expected, rtol=1e-5, atol=1e-6)


def test_drop_order_reranks_candidates_and_keeps_the_routers_reference_mass():
    # mixtral, k = 2 with a normaliser width of 3 and a drop order on layer 0: each token keeps the two
    # of its router's top-4 with the largest p * order[e], weighted p / (sum of the router's top-3 p).
    model = build_tiny_model("mixtral")
    layers = find_moe_layers(model)
    hidden = model.config.hidden_size
    order = torch.tensor([4.0, 1.0, 0.25, 1.0, 2.0, 0.5, 1.0, 3.0])
    stand_ins = {layer.path: StandIns(torch.zeros(8, hidden), order=order if i == 0 else None)
                 for i, layer in enumerate(layers)}
    router = layers[0].router
    logits = {}
    hook = router.register_forward_hook(lambda _m, _a, out: logits.update(value=out[0].clone()))
    allocation = allocation_for(model, 2, RoutingConfig(token_level=False), treatments=[{"normalizer_k": 3}] + [{}] * 3,
                                compensation=encode_tables(stand_ins, "expert"))
    with allocplan.apply_plan(model, allocation):
        (_, index, weights), _ = experts_io(model, 0, lambda: model(input_ids=IDS))
    hook.remove()
    p = torch.softmax(logits["value"].double(), dim=-1)  # [T, E]
    reference = p.topk(3, dim=-1).values.sum(-1)  # [T]
    reranked = 0
    for t in range(p.shape[0]):
        candidates = p[t].topk(4).indices.tolist()
        chosen = sorted(candidates, key=lambda e: -float(p[t, e]) * float(order[e]))[:2]
        reranked += chosen != candidates[:2]
        kept = index[t] < 8
        assert sorted(index[t][kept].tolist()) == sorted(chosen)
        for slot in kept.nonzero().flatten().tolist():
            e = int(index[t, slot])
            torch.testing.assert_close(weights[t, slot].double(), p[t, e] / reference[t], rtol=1e-5, atol=1e-6)
    assert reranked > 0  # the order changed some token's choice


def test_rank_by_drop_order_and_factors_by_hand():
    from allocplan.planner.treatments import DROP_ORDER_POWER, drop_order_factors
    from allocplan.runtime.routing_rules import rank_by_drop_order

    scores = torch.tensor([[0.5, -0.5, 0.2]])
    order = torch.tensor([2.0, 2.0, 0.5])
    assert torch.equal(rank_by_drop_order(scores, order, signed=False), torch.tensor([[1.0, -1.0, 0.1]]))
    # Negative scores (sigmoid + correction bias) are divided, so a larger factor still ranks higher.
    assert torch.equal(rank_by_drop_order(scores, order, signed=True), torch.tensor([[1.0, -0.25, 0.1]]))
    # Misses sqrt(4 / 1) = 2 and sqrt(32 / 2) = 4, mean 3; an expert without pairs gets 1.
    factors = drop_order_factors(torch.tensor([4.0, 32.0, 0.0], dtype=torch.float64),
                                 torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    expected = torch.tensor([(2 / 3) ** DROP_ORDER_POWER, (4 / 3) ** DROP_ORDER_POWER, 1.0])
    torch.testing.assert_close(factors, expected, rtol=1e-7, atol=0)
    # Stand-ins that never miss leave the order alone.
    assert torch.equal(drop_order_factors(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)),
                       torch.ones(2))


def test_gain_multiplies_the_kept_weights():
    model = build_tiny_model("olmoe")  # does not renormalise: kept weights are the router's own
    base = allocation_for(model, 2, RoutingConfig(token_level=False, renormalize="none"))
    gained = allocation_for(model, 2, RoutingConfig(token_level=False, renormalize="none"),
                            treatments=[{"gain": 1.5}] + [{}] * 3)
    with allocplan.apply_plan(model, base):
        (_, index_a, weights_a), _ = experts_io(model, 0, lambda: model(input_ids=IDS))
    with allocplan.apply_plan(model, gained):
        (_, index_b, weights_b), _ = experts_io(model, 0, lambda: model(input_ids=IDS))
    assert torch.equal(index_a, index_b)
    torch.testing.assert_close(weights_b, 1.5 * weights_a)


def layer_error(model, layer_position, allocation, windows, full_outputs) -> float:
    """Sum of squared differences between a layer's experts output under ``allocation`` and at full k."""
    total = 0.0
    with allocplan.apply_plan(model, allocation):
        for batch, reference in zip(windows.split(2), full_outputs):
            _, out = experts_io(model, layer_position, lambda: model(input_ids=batch, use_cache=False))
            total += (out.double() - reference.double()).pow(2).sum().item()
    return total


def full_outputs(model, layer_position, windows):
    return [experts_io(model, layer_position, lambda: model(input_ids=b, use_cache=False))[1] for b in windows.split(2)]


def test_drop_weights_by_hand():
    # The candidate a token ranks r-th (from 0, ties in slot order) weighs 2 r / K.
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.2], [0.4, 0.4, 0.1, 0.2]])
    assert drop_weights(scores).tolist() == [[1.5, 0.0, 0.5, 1.0], [0.0, 0.5, 1.5, 1.0]]
    torch.testing.assert_close(drop_weights(torch.tensor([[0.2, 0.7, 0.1]])),
                               torch.tensor([[2 / 3, 0.0, 4 / 3]], dtype=torch.float64))
    assert drop_weights(torch.tensor([[0.3], [0.9]])).tolist() == [[1.0], [1.0]]  # top-1: every pair counts


def test_expert_stand_ins_are_the_weighted_mean_over_droppable_pairs(windows):
    # Brute force through the family's own experts module: each (token, candidate) pair's unweighted
    # output is the experts' forward with that one candidate at weight 1; the pair the token ranks
    # r-th of K = 4 weighs 2 r / 4.
    model = build_tiny_model("olmoe")  # softmax weights: ranking by weight is ranking by score
    tables = compensation_tables(model, windows, "expert", batch_size=2, drop_order=False)
    layer = find_moe_layers(model)[1]
    experts = getattr(layer.block, layer.experts_attr)
    sums = torch.zeros(experts.num_experts, model.config.hidden_size, dtype=torch.float64)
    mass = torch.zeros(experts.num_experts, dtype=torch.float64)
    for batch in windows.split(2):
        (hidden, indices, weights), _ = experts_io(model, 1, lambda: model(input_ids=batch, use_cache=False))
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for t in range(indices.shape[0]):
            ranked = sorted(range(4), key=lambda slot: -float(weights[t, slot]))
            for rank, slot in enumerate(ranked):
                e = int(indices[t, slot])
                with torch.inference_mode():
                    out = experts(hidden[t : t + 1], indices[t : t + 1, slot : slot + 1], torch.ones(1, 1))
                sums[e] += rank / 2 * out[0].double()
                mass[e] += rank / 2
    expected = sums / torch.where(mass > 0, mass, 1.0)[:, None]
    torch.testing.assert_close(tables[layer.path].bias, expected.float(), rtol=1e-4, atol=1e-5)


def test_linear_stand_in_is_the_weighted_least_squares_fit(monkeypatch):
    # Full rank and no ridge: the stand-in is the weighted least-squares affine fit, which torch's
    # lstsq gives on rows scaled by sqrt(weight). Expert 1 has too few pairs for a map: its mean alone.
    # The factors' rounding to half precision is left out here (test_fitted_factors_on_the_half_grid).
    from allocplan.planner import treatments

    from allocplan.standins import linear

    monkeypatch.setattr(linear, "RIDGE", 0.0)
    monkeypatch.setattr(linear, "on_half_grid", lambda down, up: (down, up))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    y = torch.sin(2 * x) @ torch.randn(3, 3, generator=generator, dtype=torch.float64) + 0.5  # not affine in x
    w = torch.rand(40, generator=generator, dtype=torch.float64) * 2
    moments = treatments._ExpertMoments(2, linear=True)
    experts = torch.tensor([0] * 36 + [1] * 4)
    moments.add(x[:20], y[:20], experts[:20], w[:20])  # in two batches, as fitting adds them
    moments.add(x[20:], y[20:], experts[20:], w[20:])
    stand_ins = moments.stand_ins("linear", rank=3)
    design = torch.cat([torch.ones(36, 1, dtype=torch.float64), x[:36]], dim=1) * w[:36, None].sqrt()
    solution = torch.linalg.lstsq(design, y[:36] * w[:36, None].sqrt()).solution  # [4, 3]
    probe = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    expected = solution[0] + probe @ solution[1:]
    ours = stand_ins.bias[0].double() + probe @ stand_ins.down[0].double() @ stand_ins.up[0].double()
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    mean = (w[36:, None] * y[36:]).sum(0) / w[36:].sum()
    torch.testing.assert_close(stand_ins.bias[1].double(), mean, rtol=1e-5, atol=1e-6)
    assert not stand_ins.down[1].any()


def test_fitted_factors_on_the_half_grid():
    """Fitted linear stand-ins hold only half-precision values in their factors (what batch-1 decode's
    kernel reads), and the map stays the least-squares one to half's precision: the constant is refitted
    against the rounded map, so the stand-in's mean over the fitted inputs is still the outputs' mean."""
    from allocplan.planner import treatments

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=generator, dtype=torch.float64) * 3e-3
    y = x @ torch.randn(16, 16, generator=generator, dtype=torch.float64) * 50 + 0.25
    moments = treatments._ExpertMoments(1, linear=True)
    moments.add(x, y, torch.zeros(64, dtype=torch.long), torch.ones(64, dtype=torch.float64))
    stand_ins = moments.stand_ins("linear", rank=8)
    for factor in (stand_ins.down, stand_ins.up):
        assert torch.equal(factor.half().float(), factor)
    fitted = stand_ins.bias[0].double() + x @ stand_ins.down[0].double() @ stand_ins.up[0].double()  # [64, 16]
    torch.testing.assert_close(fitted.mean(0), y.mean(0), rtol=0, atol=1e-5)


def test_on_half_grid_by_hand():
    """Both factors are scaled by a power of two towards the same size, then rounded to half: down [[3e-3]]
    and up [[1]] meet at 2^-4 (log2(3e-3) / 2 = -4.19 rounds to -4): 3e-3 * 16 = 0.048 is 1572.86 steps
    of 2^-15 and becomes 1573 * 2^-15, and 1 / 16 is a half exactly. A map beyond half's range keeps its
    float values (scaled, product unchanged); a zero map is left alone."""
    from allocplan.standins.linear import on_half_grid

    down, up = on_half_grid(torch.tensor([[3e-3]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64))
    assert down.item() == 1573 * 2.0 ** -15 and up.item() == 2.0 ** -4
    huge_down, huge_up = on_half_grid(torch.tensor([[1e12, 3.0]], dtype=torch.float64),
                                      torch.tensor([[1.0], [0.5]], dtype=torch.float64))
    assert (huge_down @ huge_up).item() == 1e12 + 1.5  # exact: scaled by powers of two, not rounded
    assert not torch.isfinite(huge_down.half()).all()
    zero = torch.zeros(2, 1, dtype=torch.float64)
    assert on_half_grid(zero, torch.ones(1, 2, dtype=torch.float64))[0] is zero


def test_closed_form_gain_equals_a_brute_force_fit(windows):
    model = build_tiny_model("olmoe")
    routing = RoutingConfig()  # Alloc-T on, as a plan runs
    tables = compensation_tables(model, windows, "expert", batch_size=2)
    record, data = encode_tables(tables, "expert")
    grid = {layer.path: [1, 2, 3, 4] for layer in find_moe_layers(model)}
    fitted = fit_treatments(model, windows, grid, routing, tables, batch_size=2)
    gain = fitted["model.layers.1.mlp"][2]["gain"]
    reference = full_outputs(model, 1, windows)

    def error(g: float) -> float:
        treatments = [{}, {"gain": g}, {}, {}]
        allocation = allocation_for(model, [4, 2, 4, 4], routing, treatments=treatments, compensation=(record, data))
        return layer_error(model, 1, allocation, windows, reference)

    # Golden-section search on the measured error, independent of the closed form.
    lo, hi = 0.2, 3.0
    for _ in range(40):
        a, b = hi - (hi - lo) / 1.618, lo + (hi - lo) / 1.618
        if error(a) < error(b):
            hi = b
        else:
            lo = a
    assert gain == pytest.approx((lo + hi) / 2, abs=1e-4)
    assert error(gain) <= error(1.0)


def test_normalizer_width_is_the_brute_force_best(windows):
    model = build_tiny_model("mixtral")  # renormalises: the fit chooses a width, not a gain
    routing = RoutingConfig()
    grid = {layer.path: [1, 2, 3, 4] for layer in find_moe_layers(model)}
    fitted = fit_treatments(model, windows, grid, routing, None, batch_size=2)
    reference = full_outputs(model, 2, windows)
    errors = {}
    for width in (None, 2, 3, 4):
        treatments = [{}, {}, {"normalizer_k": width}, {}]
        errors[width] = layer_error(model, 2, allocation_for(model, [4, 4, 2, 4], routing, treatments=treatments),
                                    windows, reference)
    chosen, gain = fitted["model.layers.2.mlp"][2].get("normalizer_k"), fitted["model.layers.2.mlp"][2].get("gain", 1.0)
    assert gain == 1.0
    assert errors[chosen] == pytest.approx(min(errors.values()), rel=1e-6)


def test_one_token_table_by_hand():
    """Kept slots (index < E) gather zeros; index E + e gathers expert e's constant; a layer constant repeats."""
    per_expert = StandIns(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.equal(per_expert.one_token_table(2), torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0], [3.0, 4.0]]))
    per_layer = StandIns(torch.tensor([[5.0, 6.0]]))
    assert torch.equal(per_layer.one_token_table(3), torch.tensor([[0.0, 0.0]] * 3 + [[5.0, 6.0]] * 3))
    assert per_layer.one_token_table(3) is per_layer.one_token_table(3)  # built once


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["batched", "slot-by-slot", "native"])
def test_one_token_linear_rows_and_sum_by_hand(form, model_dtype):
    """Batch-1 linear stand-ins: a kept slot gives an exact zero row (the all-zero expert row), a dropped
    slot E + e gives bias[e] + (x down[e]) up[e], and the weighted rows are added to the token, batched
    (one addmm over all K slots' rows), slot by slot (CPU's torch form) or by the native kernel (CPU,
    float32 only: a bfloat16 model falls back to slot by slot), into a float32 or a bfloat16 model.
    Small integers and halves keep every sum exact, whatever its order."""
    from allocplan.runtime.experts import _add_compensation_one_token

    if form == "native" and standins_kernel() is None:
        pytest.skip("the native stand-in kernel cannot run here (test_native_kernel_runs_where_it_should)")

    bias = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])  # [E=3, H=2]
    down = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]], [[1.0], [1.0]]])  # [3, 2, r=1]
    up = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]], [[1.0, -1.0]]])  # [3, 1, 2]
    stand_ins = StandIns(bias, down, up)
    x = torch.tensor([[2.0, 3.0]])  # [1, H]
    # Slots: expert 1 kept, expert 2 dropped (3 + 2), expert 0 dropped (3 + 0), the plain sentinel 3.
    slots = torch.tensor([1, 5, 3, 3])
    # Expert 2: x.down = 5, so [3, 1] + 5 [1, -1] = [8, -4]; expert 0: x.down = 2, so [1, 0] + 2 [2, 0] = [5, 0].
    expected_rows = torch.tensor([[0.0, 0.0], [8.0, -4.0], [5.0, 0.0], [5.0, 0.0]])
    assert torch.equal(stand_ins.one_token_rows(x, slots, 3), expected_rows)
    weights = torch.tensor([[0.5, 0.5, 0.25, 0.0]])  # the sentinel's weight is 0
    result = torch.tensor([[10.0, 10.0]], dtype=model_dtype)
    # [10, 10] + 0.5 [8, -4] + 0.25 [5, 0] = [15.25, 8]; the kept slot's weight meets a zero row.
    with using_fast_paths(stand_in_loop=form != "batched", native_kernel=form == "native"):
        _add_compensation_one_token(result, stand_ins, x.to(model_dtype), slots[None], weights.to(model_dtype), 3)
    assert torch.equal(result, torch.tensor([[15.25, 8.0]], dtype=model_dtype))
    assert torch.equal(stand_ins.down, down) and torch.equal(stand_ins.up, up)  # views of the padded factors
    # The kernel's tables are built with float32 stand-ins on the half grid, whichever form runs.
    assert (stand_ins._native is not None) == (standins_kernel() is not None)


@pytest.mark.parametrize("grouping", [True, False], ids=["grouped", "copied"])
@pytest.mark.parametrize("tokens", ["batch", "many", "one-token", "few"])
@pytest.mark.parametrize("kind", ["expert", "layer", "linear"])
def test_compensation_adds_weighted_stand_ins_by_hand(kind, tokens, grouping, monkeypatch):
    """Every form of the stand-ins (one token; a few tokens, where linear ones on the half grid go through
    the native kernel token by token where it can run; many tokens, where linear ones are grouped by expert
    or their factors copied per pair (``batch``: the general forms the planner measures with), or, this
    little work (``many``), go through the native kernel in one call where it can run) against a per-pair
    sum in float64."""
    from allocplan.runtime import experts as experts_module

    one_token = tokens == "one-token"
    grouped, original = [], experts_module._grouped_linear_rows
    monkeypatch.setattr(experts_module, "_grouped_linear_rows", lambda *args: grouped.append(1) or original(*args))
    native_rows, native_add = [], StandIns.add_dropped_native_rows
    monkeypatch.setattr(StandIns, "add_dropped_native_rows",
                        lambda *args: native_rows.append(native_add(*args)) or native_rows[-1])
    native_grouped, grouped_add = [], StandIns.add_dropped_native_grouped
    monkeypatch.setattr(StandIns, "add_dropped_native_grouped",
                        lambda *args: native_grouped.append(grouped_add(*args)) or native_grouped[-1])
    # The copy limit decides the form of many pairs: 0 groups them (there are as many as experts), a
    # limit above anything here copies.
    monkeypatch.setattr(experts_module, "_STAND_IN_COPY_BYTES", 0 if grouping else 1 << 40)
    model = build_tiny_model("olmoe")
    layers = find_moe_layers(model)
    generator = torch.Generator().manual_seed(2)
    rows = 1 if kind == "layer" else 8
    # On the half grid, as the planner fits them, so the native kernel can serve them.
    stand_ins = {layer.path: StandIns(torch.randn(rows, 32, generator=generator),
                                      *((torch.randn(8, 32, 3, generator=generator).half().float(),
                                         torch.randn(8, 3, 32, generator=generator).half().float())
                                        if kind == "linear" else ()))
                 for layer in layers}
    record, data = encode_tables(stand_ins, kind)
    allocation = allocation_for(model, 2, RoutingConfig(token_level=False), compensation=(record, data))
    with allocplan.apply_plan(model, allocation), using_fast_paths(many_token_stand_ins=tokens != "batch"):
        # One token: batch-1 decode's form of the stand-ins; 8 tokens: a few (small-batch decode's); 24: many.
        ids = {"one-token": IDS[:1, :1], "few": IDS[:, :4], "batch": IDS, "many": IDS}[tokens]
        (hidden, index, weights), out = experts_io(model, 0, lambda: model(input_ids=ids))
        experts = layers[0].experts
        table = getattr(experts, COMPENSATION_ATTR)
        delattr(experts, COMPENSATION_ATTR)  # the same call without stand-ins: the kept experts alone
        kept_only = ragged_experts_forward(experts, hidden, index, weights)
        setattr(experts, COMPENSATION_ATTR, table)
    expected = kept_only.double().clone()
    bias = stand_ins[layers[0].path].bias.double()
    dropped = 0
    for t in range(index.shape[0]):
        for s in range(index.shape[1]):
            if index[t, s] >= 8:  # dropped candidate of expert index - 8, with its weight
                e = int(index[t, s]) - 8
                value = bias[e % rows].clone()
                if kind == "linear":
                    s_in = stand_ins[layers[0].path]
                    value += hidden[t].double() @ s_in.down[e].double() @ s_in.up[e].double()
                expected[t] += weights[t, s].double() * value
                dropped += 1
    assert dropped == 2 * index.shape[0]  # top-4 candidates, 2 kept
    native = kind == "linear" and tokens in ("few", "many") and standins_kernel() is not None
    # Token by token for a few tokens (8), grouped by expert for more (24), once per layer, only of linear stand-ins
    # outside the general forms; asked only where the kernel can run, and then served.
    assert native_rows == [native] * (len(layers) if kind == "linear" and tokens == "few" else 0)
    assert native_grouped == [True] * (len(layers) if native and tokens == "many" else 0)
    assert bool(grouped) == (kind == "linear" and not one_token and grouping and not native)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_stand_ins_are_grouped_once_their_copy_passes_two_mib():
    from allocplan.runtime.experts import _group_the_stand_ins

    # ref-olmoe's shape: 16 experts, [128, 28] and [28, 128] float32 factors, 28,672 bytes a pair, so
    # the copy passes 2 MiB (2,097,152 bytes) at 74 pairs (73 x 28,672 = 2,093,056).
    stand_ins = StandIns(torch.zeros(16, 128), torch.zeros(16, 128, 28), torch.zeros(16, 28, 128))
    assert not _group_the_stand_ins(stand_ins, 73, 16)
    assert _group_the_stand_ins(stand_ins, 74, 16)
    # Below one pair per expert the copy runs however large: 8 experts of [512, 100] (409,600 bytes a pair).
    big = StandIns(torch.zeros(8, 512), torch.zeros(8, 512, 100), torch.zeros(8, 100, 512))
    assert not _group_the_stand_ins(big, 7, 8)
    assert _group_the_stand_ins(big, 8, 8)  # 3.3 MB
    # Held once in half precision (where the kernel serves them), the copy is still made in float32: the same
    # 74 pairs, not twice as many.
    once = StandIns(torch.zeros(16, 128), torch.zeros(16, 128, 28), torch.zeros(16, 28, 128), one_copy=True)
    if once._padded is None:  # the kernel built its half tables
        assert once.down.dtype == torch.float16
        assert not _group_the_stand_ins(once, 73, 16)
        assert _group_the_stand_ins(once, 74, 16)


def test_sidecar_mismatch_missing_and_wrong_shape(tmp_path):
    from allocplan.formats.records import sha256_bytes
    from allocplan.formats.sidecar import record_for

    model = build_tiny_model("olmoe")
    stand_ins = {layer.path: StandIns(torch.zeros(8, 32)) for layer in find_moe_layers(model)}
    record, data = encode_tables(stand_ins, "expert")
    allocation = allocation_for(model, 2, compensation=(record, data))
    assert sha256_bytes(data) == record.sha256
    # Bytes that differ from the record.
    broken = allocation_for(model, 2, compensation=(record, data[:-1] + b"\x01"))
    with pytest.raises(AllocplanError, match="do not match the sha256") as info:
        allocplan.apply_plan(model, broken)
    assert "\n" not in str(info.value)
    # A consistent sidecar of the wrong shape for this model.
    wrong = {path: StandIns(torch.zeros(8, 16)) for path in stand_ins}
    record_w, data_w = encode_tables(wrong, "expert")
    with pytest.raises(AllocplanError, match=r"holds shape \(8, 16\) for model.layers.0.mlp, which needs shape"
                                             r" \(8, 32\)"):
        allocplan.apply_plan(model, allocation_for(model, 2, compensation=(record_w, data_w)))
    # A drop order of the wrong length, or one that is not positive.
    for order, message in ((torch.ones(7), r"holds shape \(7,\) for model.layers.0.mlp.order, which needs shape \(8,\)"),
                           (torch.zeros(8), "drop order for model.layers.0.mlp that is not positive")):
        bad = {path: StandIns(torch.zeros(8, 32), order=order) for path in stand_ins}
        with pytest.raises(AllocplanError, match=message) as info:
            allocplan.apply_plan(model, allocation_for(model, 2, compensation=encode_tables(bad, "expert")))
        assert "\n" not in str(info.value)
    assert not hasattr(model, "_allocplan_handle")
    assert record_for(data, "expert") == record  # content-addressed: the same bytes, the same name


def test_sidecar_holds_a_16_bit_models_stand_ins_in_its_precision(windows):
    """A bfloat16 model's sidecar stores its stand-ins in bfloat16 (half the bytes of float32) and routes
    exactly as the same stand-ins stored in float32, which apply casts to bfloat16; the drop order stays
    float32. A sidecar of integers is a one-line error."""
    from safetensors.torch import load, save

    from allocplan.formats.sidecar import record_for
    from allocplan.planner.treatments import sidecar_dtype

    model = build_tiny_model("olmoe")
    assert sidecar_dtype(model) == torch.float32
    model = model.to(torch.bfloat16)
    assert sidecar_dtype(model) == torch.bfloat16
    tables = compensation_tables(model, windows, "linear", batch_size=2, rank=3)
    (record16, data16), (record32, data32) = (encode_tables(tables, "linear", dtype) for dtype in
                                              (torch.bfloat16, torch.float32))
    tensors = load(data16)
    layers = find_moe_layers(model)
    for layer in layers:
        assert [tensors[layer.path + suffix].dtype for suffix in ("", ".down", ".up", ".order")] == [
            torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32]
    assert len(data16) < 0.6 * len(data32)
    logits = []
    for compensation in ((record16, data16), (record32, data32)):
        with allocplan.apply_plan(model, allocation_for(model, 2, compensation=compensation)), torch.inference_mode():
            logits.append(model(input_ids=IDS).logits)
    assert torch.equal(logits[0], logits[1])
    integers = save({layer.path: torch.zeros(8, 32, dtype=torch.int64) for layer in layers})
    with pytest.raises(AllocplanError, match="holds torch.int64 values for model.layers.0.mlp, which needs"
                                             " floating-point values") as info:
        allocplan.apply_plan(model, allocation_for(model, 2, compensation=(record_for(integers, "expert"), integers)))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="sidecar dtype torch.int8"):
        encode_tables(tables, "linear", torch.int8)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_plan_with_every_element_is_bit_identical(family, windows):
    """Alloc-T, weight treatments, compensation and a refinement record: at full k nothing changes."""
    model = build_tiny_model(family)
    layers = find_moe_layers(model)
    spec = REGISTRY[model.config.model_type]
    before = model(input_ids=IDS).logits.detach()
    compensation = None
    if spec.treatments_unsupported is None:
        compensation = encode_tables(compensation_tables(model, windows[:2], "linear", batch_size=2, rank=2,
                                                         drop_order=True), "linear")
    allocation = allocation_for(model, [layer.top_k for layer in layers], RoutingConfig(token_level=True),
                                compensation=compensation)
    with allocplan.apply_plan(model, allocation), torch.inference_mode():
        after = model(input_ids=IDS).logits
    assert torch.equal(after, before)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "gemma4_text", "dbrx", "jetmoe"])
def test_pooled_decode_modes_equal_token_by_token_decoding(family):
    model = build_tiny_model(family)
    ids = torch.randint(1, 100, (9, 20), generator=torch.Generator().manual_seed(8))
    plan = plan_for(model, [min(2.5, layer.top_k) for layer in find_moe_layers(model)], token_level=True)
    with allocplan.apply_plan(model, plan) as handle:
        for mode in ("decode-b1", "decode-b8"):
            pooled = nll_and_activations(model, ids, handle, mode)
            exact = nll_and_activations(model, ids, handle, mode, exact_decode=True)
            assert pooled["window_nll"] == pytest.approx(exact["window_nll"], abs=1e-4)
            assert pooled["activations_per_layer"] == pytest.approx(exact["activations_per_layer"], abs=1e-12)
    # Batch-1 decode really is per-layer k through the ledger, and pooling across tokens matters:
    # the prefill mode (one pool for all tokens) gives a different NLL.
    with allocplan.apply_plan(model, plan) as handle:
        prefill = nll_and_activations(model, ids, handle, "prefill")["nll"]
    assert prefill != pytest.approx(exact["nll"], abs=1e-6)


def test_paired_bootstrap_by_hand():
    # Every window 2 nats lower over 4 tokens: the difference is -0.5 per token with no spread.
    result = paired_bootstrap([1.0, 3.0, 5.0], [3.0, 5.0, 7.0], tokens_per_window=4)
    assert result == {"mean": -0.5, "low": -0.5, "high": -0.5, "windows": 3, "rounds": 2000}
    # Half the windows better by 1, half worse by 1: a mean of 0 and an interval around it.
    mixed = paired_bootstrap([0.0] * 50 + [2.0] * 50, [1.0] * 100, tokens_per_window=1)
    assert mixed["mean"] == 0.0 and mixed["low"] < 0 < mixed["high"]
    assert paired_bootstrap([0.0] * 50 + [2.0] * 50, [1.0] * 100, tokens_per_window=1) == mixed  # seeded


def test_k2_peer_chooses_a_width_and_runs_the_budget(windows):
    from allocplan.evaluation.methods import build_policy, measured_total

    model = build_tiny_model("mixtral")
    policy = build_policy(model, "k2-peer", 0.5, calib_windows=windows)
    assert policy.parameter in (2.0, 3.0, 4.0)
    assert policy.allocation.weights.renormalize == "decoupled"
    assert policy.allocation.weights.reference_k == int(policy.parameter)
    assert measured_total(model, policy, windows) == pytest.approx(8.0)


def test_profile_with_treatments_round_trips_and_solves_to_its_treatments(tmp_path, calib_file):
    model = build_tiny_model("olmoe")
    profile = allocplan.profile_model(model, tiny_tokenizer(), allocplan.ProfileConfig(
        calib=str(calib_file), calib_tokens=256, seq_len=64, batch_size=2))
    assert profile.measurement.weight_fit == "fitted" and profile.compensation.kind == "linear"
    allocplan.save_profile(profile, tmp_path / "p.yaml")
    loaded = allocplan.load_profile(tmp_path / "p.yaml")
    assert loaded == profile and loaded.compensation_data == profile.compensation_data
    plan = allocplan.solve_profile(loaded, 0.5)
    for entry, row in zip(plan.layers, loaded.layers):
        assert entry.gain == row.gain[entry.planned_k]
    # The plan's sidecar is cut from the profile's: each layer's stand-ins at the rank the solver chose.
    from allocplan.formats.sidecar import sidecar_raw

    cut, whole = sidecar_raw(plan.compensation_data), sidecar_raw(loaded.compensation_data)
    for entry in plan.layers:
        if entry.stand_in_rank is not None:
            assert (cut[entry.path][1] == whole[f"{entry.path}.r{entry.stand_in_rank}"][1]).all()
    # At full k, a layer keeps no treatment: a full-budget plan changes nothing.
    assert all(row.gain[row.original_k] == 1.0 for row in loaded.layers)


def test_drop_order_is_measured_into_the_sidecar_and_routes_the_plan(calib_file):
    """--drop-order (the default): one positive factor per expert beside the stand-ins, deterministic, and
    a plan that routes differently from the same plan without it (same k)."""
    from safetensors.torch import load

    model = build_tiny_model("olmoe")
    settings = dict(calib=str(calib_file), calib_tokens=256, seq_len=64, batch_size=2)
    ordered = [allocplan.profile_model(model, tiny_tokenizer(), allocplan.ProfileConfig(**settings))
               for _ in range(2)]
    assert ordered[0].compensation_data == ordered[1].compensation_data  # byte-identical sidecar
    plain = allocplan.profile_model(model, tiny_tokenizer(), allocplan.ProfileConfig(drop_order=False, **settings))
    tensors, plain_tensors = load(ordered[0].compensation_data), load(plain.compensation_data)
    layers = find_moe_layers(model)
    assert set(tensors) == set(plain_tensors) | {f"{layer.path}.order" for layer in layers}
    for layer in layers:
        order = tensors[f"{layer.path}.order"]
        assert order.shape == (8,) and bool((order > 0).all()) and not torch.equal(order, torch.ones(8))
        torch.testing.assert_close(tensors[f"{layer.path}.r9"], plain_tensors[f"{layer.path}.r9"])  # same stand-ins
    ks = [2] * len(layers)
    # The factors are within a few percent of one, so a candidate pair changes places only where its
    # scores are close: 128 tokens have such pairs (24 need not).
    ids = torch.randint(1, 100, (4, 32), generator=torch.Generator().manual_seed(4))
    logits = []
    from allocplan.planner.solve import allocation_from_profile

    for profile in (ordered[0], plain):
        allocation = allocation_from_profile(profile, ks, RoutingConfig(token_level=False), [9] * len(layers))
        with allocplan.apply_plan(model, allocation), torch.inference_mode():
            logits.append(model(input_ids=ids).logits)
    assert not torch.equal(logits[0], logits[1])


def test_validate_and_apply_refuse_a_changed_or_missing_sidecar(tmp_path, calib_file):
    import subprocess
    import sys

    model = build_tiny_model("olmoe")
    checkpoint = tmp_path / "ckpt"
    model.config.pad_token_id = 0
    model.save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    plan = allocplan.compile_plan(str(checkpoint), 0.5, profile=allocplan.ProfileConfig(
        calib=str(calib_file), calib_tokens=256, seq_len=64, compensation="expert", stand_in_choice=False),
        refine=allocplan.RefineConfig(refine=False))
    allocplan.save_plan(plan, tmp_path / "plan.yaml")
    sidecar = tmp_path / plan.compensation.file

    def validate() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "allocplan.cli", "validate", str(tmp_path / "plan.yaml")],
                              capture_output=True, text=True, cwd=tmp_path)

    assert validate().returncode == 0
    original = sidecar.read_bytes()
    sidecar.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    changed = validate()
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1 and "does not match the sha256" in changed.stderr
    sidecar.unlink()
    missing = validate()
    assert missing.returncode == 2 and "not beside it" in missing.stderr and "Traceback" not in missing.stderr
    sidecar.write_bytes(original)
    assert validate().returncode == 0


@pytest.mark.parametrize("family", [f for f in FAMILIES if REGISTRY[f].treatments_unsupported is None
                                    and REGISTRY[f].rewrite_unsupported is None])
def test_batch1_decode_fast_path_matches_the_general_rewrite(family, windows, monkeypatch):
    """A treated, compensated layer at batch 1 skips the general selection's bookkeeping and the stand-ins'
    nonzero and scatter. The routing's short form gives the general path's logits bit for bit and the same
    counted pairs; with the stand-ins' one-token form too, the logits agree to float tolerance."""
    from allocplan.runtime import experts as experts_module
    from allocplan.runtime.routing import LayerRouting

    model = build_tiny_model(family)
    layers = find_moe_layers(model)
    # Linear stand-ins (rows computed per slot) and constant ones (gathered from the one-token table).
    compensations = {kind: encode_tables(compensation_tables(model, windows[:2], kind, batch_size=2, rank=2,
                                                             drop_order=True), kind)
                     for kind in ("linear", "expert")}
    # k 2.5 through the ledger (3, 2, 3, ...), a normaliser width on even layers and a gain everywhere.
    treatments = [{"normalizer_k": layer.top_k if i % 2 == 0 else None, "gain": 1.25} for i, layer in enumerate(layers)]
    ks = [min(2.5, layer.top_k) for layer in layers]
    allocations = [allocation_for(model, ks, RoutingConfig(), treatments=treatments, compensation=compensation)
                   for compensation in compensations.values()]
    allocations.append(allocation_for(model, ks, RoutingConfig(), treatments=treatments))  # treated, no stand-ins
    taken = {"keep": 0, "stand-ins": 0}
    native_used = []

    def counted(name, function):
        def wrapper(*args, **kwargs):
            taken[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(LayerRouting, "_single_token_keep", counted("keep", LayerRouting._single_token_keep))
    native_add = StandIns.add_dropped_native
    monkeypatch.setattr(StandIns, "add_dropped_native",
                        lambda *args: native_used.append(native_add(*args)) or native_used[-1])
    monkeypatch.setattr(experts_module, "_add_compensation_one_token",
                        counted("stand-ins", experts_module._add_compensation_one_token))
    # (routing's short form, stand-ins' one-token form, its linear form: "batched", "loop" slot by slot
    # in torch, or "native", the kernel where it can run): both general, the routing alone short, both short.
    forms = ((False, False, "batched"), (True, False, "batched"), (True, True, "batched"), (True, True, "loop"),
             (True, True, "native"))
    runs = {}
    for (fast_routing, fast_stand_ins, linear_form), allocation in itertools.product(forms, allocations):
        with using_fast_paths(one_token_keep=fast_routing, one_token_stand_ins=fast_stand_ins,
                              stand_in_loop=linear_form != "batched", native_kernel=linear_form == "native"), \
                allocplan.apply_plan(model, allocation) as handle:
            logits = greedy_step_logits(model, IDS[:1, :6], 5)
            counts = {p: (c.pairs, c.tokens) for p, c in handle.counters().items()}
        kind = allocation.compensation and allocation.compensation.kind
        runs[fast_routing, fast_stand_ins, linear_form, kind] = (logits, counts)
    # Each short form ran in every layer at each of the five single-token steps, and only where switched
    # on (the stand-ins' form only where there are stand-ins: not in a layer left at its own k, which drops
    # nothing).
    dropping = sum(k < layer.top_k for k, layer in zip(ks, layers))
    assert taken == {"keep": 4 * 3 * 5 * len(layers), "stand-ins": 3 * 2 * 5 * dropping}
    # The fitted linear stand-ins are on the half grid, so where the kernel can run it served every layer
    # at every step of the native form (and was asked nowhere else).
    assert native_used == [standins_kernel() is not None] * (5 * dropping)
    for compensation in (*compensations, None):
        general = runs[False, False, "batched", compensation]
        # The routing's short form decides exactly as the general rewrite: same logits bit for bit.
        assert torch.equal(runs[True, False, "batched", compensation][0], general[0])
        for linear_form in ("batched", "loop", "native"):
            short = runs[True, True, linear_form, compensation]
            assert runs[True, False, "batched", compensation][1] == general[1] == short[1]
            # The stand-ins' one-token forms sum the same rows in another float order (not a scatter).
            torch.testing.assert_close(short[0], general[0], rtol=1e-5, atol=1e-5)
    # No stand-ins: nothing to sum.
    assert torch.equal(runs[True, True, "native", None][0], runs[False, False, "batched", None][0])
