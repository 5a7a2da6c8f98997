"""Stand-ins held once (``StandIns.one_copy``): the native kernel's half tables are the only copy of the factors,
every torch form gives the same sums as from float32 factors, and an applied plan holds that much less."""

from __future__ import annotations

import pytest
import torch
from test_native import half_grid_stand_ins, needs_kernel
from test_treatments import IDS
from tiny_models import build_tiny_model

import allocplan
from allocplan import RoutingConfig
from allocplan.planner.treatments import encode_tables
from allocplan.runtime.allocation_builder import allocation_for
from allocplan.runtime.experts import StandIns
from allocplan.runtime.fast_paths import using_fast_paths
from allocplan.runtime.layers import find_moe_layers


def held_bytes(stand_ins: StandIns) -> int:
    """Bytes of the storages behind ``held_tensors``, each counted once (as PlanHandle.added_bytes counts)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in stand_ins.held_tensors()}
    return sum(storages.values())


def both(experts: int, hidden: int, rank: int) -> tuple[StandIns, StandIns]:
    """The same stand-ins held twice over (float32 and the kernel's half) and once."""
    twice = half_grid_stand_ins(experts, hidden, rank)
    return twice, StandIns(twice.bias, twice.down.clone(), twice.up.clone(), one_copy=True)


@needs_kernel
def test_one_copy_holds_the_half_tables_alone_by_hand():
    """E = 6 experts, H = 37, r = 5. Held once: bias 6*37*4 = 888 bytes, down in half with 8 halves of slack
    (6*37*5 + 8)*2 = 2236, up 6*5*37*2 = 2220: 5344. Held twice over, the float32 factors padded to r' = 8 behind
    a zero row come on top: 7*37*8*4 = 8288 each, 21920 in all."""
    twice, once = both(6, 37, 5)
    assert held_bytes(once) == 5344
    assert held_bytes(twice) == 21920
    assert once.down.dtype == once.up.dtype == torch.float16 and once.down.shape == (6, 37, 5)
    assert torch.equal(once.down.float(), twice.down) and torch.equal(once.up.float(), twice.up)


def test_one_copy_is_only_asked_where_the_kernel_serves(monkeypatch):
    """Off the half grid (or without the kernel) the float32 factors stay: the only copy there is."""
    twice = half_grid_stand_ins(6, 37, 5)
    off_grid = StandIns(twice.bias, twice.down + 1e-6, twice.up, one_copy=True)
    assert off_grid.down.dtype == torch.float32 and off_grid._native is None
    assert held_bytes(off_grid) == 888 + 2 * 8288


@needs_kernel
@pytest.mark.parametrize("hidden,rank", [(40, 5), (64, 8)])
def test_every_torch_form_sums_the_same_from_one_copy(hidden, rank):
    """rows, grouped_rows, one_token_rows and add_dropped_one_token widen the half tables per call: the same
    float32 values through the same ops, so bit for bit the same outputs."""
    experts = 6
    twice, once = both(experts, hidden, rank)
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(10, hidden, generator=generator)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])  # non-decreasing, as grouped_rows takes them
    assert torch.equal(once.rows(inputs, ids), twice.rows(inputs, ids))
    assert torch.equal(once.grouped_rows(inputs, ids), twice.grouped_rows(inputs, ids))
    slots = torch.tensor([2, experts + 4, experts + 0, experts])
    token = inputs[:1]
    assert torch.equal(once.one_token_rows(token, slots, experts), twice.one_token_rows(token, slots, experts))
    start = torch.randn(1, hidden, generator=generator)
    args = (token, slots.tolist(), [0.3, 0.2, 0.1, 0.0], experts)
    assert torch.equal(once.add_dropped_one_token(start.clone(), *args), twice.add_dropped_one_token(start.clone(), *args))


@needs_kernel
def test_an_applied_plan_holds_its_stand_ins_once_and_computes_the_same():
    """A tiny model with linear stand-ins: the applied plan adds the kernel's tables alone (bytes by hand), and its
    logits in every form (batch 1, a few tokens, many; through the kernel and through the torch forms) equal those
    of the plan applied with the float32 copy kept, bit for bit."""
    model = build_tiny_model("olmoe")
    layers = find_moe_layers(model)
    generator = torch.Generator().manual_seed(2)
    stand_ins = {layer.path: StandIns(torch.randn(8, 32, generator=generator),
                                      (torch.randn(8, 32, 3, generator=generator) * 0.1).half().float(),
                                      (torch.randn(8, 3, 32, generator=generator) * 0.1).half().float())
                 for layer in layers}
    record, data = encode_tables(stand_ins, "linear")
    allocation = allocation_for(model, 2, RoutingConfig(token_level=False), compensation=(record, data))
    inputs = {"one": IDS[:1, :1], "few": IDS[:, :4], "many": IDS}

    def run(one_copy: bool, native: bool) -> tuple[int, dict]:
        with using_fast_paths(one_copy_stand_ins=one_copy), allocplan.apply_plan(model, allocation) as handle:
            with using_fast_paths(native_kernel=native, many_token_stand_ins=native), torch.no_grad():
                return handle.added_bytes(), {name: model(input_ids=ids).logits for name, ids in inputs.items()}

    # Per layer: bias 8*32*4 = 1024, down half (8*32*3 + 8)*2 = 1552, up 8*3*32*2 = 1536; the float32 copy adds
    # two padded tables of 9*32*4*4 = 4608 bytes.
    for native in (True, False):
        once_bytes, once = run(True, native)
        twice_bytes, twice = run(False, native)
        assert once_bytes == len(layers) * (1024 + 1552 + 1536)
        assert twice_bytes == once_bytes + len(layers) * 2 * 4608
        for name in inputs:
            assert torch.equal(once[name], twice[name]), name
