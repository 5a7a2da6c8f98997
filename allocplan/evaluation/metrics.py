"""Quality and measured activations of a model under a routing policy.

Metrics, all on data the policy was not calibrated on:

* mean next-token NLL (and perplexity) over ``--data`` packed into full windows,
  in one of three modes (``EVAL_MODES``), because Alloc-T pools a layer's budget
  over the tokens of one forward and so depends on how many there are:

  - ``prefill``: fixed batches of 8 windows, one forward each (8 x seq_len tokens pooled);
  - ``decode-b1``: each window token by token through the KV cache, one sequence per
    forward (one token: Alloc-T reduces to per-layer k through the decode ledger);
  - ``decode-b8``: 8 independent windows token by token, 8 tokens per forward;

  in the decode modes the plan's ledgers restart with each group of sequences, as
  between generations, so routing is exactly what generation does. Decoding token
  by token costs one forward per token; by default the decode modes run instead
  one forward per group of windows with the plan pooling each layer's budget per
  sequence position (``PlanHandle.set_pooling("position")``), which routes every
  token exactly as token-by-token decoding does (tested equal; ``exact_decode``
  runs the real thing);
* arithmetic exact match: each line ``a+b=c`` of ``--arith`` is prompted as
  ``a+b=`` and decoded greedily until a newline, in batches with left padding;
* activations: the (token, expert) pairs reaching each layer's experts, counted
  during the NLL pass (no padding there), per token.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import AllocplanError
from ..progress import progress
from allocplan.planner.losses import next_token_logprobs, token_nll
from ..formats.strict_yaml import read_text_bounded
from ..loading import pad_token_id
from allocplan.planner.windows import check_token_ids, check_window_length, pack_windows
from allocplan.runtime.layers import input_device
from allocplan.runtime.measure import count_activations
from ..formats.config import EVAL_MODES


def _prefill_nll(model: Any, group: torch.Tensor) -> torch.Tensor:
    return token_nll(next_token_logprobs(model, group), group)  # [B, S-1]


def _pooled_decode_nll(model: Any, group: torch.Tensor) -> torch.Tensor:
    """NLL [B, S-1] from one forward over the tokens decoding feeds (all but the last)."""
    logits = model(input_ids=group[:, :-1], use_cache=False).logits  # [B, S-1, V]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -logprobs.gather(-1, group[:, 1:, None]).squeeze(-1)


def _decode_nll(model: Any, group: torch.Tensor) -> torch.Tensor:
    """Teacher-forced NLL [B, S-1], one token per sequence per forward through the KV cache."""
    cache, columns = None, []
    for position in range(group.shape[1] - 1):
        out = model(input_ids=group[:, position : position + 1], cache=cache, use_cache=True)
        cache = out.cache
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
        columns.append(-logprobs.gather(-1, group[:, position + 1, None]).squeeze(-1))  # [B]
    return torch.stack(columns, dim=1)


def nll_and_activations(model: Any, windows: torch.Tensor, handle: Any = None, mode: str = "prefill",
                        exact_decode: bool = False) -> dict:
    """Mean NLL over ``windows`` [W, S] in ``mode``, per-window NLL sums, and measured activations.

    ``window_nll`` (one sum over each window's S-1 scored tokens) is what the paired
    bootstrap of :mod:`allocplan.evaluation.compare` resamples. ``exact_decode``: decode
    token by token through the KV cache instead of the equivalent pooled forward.
    """
    if mode not in EVAL_MODES:
        raise AllocplanError(f"eval mode {mode!r} is not one of {', '.join(EVAL_MODES)}")
    decode = mode != "prefill"
    pooled = decode and not exact_decode
    per_forward = EVAL_MODES[mode]
    score = _prefill_nll if not decode else _pooled_decode_nll if pooled else _decode_nll
    sums = []
    if handle is not None:
        handle.reset()
        if pooled:
            handle.set_pooling("position")
    try:
        with torch.inference_mode(), count_activations(model) as counts:
            for group in progress(windows.split(per_forward), desc=f"eval, {mode}"):
                if handle is not None and decode:
                    handle.reset()  # a new group of sequences: a new generation for the decode ledgers
                sums.append(score(model, group).double().sum(-1))  # [B]
    finally:
        if pooled and handle is not None:
            handle.set_pooling("forward")
    window_nll = torch.cat(sums)  # [W]
    count = windows.shape[0] * (windows.shape[1] - 1)  # scored tokens
    mean = window_nll.sum().item() / count
    per_layer = counts.per_token()
    return {
        "nll": mean,
        "perplexity": math.exp(mean),
        "tokens": count,
        "window_nll": window_nll.tolist(),
        "activations_per_layer": per_layer,
        "activations_per_token": sum(per_layer.values()),
        # What runs in place of dropped experts, and everything charged: experts plus stand-ins.
        "stand_in_work_per_token": counts.stand_in_work_per_token(),
        "charged_work_per_token": sum(per_layer.values()) + counts.stand_in_work_per_token(),
    }


def read_arithmetic(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from lines ``a+b=c`` (``-``: standard input)."""
    problems = []
    for number, line in enumerate(read_text_bounded(path, "arithmetic").splitlines(), 1):
        if not line.strip():
            continue
        prompt, sep, answer = line.partition("=")
        if not sep or not answer.strip() or "=" in answer:  # one '=', an answer after it
            raise AllocplanError(f"{path}:{number}: expected a line like 12+30=42, got {line[:40]!r}")
        problems.append((prompt + "=", answer.strip()))
    if not problems:
        raise AllocplanError(f"arithmetic file {str(path)!r} holds no problems")
    return problems


def arithmetic_accuracy(model: Any, tokenizer: Any, problems: list[tuple[str, str]], handle: Any = None,
                        batch_size: int = 50, max_new_tokens: int = 6) -> float:
    """Exact-match accuracy of greedy answers."""
    # Left padding built here rather than by the tokenizer, which refuses to pad without a pad token
    # (Llama-style tokenizers have none). Padded positions are masked out, so any embedding row serves.
    pad_id = pad_token_id(tokenizer)
    pad_id = 0 if pad_id is None else pad_id
    device = input_device(model)
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        if handle is not None:
            handle.reset()
        encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt, _ in chunk]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)  # [B, W]
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded],
                                      device=device)  # [B, W]
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_id, eos_token_id=None)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        correct += sum(text.split("\n")[0].strip() == answer for text, (_, answer) in zip(texts, chunk))
    return correct / len(problems)


def evaluate(
    model: Any,
    tokenizer: Any,
    *,
    data: str | Path,
    arith: str | Path | None = None,
    handle: Any = None,
    seq_len: int = 256,
    max_tokens: int = 16384,
    mode: str = "prefill",
    exact_decode: bool = False,
) -> dict:
    """Evaluate the model as it is now (apply a policy first; pass its handle to reset ledgers).

    The NLL is measured in ``mode`` (see ``EVAL_MODES``); arithmetic always generates.
    """
    windows, record = pack_windows(tokenizer, data, max_tokens=max_tokens, seq_len=seq_len, what="eval")
    check_token_ids(windows, model)
    check_window_length(windows, model)
    problems = read_arithmetic(arith) if arith is not None else None  # read (and checked) before any work
    result = nll_and_activations(model, windows, handle, mode, exact_decode)
    result["mode"] = mode
    result["data"] = {"file": record.name, "sha256": record.sha256, "tokens": record.tokens}
    if problems is not None:
        result["arith_accuracy"] = arithmetic_accuracy(model, tokenizer, problems, handle)
        result["arith_problems"] = len(problems)
    return result
