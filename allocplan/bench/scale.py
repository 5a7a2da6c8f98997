"""The profiling-at-scale protocol of docs/scale.md: the cost model checked on CPU, then carried to real models.

On the bench presets, the analytic cost model (:mod:`allocplan.bench.cost_model`) is checked against
FLOPs counted by torch's FlopCounterMode and against measured profiling time; the measured overheads
then scale the FLOP counts of the real models (built on the meta device from their transformers
configs: no weights, no hub). ``scripts/make_scale.py`` runs this and writes the page.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import torch

from allocplan.formats.config import ProfileConfig, RoutingConfig
from allocplan.planner.profiling import Deployment, measure_sensitivity
from allocplan.planner.treatments import compensation_tables, encode_tables, fit_treatments, sidecar_dtype
from allocplan.runtime.layers import find_moe_layers

from allocplan.planner.profiling import ANCHOR_EVERY, anchor_share

from .cost_model import (FITTING_PASSES, activation_bytes, anchored_probe_flops, anchored_streamed_bytes,
                         fitting_flops, forward_flops, layer_costs, module_flops, probe_flops, streamed_bytes)
from .presets import build_preset

CALIB_TOKENS, SEQ_LEN, BATCH = 16384, 256, 8  # ProfileConfig's defaults
# The GPU the table assumes: H100 SXM 80 GB. Peak dense bf16 989 TFLOP/s; 40% of it is an assumption for
# these prefill-shaped batches (2048 tokens), not a measurement (no GPU here).
GPU_MEMORY, GPU_PEAK, GPU_MFU = 80e9, 989e12, 0.40
PCIE_BYTES_PER_S = 25e9  # streaming offloaded weights host -> GPU (PCIe 5 x16, about half of its peak)
GPU_COUNTS = (1, 8, 64)


def real_configs() -> dict[str, tuple[object, float]]:
    """(config, bytes per weight) of the real models, from their published config.json values."""
    from transformers import DeepseekV2Config, DeepseekV3Config, Qwen3MoeConfig

    return {
        "DeepSeek-V2-Lite": (DeepseekV2Config(
            vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
            num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
            num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
            qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, topk_method="greedy", n_group=1,
            topk_group=1), 2.0),
        "Qwen3-30B-A3B": (Qwen3MoeConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
            num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
            num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]), 2.0),
        "DeepSeek-V3": (DeepseekV3Config(
            vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
            num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=3, kv_lora_rank=512, q_lora_rank=1536,
            qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_group=8, topk_group=4), 1.0),  # FP8 weights
    }


def median_time(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Median seconds of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_preset(name: str) -> dict:
    """On CPU: the cost model against counted FLOPs and measured profiling time."""
    model = build_preset(name)
    # One calibration batch: the measured ratios are per batch, and more batches only repeat them.
    windows = torch.randint(1, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    batch = 4
    costs = layer_costs(model, windows.shape[1])
    counted = module_flops(model, windows[:batch])[""] / (batch * windows.shape[1])
    predicted = forward_flops(costs)
    with torch.inference_mode():
        forward_s = median_time(lambda: [model(input_ids=b, use_cache=False) for b in windows.split(batch)])
    config = ProfileConfig(batch_size=batch, calib_tokens=windows.numel(), seq_len=windows.shape[1])
    plain = Deployment(RoutingConfig(token_level=False))
    probes_s = median_time(lambda: measure_sensitivity(model, windows, config, plain))

    def fitting() -> None:
        layers = find_moe_layers(model)
        tables = compensation_tables(model, windows, "linear", batch, None)
        encode_tables(tables, "linear", sidecar_dtype(model))
        grid = {layer.path: list(range(1, layer.top_k + 1)) for layer in layers}
        fit_treatments(model, windows, grid, RoutingConfig(token_level=False), tables, batch)

    fitting_s = median_time(fitting)
    per_forward = forward_flops(costs)
    return {
        "preset": name, "flops_counted": counted, "flops_model": predicted,
        "forward_s": forward_s, "probes_s": probes_s, "fitting_s": fitting_s,
        # forward-equivalents: measured time over one reference forward's time, against the model's FLOP ratio
        "probes_fe_measured": probes_s / forward_s - 1,  # measure_sensitivity also runs the reference forward
        # The probes measured here run without stand-ins: one probe per (layer, k), as the model must count.
        "probes_fe_model": probe_flops({**costs, "options": 1}) / per_forward,
        "fitting_fe_measured": fitting_s / forward_s, "fitting_fe_model": fitting_flops(costs) / per_forward,
    }


def estimate(name: str, config: Any, weight_bytes: float, overhead: dict) -> dict:
    """A real model's profiling cost on 1, 8 and 64 GPUs, from its config (meta device) and the measured
    overheads."""
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    costs = layer_costs(model, SEQ_LEN)
    tokens, batches = CALIB_TOKENS, CALIB_TOKENS // (BATCH * SEQ_LEN)
    forward = forward_flops(costs) * tokens
    shared = forward + fitting_flops(costs) * tokens * overhead["fitting"]  # every shard repeats these
    probes = probe_flops(costs) * tokens * overhead["probes"]
    rate = GPU_PEAK * GPU_MFU
    weights = costs["params"] * weight_bytes
    activations = activation_bytes(costs, BATCH, SEQ_LEN)
    per_replica = math.ceil((weights * 1.1 + activations) / GPU_MEMORY)
    share = anchor_share(batches)  # the batches the anchored strategy's anchors run on
    anchored = anchored_probe_flops(costs, anchor_share=share) * tokens * overhead["probes"]

    def gpu_rows(probes: float, streamed: float) -> dict:
        rows = {}
        for gpus in GPU_COUNTS:
            replicas = gpus // per_replica
            if replicas:
                # A replica spread over several GPUs by a device_map runs its layers one GPU at a time.
                seconds = (shared + probes / replicas) / rate
                rows[gpus] = {"hours": seconds / 3600, "replicas": replicas, "how": f"{replicas} shard(s)"
                              + (f" of {per_replica} GPUs each" if per_replica > 1 else "")}
            else:
                # Offloaded: a layer's weights cross PCIe each time it runs; GPUs split the probes.
                seconds = max((shared + probes) / (rate * gpus), batches * streamed / (PCIE_BYTES_PER_S * gpus))
                rows[gpus] = {"hours": seconds / 3600, "replicas": 0,
                              "how": f"offloaded, PCIe-bound: a copy needs {per_replica} GPUs"}
        return rows

    return {"model": name, "params_b": costs["params"] / 1e9, "weight_gb": weights / 1e9,
            "activations_gb": activations / 1e9, "gpus_per_copy": per_replica,
            "forward_tflop": forward / 1e12, "probe_forward_equivalents": probe_flops(costs) / forward_flops(costs),
            "rows": gpu_rows(probes, streamed_bytes(costs, weight_bytes)),
            "anchored": {"probe_forward_equivalents": anchored_probe_flops(costs, anchor_share=share)
                         / forward_flops(costs),
                         "rows": gpu_rows(anchored, anchored_streamed_bytes(costs, weight_bytes, share))}}


def duration(seconds: float) -> str:
    """Two significant figures, in the unit a reader expects for the size."""
    if seconds < 120:
        return f"{seconds:.2g} s"
    if seconds < 7200:
        return f"{seconds / 60:.2g} min"
    return f"{seconds / 3600:.2g} h"


def render(data: dict) -> str:
    """docs/scale.md for ``data`` (presets measured, overheads, estimates)."""
    lines = ["# Profiling at scale: sharding, big models, and what a compile costs", "",
             "Generated by `python scripts/make_scale.py` (cost model checked on this machine's CPU: "
             f"{data['machine']}); every number below comes from that run (JSON: docs/scale.json).", "",
             "## Sharding the (layer, k) grid", "",
             "Once a calibration batch has run through the untouched model, every (layer, k) cell of S is measured on",
             "its own. `allocplan profile --shard I/N` measures the cells of shard I (cells numbered layer by layer,",
             "k ascending; cell j belongs to shard j mod N) and writes a part; `allocplan profile merge` checks the",
             "parts (same model, calibration text, settings and software; each shard once: no gaps, no overlaps) and",
             "writes the profile an unsharded run writes, byte for byte (tests/test_sharding.py). Every shard",
             "repeats the reference forward and the treatment and compensation fitting; only the probes split.",
             "Shards must run with the same torch build, device type and thread count: float sums differ in",
             "their last digits otherwise, and merge refuses parts whose shared fields differ.", "",
             "One node, every GPU (torchrun, or accelerate launch):", "", "```bash",
             "torchrun --nproc-per-node 8 -m allocplan.cli profile --model deepseek-ai/DeepSeek-V2-Lite \\",
             "    --device cuda --shard auto -o profiles/dsv2-lite.yaml      # rank r uses cuda:r; rank 0 merges",
             "```", "", "Across nodes, as a Slurm job array (a shared file system for the parts):", "", "```bash",
             "#!/bin/bash", "#SBATCH --array=0-63 --gres=gpu:1", "allocplan profile --model Qwen/Qwen3-30B-A3B "
             "--device cuda \\", "    --shard $SLURM_ARRAY_TASK_ID/64 -o parts/part-$SLURM_ARRAY_TASK_ID.yaml", "",
             "# then, once the array is done (sbatch --dependency=afterok:<array job id>):",
             "allocplan profile merge parts/part-*.yaml -o profiles/qwen3-30b-a3b.yaml", "```", "",
             "Ray or any job queue works the same way: one task per shard, one merge.", "",
             "## Big models", "",
             "`--device-map auto` (accelerate) places the layers over the GPUs, CPU memory and disk, with",
             "`--max-memory 0=70GiB,cpu=200GiB` caps and `--offload-folder DIR`; `--dtype` is `auto` by default, so",
             "a bf16 checkpoint stays bf16. Profiling runs on such a model as it is: each probe calls the layers",
             "through their modules, so accelerate's hooks bring offloaded weights in, and the code that runs expert",
             "math directly (the stand-ins' fitting) opens the same window itself. tests/test_big_models.py",
             "profiles tiny models with every other layer offloaded to disk and gets the same bytes as the model",
             "loaded whole, and runs a compensated plan on one.", "",
             "Memory bound of profiling, beyond the weights: per calibration batch it holds every decoder layer's",
             "output and every MoE block's input and output (the prefix activations that let a probe re-run only",
             "the layers after it), the reference's log-probabilities and probabilities, and one probe's logits,",
             "log-probabilities and KL terms: (L + 2·L_moe) · B · S · H · 2 bytes + 5 · B · S · V · 4 bytes.",
             "Lower `--batch-size` to shrink it.", "",
             "## The cost model, checked on CPU", "",
             "Per calibration batch: one reference forward; for each MoE layer and each k below its K, the layer's",
             "routed experts at k plus every later decoder layer and the head; the compensation"
             + (", drop-order" if FITTING_PASSES == 3 else "") + " and treatment",
             "passes (a captured forward each, plus every candidate's expert output). In forward-equivalents",
             "(time, or FLOPs, over one forward's), on the bench presets with random weights:", "",
             "| preset | FLOPs/token counted | model | probes measured | model | fitting measured | model |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in data["presets"]:
        lines.append(f"| {row['preset']} | {row['flops_counted'] / 1e6:.1f} M | {row['flops_model'] / 1e6:.1f} M |"
                     f" {row['probes_fe_measured']:.1f} | {row['probes_fe_model']:.1f} |"
                     f" {row['fitting_fe_measured']:.1f} | {row['fitting_fe_model']:.1f} |")
    overhead = data["overhead"]
    lines += ["", f"The estimates below multiply the model's probe FLOPs by {overhead['probes']:.2f} and its fitting",
              f"FLOPs by {overhead['fitting']:.2f}, the largest measured-to-model ratios above (CPU overheads: the",
              "Python loop, routing hooks and gathers; a GPU's may differ). The fitting passes are the furthest",
              "from their FLOP count: beyond their matmuls they do, per MoE layer and per k of the grid (and per",
              "normaliser width where the family renormalises), elementwise work over every token's K candidate",
              "outputs, which is memory-bound and which no FLOP count sees. Carrying the CPU factor to a GPU is",
              "cautious: there that work is cheaper relative to matmuls.", "",
              "## What a compile costs", "",
              f"Defaults: {CALIB_TOKENS} calibration tokens in windows of {SEQ_LEN}, batches of {BATCH}, k from 1 to K,",
              "isolated strategy. Assumed GPU: H100 SXM 80 GB at "
              f"{GPU_MFU:.0%} of its {GPU_PEAK / 1e12:.0f} TFLOP/s dense bf16 peak (an assumption: no GPU was",
              "measured); weights in the checkpoint's dtype (bf16; DeepSeek-V3's FP8: 1 byte); a copy of the model",
              "that spans several GPUs runs its layers one GPU at a time, and each copy takes a share of the shards;",
              f"a model that fits no GPU set is offloaded and bound by {PCIE_BYTES_PER_S / 1e9:.0f} GB/s of weights",
              "over PCIe.", "",
              "| model | parameters | weights | activations per batch | GPUs per copy | probe cost (forwards) | "
              + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in GPU_COUNTS) + " |",
              "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in GPU_COUNTS) + " |"]
    for row in data["models"]:
        cells = []
        for gpus in GPU_COUNTS:
            cell = row["rows"][str(gpus)] if str(gpus) in row["rows"] else row["rows"][gpus]
            cells.append(f"{duration(cell['hours'] * 3600)} ({cell['how']})")
        lines.append(f"| {row['model']} | {row['params_b']:.1f} B | {row['weight_gb']:.0f} GB |"
                     f" {row['activations_gb']:.1f} GB | {row['gpus_per_copy']} |"
                     f" {row['probe_forward_equivalents']:.0f} | " + " | ".join(cells) + " |")
    if all("anchored" in row for row in data["models"]):
        lines += ["", "With `--strategy anchored` (an approximate S, planner/anchoring.py): each probe runs the probed",
                  "block and the head only, and each layer's two anchors re-run the later layers on the first",
                  f"batch of every {ANCHOR_EVERY}, so the probe cost grows linearly in depth but for the anchors. The same",
                  "measured overheads are applied to its FLOPs (an assumption: they were measured on exact probes).",
                  "What it costs a plan is measured on bundled:ref-deep in docs/benchmarks.md (profiling time",
                  "against depth).", "",
                  "| model | probe cost (forwards) | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in GPU_COUNTS)
                  + " |", "| --- | --- | " + " | ".join("---" for _ in GPU_COUNTS) + " |"]
        for row in data["models"]:
            anchored = row["anchored"]
            cells = [anchored["rows"][str(gpus)] if str(gpus) in anchored["rows"] else anchored["rows"][gpus]
                     for gpus in GPU_COUNTS]
            lines.append(f"| {row['model']} | {anchored['probe_forward_equivalents']:.0f} | "
                         + " | ".join(f"{duration(cell['hours'] * 3600)} ({cell['how']})" for cell in cells) + " |")
    lines += ["", "Times are compute only: reading the checkpoint (31 GB for DeepSeek-V2-Lite, 671 GB for",
              "DeepSeek-V3) from disk, and each shard loading its copy, come on top and often dominate the smaller",
              "models' rows.", "",
              "Probe cost is per calibration batch, in full forwards: profiling re-runs the layers after each",
              "probed layer, once per stand-in option (none, the constant and two ranks: 4 per (layer, k) by",
              "default), so it grows with depth² × k-grid size × options (DeepSeek-V3: 58 MoE layers × 7 smaller",
              "k each × 4); `--fixed-stand-ins` measures 2 options, `--compensation off` 1.",
              "`--k-min` above 1 and `--strategy isolated` (the default) keep it down, `--strategy anchored`",
              "(above) most; `--calib-tokens` scales everything linearly."]
    return "\n".join(lines) + "\n"
