"""Cross-validate, on calibration text only, which (token, candidate) pairs the stand-ins are fitted on.

The numbers in planner/treatments.py's docstring ("What the stand-ins are fitted on") come from
this command. 4 folds over the bundled calibration text cut into 256-token windows: fold f holds
out the 32 windows from window 66 f and compiles the default plan at budget 0.5 on the 64 windows
after them (cyclically); the score is the gap closed on the held-out windows, (uniform - plan) /
(uniform - full) in prefill NLL. No eval text is read.

Weightings (``--weights``):
  ramp     the default: the candidate a token ranks r-th of K counts 2 r / K (treatments.ramp_weights)
  uniform  every candidate counts 1 (the rule before)
  half     the later half of each token's candidates count 1, the rest 0

``--stand-in-share S`` fits linear stand-ins of the rank that costs at most S of an expert's
multiply-adds (``--compensation-share``; the default is formats.config.STAND_IN_SHARE).
``--extra-experts J`` compiles the plan at J activations per token above budget 0.5 (the gap
stays measured against uniform at 0.5): the same extra work spent on experts instead of on stand-in
rank. Each fold also prints ``stand_in_work``, the stand-ins' multiply-adds per token over the kept
experts', as the plan's charged budget counts it (budget.stand_in_work over its planned activations).

Run:  python scripts/cv_stand_in_fit.py bundled:ref-dsv2 --weights ramp,uniform
      (one thread; per weighting about 2.5 minutes for ref-dsv2, 1.5 for ref-olmoe and 4 for ref-qwen3
      on the machine that chose the default; 2-core machines of earlier sessions were 3 times slower)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from allocplan.bundled import DEFAULT_CALIBRATION
from allocplan.evaluation.methods import build_policy
from allocplan.evaluation.metrics import nll_and_activations
from allocplan.formats.budget import BudgetRequest, round_half_up
from allocplan.formats.config import STAND_IN_SHARE, ProfileConfig
from allocplan.loading import load_model
from allocplan.planner.compile import compile_model
from allocplan.planner.treatments import DROP_WEIGHTINGS, using_drop_weighting
from allocplan.planner.windows import pack_windows
from allocplan.runtime.apply import apply_plan
from allocplan.runtime.layers import find_moe_layers

SEQ_LEN, HELD_OUT, STRIDE, BUDGET = 256, 32, 66, 0.5


def prefill_nll(model, target, windows: torch.Tensor) -> float:
    handle = apply_plan(model, target) if target is not None else None
    try:
        return nll_and_activations(model, windows, handle, "prefill")["nll"]
    finally:
        if handle is not None:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--weights", default="ramp,uniform",
                        help=f"comma-separated, of {', '.join(DROP_WEIGHTINGS)}")
    parser.add_argument("--folds", default="0,1,2,3")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--stand-in-share", type=float, default=STAND_IN_SHARE)
    parser.add_argument("--extra-experts", type=int, default=0)
    args = parser.parse_args()
    settings = ProfileConfig(compensation_share=args.stand_in_share)
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    every, record = pack_windows(tokenizer, DEFAULT_CALIBRATION, max_tokens=10**8, seq_len=SEQ_LEN)
    count = every.shape[0]
    original = sum(layer.top_k for layer in find_moe_layers(model))
    budget = BudgetRequest(activations=round_half_up(BUDGET * original) + args.extra_experts)
    means = {}
    for name in args.weights.split(","):
        closed = []
        for fold in (int(f) for f in args.folds.split(",")):
            started = time.time()
            start = STRIDE * fold
            held_out = every[start : start + HELD_OUT]
            profiled = every[[(start + HELD_OUT + i) % count for i in range(args.calib_tokens // SEQ_LEN)]]
            with using_drop_weighting(name):
                plan, _ = compile_model(model, tokenizer, budget, profile=settings, model_name=args.model,
                                        windows=(profiled, record))
            full = prefill_nll(model, None, held_out)
            uniform = prefill_nll(model, build_policy(model, "uniform", BUDGET).allocation, held_out)
            planned = prefill_nll(model, plan.allocation, held_out)
            closed.append((uniform - planned) / (uniform - full))
            print(json.dumps({"model": args.model, "weights": name, "fold": fold, "full": round(full, 6),
                              "uniform": round(uniform, 6), "plan": round(planned, 6),
                              "gap_closed": round(closed[-1], 4),
                              "stand_in_work": round(plan.budget.stand_in_work / plan.budget.planned_activations, 4),
                              "seconds": round(time.time() - started)}),
                  flush=True)
        means[name] = sum(closed) / len(closed)
    print("mean gap closed: " + ", ".join(f"{name} {value:.3f}" for name, value in means.items()))


if __name__ == "__main__":
    main()
