"""The family registry: how each MoE model family lays out its routing, as plain data.

Keyed by ``config.model_type``. Adding a family whose layout matches an existing
one is one entry here; no modelling code is copied. Pure: no torch, so the
planner and ``allocplan validate`` can read it without loading a model.

Verified against transformers 5.24: in every family below each MoE decoder
layer holds ``<layers_path>.<i>.<block_attr>``, whose ``<router_attr>``
instance owns ``top_k`` and reads it at every forward, and whose
``<experts_attr>`` receives ``top_k_index`` of shape [T, top_k].
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from allocplan.errors import AllocplanError


@dataclass(frozen=True)
class MoEFamily:
    """Where a family keeps its MoE pieces.

    Attributes:
        model_type: ``config.model_type``.
        layers_path: dotted path from the top-level model to the decoder layer list.
        block_attr: attribute of a decoder layer holding the MoE block (dense layers hold an MLP
            there); empty when the router and experts sit on the decoder layer itself.
        router_attr: attribute of the MoE block holding the router.
        top_k_attr: attribute holding the per-forward top-k.
        top_k_on: where ``top_k_attr`` lives: ``router`` (most families), ``block`` (the MoE
            block), or ``router_config`` (a config object every layer's router shares).
        experts_attr: attribute of the MoE block holding the routed experts module.
        num_experts_keys: config keys that may hold the routed expert count, first present wins.
        top_k_keys: config keys that may hold the original top-k, first present wins.
        has_shared_experts: the block also runs always-on shared experts (outside the budget).
        selection: how the router ranks experts: a name in
            ``allocplan.runtime.scores.SELECTION_SCORES``.
        normalization: the rule by which the family rescales its chosen weights (to sum to
            one, times its scaling factor, or a p-norm): a name in
            ``allocplan.runtime.scores.NORMALIZATION_RULES``.
        scaling_attr: router attribute with the routed scaling factor, if any.
        router_format: layout of the router's output, a name in
            ``allocplan.runtime.router_formats.ROUTER_FORMATS`` (``topk`` for most).
        routing_in_block: the router returns only logits and the block picks the top-k (dbrx);
            allocplan then rewrites the experts' inputs instead of the router's output.
        experts_swap: name in ``allocplan.runtime.experts.EXPERTS_SWAPS`` of a stand-in for an
            experts module that cannot skip the "no expert" slot (swapped in and back).
        expert_scale_attr: router parameter [E] that multiplies each chosen expert's weight
            after normalisation (gemma4), if any.
        notes: what to know about the family (shown in docs/families.md).
        per_layer_top_k_key: config key that takes one top-k per decoder layer (hunyuan's
            ``moe_topk``), for ``allocplan export``; None where the config has none.
        layers_count_key: config key of the number of decoder layers.
        rewrite_unsupported: why Alloc-T and non-native weight modes cannot run on this
            family (None when they can); plain per-layer top-k still applies.
        treatments_unsupported: why fitted weight treatments and compensation of dropped
            experts cannot run on this family (None when they can).
        warning: emitted by ``apply_plan`` (e.g. when a smaller k saves no compute).
    """

    model_type: str
    num_experts_keys: tuple[str, ...]
    layers_path: str = "model.layers"
    block_attr: str = "mlp"
    router_attr: str = "gate"
    top_k_attr: str = "top_k"
    top_k_on: str = "router"
    experts_attr: str = "experts"
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok",)
    has_shared_experts: bool = False
    selection: str = "softmax"
    normalization: str = "never"
    scaling_attr: str | None = None
    expert_scale_attr: str | None = None
    router_format: str = "topk"
    routing_in_block: bool = False
    experts_swap: str | None = None
    notes: str = ""
    per_layer_top_k_key: str | None = None
    layers_count_key: str = "num_hidden_layers"
    rewrite_unsupported: str | None = None
    treatments_unsupported: str | None = None
    warning: str | None = None


_SIGMOID_GROUPED = dict(
    selection="sigmoid_bias",
    normalization="norm_topk_prob",
    scaling_attr="routed_scaling_factor",
    has_shared_experts=True,
)

FAMILIES: dict[str, MoEFamily] = {
    family.model_type: family
    for family in (
        MoEFamily("mixtral", num_experts_keys=("num_local_experts",), normalization="always"),
        MoEFamily("minimax", num_experts_keys=("num_local_experts",), normalization="always"),
        MoEFamily(
            "qwen2_moe", num_experts_keys=("num_experts",), has_shared_experts=True, normalization="norm_topk_prob"
        ),
        MoEFamily("qwen3_moe", num_experts_keys=("num_experts", "num_local_experts"), normalization="norm_topk_prob"),
        MoEFamily(
            "qwen3_next", num_experts_keys=("num_experts",), has_shared_experts=True, normalization="norm_topk_prob"
        ),
        MoEFamily("qwen3_5_moe_text", num_experts_keys=("num_experts",), has_shared_experts=True, normalization="always"),
        MoEFamily("olmoe", num_experts_keys=("num_experts",), normalization="norm_topk_prob"),
        MoEFamily("flex_olmo", num_experts_keys=("num_experts",), normalization="norm_topk_prob"),
        MoEFamily(
            "deepseek_v2",
            num_experts_keys=("n_routed_experts", "num_experts"),
            has_shared_experts=True,
            scaling_attr="routed_scaling_factor",
        ),
        MoEFamily("deepseek_v3", num_experts_keys=("n_routed_experts", "num_local_experts"), **_SIGMOID_GROUPED),
        MoEFamily("glm4_moe", num_experts_keys=("n_routed_experts",), **_SIGMOID_GROUPED),
        MoEFamily("dots1", num_experts_keys=("n_routed_experts",), **_SIGMOID_GROUPED),
        MoEFamily(
            "ernie4_5_moe",
            num_experts_keys=("moe_num_experts", "num_experts"),
            top_k_keys=("moe_k", "num_experts_per_tok"),
            has_shared_experts=True,
            selection="ernie",
            normalization="always",
        ),
        MoEFamily(
            "hunyuan_v1_moe",
            num_experts_keys=("num_experts",),
            top_k_keys=("moe_topk", "num_experts_per_tok"),
            has_shared_experts=True,
            normalization="always",
            per_layer_top_k_key="moe_topk",
            notes="per-layer moe_topk lists are read from each router's own top_k (and written by export)",
        ),
        MoEFamily("jamba", num_experts_keys=("num_experts",), block_attr="feed_forward", router_attr="router"),
        MoEFamily(
            "granitemoe", num_experts_keys=("num_local_experts",), block_attr="block_sparse_moe",
            router_attr="router", normalization="always",
        ),
        MoEFamily(
            "granitemoeshared", num_experts_keys=("num_local_experts",), block_attr="block_sparse_moe",
            router_attr="router", normalization="always", has_shared_experts=True,
        ),
        MoEFamily(
            "granitemoehybrid", num_experts_keys=("num_local_experts",), block_attr="block_sparse_moe",
            router_attr="router", normalization="always", has_shared_experts=True,
        ),
        MoEFamily(
            "gpt_oss", num_experts_keys=("num_local_experts",), router_attr="router", normalization="always",
            notes="transformers' eager experts loop has no sentinel slot; allocplan's experts implementation does",
        ),
        MoEFamily(
            "cohere2_moe", num_experts_keys=("num_local_experts", "num_experts"), selection="cohere2",
            normalization="cohere2",
        ),
        MoEFamily(
            "dbrx", num_experts_keys=("ffn_config.moe_num_experts",), top_k_keys=("ffn_config.moe_top_k",),
            layers_path="transformer.blocks", block_attr="ffn", router_attr="router", top_k_on="block",
            layers_count_key="n_layers",
            normalization="dbrx", routing_in_block=True, experts_swap="dbrx",
            notes="top-k on the block; under rewritten routing its experts module is swapped for one that"
            " skips dropped slots",
        ),
        MoEFamily(
            "jetmoe", num_experts_keys=("num_local_experts",), router_attr="router", experts_attr="input_linear",
            normalization="always", router_format="jetmoe",
            treatments_unsupported="its experts run split by size inside the MoE block, not through allocplan's"
            " experts implementation, which fits treatments and adds the compensation",
            notes="plans the MLP experts; the attention experts (MoA) keep their own routing",
        ),
        MoEFamily(
            "gemma4_text",
            num_experts_keys=("num_experts",),
            top_k_keys=("top_k_experts",),
            block_attr="",
            router_attr="router",
            top_k_attr="top_k_experts",
            top_k_on="router_config",
            selection="probs",
            normalization="always",
            expert_scale_attr="per_expert_scale",
            notes="MoE beside a dense MLP on the decoder layer; each router gets its own config copy",
        ),
        MoEFamily(
            "llama4_text",
            num_experts_keys=("num_local_experts",),
            block_attr="feed_forward",
            router_attr="router",
            has_shared_experts=True,
            router_format="dense_scores",
            rewrite_unsupported="its router returns dense [T, E] scores that scale every expert's input,"
            " with no per-slot expert index to mark as dropped",
            warning="llama4 runs every expert on every token (dense bmm): a smaller top-k changes the routing"
            " but saves no compute",
            notes="per-layer top-k only (compile with --no-token-level); no speed-up, see the warning",
        ),
    )
}

# Families transformers ships whose routing allocplan cannot (yet) change, with the reason.
UNSUPPORTED: dict[str, str] = {
    "phimoe": "its sparsemixer router hard-codes top-2 and ignores top_k, so k cannot be reduced",
    "gemma4": "load the text model (Gemma4ForCausalLM, model_type gemma4_text); the multimodal wrapper is not planned",
    "deepseek_v4": "not yet supported: hash-routed layers take experts from a fixed token table",
    "switch_transformers": "encoder-decoder with top-1 capacity routing; allocplan plans decoder-only LMs",
    "nllb_moe": "encoder-decoder with top-2 capacity routing; allocplan plans decoder-only LMs",
}

# Config fields that change which layers are MoE, how routing works, or the shapes of
# the weights. Present keys enter the fingerprint; dtype, paths and generation
# settings do not, so one plan serves every copy and precision of a model.
FINGERPRINT_KEYS: tuple[str, ...] = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "first_k_dense_replace",
    "moe_layer_freq",
    "decoder_sparse_step",
    "mlp_only_layers",
    "norm_topk_prob",
    "topk_method",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "scoring_func",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "hidden_act",
    "tie_word_embeddings",
    "moe_num_experts",
    "moe_k",
    "moe_topk",
    "moe_num_shared_experts",
    "num_shared_expert",
    "expert_layer_period",
    "expert_layer_offset",
    "layer_types",
    "shared_intermediate_size",
    "expert_selection_fn",
    "top_k_experts",
    "enable_moe_block",
    "d_model",
    "n_layers",
    "n_heads",
    "ffn_config",
    "attn_config",
    "kv_channels",
)


def get_family(model_type: str) -> MoEFamily:
    """The registry entry for ``model_type``.

    Raises:
        AllocplanError: unknown family, listing the supported ones.
    """
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(sorted(FAMILIES))
    if model_type in UNSUPPORTED:
        raise AllocplanError(f"model_type {model_type!r} cannot be planned: {UNSUPPORTED[model_type]}; supported: {supported}")
    raise AllocplanError(f"model_type {model_type!r} is not a supported MoE family; supported: {supported}")


def config_value(config: dict[str, Any], keys: tuple[str, ...], what: str) -> Any:
    """First present value among alias ``keys`` of a config dict."""
    for key in keys:
        value: Any = config
        for part in key.split("."):  # nested sub-configs, e.g. dbrx's ffn_config.moe_num_experts
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    raise AllocplanError(f"config has none of {', '.join(keys)} ({what})")


def model_fingerprint(config: dict[str, Any]) -> str:
    """``sha256:<16 hex>`` over the architecture-relevant fields of a config dict.

    Computed from ``config.to_dict()`` (or config.json) alone, so ``allocplan validate``
    can check a plan against a model without loading its weights.
    """
    relevant = {key: config[key] for key in FINGERPRINT_KEYS if key in config}
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def families_markdown() -> str:
    """docs/families.md, generated from this registry (``allocplan families --markdown``)."""
    lines = [
        "# Model families",
        "",
        "Generated from `runtime/families.py` by",
        "`allocplan families --markdown > docs/families.md`;",
        "a test checks that this file matches the registry.",
        "",
        "## Supported",
        "",
        "| model_type | MoE block | top-k lives at | selection score | normalisation | Alloc-T and weight modes | treatments and compensation | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in sorted(FAMILIES):
        f = FAMILIES[name]
        rewrite = "yes" if f.rewrite_unsupported is None else f"no: {f.rewrite_unsupported}"
        treatments = ("no (see left)" if f.rewrite_unsupported else f"no: {f.treatments_unsupported}"
                      if f.treatments_unsupported else "yes")
        notes = "; ".join(n for n in (f.notes, "shared experts outside the budget" if f.has_shared_experts else "") if n)
        block = f"{f.layers_path}.<i>" + (f".{f.block_attr}" if f.block_attr else "")
        owner = {"router": f".{f.router_attr}", "block": "", "router_config": f".{f.router_attr}.config"}[f.top_k_on]
        lines.append(
            f"| `{name}` | `{block}` | `{owner}.{f.top_k_attr}` | {f.selection}"
            f" | {f.normalization} | {rewrite} | {treatments} | {notes} |"
        )
    lines += [
        "",
        "Selection scores: `softmax` = router probabilities; `sigmoid_bias` = sigmoid plus",
        "`e_score_correction_bias` (DeepSeek-V3 style, group limits respected because candidates",
        "are the router's own top-k); `ernie` = probabilities plus `moe_statics`; `cohere2` = softmax",
        "or sigmoid as the router's `expert_selection_fn` says. Routers that pick top-k on raw",
        "logits rank candidates across tokens by their full-softmax probability.",
        "",
        "## Not supported",
        "",
        "| model_type | reason |",
        "| --- | --- |",
    ]
    lines += [f"| `{name}` | {reason} |" for name, reason in sorted(UNSUPPORTED.items())]
    return "\n".join(lines) + "\n"
