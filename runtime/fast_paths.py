"""The short forms of batch-1 and small-batch decoding, and the one switch that turns each off (for comparisons).

Every short form gives the general form's result (bit for bit, or up to float order where its
docstring says so); they exist because at batch 1 each op's fixed cost outweighs its arithmetic.
Tests compare a short form with the general one by switching it off for a block of code::

    with using_fast_paths(one_token_experts=False):
        logits = model(ids)

The switches live in a context variable, so a block changes them for its own thread or task
only and puts them back on exit; nothing else ever changes them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class FastPaths:
    """Which short forms run (all of them unless a test switches one off).

    Attributes:
        native_top_n: Alloc-T at batch 1 (plain weights, no selector) sets the router's own top-k
            to the ledger's n instead of rewriting its output (runtime/routing.py, ``LayerRouting``).
        one_token_keep: a layer that must rewrite at batch 1 builds its keep mask and per-slot
            factors once per n instead of running the general selection (``LayerRouting``).
        one_token_experts: one token's experts on CPU without the general form's grouping
            (runtime/experts.py), where the native experts kernel does not serve them.
        one_token_stand_ins: one token's stand-ins over its K slots without ``nonzero`` and scatter
            (runtime/experts.py).
        stand_in_loop: on CPU, linear stand-ins slot by slot rather than batched over copies of all
            K slots' factors.
        native_kernel: that slot-by-slot form through the native C kernel where it can run
            (runtime/native.py; ``ALLOCPLAN_NATIVE=0`` switches it off for a whole process), and a few
            tokens' linear stand-ins through it token by token (small-batch decode).
        few_tokens_keep: on CPU, Alloc-T's selection over a few tokens (batched decode) in Python on
            the scores read back, instead of the general form's small tensor ops.
        native_few_tokens_keep: that selection, and the rewrite of a few tokens' routing, each in one call of
            the native kernel (runtime/native.py) where it can run, with the Python and torch forms' results.
        few_token_pairs: on CPU, a few tokens' pairs grouped by expert in Python on the slots read back
            (runtime/experts.py, ``few_active_pairs``), instead of the general form's small tensor ops.
        native_few_token_experts: on CPU, 1 to 16 tokens' float32 SwiGLU experts (decoding) through the native
            kernel (runtime/native.py, runtime/experts.py's ``_native_few_experts``): each pair's projections in
            one call, where ``grouped_mm`` runs one matmul per expert; the same sums up to float rounding.
        many_token_stand_ins: on CPU, more than a few tokens' linear stand-ins through the native kernel's
            grouped form (prefill; runtime/experts.py), which reads each row of an expert's half-precision
            factors once per block of its pairs. The planner switches it off: profiles and stand-ins keep the
            bytes the general form gives.
        one_copy_stand_ins: stand-ins that the native kernel serves are held once, in its half-precision
            tables, with the torch forms widening them per call (``StandIns.one_copy``); read when
            apply_plan builds them. Not a short form but a memory form: the same sums either way.
    """

    native_top_n: bool = True
    one_token_keep: bool = True
    one_token_experts: bool = True
    one_token_stand_ins: bool = True
    stand_in_loop: bool = True
    native_kernel: bool = True
    few_tokens_keep: bool = True
    native_few_tokens_keep: bool = True
    few_token_pairs: bool = True
    native_few_token_experts: bool = True
    many_token_stand_ins: bool = True
    one_copy_stand_ins: bool = True


_CURRENT: contextvars.ContextVar[FastPaths] = contextvars.ContextVar("allocplan_fast_paths", default=FastPaths())


def fast_paths() -> FastPaths:
    """The switches in force here."""
    return _CURRENT.get()


@contextlib.contextmanager
def using_fast_paths(**switches: bool) -> Iterator[FastPaths]:
    """Run a block with some short forms switched (``using_fast_paths(native_kernel=False)``).

    Raises:
        TypeError: a switch that :class:`FastPaths` does not have.
    """
    token = _CURRENT.set(dataclasses.replace(_CURRENT.get(), **switches))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)
