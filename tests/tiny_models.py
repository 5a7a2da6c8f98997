"""Tiny random MoE models of every supported family, built in-process from config classes.

Shapes: 4 decoder layers, 8 routed experts, top-4, hidden 32, vocab 128. DeepSeek-style
families keep their first layer dense (first_k_dense_replace=1) like the real ones.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts_per_tok=4,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

_MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8)

_LINEAR_ATTENTION = dict(
    layer_types=["linear_attention", "full_attention"] * 2, linear_num_value_heads=4, linear_num_key_heads=2,
    linear_key_head_dim=8, linear_value_head_dim=8, head_dim=8,
)
_QWEN_SHARED = dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32)
_GROUPED = dict(n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
                n_group=2, topk_group=2)

# model_type -> config overrides on top of COMMON. Hybrid models keep at least one attention layer.
FAMILY_OVERRIDES = {
    "mixtral": dict(num_local_experts=8),
    "minimax": dict(num_local_experts=8, head_dim=8, layer_types=["linear_attention", "full_attention"] * 2),
    "qwen2_moe": _QWEN_SHARED,
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=32, head_dim=8),
    "qwen3_next": {**_QWEN_SHARED, **_LINEAR_ATTENTION},
    "qwen3_5_moe_text": {**_QWEN_SHARED, **_LINEAR_ATTENTION},
    "olmoe": dict(num_experts=8),
    "flex_olmo": dict(num_experts=8, pad_token_id=0),
    "deepseek_v2": dict(**_MLA, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32,
                        first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy"),
    "deepseek_v3": dict(**_MLA, **_GROUPED),
    "glm4_moe": dict(head_dim=8, **_GROUPED),
    "dots1": dict(head_dim=8, **_GROUPED),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_intermediate_size=32, moe_k=4, moe_layer_start_index=1,
                         moe_num_shared_experts=1),
    # A per-layer top-k list, which hunyuan supports natively (num_experts_per_tok would override it).
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=[4, 3, 4, 2], head_dim=8, moe_intermediate_size=32,
                           num_experts_per_tok=None),
    "jamba": dict(num_experts=8, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                  attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
                  use_mamba_kernels=False),
    "granitemoe": dict(num_local_experts=8),
    "granitemoeshared": dict(num_local_experts=8, shared_intermediate_size=32),
    "granitemoehybrid": dict(num_local_experts=8, shared_intermediate_size=32,
                             layer_types=["mamba", "attention", "mamba", "attention"], mamba_n_heads=4,
                             mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_expand=2),
    "gpt_oss": dict(num_local_experts=8, head_dim=8, layer_types=["sliding_attention", "full_attention"] * 2,
                    sliding_window=16),
    "cohere2_moe": dict(num_local_experts=8, head_dim=8),
    "gemma4_text": dict(head_dim=8, enable_moe_block=True, num_experts=8, top_k_experts=4, moe_intermediate_size=32,
                        num_experts_per_tok=None),
    "jetmoe": dict(num_local_experts=8, kv_channels=8, num_key_value_heads=2),
    "llama4_text": dict(num_local_experts=8, head_dim=8, intermediate_size=32, intermediate_size_mlp=64,
                        moe_layers=[1, 3], no_rope_layers=[1, 1, 1, 1]),
}
# Families whose experts run densely from [T, E] scores instead of (index, weight) slots.
DENSE_FAMILIES = {"llama4_text"}


def _config(model_type: str):
    if model_type == "dbrx":  # its own parameter names; default rope_theta and clip_qkv are unusable
        return CONFIG_MAPPING["dbrx"](
            vocab_size=128, d_model=32, n_layers=4, n_heads=4, max_seq_len=128, tie_word_embeddings=False,
            attn_config=dict(kv_n_heads=4, rope_theta=10000.0, clip_qkv=8.0),
            ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=4, moe_normalize_expert_weights=1.0),
        )
    overrides = {**COMMON, **FAMILY_OVERRIDES[model_type]}
    return CONFIG_MAPPING[model_type](**{k: v for k, v in overrides.items() if v is not None})


FAMILY_CONFIGS = {
    model_type: (lambda model_type=model_type: _config(model_type)) for model_type in [*FAMILY_OVERRIDES, "dbrx"]
}


def build_tiny_model(family: str, seed: int = 0):
    """A random-init tiny causal LM of ``family`` in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family]())
    # Random init leaves DeepSeek-V3's correction bias at zero and some routers near-uniform;
    # spread router weights so that routing differs clearly between tokens.
    # Experts get weights large enough that dropping one visibly changes the logits.
    for name, param in model.named_parameters():
        if name.endswith("gate.weight") and param.dim() == 2:
            torch.nn.init.normal_(param, std=0.5)
        elif ".experts." in name and (param.dim() == 3 or ".experts.mlp." in name):  # dbrx stores them flat
            torch.nn.init.normal_(param, std=0.2)
        elif name.endswith("per_expert_scale"):  # gemma4: make the per-expert multipliers matter
            torch.nn.init.uniform_(param, 0.5, 1.5)
    model.eval()
    return model


def tiny_tokenizer():
    """Character-level tokenizer over printable ASCII (101 ids, fits vocab 128)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # characters join back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<unk>", eos_token="<unk>")


def save_tiny_checkpoint(family: str, directory, seed: int = 0):
    """Save a tiny model of ``family`` and its tokenizer with save_pretrained; returns the path."""
    model = build_tiny_model(family, seed)
    model.config.eos_token_id = 0
    model.config.pad_token_id = 0
    model.config.bos_token_id = None
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = None
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def greedy_step_logits(model, ids, steps: int):
    """Logits of a forward over ``ids`` and then of ``steps`` greedy single-token forwards through the
    KV cache, concatenated along the sequence: [B, S + steps, V]."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache, logits = out.cache, [out.logits]
        for _ in range(steps):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


def plan_for(model, ks, **routing):
    """An allocation for ``model`` with the given per-layer k (one number: every layer); ``routing``
    holds RoutingConfig fields, with token-level allocation off unless asked for (plain top-k)."""
    from allocplan import RoutingConfig, allocation_for

    return allocation_for(model, ks, RoutingConfig(**{"token_level": False, **routing}))


def plan_of(allocation):
    """A plan wrapping ``allocation`` with a plain solver record and provenance (for export and
    validation tests that need a plan file rather than an allocation)."""
    from allocplan import Plan
    from allocplan.formats.plan import Budget, PlanProvenance, SolverRecord
    from allocplan.formats.provenance import CalibrationRecord

    budget = Budget(None, int(allocation.planned_activations + 0.999), allocation.original_activations,
                    allocation.planned_activations, None, None, None, None)
    provenance = PlanProvenance("0.1.0", "2.13.0", "5.24.0", "isolated", 1, "sha256:" + "0" * 64,
                                CalibrationRecord("text", "calib.txt", None, "sha256:" + "0" * 64, 64, 64, 1))
    return Plan.build(allocation, budget, SolverRecord("kl", 0.0, 0.0, "OPTIMAL", True), provenance)


class PairRecorder:
    """Records, per MoE layer and forward, the [T, K] expert index of the pairs that run.

    Slots that do not run hold ``num_experts``. Where a family's router format shows them
    (the experts' input for most, JetMoE's sparse router output) is the runtime's own
    ``RouterFormat.watch`` (its JetMoE decoding is tested on its own in test_families).
    Create it after ``apply_plan`` to see the planned routing (dbrx swaps its experts module).
    """

    def __init__(self, model):
        from allocplan.runtime.layers import find_moe_layers, model_family
        from allocplan.runtime.router_formats import ROUTER_FORMATS

        self.layers = find_moe_layers(model)
        self.seen = {layer.path: [] for layer in self.layers}
        watch = ROUTER_FORMATS[model_family(model).router_format].watch
        self.hooks = [
            watch(layer, lambda index, _num_experts, path=layer.path: self.seen[path].append(index.clone()))
            for layer in self.layers
        ]

    def remove(self):
        for hook in self.hooks:
            hook.remove()
