"""scripts/gpu_check.sh without a GPU: its dry run, and the page it writes from bench JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bad_inputs import console_script

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_lists_every_step_and_checks_its_inputs():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "ALLOCPLAN": " ".join(console_script())}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = [line for line in done.stdout.splitlines() if line.startswith("  ") and "CUDA available" not in line]
    assert len(steps) == 10 and "tests/test_cuda.py" in steps[0] and "make_benchmarks_gpu.py" in steps[-1]
    assert sum("--device cuda --dtype bfloat16" in step for step in steps) == 8


@pytest.mark.slow  # two bench runs of a preset
def test_page_from_bench_json(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    for level in ("--no-token-level", "--token-level"):
        done = subprocess.run([*console_script(), "bench", "--config", "mixtral-small", "--budget", "0.5", level,
                               "--batch", "1", "--prompt-len", "8", "--new-tokens", "2", "--repeat", "1",
                               "--decode-batch", "16", "-q"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        assert "decode_b16_s_per_step" in data and data["device"] == "cpu"
        (out / f"mixtral-small{level.replace('--', '_')}_b1.json").write_text(done.stdout)
    page = tmp_path / "page.md"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_benchmarks_gpu.py"), str(out), str(page)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [line for line in page.read_text().splitlines() if line.startswith("| mixtral-small")]
    assert [row.split(" | ")[1] for row in rows] == ["off", "on"] and all("bound" in row for row in rows)
