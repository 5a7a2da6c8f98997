"""The house rules: data flows one way, pure modules never import torch, the CLI uses public verbs.

Read from the installed package's own files (wherever pip put planner/ and runtime/),
so the check holds for the editable and the wheel install alike.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import allocplan


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    return Path(next(iter(spec.submodule_search_locations)))


def module_files(package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``package``."""
    root = package_dir(package)
    return {
        package + ("" if path.stem == "__init__" else "." + path.stem): path
        for path in sorted(root.glob("*.py"))
    }


def imports_of(module: str, path: Path) -> set[str]:
    """Absolute names of everything ``module`` imports (relative imports resolved), at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return found


ALL = {**module_files("allocplan"), **module_files("allocplan.formats"), **module_files("allocplan.planner"),
       **module_files("allocplan.runtime"), **module_files("allocplan.evaluation"), **module_files("allocplan.bench")}

# Modules that must run without torch: data formats, solvers, registries, output formatting.
PURE = sorted(
    [name for name in ALL if name.startswith("allocplan.formats")]
    + ["allocplan", "allocplan.errors", "allocplan.bundled", "allocplan.display", "allocplan.cli", "allocplan.outputs",
       "allocplan.cli_options", "allocplan.planner.problem", "allocplan.planner.solve_dp",
       "allocplan.planner.solve_ilp", "allocplan.planner.crosscheck", "allocplan.planner.solve",
       "allocplan.runtime.families", "allocplan.evaluation.methods", "allocplan.evaluation.compare",
       "allocplan.evaluation.modes",
       "allocplan.bench.presets"]
)


def test_the_walk_found_every_package():
    assert {"allocplan.formats.plan", "allocplan.planner.profiling", "allocplan.runtime.apply",
            "allocplan.evaluation.methods", "allocplan.bench.timing", "allocplan.cli"} <= set(ALL)


@pytest.mark.parametrize("module", sorted(m for m in ALL if m.startswith("allocplan.runtime")))
def test_runtime_never_imports_the_planner(module):
    bad = {name for name in imports_of(module, ALL[module]) if name.startswith("allocplan.planner")}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", sorted(m for m in ALL if m.startswith("allocplan.formats")))
def test_formats_import_neither_side(module):
    bad = {name for name in imports_of(module, ALL[module])
           if name.startswith(("allocplan.planner", "allocplan.runtime", "torch", "transformers"))}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", sorted(m for m in ALL if m.startswith(("allocplan.planner", "allocplan.runtime"))))
def test_planner_and_runtime_use_relative_imports(module):
    # The installed name appears only in pyproject.toml: inside these packages every import
    # of allocplan's own code is relative.
    tree = ast.parse(ALL[module].read_text(encoding="utf-8"))
    absolute = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and not node.level and node.module and node.module.startswith("allocplan")]
    absolute += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names if alias.name.startswith("allocplan")]
    assert not absolute, f"{module}: {absolute}"


def test_cli_imports_only_public_verbs():
    own = {name for name in imports_of("allocplan.cli", ALL["allocplan.cli"]) if name.startswith("allocplan")}
    allowed_modules = {"allocplan", "allocplan.display", "allocplan.cli_options"}
    public = {f"allocplan.{name}" for name in allocplan.__all__}
    helpers = {f"{m}.{n}" for m in ("allocplan.display", "allocplan.cli_options") for n in ("display", "build_config",
               "config_options")}
    assert own <= allowed_modules | public | helpers, sorted(own - allowed_modules - public - helpers)
    # The verbs the CLI calls are attributes of allocplan, not reached through submodules.
    source = ALL["allocplan.cli"].read_text(encoding="utf-8")
    for submodule in ("planner", "runtime", "evaluation", "bench", "formats", "loading", "api"):
        assert f"allocplan.{submodule}" not in source


def test_pure_modules_import_without_torch(tmp_path):
    # sys.modules["torch"] = None makes any torch import fail. cwd outside the checkout:
    # `python -c` puts the cwd first on sys.path, which would import the source tree.
    code = "import sys, importlib; sys.modules['torch'] = None\n" + "".join(
        f"importlib.import_module({name!r})\n" for name in PURE
    ) + "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_violation_is_caught(tmp_path):
    # The checks above must be able to fail: a runtime module importing the planner, written
    # relatively and absolutely, is found.
    bad = tmp_path / "bad.py"
    bad.write_text("from ..planner.solve import solve_profile\nimport allocplan.planner.profiling\n")
    found = imports_of("allocplan.runtime.bad", bad)
    assert "allocplan.planner.solve" in found and "allocplan.planner.profiling" in found


def test_a_bare_checkout_imports_its_packages(tmp_path):
    # From the source tree alone (no install finder), planner/ and runtime/ import as
    # allocplan.planner and allocplan.runtime.
    checkout = Path(__file__).resolve().parent.parent
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        f"sys.path.insert(0, {str(checkout)!r})\n"
        "import allocplan, allocplan.planner.solve, allocplan.runtime.families\n"
        f"assert allocplan.planner.solve.__file__.startswith({str(checkout / 'planner')!r}), allocplan.planner.__file__\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
