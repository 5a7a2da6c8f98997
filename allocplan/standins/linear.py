"""``linear`` stand-ins: each expert's mean output plus a low-rank least-squares map of its input.

Expert e's stand-in is c_e + (x @ down_e) @ up_e: the reduced-rank least-squares fit of e's output
on its input over the calibration (token, candidate) pairs routed to it, weighted as the planner
weights the candidates a plan can drop (ridge ``RIDGE`` of the mean input variance, projected on
the r output directions the fit explains most). Each expert's two factors are scaled by a power of
two (which leaves their product unchanged) and rounded to half precision (:func:`on_half_grid`);
the constant is fitted after, against the rounded map, so batch-1 decode on CPU reads them in half
precision (runtime/native.py) and every path multiplies by the same values. An expert with too few
pairs for a map keeps its mean alone.
"""

from __future__ import annotations

import math
from typing import Any

from .expert import positive
from .registry import StandInKind, register_stand_in_kind

# The linear stand-ins' ridge, as a share of the mean input variance. On the calibration holdout (the
# calibration tokens after the profiled ones) 1e-1 helped ref-dsv2 (3.1412 -> 3.1396 at budget 0.5)
# but hurt ref-olmoe (3.0732 -> 3.0743), so it stays.
RIDGE = 1e-2


def fit(moments: Any, rank: int) -> dict[str, Any]:
    """bias [E, H], down [E, H, r] and up [E, r, H] (module docstring)."""
    import torch

    count = positive(moments.mass)[:, None]  # [E, 1]
    mean_y = moments.sum_y / count  # [E, H]
    experts, h = mean_y.shape
    mean_x = moments.sum_x / count
    down = torch.zeros(experts, h, rank, dtype=torch.float64)
    up = torch.zeros(experts, rank, h, dtype=torch.float64)
    bias = mean_y.clone()
    for e in range(experts):
        if float(moments.pairs[e]) < max(2 * rank, 8):  # too few tokens to fit a map: the mean alone
            continue
        n = float(moments.mass[e])
        cov_xx = moments.sum_xx[e] / n - torch.outer(mean_x[e], mean_x[e])
        cov_xy = moments.sum_xy[e] / n - torch.outer(mean_x[e], mean_y[e])
        ridge = RIDGE * cov_xx.diagonal().mean().clamp_min(1e-12)
        weight = torch.linalg.solve(cov_xx + ridge * torch.eye(h, dtype=torch.float64), cov_xy)  # [H, H]
        # Reduced-rank regression: keep the r output directions the fitted map explains most of
        # (top eigenvectors of the fitted outputs' covariance W^T C_xx W), the least-squares rank-r map.
        fitted = weight.T @ cov_xx @ weight  # [H, H]
        # Most explained first, so the first r' columns of a rank-r fit are the rank-r' fit (the planner
        # offers every rank of its grid from one fit: planner/treatments.truncated).
        directions = torch.linalg.eigh((fitted + fitted.T) / 2).eigenvectors[:, -rank:].flip(-1)  # [H, r]
        down[e], up[e] = on_half_grid(weight @ directions, directions.T)  # [H, r], [r, H]
        bias[e] = mean_y[e] - mean_x[e] @ down[e] @ up[e]
    return {"bias": bias.float(), "down": down.float(), "up": up.float()}


def on_half_grid(down: Any, up: Any) -> tuple[Any, Any]:
    """One expert's factors down [H, r] and up [r, H] with every value exactly a half-precision number,
    so that the half-precision decode kernel and the float32 paths multiply by the same values.

    down carries the map's scale and up (orthonormal directions) has entries of at most 1, so both
    are first scaled by a power of two, down / s and up * s (exact in binary floats, and the product
    is unchanged), to bring their largest values level: a very small or very large map then keeps
    half's relative precision instead of meeting its subnormals or its overflow. Factors that still
    do not fit half's range come back scaled but not rounded; the float32 paths serve them.
    """
    import torch

    top_down, top_up = float(down.abs().max()), float(up.abs().max())
    if top_down == 0.0 or top_up == 0.0:
        return down, up
    scale = 2.0 ** round(math.log2(top_down / top_up) / 2)
    down, up = down / scale, up * scale
    rounded = down.half().to(down.dtype), up.half().to(up.dtype)
    if not all(bool(torch.isfinite(factor).all()) for factor in rounded):
        return down, up
    return rounded


LINEAR = register_stand_in_kind(StandInKind(
    "linear", "each routed expert's mean output plus a low-rank least-squares linear map of its input",
    per_expert=True, low_rank=True, fit=fit))
