"""Paths of what ships inside the allocplan package: reference models and calibration text."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_DIR = DATA_DIR / "models"
DEFAULT_CALIBRATION = DATA_DIR / "calibration.txt"
BUNDLED_PREFIX = "bundled:"


def bundled_model_names() -> list[str]:
    """Names usable as ``bundled:<name>``."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())
