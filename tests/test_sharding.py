"""Sharded profiling: parts of the (layer, k) grid merge into the unsharded profile, byte for byte."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bad_inputs import console_script
from tiny_models import build_tiny_model, tiny_tokenizer

import allocplan
from allocplan import AllocplanError, ProfileConfig
from allocplan.formats.profile_part import (
    Shard,
    grid_cells,
    load_part,
    merge_parts,
    owned_cells,
    parse_shard,
    save_part,
)
from allocplan.planner.profiling import profile_part


def test_cells_are_dealt_round_robin_layer_by_layer():
    # originals (2, 3), k_min 1: cells (0,1) (0,2) (1,1) (1,2) (1,3), numbered 0..4.
    assert grid_cells([2, 3], 1, 1.0) == [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]
    assert owned_cells([2, 3], 1, 1.0, Shard(0, 2)) == {(0, 1), (1, 1), (1, 3)}
    assert owned_cells([2, 3], 1, 1.0, Shard(1, 2)) == {(0, 2), (1, 2)}
    assert owned_cells([2, 3], 2, 0.5, Shard(2, 3)) == {(1, 2.5)}  # cells (0,2) (1,2) (1,2.5) (1,3)
    assert owned_cells([2], 1, 1.0, Shard(3, 4)) == set()  # more shards than cells: an empty part is fine


@pytest.mark.parametrize("text, message", [("2/2", "0 <= index < count"), ("1-2", "must be I/N"),
                                           ("-1/2", "must be I/N"), ("a/b", "must be I/N")])
def test_bad_shard_specs(text, message):
    with pytest.raises(AllocplanError, match=message):
        parse_shard(text)


@pytest.mark.parametrize("family, count", [("olmoe", 2), ("qwen3_moe", 3), ("deepseek_v3", 4)])
def test_merged_parts_are_byte_identical_to_an_unsharded_run(family, count, tmp_path):
    model, tokenizer = build_tiny_model(family), tiny_tokenizer()
    config = ProfileConfig(calib_tokens=256, seq_len=64)
    whole = allocplan.profile_model(model, tokenizer, config)
    paths = []
    for index in reversed(range(count)):  # any order
        path = tmp_path / f"part-{index}.yaml"
        save_part(profile_part(model, tokenizer, Shard(index, count), config), path)
        paths.append(path)
    merged = allocplan.merge_profile_parts(paths, tmp_path / "merged.yaml")
    allocplan.save_profile(whole, tmp_path / "whole.yaml")
    assert (tmp_path / "merged.yaml").read_bytes() == (tmp_path / "whole.yaml").read_bytes()
    assert merged.compensation_data == whole.compensation_data
    # Each part measured only its cells: the others are 0 there, whatever the whole profile holds.
    part = load_part(paths[-1])
    for position, layer in enumerate(part.profile.layers):
        for k, value in layer.sensitivity.items():
            if (position, k) not in part.cells():
                assert value == 0.0


def test_merge_refuses_gaps_overlaps_and_strangers(tmp_path, calib_file):
    model, tokenizer = build_tiny_model("olmoe"), tiny_tokenizer()
    config = ProfileConfig(calib_tokens=128, seq_len=64, weight_fit="off", compensation="off")
    parts = [profile_part(model, tokenizer, Shard(i, 3), config) for i in range(3)]
    with pytest.raises(AllocplanError, match=r"shard\(s\) 1 of 3 are missing: the parts leave gaps"):
        merge_parts([parts[0], parts[2]])
    with pytest.raises(AllocplanError, match="shard 2/3 is given twice .* the parts overlap"):
        merge_parts([parts[0], parts[1], parts[2], parts[2]])
    other_count = profile_part(model, tokenizer, Shard(1, 2), config)
    with pytest.raises(AllocplanError, match="different shardings"):
        merge_parts([parts[0], other_count])
    other_text = profile_part(model, tokenizer, Shard(1, 3), ProfileConfig(
        calib=str(calib_file), calib_tokens=128, seq_len=64, weight_fit="off", compensation="off"))
    with pytest.raises(AllocplanError, match=r"differ at profile\.measurement\.calibration\.name"):
        merge_parts([parts[0], other_text, parts[2]])
    other_metric = profile_part(model, tokenizer, Shard(1, 3), ProfileConfig(
        calib_tokens=128, seq_len=64, weight_fit="off", compensation="off", metric="nll"))
    with pytest.raises(AllocplanError, match=r"differ at profile\.measurement\.metric"):
        merge_parts([parts[0], other_metric, parts[2]])


def _run(args, env=None, cwd=None):
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


@pytest.mark.slow  # three CLI subprocesses profiling a checkpoint
def test_cli_shards_and_merge_equal_the_unsharded_profile(checkpoints, calib_file, tmp_path):
    common = ["--model", str(checkpoints("qwen2_moe")), "--calib", str(calib_file), "--calib-tokens", "128",
              "--seq-len", "64", "-q"]
    (tmp_path / "whole").mkdir()
    whole = _run([*console_script(), "profile", *common, "-o", str(tmp_path / "whole" / "profile.yaml")])
    assert whole.returncode == 0, whole.stderr
    (tmp_path / "parts").mkdir()
    for index in range(2):
        done = _run([*console_script(), "profile", *common, "--shard", f"{index}/2",
                     "-o", str(tmp_path / "parts" / f"p{index}.yaml")])
        assert done.returncode == 0, done.stderr
    merged = _run([*console_script(), "profile", "merge", str(tmp_path / "parts" / "p1.yaml"),
                   str(tmp_path / "parts" / "p0.yaml"), "-o", str(tmp_path / "parts" / "profile.yaml")])
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "parts" / "profile.yaml").read_bytes() == (tmp_path / "whole" / "profile.yaml").read_bytes()
    gap = _run([*console_script(), "profile", "merge", str(tmp_path / "parts" / "p1.yaml"), "-o",
                str(tmp_path / "gap.yaml")])
    assert gap.returncode == 2 and gap.stderr.count("\n") == 1 and "missing" in gap.stderr
    assert not (tmp_path / "gap.yaml").exists()
    not_a_part = _run([*console_script(), "profile", "merge", str(tmp_path / "whole" / "profile.yaml"), "-o",
                       str(tmp_path / "x.yaml")])
    assert not_a_part.returncode == 2 and "not 'allocplan-profile-part'" in not_a_part.stderr


def test_shard_auto_needs_a_launcher(checkpoints, tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run([*console_script(), "profile", "--model", str(checkpoints("olmoe")), "--shard", "auto",
                           "-o", str(tmp_path / "p.yaml")], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "launch with torchrun" in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.slow  # two torchrun ranks, each a Python process importing torch
def test_torchrun_two_ranks_profile_and_rank_0_merges(checkpoints, calib_file, tmp_path):
    """``--shard auto`` under ``torchrun --nproc-per-node 2`` (gloo on CPU): the same bytes as one process."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    common = ["--model", str(checkpoints("olmoe")), "--calib", str(calib_file), "--calib-tokens", "128",
              "--seq-len", "64", "-q"]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    # torchrun gives each rank one thread; so does the single run, as float sums depend on the thread count.
    whole = _run([*console_script(), "profile", *common, "-o", str(tmp_path / "one" / "profile.yaml")],
                 env={"OMP_NUM_THREADS": "1"})
    assert whole.returncode == 0, whole.stderr
    launched = _run([torchrun, "--nproc-per-node", "2", "--master-port", "29517", "-m", "allocplan.cli", "profile",
                     *common, "--shard", "auto", "-o", str(tmp_path / "two" / "profile.yaml")],
                    env={"OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert (tmp_path / "two" / "profile.yaml").read_bytes() == (tmp_path / "one" / "profile.yaml").read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".yaml") == ["profile.yaml"]


@pytest.mark.slow  # the 16-layer reference profiled four times (whole, then three parts)
def test_deep_reference_shards_merge_byte_identical(tmp_path):
    from allocplan.bundled import bundled_model_names

    if "ref-deep" not in bundled_model_names():
        pytest.skip("bundled:ref-deep is not installed")
    model, tokenizer = allocplan.load_model("bundled:ref-deep")
    config = ProfileConfig(calib_tokens=512, seq_len=128)
    whole = allocplan.profile_model(model, tokenizer, config)
    assert len(whole.layers) == 16
    paths = []
    for index in range(3):
        path = tmp_path / f"part-{index}.yaml"
        save_part(profile_part(model, tokenizer, Shard(index, 3), config), path)
        paths.append(path)
    merged = allocplan.merge_profile_parts(paths, tmp_path / "merged.yaml")
    allocplan.save_profile(whole, tmp_path / "whole.yaml")
    assert (tmp_path / "merged.yaml").read_bytes() == (tmp_path / "whole.yaml").read_bytes()
    assert merged.compensation_data == whole.compensation_data
