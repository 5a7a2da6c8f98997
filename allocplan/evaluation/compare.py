"""Comparisons the results page reports: gap closed, averages over seeds.

Pure arithmetic on evaluation results (no torch), so each is unit-tested with
hand-computed numbers.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence


def gap_closed(nll: float, full_nll: float, uniform_nll: float) -> float | None:
    """Share of uniform top-k's NLL gap to the full model that a method recovers.

    (NLL_uniform - NLL_method) / (NLL_uniform - NLL_full): 0 for uniform itself, 1 for
    the full model's quality; None where uniform loses nothing (no gap to close).
    """
    gap = uniform_nll - full_nll
    return (uniform_nll - nll) / gap if gap > 0 else None


def mean_over_seeds(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One results row from the rows of several seeds of a randomised method: its expectation.

    Each row holds, per eval mode, the mean NLL, each window's summed NLL (``window_nll``), the
    activations per token and per layer, and optionally an arithmetic accuracy. The mean row
    averages NLL, activations and accuracy over the seeds, and ``window_nll`` window by window
    (so paired intervals against it stay paired); per-layer activations are the first seed's
    (each seed runs its own allocation).
    """
    out: dict[str, Any] = {"modes": {}, "seeds": len(rows)}
    for mode in rows[0]["modes"]:
        runs = [r["modes"][mode] for r in rows]
        out["modes"][mode] = {
            "nll": statistics.mean(r["nll"] for r in runs),
            "window_nll": [statistics.mean(values) for values in zip(*(r["window_nll"] for r in runs))],
            "activations_per_token": statistics.mean(r["activations_per_token"] for r in runs),
            **{key: statistics.mean(r[key] for r in runs) for key in ("stand_in_work_per_token",
                                                                       "charged_work_per_token") if key in runs[0]},
            "activations_per_layer": runs[0]["activations_per_layer"],
        }
    if "arith_accuracy" in rows[0]:
        out["arith_accuracy"] = statistics.mean(r["arith_accuracy"] for r in rows)
    return out


def paired_bootstrap(method: Sequence[float], baseline: Sequence[float], tokens_per_window: int, *,
                     rounds: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean per-token NLL difference (method − baseline) on the same windows, with a 95% interval.

    ``method`` and ``baseline`` hold each window's summed NLL, window by window on the same
    text. Windows (not single tokens) are resampled with replacement, because a window's
    tokens are not independent of each other; the interval is the 2.5 and 97.5 percentiles
    of the resampled means. Negative means the method's NLL is lower; "beats" is claimed
    only when the whole interval is below zero.
    """
    import numpy as np

    diff = (np.asarray(method, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)) / tokens_per_window
    if diff.ndim != 1 or diff.size == 0:
        raise ValueError("paired_bootstrap needs two equally long, non-empty sequences of window sums")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(rounds, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high), "windows": int(diff.size),
            "rounds": rounds}


def gap_closed_interval(method: Sequence[float], full: Sequence[float], uniform: Sequence[float], *,
                        rounds: int = 2000, seed: int = 0) -> dict[str, float]:
    """The gap closed over a set of windows, with a 95% interval that resamples whole windows.

    Each argument holds every window's summed NLL, window by window on the same text, under the method,
    the full model and uniform top-k. The ratio is (sum uniform - sum method) / (sum uniform - sum full);
    each bootstrap round draws the windows with replacement and recomputes it, and the interval is the
    2.5 and 97.5 percentiles of those rounds (a round whose uniform loses nothing counts as None and is
    left out). A target is met only where the interval's lower end clears it.
    """
    import numpy as np

    m, f, u = (np.asarray(values, dtype=np.float64) for values in (method, full, uniform))
    if not m.shape == f.shape == u.shape or m.ndim != 1 or m.size == 0:
        raise ValueError("gap_closed_interval needs three equally long, non-empty sequences of window sums")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, m.size, size=(rounds, m.size))
    gaps = u[draws].sum(1) - f[draws].sum(1)
    ratios = ((u[draws].sum(1) - m[draws].sum(1)) / np.where(gaps > 0, gaps, 1.0))[gaps > 0]
    low, high = np.percentile(ratios, [2.5, 97.5]) if ratios.size else (float("nan"), float("nan"))
    return {"gap_closed": gap_closed(float(m.sum()), float(f.sum()), float(u.sum())), "low": float(low),
            "high": float(high), "windows": int(m.size), "rounds": rounds}
