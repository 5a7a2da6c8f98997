"""Profiling time against depth: the same model cut to its first n decoder layers, profiled alike.

Each probe of S[l, k] re-runs the decoder layers after l and the head (planner/replay.py), so per
calibration batch a model of L MoE layers runs about sum_l (L - l) = L (L + 1) / 2 layer-forwards
of probes, one head per probe, and the per-layer fitting passes (linear in L). Time then grows
linearly in depth while the head and the fitting dominate, and quadratically once the later layers
do. This module measures where a model sits: it profiles the first n decoder layers of one model
(the head and embeddings kept, the rest dropped) with one profiling config, for several n, in
interleaved rounds, and fits the growth exponent between the shallowest and the deepest cut.

The anchored strategy (``--strategy anchored``) runs each probe's block and the head only, and two
exact probes per layer on every fourth batch to correct them: linear in depth but for those anchors.
Both strategies are measured here, with the anchored plans' regret against the exact ones.

``scripts/make_benchmarks.py --depth-only`` runs it on ``bundled:ref-deep`` and
:mod:`allocplan.bench.page` renders it.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from ..errors import AllocplanError
from .timing import median_spread

# The cuts measured: a quarter, half and all of ref-deep's 16 MoE layers.
DEPTHS = (4, 8, 16)
# Calibration tokens per cut: 32 windows of 256, four batches at the default batch size. The exact
# strategy's time is linear in tokens; the anchored one's anchors run on the first batch of every
# four (planner/profiling.py), so fewer tokens than this would overstate their share.
DEPTH_CALIB_TOKENS = 8192
DEPTH_ROUNDS = 2
# The exact strategy (the default) and the approximate one that skips the later layers.
STRATEGIES = ("isolated", "anchored")


def first_layers(model: Any, count: int) -> Any:
    """Cut ``model`` (a freshly loaded instance, edited in place) to its first ``count`` decoder layers.

    The embeddings, final norm and head stay; ``config.num_hidden_layers`` (and ``layer_types``
    where the config has it) follow the cut so caches and masks are sized for the layers left.

    Raises:
        AllocplanError: ``count`` outside 1..the model's decoder layers.
    """
    from allocplan.runtime.layers import model_family

    parent, name = model_family(model).layers_path.rsplit(".", 1)  # the family registry's decoder-layer list
    holder = model.get_submodule(parent)
    layers = getattr(holder, name)
    if not 1 <= count <= len(layers):
        raise AllocplanError(f"cannot cut the model to {count} decoder layers: it has {len(layers)};"
                             f" give a depth from 1 to {len(layers)}")
    setattr(holder, name, torch.nn.ModuleList(list(layers)[:count]))
    model.config.num_hidden_layers = count
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:count]
    return model


def probes_per_layer(profile: Any) -> int:
    """Probes one MoE layer of ``profile`` ran per batch: each k below K_l without a stand-in and with each
    stand-in rank measured (the first layer's count; every layer of a uniform-shaped model has it)."""
    row = profile.layers[0]
    below = [k for k in row.sensitivity if k < row.original_k]
    return len(below) * (1 + len(row.stand_in_sensitivity or {}))


def probe_layer_forwards(moe_layers: int, probes: int) -> int:
    """Decoder-layer forwards the probes of one batch run in a model whose every decoder layer is an MoE
    layer: each of the ``probes`` probes of layer l (0-based) re-runs l's block and the
    ``moe_layers - 1 - l`` layers after it, so sum_l (moe_layers - l) = L (L + 1) / 2 per probe count."""
    return probes * moe_layers * (moe_layers + 1) // 2


def anchored_layer_forwards(moe_layers: int, probes: int, batches: int) -> float:
    """Decoder-layer forwards per batch of the anchored strategy's probes, on average over ``batches``: each
    of the ``probes`` carried probes of a layer runs that layer's block only, and the layer's two anchors
    re-run it and every layer after it, on the first batch of every ``ANCHOR_EVERY``."""
    from allocplan.planner.profiling import anchor_share

    return probes * moe_layers + 2 * moe_layers * (moe_layers + 1) // 2 * anchor_share(batches)


def growth_exponent(depths: list[int], seconds: list[float]) -> float:
    """The exponent p of time ~ depth^p between the shallowest and the deepest cut (1: linear)."""
    return math.log(seconds[-1] / seconds[0]) / math.log(depths[-1] / depths[0])


def depth_scaling(model_name: str = "bundled:ref-deep", depths: tuple[int, ...] = DEPTHS,
                  calib_tokens: int = DEPTH_CALIB_TOKENS, rounds: int = DEPTH_ROUNDS,
                  seq_len: int | None = None, strategies: tuple[str, ...] = STRATEGIES) -> dict:
    """Profile the first n decoder layers of ``model_name`` for each n in ``depths`` and each strategy, with
    the default profiling config otherwise at ``calib_tokens`` tokens (and ``seq_len`` tokens per window,
    default the config's), rounds interleaved over the depths and strategies.

    Returns, per strategy, the per-depth median seconds with [min, max], seconds per MoE layer, probes and
    the probes' layer-forwards, and the growth exponent (median over rounds, with its [min, max]); with two
    strategies, the second's plans' regret against the first's at every depth (:mod:`.fidelity`), and at
    the full depth the yardstick: the first strategy's regret on the next ``calib_tokens`` of the text.
    """
    from allocplan.formats.config import ProfileConfig
    from allocplan.loading import load_model
    from allocplan.planner.profiling import profile_model
    from allocplan.planner.windows import calibration_source, pack_windows
    from allocplan.runtime.layers import find_moe_layers
    from .fidelity import profile_regrets

    settings = {"calib_tokens": calib_tokens, **({"seq_len": seq_len} if seq_len else {})}
    models = {}
    for depth in depths:
        model, tokenizer = load_model(model_name)
        models[depth] = (first_layers(model, depth), tokenizer)
    times: dict[tuple[str, int], list[float]] = {(strategy, depth): [] for strategy in strategies for depth in depths}
    profiles: dict[tuple[str, int], Any] = {}
    for _ in range(rounds):
        for depth in depths:
            model, tokenizer = models[depth]
            for strategy in strategies:
                start = time.perf_counter()
                profiles[strategy, depth] = profile_model(model, tokenizer, ProfileConfig(strategy=strategy, **settings),
                                                          model_name=model_name)
                times[strategy, depth].append(time.perf_counter() - start)
    result: dict[str, Any] = {"model": model_name, "calib_tokens": calib_tokens, "rounds": rounds,
                              "strategies": {}}
    for strategy in strategies:
        rows = []
        for depth in depths:
            moe_layers = len(find_moe_layers(models[depth][0]))
            profile = profiles[strategy, depth]
            probes = probes_per_layer(profile)
            batches = -(-profile.measurement.calibration.windows // ProfileConfig().batch_size)
            forwards = (anchored_layer_forwards(moe_layers, probes, batches) if strategy == "anchored"
                        else probe_layer_forwards(moe_layers, probes))
            rows.append({"depth": depth, "moe_layers": moe_layers, "seconds": median_spread(times[strategy, depth]),
                         "seconds_per_moe_layer": statistics.median(times[strategy, depth]) / moe_layers,
                         "probes_per_layer": probes, "probe_layer_forwards": forwards})
        exponents = [growth_exponent(list(depths), [times[strategy, depth][i] for depth in depths])
                     for i in range(rounds)]
        result["strategies"][strategy] = {
            "rows": rows, "exponent": median_spread(exponents),
            "layer_forward_exponent": growth_exponent(list(depths), [row["probe_layer_forwards"] for row in rows])}
    if len(strategies) > 1:
        truth, approximate = strategies[0], strategies[1]
        result["regret"] = {depth: profile_regrets(profiles[truth, depth], profiles[approximate, depth])
                            for depth in depths}
        # The yardstick: the exact strategy on the next calib_tokens of the same text, at the full depth.
        model, tokenizer = models[depths[-1]]
        config = ProfileConfig(strategy=truth, **settings)
        windows, record = pack_windows(tokenizer, calibration_source(config, 2 * calib_tokens),
                                       max_tokens=2 * calib_tokens, seq_len=config.seq_len)
        other = profile_model(model, tokenizer, config, model_name=model_name,
                              windows=(windows[len(windows) // 2:], record))
        result["yardstick"] = profile_regrets(profiles[truth, depths[-1]], other)
    return result
