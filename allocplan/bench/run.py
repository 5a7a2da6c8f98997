"""``allocplan bench``: time a plan on its model, or a uniform budget on a preset shape."""

from __future__ import annotations

import warnings
from typing import Any

from ..bundled import DEFAULT_CALIBRATION
from ..errors import AllocplanError
from ..standins import get_stand_in_kind
from ..formats.config import STAND_IN_SHARE, BenchConfig, LoadConfig, RoutingConfig
from ..formats.plan import load_plan
from ..loading import load_model
from .breakdown import time_breakdown
from ..evaluation.methods import uniform_allocation
from .presets import PRESET_BUDGET, build_preset, get_preset
from .timing import bench, profile_cost, solver_cost

# --profile-cost measures on 2048 tokens of calibration text in windows of 256 (a preset, which has
# no tokenizer: 4 windows of random ids).
PROFILE_COST_TOKENS, PROFILE_COST_SEQ_LEN, PRESET_PROFILE_WINDOWS = 2048, 256, 4


def with_compensation(model: Any, allocation: Any, kind: str, share: float = STAND_IN_SHARE) -> Any:
    """``allocation`` with stand-ins of ``kind`` for its dropped experts, fitted on random token windows;
    ``share``: the cost cap of linear stand-ins (``--compensation-share``)."""
    import dataclasses

    import torch

    from allocplan.planner.treatments import compensation_tables, encode_tables, sidecar_dtype

    get_stand_in_kind(kind)  # an unknown kind is refused before anything is fitted
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.get_input_embeddings().num_embeddings, (2, 128), generator=generator)
    tables = compensation_tables(model, windows, kind, batch_size=2, share=share)
    record, data = encode_tables(tables, kind, sidecar_dtype(model))
    return dataclasses.replace(allocation, compensation=record, compensation_data=data)


def check_bench_inputs(config: BenchConfig) -> None:
    """Refuse a bench config that times nothing, or that gives settings of the other kind of run.

    Raises:
        AllocplanError: neither or both of ``plan`` and ``preset``, an unknown preset, or a setting of
            the other one's (refused rather than ignored, so nobody believes it was timed).
    """
    if (config.preset is None) == (config.plan is None):
        raise AllocplanError("give --plan PLAN (with --model or the plan's model) or --config PRESET"
                             + (", not both" if config.preset is not None else ""))
    if config.preset is not None:
        get_preset(config.preset)
        if config.model is not None:
            raise AllocplanError("--model names the trained model a --plan is timed on; --config builds its own:"
                                 " leave --model out")
    else:
        given = [flag for flag, value in (("--budget", config.budget),
                                          ("--token-level/--no-token-level", config.token_level),
                                          ("--compensation", config.compensation)) if value is not None]
        if given:
            raise AllocplanError(f"{given[0]} sets the uniform plan a --config preset is timed with; a --plan carries"
                                 f" its own budget, routing and compensation: leave {given[0]} out")


def slower_than_untouched(result: dict[str, Any]) -> str | None:
    """One line naming every measure where the plan's median time is above the untouched model's, or None.

    ``result`` is :func:`~allocplan.bench.timing.bench`'s: each measure holds the per-round ``speedup``
    (untouched over planned) with its median.
    """
    slower = [f"{name.removesuffix('_s').replace('_s_per_token', '').replace('_s_per_step', '').replace('_', ' ')}"
              f" {result[name]['speedup']['median']:.2f}x" for name in result.get("ideal_speedup", {})
              if result[name]["speedup"]["median"] < 1.0]
    if not slower:
        return None
    return ("allocplan: warning: the plan measures slower than the untouched model (speed-up, median of rounds): "
            + ", ".join(slower) + "; its fixed routing cost outweighs the work it saves there, so check the"
            " measure you serve with before deploying it")


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Time prefill and decode without and with a plan (or a preset's uniform budget), side by side.

    With ``config.preset``: its uniform plan at ``config.budget`` (by default ``PRESET_BUDGET``,
    without Alloc-T unless ``config.token_level``), and with ``config.compensation`` the same
    allocation again with stand-ins of that kind for its dropped experts (fitted on random tokens:
    their values do not change the time). A preset is built on the CPU and moved to
    ``config.device``; a named model is loaded there.

    Raises:
        AllocplanError: settings that do not fit together (:func:`check_bench_inputs`), or bad inputs.
    """
    import torch

    check_bench_inputs(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    tokenizer = None
    if config.preset is not None:
        try:
            model = build_preset(config.preset).to(device=config.device, dtype=getattr(torch, config.dtype))
        except (RuntimeError, AssertionError) as exc:
            raise AllocplanError(f"cannot run on device {config.device!r}: {str(exc).splitlines()[0]}") from None
        budget_ratio = PRESET_BUDGET if config.budget is None else config.budget
        allocation = uniform_allocation(model, budget_ratio, RoutingConfig() if config.token_level else None)
        label = f"{config.preset} (random init), uniform budget {budget_ratio:g}"
    else:
        loaded = load_plan(config.plan)
        name = config.model or loaded.model.name
        model, tokenizer = load_model(name, LoadConfig(device=config.device, dtype=config.dtype))
        allocation = loaded.allocation
        label = f"{name} with {config.plan}"
    label += f" on {config.device} in {config.dtype}"
    variants = None
    if config.compensation is not None:
        variants = {f"{config.compensation} compensation": with_compensation(model, allocation, config.compensation)}
    result = {"label": label, **bench(model, allocation, batch=config.batch, prompt_len=config.prompt_len,
                                      new_tokens=config.new_tokens, repeat=config.repeat, variants=variants,
                                      decode_batch_size=config.decode_batch)}
    if config.plan is not None:
        warning = slower_than_untouched(result)
        if warning is not None:
            warnings.warn(warning, stacklevel=2)
    if config.profile_cost:
        if tokenizer is None:
            generator = torch.Generator().manual_seed(0)
            windows = torch.randint(0, model.get_input_embeddings().num_embeddings,
                                    (PRESET_PROFILE_WINDOWS, PROFILE_COST_SEQ_LEN), generator=generator)
        else:
            from allocplan.planner.windows import pack_windows

            windows, _ = pack_windows(tokenizer, DEFAULT_CALIBRATION, seq_len=PROFILE_COST_SEQ_LEN,
                                      max_tokens=PROFILE_COST_TOKENS)
        result["profile_cost"] = profile_cost(model, windows)
    if config.solver_cost:
        result["solver_cost"] = solver_cost()
    if config.breakdown:
        result["breakdown"] = time_breakdown(model, allocation, prompt_len=config.prompt_len,
                                             new_tokens=config.new_tokens)
    return result
