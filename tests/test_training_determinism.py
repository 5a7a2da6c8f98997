"""The reference-model training script is deterministic: same command, same bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_short_training_runs_give_identical_checkpoints(tmp_path):
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "train_reference.py"), "--name", "ref-olmoe", "--steps", "3",
             "--threads", "1", "--out", str(out)],
            check=True, cwd=tmp_path, capture_output=True, timeout=600,
        )
        outputs.append(out)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name
