"""``allocplan bench``: time a plan on its model, or a uniform budget on a preset shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bundled import DEFAULT_CALIBRATION
from ..errors import AllocplanError
from ..formats.plan import load_plan
from ..loading import load_model
from .breakdown import time_breakdown
from .presets import build_preset
from .timing import bench, profile_cost, solver_cost, uniform_budget_allocation

# --profile-cost measures on 2048 tokens of calibration text in windows of 256 (a preset, which has
# no tokenizer: 4 windows of random ids).
PROFILE_COST_TOKENS, PROFILE_COST_SEQ_LEN, PRESET_PROFILE_WINDOWS = 2048, 256, 4


def run_bench(
    *,
    plan: str | Path | None = None,
    model_name: str | None = None,
    preset: str | None = None,
    budget_ratio: float = 0.5,
    token_level: bool = False,
    batch: int = 1,
    prompt_len: int = 256,
    new_tokens: int = 32,
    repeat: int = 5,
    profile_cost_too: bool = False,
    solver_cost_too: bool = False,
    breakdown: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time prefill and decode without and with a plan (or a preset's uniform budget), side by side.

    Raises:
        AllocplanError: neither or both of ``plan`` and ``preset``, or bad inputs.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    if (preset is None) == (plan is None):
        raise AllocplanError("give --plan PLAN (with --model or the plan's model) or --config PRESET")
    tokenizer = None
    if preset is not None:
        model = build_preset(preset)
        allocation = uniform_budget_allocation(model, budget_ratio, token_level)
        label = f"{preset} (random init), uniform budget {budget_ratio:g}"
    else:
        loaded = load_plan(plan)
        model, tokenizer = load_model(model_name or loaded.model.name)
        allocation = loaded.allocation
        label = f"{model_name or loaded.model.name} with {plan}"
    result = {"label": label, **bench(model, allocation, batch=batch, prompt_len=prompt_len,
                                      new_tokens=new_tokens, repeat=repeat)}
    if profile_cost_too:
        if tokenizer is None:
            generator = torch.Generator().manual_seed(0)
            windows = torch.randint(0, model.get_input_embeddings().num_embeddings,
                                    (PRESET_PROFILE_WINDOWS, PROFILE_COST_SEQ_LEN), generator=generator)
        else:
            from ..planner.windows import pack_windows

            windows, _ = pack_windows(tokenizer, DEFAULT_CALIBRATION, seq_len=PROFILE_COST_SEQ_LEN,
                                      max_tokens=PROFILE_COST_TOKENS)
        result["profile_cost"] = profile_cost(model, windows)
    if solver_cost_too:
        result["solver_cost"] = solver_cost()
    if breakdown:
        result["breakdown"] = time_breakdown(model, allocation, prompt_len=prompt_len, new_tokens=new_tokens)
    return result
