"""A semantic diff of two plans: what changes how a model routes, and what only changes the record.

A byte diff of two plans raises false alarms: recompiling on another CPU or thread
count moves measured values in their 8th significant digit, and with them every hash.
This diff compares fields by meaning:

* ``behaviour``: what ``apply_plan`` does differently: the model (type, fingerprint,
  layers), each layer's k, normaliser width and gain, the token-level and weight
  settings, the compensation kind and its stand-ins (compared as numbers when both
  sidecars' bytes are at hand, else by hash);
* ``budget``: the budget arithmetic;
* ``record``: the solver's objectives and refinement, provenance (versions, hashes,
  calibration), the model's name. Reported, but two plans that differ only here are
  equivalent.

Floats are equal within ``rtol`` (relative) or ``atol`` (absolute). A stand-in tensor is equal
when every value is within ``STAND_IN_TOLERANCE`` of the tensor's largest magnitude: the planner
fits them on a fixed thread count (planner/determinism.py), so one machine gives the same bytes,
but another CPU's float32 kernels move them in their last digits, far below the half-precision
step (about 5e-4 of the largest value) that the batch-1 kernel reads them at. Such a change is
reported as a record difference, with its size. Pure: no torch (stand-ins are compared with
safetensors' numpy reader).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .plan import Plan
from .records import to_data
from .sidecar import sidecar_arrays

# Stand-in values this close, relative to their tensor's largest magnitude, route alike (module docstring).
STAND_IN_TOLERANCE = 1e-4

@dataclass(frozen=True)
class Difference:
    """One field that differs: its path, both values, and what kind of change it is (``behaviour``,
    ``budget`` or ``record``; only ``record`` differences keep two plans equivalent)."""

    field: str
    a: Any
    b: Any
    kind: str


@dataclass(frozen=True)
class PlanDiff:
    """All differences between plan A and plan B."""

    differences: tuple[Difference, ...] = field(default_factory=tuple)

    @property
    def equivalent(self) -> bool:
        """No behaviour and no budget difference (record differences are allowed)."""
        return not any(d.kind != "record" for d in self.differences)

    def to_data(self) -> dict:
        return {"equivalent": self.equivalent,
                "differences": [{"field": d.field, "a": d.a, "b": d.b, "kind": d.kind} for d in self.differences]}


def _close(a: Any, b: Any, rtol: float, atol: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    return a == b


def _walk(a: Any, b: Any, where: str, kind: str, rtol: float, atol: float, out: list[Difference]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            _walk(a.get(key), b.get(key), f"{where}.{key}" if where else str(key), kind, rtol, atol, out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, f"{where}[{i}]", kind, rtol, atol, out)
    elif not _close(a, b, rtol, atol):
        out.append(Difference(where, a, b, kind))


def _stand_in_differences(a: Plan, b: Plan, rtol: float, atol: float) -> list[Difference]:
    """Compensation tensors compared as numbers (hash and file name then only record changes)."""
    ra, rb = a.compensation, b.compensation
    if ra is None or rb is None:
        return [] if ra == rb else [Difference("compensation", to_data(ra), to_data(rb), "behaviour")]
    out = []
    if ra.kind != rb.kind:
        out.append(Difference("compensation.kind", ra.kind, rb.kind, "behaviour"))
    if ra.sha256 == rb.sha256:
        return out
    out.append(Difference("compensation.sha256", ra.sha256, rb.sha256, "record"))
    if a.compensation_data is None or b.compensation_data is None:
        out.append(Difference("compensation (stand-ins)", "sidecar not loaded", "sidecar not loaded", "behaviour"))
        return out
    import numpy as np

    ta, tb = sidecar_arrays(a.compensation_data), sidecar_arrays(b.compensation_data)
    for name in sorted(set(ta) | set(tb)):
        x, y = ta.get(name), tb.get(name)
        if x is None or y is None or x.shape != y.shape:
            out.append(Difference(f"compensation[{name}]", None if x is None else list(x.shape),
                                  None if y is None else list(y.shape), "behaviour"))
        elif not np.allclose(x, y, rtol=rtol, atol=atol):
            worst = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
            scale = float(np.max(np.abs(x.astype(np.float64)))) if x.size else 0.0
            kind = "record" if worst <= STAND_IN_TOLERANCE * scale else "behaviour"
            out.append(Difference(f"compensation[{name}]", "…", f"max |difference| {worst:.3g}"
                                  + (f" (within {STAND_IN_TOLERANCE:g} of its largest value)" if kind == "record"
                                     else ""), kind))
    return out


def diff_plans(a: Plan, b: Plan, *, rtol: float = 1e-6, atol: float = 1e-9) -> PlanDiff:
    """Every difference between plans ``a`` and ``b`` (module docstring)."""
    da, db = to_data(a), to_data(b)
    out: list[Difference] = []
    behaviour_model = {k: v for k, v in da["model"].items() if k != "name"}
    _walk(behaviour_model, {k: v for k, v in db["model"].items() if k != "name"}, "model", "behaviour", rtol, atol,
          out)
    _walk(da["model"]["name"], db["model"]["name"], "model.name", "record", rtol, atol, out)
    if len(da["layers"]) != len(db["layers"]):
        out.append(Difference("layers", f"{len(da['layers'])} layers", f"{len(db['layers'])} layers", "behaviour"))
    else:
        for i, (la, lb) in enumerate(zip(da["layers"], db["layers"])):
            _walk(la, lb, f"layers[{i}]", "behaviour", rtol, atol, out)
    for section in ("token_level", "weights"):
        _walk(da[section], db[section], section, "behaviour", rtol, atol, out)
    out += _stand_in_differences(a, b, rtol, atol)
    _walk(da["budget"], db["budget"], "budget", "budget", rtol, atol, out)
    for section in ("solver", "provenance"):
        _walk(da[section], db[section], section, "record", rtol, atol, out)
    _walk(da["schema_version"], db["schema_version"], "schema_version", "record", rtol, atol, out)
    return PlanDiff(tuple(out))
