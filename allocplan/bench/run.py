"""``allocplan bench``: time a plan on its model, or a uniform budget on a preset shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bundled import DEFAULT_CALIBRATION
from ..errors import AllocplanError
from ..formats.config import STAND_IN_SHARE
from ..formats.plan import load_plan
from ..loading import load_model
from .breakdown import time_breakdown
from .presets import PRESET_BUDGET, build_preset
from .timing import bench, profile_cost, solver_cost, uniform_budget_allocation

# --profile-cost measures on 2048 tokens of calibration text in windows of 256 (a preset, which has
# no tokenizer: 4 windows of random ids).
PROFILE_COST_TOKENS, PROFILE_COST_SEQ_LEN, PRESET_PROFILE_WINDOWS = 2048, 256, 4


def with_compensation(model: Any, allocation: Any, kind: str, share: float = STAND_IN_SHARE) -> Any:
    """``allocation`` with stand-ins of ``kind`` for its dropped experts, fitted on random token windows;
    ``share``: the cost cap of linear stand-ins (``--compensation-share``)."""
    import dataclasses

    import torch

    from ..formats.sidecar import COMPENSATION_KINDS
    from allocplan.planner.treatments import compensation_tables, encode_tables, sidecar_dtype

    if kind not in COMPENSATION_KINDS:
        raise AllocplanError(f"compensation {kind!r} is not one of {', '.join(COMPENSATION_KINDS)}")
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.get_input_embeddings().num_embeddings, (2, 128), generator=generator)
    tables = compensation_tables(model, windows, kind, batch_size=2, share=share)
    record, data = encode_tables(tables, kind, sidecar_dtype(model))
    return dataclasses.replace(allocation, compensation=record, compensation_data=data)


def run_bench(
    *,
    plan: str | Path | None = None,
    model_name: str | None = None,
    preset: str | None = None,
    budget_ratio: float | None = None,
    token_level: bool | None = None,
    batch: int = 1,
    prompt_len: int = 256,
    new_tokens: int = 32,
    repeat: int = 5,
    profile_cost_too: bool = False,
    solver_cost_too: bool = False,
    breakdown: bool = False,
    threads: int | None = None,
    compensation: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    decode_batch: int = 8,
) -> dict[str, Any]:
    """Time prefill and decode without and with a plan (or a preset's uniform budget), side by side.

    ``budget_ratio`` and ``token_level`` (with ``preset``): its uniform plan, by default
    ``PRESET_BUDGET`` without Alloc-T. ``compensation`` (with ``preset``): also time the same
    allocation with stand-ins of that kind for its dropped experts (fitted on random tokens: their
    values do not change the time).
    ``device`` and ``dtype``: where and in what the model runs (a preset is built on the CPU
    and moved; a named model is loaded there).

    Raises:
        AllocplanError: neither or both of ``plan`` and ``preset``, a setting of the other one's, or
            bad inputs.
    """
    import torch

    if (preset is None) == (plan is None):
        raise AllocplanError("give --plan PLAN (with --model or the plan's model) or --config PRESET"
                             + (", not both" if preset is not None else ""))
    # Settings of the other kind of run are refused rather than ignored, so nobody believes they were timed.
    if preset is not None and model_name is not None:
        raise AllocplanError("--model names the trained model a --plan is timed on; --config builds its own: leave"
                             " --model out")
    if plan is not None:
        given = [flag for flag, value in (("--budget", budget_ratio), ("--token-level/--no-token-level", token_level),
                                          ("--compensation", compensation)) if value is not None]
        if given:
            raise AllocplanError(f"{given[0]} sets the uniform plan a --config preset is timed with; a --plan carries"
                                 f" its own budget, routing and compensation: leave {given[0]} out")
    if threads:
        torch.set_num_threads(threads)
    tokenizer = None
    if preset is not None:
        try:
            model = build_preset(preset).to(device=device, dtype=getattr(torch, dtype))
        except (RuntimeError, AssertionError) as exc:
            raise AllocplanError(f"cannot run on device {device!r}: {str(exc).splitlines()[0]}") from None
        budget_ratio = PRESET_BUDGET if budget_ratio is None else budget_ratio
        allocation = uniform_budget_allocation(model, budget_ratio, bool(token_level))
        label = f"{preset} (random init), uniform budget {budget_ratio:g}"
    else:
        from ..formats.config import LoadConfig

        loaded = load_plan(plan)
        model, tokenizer = load_model(model_name or loaded.model.name, LoadConfig(device=device, dtype=dtype))
        allocation = loaded.allocation
        label = f"{model_name or loaded.model.name} with {plan}"
    label += f" on {device} in {dtype}"
    variants = None
    if compensation is not None:
        variants = {f"{compensation} compensation": with_compensation(model, allocation, compensation)}
    result = {"label": label, **bench(model, allocation, batch=batch, prompt_len=prompt_len,
                                      new_tokens=new_tokens, repeat=repeat, variants=variants,
                                      decode_batch_size=decode_batch)}
    if profile_cost_too:
        if tokenizer is None:
            generator = torch.Generator().manual_seed(0)
            windows = torch.randint(0, model.get_input_embeddings().num_embeddings,
                                    (PRESET_PROFILE_WINDOWS, PROFILE_COST_SEQ_LEN), generator=generator)
        else:
            from allocplan.planner.windows import pack_windows

            windows, _ = pack_windows(tokenizer, DEFAULT_CALIBRATION, seq_len=PROFILE_COST_SEQ_LEN,
                                      max_tokens=PROFILE_COST_TOKENS)
        result["profile_cost"] = profile_cost(model, windows)
    if solver_cost_too:
        result["solver_cost"] = solver_cost()
    if breakdown:
        result["breakdown"] = time_breakdown(model, allocation, prompt_len=prompt_len, new_tokens=new_tokens)
    return result
