"""allocplan: offline allocation-planning compiler for Mixture-of-Experts LLMs.

Two verbs, like ``quantize_(model, config)``::

    plan = allocplan.compile_plan("bundled:ref-olmoe", 0.5)   # profile + solve (Alloc-L)
    allocplan.save_plan(plan, "plan.yaml")
    handle = allocplan.apply_plan(model, "plan.yaml")          # per-layer top-k, reversible
    handle.remove()                                            # bit-identical original

Settings are frozen configs (``ProfileConfig``, ``RoutingConfig``, ``LoadConfig``, ``EvalConfig``,
``BenchConfig``;
a ``Recipe`` bundles them as YAML); an ``Allocation`` built in code with
``allocation_for`` applies like a plan. Everything a user calls is importable from
here; torch-bound names are imported lazily, so ``import allocplan`` and the pure
parts (plans, profiles, configs, solvers) stay light.

Package layout: ``allocplan.formats`` (pure data), ``allocplan.runtime`` (the
shim; from ``runtime/`` in a checkout), ``allocplan.planner`` (profiling and
solvers; from ``planner/``), ``allocplan.evaluation`` and ``allocplan.bench``.
"""

from pathlib import Path as _Path
from typing import Any

# In a source checkout the design card's planner/ and runtime/ sit beside this folder;
# installed, setuptools puts them inside it. Either way they import as allocplan.planner
# and allocplan.runtime.
_CHECKOUT = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).resolve().parent / "planner").is_dir() and (_CHECKOUT / "planner" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 (the package's own __path__)

from ._version import __version__  # noqa: E402
from .errors import AllocplanError, SolverDisagreement  # noqa: E402
from .formats.allocation import Allocation  # noqa: E402
from .formats.budget import BudgetRequest  # noqa: E402
from .formats.config import (  # noqa: E402
    BenchConfig,
    EvalConfig,
    LoadConfig,
    ProfileConfig,
    Recipe,
    RefineConfig,
    RoutingConfig,
    load_recipe,
    save_recipe,
)
from .formats.plan import Plan, load_plan, save_plan  # noqa: E402
from .formats.profile import SensitivityProfile, load_profile, save_profile  # noqa: E402
from .formats.sidecar import COMPENSATION_KINDS  # noqa: E402

# Public name -> module that defines it (imported on first use).
_LAZY = {
    "compile_plan": "allocplan.api",
    "check_outputs": "allocplan.outputs",
    "diff_plans": "allocplan.formats.diff",
    "write_report": "allocplan.report",
    "check_plan_for_model": "allocplan.api",
    "generate": "allocplan.api",
    "check_prompt": "allocplan.api",
    "load_model": "allocplan.loading",
    "load_config": "allocplan.loading",
    "solve_profile": "allocplan.planner.solve",
    "profile_model": "allocplan.planner.profiling",
    "apply_plan": "allocplan.runtime.apply",
    "PlanHandle": "allocplan.runtime.apply",
    "plan_handle": "allocplan.runtime.apply",
    "export_plan": "allocplan.export",
    "from_pretrained": "allocplan.export",
    "allocation_for": "allocplan.runtime.allocation_builder",
    "FAMILIES": "allocplan.runtime.families",
    "families_markdown": "allocplan.runtime.families",
    "METHODS": "allocplan.evaluation.methods",
    "build_policy": "allocplan.evaluation.methods",
    "evaluate": "allocplan.evaluation.metrics",
    "EVAL_MODES": "allocplan.formats.config",
    "run_eval": "allocplan.evaluation.run",
    "run_bench": "allocplan.bench.run",
    "BENCH_PRESETS": "allocplan.bench.presets",
    "BENCH_PRESET_BUDGET": "allocplan.bench.presets",
    "show_progress": "allocplan.progress",
    "run_lm_eval": "allocplan.harness",
    "profile_shard": "allocplan.sharding",
    "merge_profile_parts": "allocplan.sharding",
}
_RENAMED = {"BENCH_PRESETS": "PRESETS", "BENCH_PRESET_BUDGET": "PRESET_BUDGET", "show_progress": "enable"}

__all__ = [
    "COMPENSATION_KINDS", "Allocation", "AllocplanError", "BenchConfig", "BudgetRequest", "EvalConfig", "LoadConfig",
    "Plan", "ProfileConfig", "Recipe", "RefineConfig", "RoutingConfig", "SensitivityProfile", "SolverDisagreement", "__version__", "load_plan", "load_profile",
    "load_recipe", "save_plan", "save_profile", "save_recipe", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), _RENAMED.get(name, name))
    raise AttributeError(f"module 'allocplan' has no attribute {name!r}")
