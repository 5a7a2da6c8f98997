"""Plans that do not depend on the machine's thread count: the planner's CPU numerics run on a fixed count.

Multi-threaded float32 matrix products on the CPU split their reductions by thread count for some
shapes (measured: bundled:ref-olmoe's planned forward under 1 and 2 threads differs by up to 1e-5
in the logits, from the experts' matmuls of one layer), so sensitivities and stand-ins measured
under different ``OMP_NUM_THREADS`` differed in their 8th digit and their files' bytes. Profiling,
fitting and refinement therefore run with ``PLANNER_THREADS`` intra-op threads on the CPU, whatever
the process was started with, and put the count back afterwards: the same inputs and library
versions give the same plan, profile and sidecar bytes under any thread count (tests/test_threads.py).
The cost is time: on 2 cores a compile takes about 1.5 times as long. ``ALLOCPLAN_PLANNER_THREADS=N``
trades that back (plans then match only plans made with the same N).

The planner also measures through the runtime's general stand-in and experts forms (``planner_numerics``):
the native forms that prefill's stand-ins and batched decode's experts use where they cost less
(``FastPaths.many_token_stand_ins``, ``FastPaths.native_few_token_experts``) give the same sums in another
float order, and a profile's bytes should not move when the runtime gains a faster form.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from ..runtime.fast_paths import using_fast_paths

ENV_THREADS = "ALLOCPLAN_PLANNER_THREADS"
PLANNER_THREADS = 1


def planner_threads() -> int:
    """The intra-op thread count the planner's CPU numerics run with."""
    value = os.environ.get(ENV_THREADS, "")
    return int(value) if value.isdigit() and int(value) > 0 else PLANNER_THREADS


def computes_on_cpu(model: Any) -> bool:
    """Whether every module of ``model`` computes on the CPU: its weights there (or offloaded to disk or
    CPU memory by a ``device_map``, on the meta device) and no accelerate hook executing elsewhere."""
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None and torch.device(f"cuda:{device}" if isinstance(device, int) else device).type != "cpu":
            return False
    return all(p.device.type in ("cpu", "meta") for p in model.parameters())


@contextlib.contextmanager
def fixed_threads(model: Any = None) -> Iterator[None]:
    """Run the block with :func:`planner_threads` intra-op threads (a model that computes on a GPU is left
    alone; one offloaded by a device_map but computing on the CPU is not)."""
    on_cpu = model is None or computes_on_cpu(model)
    saved = torch.get_num_threads()
    if on_cpu:
        torch.set_num_threads(planner_threads())
    try:
        yield
    finally:
        if on_cpu:
            torch.set_num_threads(saved)


@contextlib.contextmanager
def planner_numerics(model: Any = None) -> Iterator[None]:
    """:func:`fixed_threads`, with the runtime's general stand-in and experts forms rather than their native ones
    (module docstring): the numerics every profile, fit and refinement measures on."""
    with fixed_threads(model), using_fast_paths(many_token_stand_ins=False, native_few_token_experts=False):
        yield
