"""Write the project's text corpora from text that ships with CPython itself.

``pydoc_data.topics`` holds the Language Reference's topic pages as plain English
prose (about 460 KB), so every machine with Python has it and nothing is
downloaded. Topics are split deterministically by their sorted position:

    data/train.txt                       training text for the bundled models, plus the
                                         standard library's longer docstrings (~1.1 MB)
    allocplan/data/calibration.txt       default calibration text for profiling: topics
                                         interleaved with tkinter's source and arithmetic
                                         problems, as the training text interleaves them
    data/eval.txt                        held-out evaluation text (never calibrated on):
                                         topics interleaved with idlelib's source, less every
                                         line of 20 or more characters that occurs anywhere in
                                         the training or calibration text

The reference models are trained on that prose, on the standard library's
top-level modules and on arithmetic problems (scripts/train_reference.py), so
calibration mirrors that mixture: after each piece of prose or code come 40
problems, as in training (drawn with their own seed, never one of the held-out
problems of data/arith_eval.txt, which score arithmetic separately). Evaluation
text mixes prose and code; arithmetic is evaluated on its own. The source of
the tkinter and idlelib packages is never part of training (packages are not
top-level modules, and their docstrings are left out of train.txt), so it is
held out like the topics. Topics repeat each other's text, though, and code repeats
common lines, so eval.txt then drops every line whose text (stripped, 20 characters or
more) occurs verbatim anywhere in train.txt, in calibration.txt or in the standard-library
source the references were trained on (scripts/train_reference.py's stdlib_source):
no long line of the evaluation text was seen in training or calibration.

Run: python scripts/make_corpus.py   (output depends only on the CPython version's files)
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path

import pydoc_data.topics

ROOT = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Packages of tests, GUIs and demos hold code-heavy or odd docstrings; leave them out of training.
SKIPPED_PACKAGES = {"test", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo"}
# Held-out source per split: (package, characters of its sorted files to take).
HELD_OUT_CODE = {"calibration": ("tkinter", 80_000), "eval": ("idlelib", 110_000)}
CHUNK = 2_000  # interleaving unit: a prefix of either file is a mix of prose and code


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings of at least ``min_chars`` from the standard library, in sorted file order."""
    found = []
    for path in sorted(STDLIB.rglob("*.py")):
        parts = path.relative_to(STDLIB).parts
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


def package_source(package: str, max_chars: int) -> str:
    """The first ``max_chars`` characters of a standard-library package's sorted source files."""
    text = "\n".join(path.read_text(encoding="utf-8") for path in sorted((STDLIB / package).glob("*.py")))
    return text[:max_chars]


def pieces(text: str) -> list[str]:
    """``text`` cut into pieces of at least CHUNK characters, each ending at a line end."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK)
        end = len(text) if end == -1 else end + 1
        out.append(text[start:end])
        start = end
    return out


def interleave(prose: str, code: str) -> str:
    """Alternate CHUNK-sized pieces of prose and code, each cut at a line end."""
    prose_pieces, code_pieces = pieces(prose), pieces(code)
    mixed = []
    for i in range(max(len(prose_pieces), len(code_pieces))):
        mixed += prose_pieces[i : i + 1] + code_pieces[i : i + 1]
    return "".join(mixed)


def calibration_arithmetic(count: int, seed: int = 7) -> list[str]:
    """Arithmetic problems like the training ones, none of them a held-out evaluation problem."""
    import random

    held_out = set((ROOT / "data" / "arith_eval.txt").read_text(encoding="utf-8").split())
    rng, lines = random.Random(seed), []
    while len(lines) < count:
        a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-")
        line = f"{a}{op}{b}={a + b if op == '+' else a - b}"
        if line not in held_out:
            lines.append(line)
    return lines


def with_arithmetic(text: str, per_piece: int = 40) -> str:
    """After every CHUNK-sized piece of ``text``, ``per_piece`` problems (training's interleaving)."""
    chunks = pieces(text)
    problems = calibration_arithmetic(per_piece * len(chunks))
    return "".join(piece + "\n".join(problems[i * per_piece : (i + 1) * per_piece]) + "\n"
                   for i, piece in enumerate(chunks))


# Lines at least this long (stripped) that occur in training or calibration text are dropped from eval.txt.
SHARED_LINE_CHARS = 20


def held_out_lines(text: str, seen: list[str]) -> tuple[str, int]:
    """``text`` without the lines whose stripped text (SHARED_LINE_CHARS or longer) occurs verbatim in any of
    ``seen``, and how many lines that dropped."""
    kept, dropped = [], 0
    for line in text.splitlines(keepends=True):
        body = line.strip()
        if len(body) >= SHARED_LINE_CHARS and any(body in other for other in seen):
            dropped += 1
            continue
        kept.append(line)
    return "".join(kept), dropped


def main() -> None:
    names = sorted(pydoc_data.topics.topics)
    splits: dict[str, list[str]] = {"train": [], "calibration": [], "eval": []}
    for position, name in enumerate(names):
        split = {3: "calibration", 7: "eval"}.get(position % 10, "train")
        splits[split].append(pydoc_data.topics.topics[name].strip() + "\n")
    splits["train"].extend(stdlib_docstrings())
    texts = {split: "\n".join(parts) for split, parts in splits.items()}
    for split, (package, chars) in HELD_OUT_CODE.items():
        texts[split] = interleave(texts[split], package_source(package, chars))
    texts["calibration"] = with_arithmetic(texts["calibration"])
    sys.path.insert(0, str(ROOT / "scripts"))
    from train_reference import stdlib_source  # the code the references were trained on

    training_code = stdlib_source(len(texts["train"]))
    texts["eval"], dropped = held_out_lines(texts["eval"], [texts["train"], texts["calibration"], training_code])
    print(f"data/eval.txt: dropped {dropped} lines shared with training or calibration text", file=sys.stderr)
    targets = {
        "train": ROOT / "data" / "train.txt",
        "calibration": ROOT / "allocplan" / "data" / "calibration.txt",
        "eval": ROOT / "data" / "eval.txt",
    }
    for split, path in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(texts[split], encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(texts[split])} characters", file=sys.stderr)


if __name__ == "__main__":
    main()
