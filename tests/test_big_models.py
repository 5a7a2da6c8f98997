"""Big-model loading on CPU: layers placed by a device_map, some offloaded to disk, still profile and run plans."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_tokenizer

import allocplan
from allocplan import LoadConfig, ProfileConfig

pytest.importorskip("accelerate")

CONFIG = ProfileConfig(calib_tokens=128, seq_len=64)
IDS = torch.randint(1, 90, (2, 16), generator=torch.Generator().manual_seed(4))


def split_map(checkpoint) -> dict[str, str]:
    """Embeddings and head on the CPU; decoder layers alternately on the CPU and offloaded to disk."""
    layers = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
    placement = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    placement.update({f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(layers)})
    return placement


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_profiling_with_layers_offloaded_to_disk_is_byte_identical(family, checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoint = checkpoints(family)
    whole, _ = allocplan.load_model(str(checkpoint))
    placed = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=split_map(checkpoint),
                                                  offload_folder=str(tmp_path / "offload"))
    assert set(placed.hf_device_map.values()) == {"cpu", "disk"}
    assert any(p.device.type == "meta" for p in placed.parameters())  # really offloaded
    expected = allocplan.profile_model(whole, tiny_tokenizer(), CONFIG)
    got = allocplan.profile_model(placed, tiny_tokenizer(), CONFIG)
    assert got.to_yaml() == expected.to_yaml() and got.compensation_data == expected.compensation_data
    assert expected.compensation is not None  # the stand-ins' fitting ran on offloaded experts too


def test_load_config_offload_runs_a_compensated_plan(checkpoints, tmp_path):
    """``--device-map auto --max-memory cpu=... --offload-folder``: a plan with compensation applies and
    gives the logits it gives on the model loaded whole."""
    checkpoint = checkpoints("olmoe")
    whole, tokenizer = allocplan.load_model(str(checkpoint))
    profile = allocplan.profile_model(whole, tokenizer, CONFIG)
    plan = allocplan.solve_profile(profile, 0.5)
    assert plan.compensation is not None
    load = LoadConfig(device_map="auto", max_memory="cpu=150KB", offload_folder=str(tmp_path / "offload"))
    placed, _ = allocplan.load_model(str(checkpoint), load)
    assert "disk" in set(placed.hf_device_map.values())
    with torch.inference_mode():
        with allocplan.apply_plan(whole, plan):
            expected = whole(input_ids=IDS).logits
        with allocplan.apply_plan(placed, plan):
            got = placed(input_ids=IDS).logits
        untouched = placed(input_ids=IDS).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0) and not torch.allclose(got, untouched, atol=1e-3)


@pytest.mark.parametrize("settings, message", [
    ({"max_memory": "cpu=1GiB"}, "give --device-map too"),
    ({"offload_folder": "x"}, "give --device-map too"),
    ({"device_map": "auto", "max_memory": "cpu:1GiB"}, "each item must be DEVICE=SIZE"),
])
def test_big_model_settings_are_checked(settings, message):
    with pytest.raises(allocplan.AllocplanError, match=message):
        LoadConfig(**settings)
