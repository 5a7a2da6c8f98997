"""llama.cpp beside allocplan: the same model, decode at half the experts, one process, same threads.

llama.cpp is what CPU users serve MoEs with, and it halves experts with
``--override-kv <arch>.expert_used_count=int:N``. This module converts a Hugging Face checkpoint
with llama.cpp's own converter (``convert_hf_to_gguf.py`` from a llama.cpp source tree), loads it
through llama-cpp-python (the ``llama`` extra, compiled from source by pip) at full and at half
expert count, and times batch-1 decode round by round beside allocplan's untouched, uniform k/2
and planned models, all on the same threads.

Two deviations from a plain ``convert_hf_to_gguf.py`` run, both stated in the report:

* The bundled references use their own byte-level BPE, whose pre-tokenizer hash is not in the
  converter's list of known ones, so the converter refuses it. The conversion names it ``gpt-2``
  instead. Decode here feeds token ids, so llama.cpp's pre-tokenizer never runs.
* llama.cpp decode is fed the next tokens of the text (teacher forcing) rather than its own
  argmax: the work per step is the same, and it keeps llama-cpp-python's sampler out of the time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Runs llama.cpp's converter with one change: an unrecognised BPE pre-tokenizer is named gpt-2.
_CONVERT = """
import runpy, sys
from pathlib import Path
converter = Path(sys.argv[1]).resolve()
sys.argv = [str(converter)] + sys.argv[2:]
sys.path.insert(0, str(converter.parent))
sys.path.insert(1, str(converter.parent / "gguf-py"))
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
runpy.run_path(str(converter), run_name="__main__")
"""


def converter_path(llama_cpp_dir: str | Path) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` in ``llama_cpp_dir``, or a ValueError naming the fix."""
    path = Path(llama_cpp_dir) / "convert_hf_to_gguf.py"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass a llama.cpp source tree (for example the"
                         " vendor/llama.cpp folder of the llama-cpp-python sdist)")
    return path


def convert_to_gguf(model_dir: str | Path, llama_cpp_dir: str | Path, out: str | Path) -> Path:
    """Convert the Hugging Face checkpoint in ``model_dir`` to a float32 GGUF file at ``out``."""
    converter = converter_path(llama_cpp_dir)
    command = [sys.executable, "-c", _CONVERT, str(converter), str(model_dir), "--outfile", str(out),
               "--outtype", "f32"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"llama.cpp's converter failed on {model_dir}: {last}")
    return Path(out)


def _llama_decode(llm: Any, prompt: list[int], steps: list[int]) -> float:
    """Seconds per step of ``steps`` single-token decode calls after ``prompt``, through the KV cache."""
    llm.reset()
    llm.eval(prompt)
    start = time.perf_counter()
    for token in steps:
        llm.eval([token])
    return (time.perf_counter() - start) / len(steps)


def logits_agreement(llm_all: Any, model: Any, ids: list[int]) -> dict[str, float]:
    """How closely the converted model reproduces the checkpoint: max |Δ logit| and top-1 agreement
    over ``ids`` (llama.cpp with every position's logits kept)."""
    llm_all.reset()
    llm_all.eval(ids)
    theirs = torch.tensor(llm_all.scores[: len(ids)], dtype=torch.float32)  # [T, V]
    with torch.inference_mode():
        ours = model(input_ids=torch.tensor([ids])).logits[0].float()  # [T, V]
    return {"max_abs_logit_diff": float((theirs - ours).abs().max()),
            "top1_agreement": float((theirs.argmax(-1) == ours.argmax(-1)).float().mean())}


def side_by_side(model: Any, gguf: str | Path, allocations: dict[str, Any], tokens: list[int], *,
                 prompt_len: int = 256, new_tokens: int = 32, repeat: int = 5, threads: int = 2) -> dict:
    """Batch-1 decode, llama.cpp at full and half expert count beside ``model`` untouched and under each
    of ``allocations`` (label -> allocation), alternating round by round on ``threads`` threads.

    ``tokens``: at least ``prompt_len + new_tokens`` ids of real text; the prompt is the first
    ``prompt_len``. Returns seconds per token per path and per-round speed-ups over each engine's
    own full-k model.
    """
    import llama_cpp  # the optional ``llama`` extra

    from allocplan.runtime.apply import apply_plan
    from allocplan.runtime.layers import find_moe_layers
    from .timing import median_spread, time_decode

    Llama = llama_cpp.Llama

    if len(tokens) < prompt_len + new_tokens:
        raise ValueError(f"need {prompt_len + new_tokens} tokens of text, got {len(tokens)}")
    torch.set_num_threads(threads)
    arch = model.config.model_type
    top_k = find_moe_layers(model)[0].top_k
    common = dict(model_path=str(gguf), n_ctx=prompt_len + new_tokens + 8, n_batch=prompt_len, n_threads=threads,
                  n_threads_batch=threads, verbose=False, seed=0)
    engines = {"llama.cpp full k": Llama(**common),
               "llama.cpp k/2": Llama(**common, kv_overrides={f"{arch}.expert_used_count": top_k // 2})}
    prompt, steps = tokens[:prompt_len], tokens[prompt_len : prompt_len + new_tokens]
    ids = torch.tensor([prompt])

    def ours(allocation: Any) -> float:
        if allocation is None:
            return time_decode(model, ids, new_tokens)
        with apply_plan(model, allocation):
            return time_decode(model, ids, new_tokens)

    paths = {**{label: (lambda llm=llm: _llama_decode(llm, prompt, steps)) for label, llm in engines.items()},
             "allocplan untouched": lambda: ours(None),
             **{f"allocplan {label}": (lambda a=a: ours(a)) for label, a in allocations.items()}}
    for measure in paths.values():  # warm-up every path
        measure()
    times: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(repeat):
        for label, measure in paths.items():
            times[label].append(measure())
    check = Llama(**{**common, "n_ctx": 72, "n_batch": 64}, logits_all=True)
    agreement = logits_agreement(check, model, prompt[:64])
    speedups = {label: median_spread([f / t for f, t in zip(times["llama.cpp full k"], times[label])])
                for label in engines}
    speedups.update({label: median_spread([f / t for f, t in zip(times["allocplan untouched"], times[label])])
                     for label in paths if label.startswith("allocplan")})
    return {"seconds_per_token": {label: median_spread(values) for label, values in times.items()},
            "speedup": speedups, "agreement": agreement, "threads": threads, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "repeat": repeat, "top_k": top_k, "half_k": top_k // 2,
            "llama_cpp_python": llama_cpp.__version__}
