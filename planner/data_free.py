"""LExI-style data-free sensitivities: a baseline that needs no calibration text.

Each MoE block alone gets the same Gaussian input vectors; S[l, k] is the
relative squared Frobenius change of its output at top-k versus its original K,
||y_k - y_K||^2 / ||y_K||^2.
"""

from __future__ import annotations

from typing import Any

import torch

from allocplan.formats.profile import SensitivityProfile
from allocplan.formats.provenance import CalibrationRecord
from ..runtime.layers import MoELayer, find_moe_layers, model_identity, module_device
from .profiling import build_profile, rounded, top_ks
from .replay import hidden_of


def profile_data_free(model: Any, *, tokens: int = 512, seed: int = 0, k_min: int = 1) -> SensitivityProfile:
    """The data-free profile of ``model`` on ``tokens`` Gaussian inputs drawn with ``seed``."""
    layers = find_moe_layers(model)
    hidden_size = model.get_input_embeddings().embedding_dim
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(1, tokens, hidden_size, generator=generator)  # [1, N, H]

    def block_output(layer: MoELayer) -> torch.Tensor:
        # Each block where it computes (a device_map may spread the layers), in the model's dtype.
        placed = inputs.to(device=module_device(layer.block), dtype=model.dtype)
        return hidden_of(layer.block(placed)).float()  # [1, N, H]

    rows = []
    with torch.inference_mode():
        for layer in layers:
            reference = block_output(layer)
            row = {}
            for k in range(k_min, layer.top_k + 1):
                with top_ks([layer], [k]):
                    change = (block_output(layer) - reference).pow(2).sum() / reference.pow(2).sum()
                row[k] = rounded(change.item())
            rows.append(row)
    return build_profile(
        model, model_identity(model, getattr(model, "name_or_path", "") or "in-process"), rows,
        metric="output-change", strategy="data-free", k_min=k_min, k_step=1.0, token_level=False,
        weight_fit="off", compensation="off", reference_nll=0.0, hidden_size=hidden_size,
        calibration=CalibrationRecord(source="gaussian", name="gaussian", text_field=None, sha256=f"seed:{seed}",
                                      tokens=tokens, seq_len=tokens, windows=1),
    )
