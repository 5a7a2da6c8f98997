"""allocplan: offline allocation-planning compiler for Mixture-of-Experts LLMs.

Two verbs, like ``quantize_(model, config)``::

    plan = allocplan.compile_plan("bundled:ref-olmoe", 0.5)   # profile + solve (Alloc-L)
    allocplan.save_plan(plan, "plan.yaml")
    handle = allocplan.apply_plan(model, "plan.yaml")          # per-layer top-k, reversible
    handle.remove()                                            # bit-identical original

Torch-bound names are imported lazily, so ``import allocplan`` and the pure
planner (plans, profiles, solvers) stay light.
"""

from typing import Any

from allocplan._version import __version__
from allocplan.errors import AllocplanError
from allocplan.planner.from_profile import solve_profile
from allocplan.planner.plan import Plan, load_plan, save_plan
from allocplan.planner.profile_format import SensitivityProfile, load_profile, save_profile

_LAZY = {
    "compile_plan": "allocplan.planner.compile",
    "profile_model": "allocplan.planner.profiling",
    "apply_plan": "allocplan.runtime.apply",
    "PlanHandle": "allocplan.runtime.apply",
    "load_model": "allocplan.loading",
}

__all__ = [
    "AllocplanError",
    "Plan",
    "PlanHandle",
    "SensitivityProfile",
    "__version__",
    "apply_plan",
    "compile_plan",
    "load_model",
    "load_plan",
    "load_profile",
    "profile_model",
    "save_plan",
    "save_profile",
    "solve_profile",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'allocplan' has no attribute {name!r}")
