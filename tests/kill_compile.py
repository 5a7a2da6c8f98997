"""kill -9 in the middle of a compile: no partial file is left, and a re-run gives the same bytes.

Shared by tests/test_kill.py and scripts/make_reliability.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from bad_inputs import console_script


def compile_args(checkpoint: Path, calib: Path, out: Path) -> list[str]:
    return [*console_script(), "-v", "compile", "--model", str(checkpoint), "--calib", str(calib), "--calib-tokens",
            "512", "--seq-len", "64", "--batch-size", "2", "--budget", "0.5", "-o", str(out / "plan.yaml"),
            "--profile-out", str(out / "profile.yaml")]


def files_in(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def kill_mid_compile(checkpoint: Path, calib: Path, root: Path) -> dict:
    """Run a compile to completion, then one killed with SIGKILL once profiling has begun, then a re-run."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    reference, killed = root / "reference", root / "killed"
    reference.mkdir()
    killed.mkdir()
    done = subprocess.run(compile_args(checkpoint, calib, reference), capture_output=True, env=env)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    proc = subprocess.Popen(compile_args(checkpoint, calib, killed), stderr=subprocess.PIPE, env=env)
    seen = []
    for line in proc.stderr:  # wait until a calibration batch has been profiled: mid-compile for sure
        seen.append(line.decode(errors="replace"))
        if "profiled batch" in seen[-1]:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = files_in(killed)
    rerun = subprocess.run(compile_args(checkpoint, calib, killed), capture_output=True, env=env)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    return {"killed_during": seen[-1].strip() if seen else "", "returncode": proc.returncode,
            "files_left": sorted(left), "rerun_identical": files_in(killed) == files_in(reference),
            "files": sorted(files_in(reference))}
