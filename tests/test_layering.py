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
       **module_files("allocplan.runtime"), **module_files("allocplan.evaluation"), **module_files("allocplan.bench"),
       **module_files("allocplan.standins"), **module_files("allocplan.weight_treatments")}

# Modules that must run without torch: data formats, solvers, registries, output formatting.
PURE = sorted(
    [name for name in ALL if name.startswith("allocplan.formats")]
    + ["allocplan", "allocplan.errors", "allocplan.registries", "allocplan.bundled", "allocplan.display", "allocplan.cli", "allocplan.outputs",
       "allocplan.cli_options", "allocplan.planner.problem", "allocplan.planner.solve_dp",
       "allocplan.planner.solve_ilp", "allocplan.planner.crosscheck", "allocplan.planner.solve",
       "allocplan.runtime.families", "allocplan.evaluation.methods", "allocplan.evaluation.compare",
       "allocplan.bench.presets", "allocplan.standins", "allocplan.standins.registry", "allocplan.standins.expert",
       "allocplan.standins.layer", "allocplan.standins.linear", "allocplan.weight_treatments",
       "allocplan.weight_treatments.registry", "allocplan.weight_treatments.gain",
       "allocplan.weight_treatments.normalizer_width"]
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


CHECKOUT = Path(__file__).resolve().parent.parent
# Where each installed package's files lie in the repository (pyproject.toml's package-dir).
REPO_DIRS = {"allocplan": CHECKOUT / "allocplan", "allocplan.planner": CHECKOUT / "planner",
             "allocplan.runtime": CHECKOUT / "runtime"}


def repository_file(module: str) -> Path:
    """The file of ``module`` in the repository (runtime.apply -> runtime/apply.py)."""
    for package in sorted(REPO_DIRS, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            rest = module[len(package):].lstrip(".").split(".") if module != package else []
            return REPO_DIRS[package].joinpath(*rest)
    raise AssertionError(module)


def relative_targets(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every relative ``from`` import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(node.level, node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]


def unresolved_relative_imports(path: Path) -> list[str]:
    """Relative imports of the repository file ``path`` that name no file or folder beside it in the
    repository: what a reviewer, or a tool reading the tree, could not follow."""
    bad = []
    for level, module in relative_targets(path):
        base = path.parent
        for _ in range(level - 1):
            base = base.parent
        target = base.joinpath(*module.split(".")) if module else base
        if not (target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()):
            bad.append("." * level + module)
    return bad


@pytest.mark.parametrize("module", sorted(ALL))
def test_every_import_resolves_in_the_repository(module):
    # planner/ and runtime/ name allocplan's own modules absolutely and each other relatively, so that
    # ..formats (which would point to a formats/ beside planner/ that does not exist) never appears.
    source = repository_file(module) / "__init__.py" if ALL[module].stem == "__init__" else \
        repository_file(module).with_suffix(".py")
    if not source.is_file():
        pytest.skip("not run from a checkout")
    assert not unresolved_relative_imports(source), f"{source}: {unresolved_relative_imports(source)}"


def test_an_unresolvable_relative_import_is_caught(tmp_path):
    (tmp_path / "planner").mkdir()
    (tmp_path / "runtime").mkdir()
    (tmp_path / "planner" / "__init__.py").write_text("")
    (tmp_path / "runtime" / "layers.py").write_text("")
    bad = tmp_path / "planner" / "bad.py"
    bad.write_text("from ..runtime.layers import x\nfrom ..formats.plan import Plan\nfrom . import bad\n")
    assert unresolved_relative_imports(bad) == ["..formats.plan"]


# ---------------------------------------------------------------- the documented layer table

ARCHITECTURE = CHECKOUT / "docs" / "architecture.md"


def documented_layers(text: str) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """From docs/architecture.md's table: layer -> its module paths, and layer -> the layers it may import."""
    body = text.split("<!-- layers: begin -->", 1)[1].split("<!-- layers: end -->", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in body.strip().splitlines()[2:]]
    paths = {row[0]: [p.strip().strip("`") for p in row[1].split(",")] for row in rows}
    allowed = {row[0]: {name.strip() for name in row[3].split(",") if name.strip() in paths} for row in rows}
    return paths, allowed


def module_of_path(path: str) -> str:
    """``planner/`` -> allocplan.planner; ``allocplan/api.py`` -> allocplan.api."""
    parts = path.rstrip("/").removesuffix(".py").split("/")
    if parts[0] in ("planner", "runtime"):
        parts = ["allocplan", *parts]
    name = ".".join(parts)
    return "allocplan" if name == "allocplan.__init__" else name


def layer_of(module: str, paths: dict[str, list[str]]) -> str | None:
    """The layer of ``module`` (the most specific documented path that holds it)."""
    best = None
    for layer, items in paths.items():
        for item in items:
            name = module_of_path(item)
            holds = module == name or (item.endswith("/") and module.startswith(name + "."))
            if holds and (best is None or len(name) > len(best[1])):
                best = (layer, name)
    return best[0] if best else None


def back_edges(modules: dict[str, Path], paths: dict[str, list[str]], allowed: dict[str, set[str]]) -> list[str]:
    """Every import of an allocplan module from a layer the importer's row does not name."""
    found = []
    for module, path in modules.items():
        own = layer_of(module, paths)
        for name in imports_of(module, path):
            target = layer_of(name, paths) if name.startswith("allocplan") else None
            if target is None and name.startswith("allocplan."):
                # "from allocplan.formats.plan import Plan" also yields "allocplan.formats.plan.Plan"
                target = layer_of(name.rsplit(".", 1)[0], paths)
            if target is not None and target != own and target not in allowed[own]:
                found.append(f"{module} ({own}) imports {name} ({target})")
    return found


PATHS, ALLOWED = documented_layers(ARCHITECTURE.read_text(encoding="utf-8")) if ARCHITECTURE.is_file() else ({}, {})
needs_docs = pytest.mark.skipif(not PATHS, reason="docs/architecture.md is not beside the tests")


@needs_docs
def test_every_module_has_a_documented_layer():
    assert {module: layer_of(module, PATHS) for module in ALL if layer_of(module, PATHS) is None} == {}
    # Every documented path names something real.
    assert all(layer_of(name, PATHS) for name in ("allocplan.loading", "allocplan.bundled", "allocplan.progress"))


@needs_docs
def test_no_module_imports_a_layer_its_row_does_not_name():
    assert back_edges(ALL, PATHS, ALLOWED) == []


@needs_docs
@pytest.mark.parametrize("source", [
    "from allocplan.planner.solve import solve_profile\n",   # formats -> planner
    "import allocplan.loading\n",                             # formats -> loading
    "from allocplan.evaluation.methods import METHODS\n",    # formats -> evaluation
])
def test_a_back_edge_from_formats_is_caught(tmp_path, source):
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    assert len(back_edges({"allocplan.formats.bad": bad}, PATHS, ALLOWED)) >= 1


@needs_docs
def test_back_edges_of_every_layer_are_caught(tmp_path):
    # The loading layer must not reach the planner, the planner not evaluation, runtime not loading.
    cases = {"allocplan.loading": "from allocplan.planner.windows import pack_windows\n",
             "allocplan.planner.bad": "from allocplan.evaluation.metrics import evaluate\n",
             "allocplan.runtime.bad": "from allocplan.loading import load_model\n",
             "allocplan.bench.bad": "from allocplan.api import compile_plan\n",
             "allocplan.errors": "from allocplan.formats.plan import Plan\n"}
    for module, source in cases.items():
        bad = tmp_path / f"{module}.py"
        bad.write_text(source)
        assert back_edges({module: bad}, PATHS, ALLOWED), module
    fine = tmp_path / "fine.py"
    fine.write_text("from ..runtime.layers import find_moe_layers\nfrom allocplan.loading import load_model\n")
    assert back_edges({"allocplan.planner.fine": fine}, PATHS, ALLOWED) == []


def test_cli_imports_only_public_verbs():
    own = {name for name in imports_of("allocplan.cli", ALL["allocplan.cli"]) if name.startswith("allocplan")}
    allowed_modules = {"allocplan", "allocplan.display", "allocplan.cli_options"}
    public = {f"allocplan.{name}" for name in allocplan.__all__}
    # The CLI layer's own helpers: every public name of cli_options (its errors, shared options and output).
    import allocplan.cli_options as cli_options

    helpers = {f"allocplan.cli_options.{name}" for name in vars(cli_options) if not name.startswith("_")}
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
