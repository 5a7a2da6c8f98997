"""Shared fixtures: tiny checkpoints saved once per session, a small calibration file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import DENSE_FAMILIES, FAMILY_CONFIGS, save_tiny_checkpoint  # noqa: E402

# Families whose experts take (top_k_index, top_k_weights): every routing test runs on each.
FAMILIES = sorted(set(FAMILY_CONFIGS) - DENSE_FAMILIES)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Lazily saved tiny checkpoints: checkpoints(family) -> directory."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = save_tiny_checkpoint(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """Real English text (the bundled calibration file's opening), enough for 8 windows of 64 chars."""
    from allocplan.bundled import DEFAULT_CALIBRATION

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path
