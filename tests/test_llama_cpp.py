"""llama.cpp beside allocplan (allocplan.bench.llama_cpp): the parts that need no llama.cpp build."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_model

from allocplan.bench.llama_cpp import converter_path, logits_agreement


def test_converter_path_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="llama.cpp source tree"):
        converter_path(tmp_path)
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    assert converter_path(tmp_path) == tmp_path / "convert_hf_to_gguf.py"


class _FakeLlama:
    """Stands in for llama_cpp.Llama with logits_all: ``scores`` are given logits."""

    def __init__(self, scores: np.ndarray):
        self.scores, self.evaluated = scores, None

    def reset(self) -> None:
        self.evaluated = []

    def eval(self, tokens) -> None:
        self.evaluated += list(tokens)


def test_logits_agreement_by_hand():
    model = build_tiny_model("olmoe")
    ids = [3, 1, 4, 1, 5, 9]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()  # [T, V]
    shifted = logits + 0.25  # the same ranking everywhere, every logit off by 0.25
    fake = _FakeLlama(shifted)
    result = logits_agreement(fake, model, ids)
    assert fake.evaluated == ids
    assert abs(result["max_abs_logit_diff"] - 0.25) < 1e-5 and result["top1_agreement"] == 1.0
    # Swap the top token at two of the six positions: agreement 4/6.
    swapped = logits.copy()
    for t in (0, 3):
        top = logits[t].argmax()
        swapped[t, top] = logits[t].min() - 1.0
    result = logits_agreement(_FakeLlama(swapped), model, ids)
    assert abs(result["top1_agreement"] - 4 / 6) < 1e-6
