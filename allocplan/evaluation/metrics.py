"""Quality and measured activations of a model under a routing policy.

Metrics, all on data the policy was not calibrated on:

* mean next-token NLL (and perplexity) over ``--data`` packed into full windows,
  evaluated in fixed batches of windows (Alloc-T pools the tokens of a batch);
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
from ..planner.losses import next_token_logprobs, token_nll
from ..planner.windows import pack_windows
from ..runtime.measure import count_activations


def nll_and_activations(model: Any, windows: torch.Tensor, handle: Any = None, batch_size: int = 8) -> dict:
    """Mean NLL over ``windows`` [W, S] and measured activations per token per layer."""
    total, count = 0.0, 0
    if handle is not None:
        handle.reset()
    with torch.inference_mode(), count_activations(model) as counts:
        for batch in windows.split(batch_size):
            nll = token_nll(next_token_logprobs(model, batch), batch)  # [B, S-1]
            total += nll.double().sum().item()
            count += nll.numel()
    mean = total / count
    per_layer = counts.per_token()
    return {
        "nll": mean,
        "perplexity": math.exp(mean),
        "tokens": count,
        "activations_per_layer": per_layer,
        "activations_per_token": sum(per_layer.values()),
    }


def read_arithmetic(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from lines ``a+b=c``."""
    problems = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        prompt, sep, answer = line.partition("=")
        if not sep or not answer.strip():
            raise AllocplanError(f"{path}:{number}: expected a line like 12+30=42, got {line!r}")
        problems.append((prompt + "=", answer.strip()))
    if not problems:
        raise AllocplanError(f"arithmetic file {str(path)!r} holds no problems")
    return problems


def arithmetic_accuracy(model: Any, tokenizer: Any, problems: list[tuple[str, str]], handle: Any = None,
                        batch_size: int = 50, max_new_tokens: int = 6) -> float:
    """Exact-match accuracy of greedy answers."""
    correct = 0
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            if handle is not None:
                handle.reset()
            inputs = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += sum(text.split("\n")[0].strip() == answer for text, (_, answer) in zip(texts, chunk))
    finally:
        tokenizer.padding_side = padding_side
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
    batch_size: int = 8,
) -> dict:
    """Evaluate the model as it is now (apply a policy first; pass its handle to reset ledgers)."""
    windows, record = pack_windows(tokenizer, data, max_tokens=max_tokens, seq_len=seq_len, what="eval")
    result = nll_and_activations(model, windows, handle, batch_size)
    result["data"] = {"file": record.file, "sha256": record.sha256, "tokens": record.tokens}
    if arith is not None:
        problems = read_arithmetic(arith)
        result["arith_accuracy"] = arithmetic_accuracy(model, tokenizer, problems, handle)
        result["arith_problems"] = len(problems)
    return result
