"""The native stand-in kernel (runtime/native.py): where it runs, what it adds, how it is built and cached."""

from __future__ import annotations

import subprocess

import pytest
import torch

from allocplan.runtime import native
from allocplan.runtime.experts import StandIns
from allocplan.runtime.native import standins_kernel

needs_kernel = pytest.mark.skipif(standins_kernel() is None, reason="the native kernel cannot run here")
# Where the kernel should build: x86-64 Linux with AVX2, FMA and F16C, and a C compiler (CI's machine).
CAN_BUILD = native._cpu_supported() and native._compiler() is not None
needs_build = pytest.mark.skipif(not CAN_BUILD, reason="no AVX2/FMA/F16C x86-64 Linux CPU or no C compiler here")


def half_grid_stand_ins(experts: int, hidden: int, rank: int, seed: int = 0) -> StandIns:
    """Random linear stand-ins whose factors are half-precision values (as fitted ones are)."""
    generator = torch.Generator().manual_seed(seed)
    down = (torch.randn(experts, hidden, rank, generator=generator) * 0.05).half().float()
    up = (torch.randn(experts, rank, hidden, generator=generator) * 0.05).half().float()
    return StandIns(torch.randn(experts, hidden, generator=generator), down, up)


def loop_sum(stand_ins: StandIns, result, hidden, slots, weights, experts):
    """The torch loop's sum (StandIns.add_dropped_one_token), the reference the kernel must match."""
    return stand_ins.add_dropped_one_token(result.clone(), hidden, slots[0].tolist(), weights[0].tolist(), experts)


@needs_build
def test_native_kernel_runs_where_it_should():
    """On x86-64 Linux with AVX2, FMA and F16C and a C compiler (CI's machine), the kernel builds and loads."""
    assert standins_kernel() is not None


@needs_kernel
@pytest.mark.parametrize("hidden,rank", [(512, 56), (37, 5), (8, 8), (3, 1)])
def test_kernel_adds_what_the_torch_loop_adds(hidden, rank):
    """Any hidden size and rank (the kernel's 8-wide body and its scalar tails), kept slots, dropped ones,
    the plain sentinel (weight 0) and a dropped slot listed twice: the loop's sum up to float order."""
    experts = 6
    stand_ins = half_grid_stand_ins(experts, hidden, rank)
    generator = torch.Generator().manual_seed(1)
    hidden_state = torch.randn(1, hidden, generator=generator)
    slots = torch.tensor([[2, experts + 4, experts + 0, 5, experts, experts + 4, experts + 5]])
    weights = torch.tensor([[0.3, 0.2, 0.1, 0.25, 0.0, 0.05, 0.125]])
    start = torch.randn(1, hidden, generator=generator)
    result = start.clone()
    assert stand_ins.add_dropped_native(result, hidden_state, slots, weights, experts)
    expected = loop_sum(stand_ins, start, hidden_state, slots, weights, experts)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(result, start)
    nothing_dropped = start.clone()
    assert stand_ins.add_dropped_native(nothing_dropped, hidden_state, torch.tensor([[1, 3]]),
                                        torch.tensor([[0.5, 0.5]]), experts)
    assert torch.equal(nothing_dropped, start)


@needs_kernel
@pytest.mark.parametrize("hidden,rank", [(64, 9), (37, 5), (16, 8), (3, 1)])
def test_many_rows_in_one_call_add_what_one_call_per_row_adds(hidden, rank):
    """The many-token entry point (prefill's stand-ins of small experts) adds to each row exactly what the
    one-token call adds for that row alone, for ranks that are not whole vectors of 8 too (the down pass
    reads them in whole vectors: the last expert's last row reads into the slack after the table)."""
    experts, tokens = 5, 40
    stand_ins = half_grid_stand_ins(experts, hidden, rank, seed=3)
    generator = torch.Generator().manual_seed(4)
    hidden_states = torch.randn(tokens, hidden, generator=generator)
    # Every token drops the last expert (whose rows end the table) and one other; slot 0 is kept.
    others = torch.randint(0, experts - 1, (tokens,), generator=generator)
    slots = torch.stack([others, experts + others, torch.full((tokens,), 2 * experts - 1)], dim=1)
    weights = torch.rand(tokens, 3, generator=generator)
    start = torch.randn(tokens, hidden, generator=generator)
    result = start.clone()
    assert stand_ins.add_dropped_native_rows(result, hidden_states, slots, weights, experts)
    for t in range(tokens):
        alone = start[t:t + 1].clone()
        assert stand_ins.add_dropped_native(alone, hidden_states[t:t + 1], slots[t:t + 1].contiguous(),
                                            weights[t:t + 1].contiguous(), experts)
        assert torch.equal(result[t:t + 1], alone)
        expected = loop_sum(stand_ins, start[t:t + 1], hidden_states[t:t + 1], slots[t:t + 1], weights[t:t + 1],
                            experts)
        torch.testing.assert_close(alone, expected, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("hidden,rank", [(64, 52), (40, 9), (37, 5), (16, 16), (24, 17), (3, 1)])
def test_grouped_form_adds_each_pairs_weighted_stand_in(hidden, rank):
    """The grouped form (prefill) against a float64 per-pair sum: blocks of 1 to 4 pairs of one expert and
    longer runs, hidden sizes with 16-, 8- and scalar-wide tails, ranks in whole pairs of vectors, one vector
    and a tail (read into the padding: the last expert's last row into the table's slack), kept slots and the
    plain sentinel (weight 0: nothing added), and one token's slot listed twice (both added, in separate
    blocks)."""
    experts, tokens = 5, 12
    stand_ins = half_grid_stand_ins(experts, hidden, rank, seed=5)
    generator = torch.Generator().manual_seed(6)
    # Every token drops expert 0 (12 pairs: three full blocks) and one of the others (about 3 pairs each), and
    # keeps expert (t % 5); token 0 lists its second dropped slot twice; token 3's second slot is the sentinel.
    others = 1 + torch.arange(tokens) % (experts - 1)
    slots = torch.stack([torch.arange(tokens) % experts, torch.full((tokens,), experts + 0), experts + others,
                         experts + others], dim=1)
    slots[1:, 3] = torch.arange(1, tokens) % experts  # kept, but for token 0
    slots[3, 2] = experts
    weights = torch.rand(tokens, 4, generator=generator)
    weights[3, 2] = 0.0
    hidden_states = torch.randn(tokens, hidden, generator=generator)
    start = torch.randn(tokens, hidden, generator=generator)
    result = start.clone()
    assert stand_ins.add_dropped_native_grouped(result, hidden_states, slots, weights, experts)
    expected = start.double()
    for t in range(tokens):
        for slot, w in zip(slots[t].tolist(), weights[t].double().tolist()):
            if slot >= experts and w != 0.0:
                e = slot - experts
                expected[t] += w * (stand_ins.bias[e].double()
                                    + hidden_states[t].double() @ stand_ins.down[e].double() @ stand_ins.up[e].double())
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)
    token_by_token = start.clone()
    assert stand_ins.add_dropped_native_rows(token_by_token, hidden_states, slots, weights, experts)
    torch.testing.assert_close(result, token_by_token, rtol=1e-5, atol=1e-5)
    nothing = start.clone()  # kept slots and the plain sentinel (index E, weight 0) alone
    kept_and_sentinel = torch.stack([slots[:, 0], torch.full((tokens,), experts)], dim=1)
    assert stand_ins.add_dropped_native_grouped(nothing, hidden_states, kept_and_sentinel,
                                                torch.stack([weights[:, 0], torch.zeros(tokens)], dim=1), experts)
    assert torch.equal(nothing, start)


@needs_kernel
@pytest.mark.parametrize("form", ["add_dropped_native_rows", "add_dropped_native_grouped"])
def test_many_rows_refuse_a_bad_slot_in_any_row_before_adding_to_any(form):
    """A dropped slot beyond the tables in the last row: an error, and no row has been added to (token by token
    and grouped by expert)."""
    stand_ins = half_grid_stand_ins(4, 16, 4)
    slots = torch.tensor([[4 + 1, 0]] * 5 + [[4 + 4, 0]])  # [6, 2]: row 5 names expert 4 of 4
    result = torch.zeros(6, 16)
    with pytest.raises(RuntimeError, match="names no expert of 4"):
        getattr(stand_ins, form)(result, torch.ones(6, 16), slots, torch.full((6, 2), 0.5), 4)
    assert not result.any()


@needs_kernel
def test_kernel_refuses_a_slot_beyond_its_tables():
    """A dropped slot naming expert E or beyond would read past the tables: an error, and nothing added."""
    stand_ins = half_grid_stand_ins(4, 16, 4)
    result = torch.zeros(1, 16)
    with pytest.raises(RuntimeError, match="names no expert of 4"):
        stand_ins.add_dropped_native(result, torch.ones(1, 16), torch.tensor([[4 + 1, 4 + 4]]),
                                     torch.tensor([[0.5, 0.5]]), 4)
    assert not result.any()


@needs_kernel
def test_kernel_serves_only_what_it_reads_exactly():
    """Factors off the half grid, other dtypes, autograd: the kernel declines (False, nothing added), so
    the torch forms run with the float32 values themselves."""
    off_grid = half_grid_stand_ins(4, 16, 4)
    off_grid = StandIns(off_grid.bias, off_grid.down + 1e-6, off_grid.up)
    result, hidden = torch.zeros(1, 16), torch.ones(1, 16)
    slots, weights = torch.tensor([[4 + 1]]), torch.tensor([[0.5]])
    assert not off_grid.add_dropped_native(result, hidden, slots, weights, 4)
    assert off_grid._native is None and not result.any()
    on_grid = half_grid_stand_ins(4, 16, 4)
    assert not on_grid.add_dropped_native(result.double(), hidden.double(), slots, weights.double(), 4)
    assert not on_grid.add_dropped_native(result, hidden.requires_grad_(), slots, weights, 4)
    assert not on_grid.add_dropped_native(result, torch.ones(1, 16), slots.int(), weights, 4)
    assert not result.any()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.standins_kernel.__wrapped__() is None


@needs_build
def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    """A second build of the same source with the same compiler compiles nothing; a failed build warns,
    leaves no partial file, and the torch loop serves instead (None)."""
    compiler = native._compiler()
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    folder = native._writable_cache()
    assert folder == tmp_path / "cache"
    first = native._build(compiler, folder)
    calls, run = [], subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda command, **kw: calls.append(command) or run(command, **kw))
    assert native._build(compiler, folder) == first and calls == [[compiler, "--version"]]
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo failing 1.0 && exit 0\necho 'cc: error: no' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    with pytest.warns(RuntimeWarning, match="did not build .cc: error: no.; decoding uses the torch forms instead"):
        assert native.standins_kernel.__wrapped__() is None
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [first.name]


@needs_build
def test_unwritable_cache_builds_in_a_temporary_folder_and_removes_it(tmp_path, monkeypatch):
    """A cache that cannot be written (here: a path under a file) still gives a working kernel, built in a
    private temporary folder that is gone once the library is loaded."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(native.ENV_CACHE, str(blocker / "cache"))
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path))  # where mkdtemp puts its folder
    assert native._writable_cache() is None
    assert native.standins_kernel.__wrapped__() is not None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


@pytest.mark.slow
def test_installed_package_ships_the_kernel_source():
    """CI runs the slow checks against the wheel: its runtime package must carry the C source (package
    data), or the kernel silently never runs for pip users."""
    source = native.SOURCE.read_text() if native.SOURCE.is_file() else ""
    assert "int64_t allocplan_add_dropped_f16(" in source and "int64_t allocplan_add_dropped_f16_rows(" in source
    routing = native.ROUTING_SOURCE.read_text() if native.ROUTING_SOURCE.is_file() else ""
    assert "int64_t allocplan_alloc_t_few(" in routing and "void allocplan_rewrite_few(" in routing
    experts = native.EXPERTS_SOURCE.read_text() if native.EXPERTS_SOURCE.is_file() else ""
    assert "int64_t allocplan_experts_few(" in experts
    if CAN_BUILD:
        assert standins_kernel() is not None


@needs_build
def test_no_cache_and_no_temporary_folder_means_the_torch_loop(tmp_path, monkeypatch):
    """Nowhere to build (the cache unwritable and no temporary folder to be had): one warning, no kernel,
    and no exception escapes into apply_plan."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(native.ENV_CACHE, str(blocker / "cache"))
    monkeypatch.setattr(native.tempfile, "tempdir", str(blocker / "tmp"))  # mkdtemp fails under a file
    with pytest.warns(RuntimeWarning, match="did not build"):
        assert native.standins_kernel.__wrapped__() is None
