"""README states no measured number that a generated page holds: what it states is a setting, a version,
or a value recorded in the repository (so nothing there can go stale while the pages move on)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
pytestmark = pytest.mark.skipif(not README.is_file(), reason="README.md is not beside the tests")


def stated_numbers(text: str) -> list[str]:
    """Every number README states with a decimal point or a percent sign (what a measurement looks like)."""
    return re.findall(r"(?<![\w.])\d+(?:\.\d+)+%?|(?<![\w.])\d+%", text)


def known_numbers() -> set[str]:
    """Settings, versions and identifiers whose source is in the repository."""
    from allocplan.formats.config import STAND_IN_SHARE

    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    env = (ROOT / "scripts" / "env.sh").read_text(encoding="utf-8")
    known = {f"{STAND_IN_SHARE:.0%}", "0.5"}  # the stand-in cap (formats/config.py); the example budget
    known |= set(re.findall(r"transformers>=(\d+\.\d+)", pyproject))
    known |= set(re.findall(r"torch==(\d+\.\d+\.\d+)", env))
    known.add("3.11")  # the Python the quick start names (CI's)
    return known


def test_readme_states_no_measured_number():
    text = README.read_text(encoding="utf-8")
    arxiv = set(re.findall(r"arXiv (\d{4}\.\d{5})", text))
    stray = [n for n in stated_numbers(text) if n not in known_numbers() and n not in arxiv]
    assert not stray, f"README states {stray}: link the page that measures them instead"


def test_readme_training_commands_are_the_recorded_ones():
    # Each reference's training command in README is the one its training.json records.
    text = README.read_text(encoding="utf-8")
    commands = re.findall(r"^(python scripts/train_reference\.py --name (\S+) .*?)\s+#", text, re.MULTILINE)
    assert {name for _, name in commands} == {"ref-dsv2", "ref-olmoe", "ref-qwen3", "ref-deep"}
    for command, name in commands:
        recorded = json.loads((ROOT / "allocplan" / "data" / "models" / name / "training.json").read_text())
        assert " ".join(command.split()) == recorded["command"], name


def test_the_check_catches_a_stale_number():
    assert stated_numbers("closes 0.74 (ref-dsv2) and adds +2.2% at 1.30x") == ["0.74", "2.2%", "1.30"]
    assert stated_numbers("arXiv 2604.08133, torch==2.13.0, 10% cap") == ["2604.08133", "2.13.0", "10%"]
