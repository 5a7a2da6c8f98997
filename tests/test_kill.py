"""kill -9 mid-compile: no partial file, and the re-run is byte-identical to an uninterrupted run."""

from __future__ import annotations

import pytest
from kill_compile import kill_mid_compile


@pytest.mark.slow  # three compiles in subprocesses: over a minute
def test_kill_9_mid_compile(checkpoints, calib_file, tmp_path):
    result = kill_mid_compile(checkpoints("olmoe"), calib_file, tmp_path)
    assert result["returncode"] == -9 and "profiled batch" in result["killed_during"]
    assert result["files_left"] == []  # not even a temporary file
    assert result["rerun_identical"]
    assert {"plan.yaml", "profile.yaml"} <= set(result["files"])
