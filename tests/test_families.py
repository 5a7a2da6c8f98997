"""Every supported family: compile through the CLI, apply, count experts, restore exactly."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from conftest import FAMILIES
from tiny_models import DENSE_FAMILIES, PairRecorder

from allocplan.cli import cli
from allocplan.errors import AllocplanError
from allocplan.formats.allocation import LayerAllocation
from allocplan.formats.plan import Budget, load_plan
from allocplan.loading import load_model
from allocplan.runtime.apply import apply_plan
from allocplan.runtime.families import FAMILIES as REGISTRY
from allocplan.runtime.layers import find_moe_layers

INPUT_IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 64, 23, 11, 70, 2, 45]])


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=INPUT_IDS).logits


def experts_per_token(model) -> dict[str, set[int]]:
    """Run one forward and record how many experts each token got in every MoE layer."""
    recorder = PairRecorder(model)
    try:
        logits(model)
    finally:
        recorder.remove()
    # Sentinel slots (== num_experts) are not experts.
    return {
        layer.path: set((recorder.seen[layer.path][-1] < layer.experts.num_experts).sum(-1).tolist())
        for layer in recorder.layers
    }


SUPPORTED = [  # the 24 families the README lists, by hand
    "cohere2_moe", "dbrx", "deepseek_v2", "deepseek_v3", "dots1", "ernie4_5_moe", "flex_olmo", "gemma4_text",
    "glm4_moe", "gpt_oss", "granitemoe", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "jamba",
    "jetmoe", "llama4_text", "minimax", "mixtral", "olmoe", "qwen2_moe", "qwen3_5_moe_text", "qwen3_moe",
    "qwen3_next",
]


def test_registry_is_the_documented_list_and_each_has_a_tiny_model():
    from tiny_models import FAMILY_CONFIGS

    assert sorted(REGISTRY) == SUPPORTED
    assert sorted(FAMILY_CONFIGS) == SUPPORTED  # every family is exercised in-process


def test_jetmoe_sparse_layout_decodes_to_its_top_k():
    """The runtime's JetMoE decoding gives, per token, exactly the top-k experts of its router logits."""
    from tiny_models import build_tiny_model

    from allocplan.runtime.router_formats import jetmoe_routed_index

    model = build_tiny_model("jetmoe")
    router = find_moe_layers(model)[0].router
    hidden = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        output = router(hidden)
    logits = output[4]  # [T, E]
    expected = logits.topk(router.top_k, dim=1).indices.sort(-1).values
    assert torch.equal(jetmoe_routed_index(router, output).sort(-1).values, expected)
    assert expected.shape == (7, 4)


@pytest.fixture(scope="module")
def compiled(checkpoints, calib_file, tmp_path_factory):
    """family -> (checkpoint dir, plan path) compiled at budget 0.5 through the CLI (plain top-k)."""
    cache = {}

    def get(family):
        if family not in cache:
            ckpt = checkpoints(family)
            out = tmp_path_factory.mktemp(f"plan-{family}") / "plan.yaml"
            result = CliRunner().invoke(
                cli,
                ["compile", "--model", str(ckpt), "--budget", "0.5", "-o", str(out), "--calib", str(calib_file),
                 "--calib-tokens", "512", "--seq-len", "64", "--no-token-level"],
            )
            assert result.exit_code == 0, result.output
            cache[family] = (ckpt, out)
        return cache[family]

    return get


# Dense families (llama4) run plain per-layer top-k, which is what this module compiles.
@pytest.mark.parametrize("family", sorted([*FAMILIES, *DENSE_FAMILIES]))
def test_compile_apply_counts_and_restores(family, compiled):
    ckpt, plan_path = compiled(family)
    plan = load_plan(plan_path)
    assert plan.model.model_type == family
    assert plan.budget.total_activations == math.floor(0.5 * plan.budget.original_activations + 0.5)
    assert plan.budget.planned_activations <= plan.budget.total_activations

    model, _ = load_model(str(ckpt))
    before = logits(model)
    originals = {layer.path: {layer.top_k} for layer in find_moe_layers(model)}
    assert experts_per_token(model) == originals

    handle = apply_plan(model, plan_path)
    seen = experts_per_token(model)
    assert seen == {entry.path: {int(entry.planned_k)} for entry in plan.layers}
    with pytest.raises(AllocplanError, match="already applied"):
        apply_plan(model, plan)

    handle.remove()
    with pytest.raises(AllocplanError, match="takes a Plan, an Allocation or a plan file's path, not NoneType"):
        apply_plan(model, None)
    assert torch.equal(logits(model), before)
    assert experts_per_token(model) == originals


@pytest.mark.parametrize("family", sorted([*FAMILIES, *DENSE_FAMILIES]))
def test_full_budget_plan_is_bit_identical(family, compiled):
    ckpt, plan_path = compiled(family)
    plan = load_plan(plan_path)
    full = plan.__class__(
        **{
            **{f: getattr(plan, f) for f in plan.__dataclass_fields__},
            "layers": tuple(LayerAllocation(e.path, e.index, e.original_k, e.original_k) for e in plan.layers),
            "budget": Budget(1.0, plan.budget.original_activations, plan.budget.original_activations,
                             plan.budget.original_activations, None, None, None, None),
        }
    )
    model, _ = load_model(str(ckpt))
    before = logits(model)
    with apply_plan(model, full):
        assert torch.equal(logits(model), before)


def test_fingerprint_mismatch_names_both(compiled, checkpoints):
    _, plan_path = compiled("olmoe")
    other, _ = load_model(str(checkpoints("mixtral")))
    with pytest.raises(AllocplanError, match=r"compiled for .*olmoe.* but the model is mixtral"):
        apply_plan(other, plan_path)


def test_unknown_family_lists_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(AllocplanError, match="'llama' is not a supported MoE family; supported: .*deepseek_v2"):
        find_moe_layers(model)


def test_families_doc_matches_registry():
    from pathlib import Path

    from allocplan.runtime.families import families_markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "families.md"
    assert doc.read_text(encoding="utf-8") == families_markdown(), "regenerate: allocplan families --markdown"
