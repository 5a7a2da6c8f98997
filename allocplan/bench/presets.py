"""Randomly initialised models of named shapes, for timing without trained weights."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import AllocplanError


def _dsv2_lite_small() -> Any:
    from transformers import DeepseekV2Config

    # DeepSeek-V2-Lite's proportions at 1/4 width and half depth: hidden 2048 -> 512, routed
    # expert width 1408 -> 352 (64 experts, top-6, 2 shared), MLA with 16 heads so attention
    # keeps its ~1/16 share, 13 MoE layers after one dense layer, and a 12800 vocabulary so the
    # head keeps its share. Routed experts are then ~0.55 of the weights a token uses (V2-Lite:
    # ~0.55 by the same count).
    return DeepseekV2Config(
        vocab_size=12800, hidden_size=512, intermediate_size=1368, moe_intermediate_size=352,
        num_hidden_layers=14, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=128, q_lora_rank=None,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, head_dim=16, topk_method="greedy",
        n_group=1, topk_group=1, routed_scaling_factor=1.0, max_position_embeddings=2048,
    )


def _mixtral_small() -> Any:
    from transformers import MixtralConfig

    # Mixtral-8x7B's shape (8 experts, top-2, expert width 3.5x hidden, GQA 4:1) at hidden 512;
    # a 2048 vocabulary keeps the head's share as small as Mixtral's, so routed experts hold
    # about 0.87 of the weights a token uses (Mixtral-8x7B: about 0.88).
    return MixtralConfig(
        vocab_size=2048, hidden_size=512, intermediate_size=1792, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048,
    )


# The budget of a preset's uniform plan in ``allocplan bench --config`` when none is given.
PRESET_BUDGET = 0.5

PRESETS: dict[str, Callable[[], Any]] = {
    "dsv2-lite-small": _dsv2_lite_small,
    "mixtral-small": _mixtral_small,
}


def get_preset(name: str) -> Callable[[], Any]:
    """The config builder of preset ``name``.

    Raises:
        AllocplanError: unknown preset, listing the known ones.
    """
    if name not in PRESETS:
        raise AllocplanError(f"no preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def build_preset(name: str, seed: int = 0) -> Any:
    """A randomly initialised model of preset ``name`` in eval mode.

    Raises:
        AllocplanError: unknown preset, listing the known ones.
    """
    import torch
    from transformers import AutoModelForCausalLM

    make_config = get_preset(name)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(make_config()).eval()
