"""Write the project's text corpora from text that ships with CPython itself.

``pydoc_data.topics`` holds the Language Reference's topic pages as plain English
prose (about 460 KB), so every machine with Python has it and nothing is
downloaded. Topics are split deterministically by their sorted position:

    data/train.txt                       training text for the bundled models, plus the
                                         standard library's longer docstrings (~1.1 MB)
    allocplan/data/calibration.txt       default calibration text for profiling
    data/eval.txt                        held-out evaluation text (never calibrated on)

Run: python scripts/make_corpus.py   (output depends only on the CPython version's topics)
"""

from __future__ import annotations

import sys
from pathlib import Path

import ast
import sysconfig

import pydoc_data.topics

ROOT = Path(__file__).resolve().parent.parent
# Packages of tests, GUIs and demos hold code-heavy or odd docstrings; leave them out.
SKIPPED_PACKAGES = {"test", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo"}


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings of at least ``min_chars`` from the standard library, in sorted file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in SKIPPED_PACKAGES or "tests" in parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    found.append(doc.strip() + "\n")
    return found


def main() -> None:
    names = sorted(pydoc_data.topics.topics)
    splits: dict[str, list[str]] = {"train": [], "calibration": [], "eval": []}
    for position, name in enumerate(names):
        split = {3: "calibration", 7: "eval"}.get(position % 10, "train")
        splits[split].append(pydoc_data.topics.topics[name].strip() + "\n")
    splits["train"].extend(stdlib_docstrings())
    targets = {
        "train": ROOT / "data" / "train.txt",
        "calibration": ROOT / "allocplan" / "data" / "calibration.txt",
        "eval": ROOT / "data" / "eval.txt",
    }
    for split, path in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(splits[split])
        path.write_text(text, encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(splits[split])} topics, {len(text)} characters", file=sys.stderr)


if __name__ == "__main__":
    main()
