"""The stand-in kind registry: what a plan runs in place of an expert a token's candidate dropped.

A dropped candidate of expert e adds its routing weight times a stand-in for e's output on the
token's input x. The runtime evaluates every kind with one formula,

    stand-in(x) = bias[e] + (x @ down[e]) @ up[e]        (bias[0] when the kind keeps one row),

and a kind says which of its terms it stores: one constant per routed expert or one per layer,
with or without a rank-r map of the input. So each kind is one module that registers one
:class:`StandInKind` with :func:`register_stand_in_kind`, holding

* its **fit** (``fit(moments, rank)``): the stand-ins from the weighted moments of the
  (input, output) pairs of the candidates a plan can drop, gathered by the planner
  (planner/treatments.py): ``num_experts``, and per expert ``pairs`` [E] and ``mass`` [E]
  (count and weight of its pairs), ``sum_x`` and ``sum_y`` [E, H] (weighted sums), and with
  ``low_rank`` ``sum_xx`` and ``sum_xy`` [E, H, H] (float64). It returns ``bias`` [E or 1, H]
  and, with ``low_rank``, ``down`` [E, H, r] and ``up`` [E, r, H] (float32 tensors);
* its **runtime step**: the terms above (``per_expert``, ``low_rank``), from which
  :func:`sidecar_shapes` gives the tensors the plan's sidecar must hold and the runtime
  checks and loads (runtime/apply.py);
* its **plan field's validation**: ``compensation.kind`` names a registered kind, and the
  sidecar's tensors are the ones its terms need;
* its **report line** (``summary``) and its **cost**: :func:`multiply_adds` per dropped pair.

Pure at import (no torch): the formats layer validates plans against the registry. The fits
import torch when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from allocplan.registries import lookup, register


@dataclass(frozen=True)
class StandInKind:
    """One registered kind of stand-in.

    Attributes:
        name: the plan's ``compensation.kind`` and the ``--compensation`` value.
        summary: what the stand-in is, for reports (a phrase).
        per_expert: one constant per routed expert (else one per layer, shared by its experts).
        low_rank: also a rank-r linear map of the input; its rank comes from
            ``--compensation-rank`` or ``--compensation-share``.
        fit: ``(moments, rank) -> {"bias": ..., "down": ..., "up": ...}`` (module docstring).
    """

    name: str
    summary: str
    per_expert: bool
    low_rank: bool
    fit: Callable[[Any, int], dict[str, Any]]


STAND_IN_KINDS: dict[str, StandInKind] = {}


def register_stand_in_kind(kind: StandInKind) -> StandInKind:
    """Register ``kind`` under its name (a name may be registered once; ``auto`` and ``off`` are settings)."""
    return register(STAND_IN_KINDS, kind.name, kind, "stand-in kind", reserved=("auto", "off"))


def get_stand_in_kind(name: str) -> StandInKind:
    """The registered kind ``name``; an unknown one is an AllocplanError listing the known ones."""
    return lookup(STAND_IN_KINDS, name, "compensation kind")


def sidecar_shapes(kind: StandInKind, path: str, num_experts: int, hidden: int) -> dict[str, tuple[int | None, ...]]:
    """The tensors one MoE layer's stand-ins of ``kind`` are stored as: name -> shape (None: the rank)."""
    shapes: dict[str, tuple[int | None, ...]] = {path: (num_experts if kind.per_expert else 1, hidden)}
    if kind.low_rank:
        shapes[f"{path}.down"] = (num_experts, hidden, None)
        shapes[f"{path}.up"] = (num_experts, None, hidden)
    return shapes


def map_multiply_adds(hidden: int, rank: int) -> int:
    """Multiply-adds of a rank-r stand-in map per (token, dropped candidate): x @ down [H, r], then @ up [r, H]."""
    return 2 * rank * hidden


def multiply_adds(hidden: int, rank: int) -> int:
    """Multiply-adds of one dropped pair's stand-in: its rank-r map (r = 0: a kind without one), plus adding
    the constant (H)."""
    return map_multiply_adds(hidden, rank) + hidden
