"""llama4: per-layer top-k changes routing (with a warning that it saves nothing); Alloc-T is refused."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model, plan_for

from allocplan.errors import AllocplanError
from allocplan.runtime.apply import apply_plan
from allocplan.runtime.layers import find_moe_layers

IDS = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def routed_per_token(model):
    """Experts with a non-zero score per token, per MoE layer (llama4's router returns dense scores)."""
    seen = {}
    hooks = [
        layer.router.register_forward_hook(
            lambda _m, _a, out, path=layer.path: seen.__setitem__(path, set((out[0] > 0).sum(-1).tolist()))
        )
        for layer in find_moe_layers(model)
    ]
    with torch.inference_mode():
        logits = model(input_ids=IDS).logits
    for hook in hooks:
        hook.remove()
    return seen, logits


def test_llama4_per_layer_k_with_warning():
    model = build_tiny_model("llama4_text")
    before_counts, before = routed_per_token(model)
    assert set(map(frozenset, before_counts.values())) == {frozenset({4})}
    with pytest.warns(UserWarning, match="saves no compute"):
        handle = apply_plan(model, plan_for(model, [2, 1]))
    counts, _ = routed_per_token(model)
    assert list(counts.values()) == [{2}, {1}]
    handle.remove()
    after_counts, after = routed_per_token(model)
    assert after_counts == before_counts and torch.equal(after, before)


def test_llama4_refuses_token_level():
    model = build_tiny_model("llama4_text")
    with pytest.raises(AllocplanError, match="cannot run token-level allocation.*dense.*; compile with --no-token-level$"):
        apply_plan(model, plan_for(model, 2, token_level=True))
    assert not hasattr(model, "_allocplan_handle")


@pytest.mark.parametrize("model_type, reason", [("phimoe", "hard-codes top-2"), ("deepseek_v4", "hash-routed"), ("nllb_moe", "encoder-decoder")])
def test_unsupported_families_give_the_reason(model_type, reason):
    from allocplan.runtime.families import get_family

    with pytest.raises(AllocplanError, match=f"cannot be planned: .*{reason}.*; supported: "):
        get_family(model_type)


def test_llama4_compiles_solves_and_counts_with_plain_top_k(checkpoints, calib_file, tmp_path):
    """llama4 end to end: compile refuses Alloc-T up front naming the one flag to add; with it, profiling
    (whose MoE block returns its tokens flattened) and solve give plain top-k plans, and eval counts the
    routed pairs through the router's dense scores."""
    from click.testing import CliRunner

    from allocplan import load_plan
    from allocplan.cli import cli

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args])

    ckpt, small = checkpoints("llama4_text"), ["--calib", calib_file, "--calib-tokens", "512", "--seq-len", "64"]
    refused = run("compile", "--model", ckpt, "--budget", "0.5", "-o", tmp_path / "x.yaml", *small)
    assert refused.exit_code == 2 and refused.stderr.strip().endswith("; add --no-token-level"), refused.output
    assert not (tmp_path / "x.yaml").exists()
    result = run("compile", "--model", ckpt, "--budget", "0.5", "--no-token-level", "-o", tmp_path / "plan.yaml",
                 "--profile-out", tmp_path / "profile.yaml", *small)
    assert result.exit_code == 0, result.output
    result = run("solve", tmp_path / "profile.yaml", "--budget", "0.5", "-o", tmp_path / "solved.yaml")
    assert result.exit_code == 0, result.output
    solved = load_plan(tmp_path / "solved.yaml")
    assert not solved.token_level.enabled
    assert (tmp_path / "solved.yaml").read_bytes() == (tmp_path / "plan.yaml").read_bytes()
    result = run("eval", "--model", ckpt, "--plan", tmp_path / "plan.yaml", "--data", calib_file,
                 "--max-tokens", "256", "--seq-len", "64")
    assert result.exit_code == 0, result.output
    assert '"activations_per_token": 4.0,' in result.output, result.output  # 2 + 2 of the original 4 + 4
