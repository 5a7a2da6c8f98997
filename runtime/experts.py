"""An experts implementation that pays only for the (token, expert) pairs that run.

transformers 5.x experts modules take ``(hidden_states [T, H], top_k_index [T, K],
top_k_weights [T, K])`` and dispatch on ``config._experts_implementation``
through ``ExpertsInterface``. Slots whose index is ``num_experts`` mean "no
expert". The stock ``grouped_mm`` path still gathers, activates, weights and
scatters all T*K rows; this one drops the sentinel slots first, groups the
surviving pairs by expert and multiplies only those rows.

Registered under the name ``allocplan_ragged``; ``apply_plan`` selects it with
``model.set_experts_implementation`` and restores the previous choice on remove.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ExpertsInterface

IMPLEMENTATION_NAME = "allocplan_ragged"


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Rows of expert e (rows[offsets[e-1]:offsets[e]]) times expert e's weight.

    Args:
        rows: [P, in] inputs grouped by expert.
        weight: [E, out, in] (or [E, in, out] when ``transposed``).
        offsets: [E] int32 cumulative row counts.
    """
    w = weight if transposed else weight.transpose(-2, -1)  # [E, in, out]
    return torch.nn.functional.grouped_mm(rows.to(w.dtype), w, offs=offsets)  # [P, out]


def ragged_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts forward over only the non-sentinel pairs (same result as ``eager``)."""
    num_tokens, num_slots = top_k_index.shape
    flat_index = top_k_index.reshape(-1)  # [T*K]
    active = (flat_index < self.num_experts).nonzero().squeeze(-1)  # [P] slot ids that run
    expert_ids, order = torch.sort(flat_index[active], stable=True)  # [P] grouped by expert
    slots = active[order]  # [P]
    tokens = slots // num_slots  # [P]
    weights = top_k_weights.reshape(-1)[slots]  # [P]
    counts = torch.bincount(expert_ids, minlength=self.num_experts)  # [E]
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # [E]

    rows = hidden_states[tokens]  # [P, H]
    if self.has_gate:
        up = grouped_matmul(rows, self.gate_up_proj, offsets, self.is_transposed)  # [P, 2I]
        if self.has_bias:
            up = up + self.gate_up_proj_bias[expert_ids]
        inner = self._apply_gate(up)  # [P, I]
    else:
        up = grouped_matmul(rows, self.up_proj, offsets, self.is_transposed)  # [P, I]
        if self.has_bias:
            up = up + self.up_proj_bias[expert_ids]
        inner = self.act_fn(up)
    out = grouped_matmul(inner, self.down_proj, offsets, self.is_transposed)  # [P, H]
    if self.has_bias:
        out = out + self.down_proj_bias[expert_ids]
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    out = out * weights[:, None].to(out.dtype)  # [P, H]
    result = torch.zeros(num_tokens, out.shape[-1], dtype=out.dtype, device=out.device)  # [T, H]
    result.index_add_(0, tokens, out)
    return result.to(hidden_states.dtype)


def register() -> str:
    """Make ``allocplan_ragged`` selectable (idempotent); returns its name."""
    if IMPLEMENTATION_NAME not in ExpertsInterface._global_mapping:
        ExpertsInterface.register(IMPLEMENTATION_NAME, ragged_experts_forward)
    return IMPLEMENTATION_NAME
