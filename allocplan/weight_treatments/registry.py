"""The weight-treatment registry: per-layer numbers a plan carries besides k, fitted on calibration text.

A weight treatment changes how a layer weighs the experts it keeps, so that its routed output at
k stays close to its output at full k. Each is one module that registers one
:class:`WeightTreatment` with :func:`register_weight_treatment`, holding

* its **plan field**: the per-layer key in plans (``layers[i].<field>``) and profiles
  (``layers[i].<field>``: k -> value), and the value that changes nothing (``neutral``);
* its **validation**: ``check(value, width)`` names what is wrong with a value, where
  ``width`` is the layer's candidate width;
* its **fit**: for each (layer, k) where it ``applies``, the values tried (``options``; each
  is routed through the runtime's own decision), the statistics each accumulates from the
  layer's kept output a, its stand-ins' part b and its full-k output y on calibration tokens
  (``accumulate``), and the value chosen from them (``choose``), all in planner/treatments.py's
  one reference forward per batch;
* its **runtime step**: ``configure(routing, value)`` sets the layer routing's weight rule
  (runtime/routing.py, ``LayerRouting``: its ``mode`` and ``reference_k``, and its ``gain``);
* its **report column** (``header``, ``cell``).

Pure at import (no torch). Plans and profiles write the registered fields in registration
order, so the built-in ones keep their place in every file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from allocplan.registries import lookup, register


@dataclass(frozen=True)
class WeightTreatment:
    """One registered weight treatment (module docstring).

    Attributes:
        name: the registry key.
        field: the per-layer key in plans and profiles.
        neutral: the value that leaves the layer as it is (what a layer at full k keeps).
        value_type: ``int`` or ``float``: how plan and profile files hold a value other than None.
        applies: ``(renormalises, k, width) -> bool``: fitted at (layer, k) for a family that does
            (or does not) renormalise its kept weights, with candidate width ``width``.
        options: ``(k, width) -> values`` tried by the fit, ``neutral`` first.
        accumulate: ``(stats, value, a, b, y)``: add one batch's statistics of option ``value``
            (a, b, y: [T, H] tensors) to the mapping ``stats``.
        choose: ``(stats, values) -> value``: the fitted value.
        check: ``(value, width) -> message or None``.
        configure: ``(routing, value)``: the runtime step on a ``LayerRouting``.
        header: the report's column heading.
        cell: ``value -> text`` for the report.
    """

    name: str
    field: str
    neutral: Any
    value_type: type
    applies: Callable[[bool, int | float, int], bool]
    options: Callable[[int | float, int], list[Any]]
    accumulate: Callable[[dict, Any, Any, Any, Any], None]
    choose: Callable[[dict, list[Any]], Any]
    check: Callable[[Any, int], str | None]
    configure: Callable[[Any, Any], None]
    header: str
    cell: Callable[[Any], str]

    @property
    def file_type(self) -> Any:
        """The type a plan or profile file holds a value as (None allowed where it is the neutral value)."""
        return self.value_type if self.neutral is not None else self.value_type | None


WEIGHT_TREATMENTS: dict[str, WeightTreatment] = {}


def register_weight_treatment(treatment: WeightTreatment) -> WeightTreatment:
    """Register ``treatment`` (a name, and a field, may be registered once)."""
    fields = tuple(t.field for t in WEIGHT_TREATMENTS.values())
    reserved = (treatment.name,) if treatment.field in fields else ()  # its field is another's
    return register(WEIGHT_TREATMENTS, treatment.name, treatment, "weight treatment", reserved=reserved)


def get_weight_treatment(name: str) -> WeightTreatment:
    """The registered treatment ``name``; an unknown one is an AllocplanError listing the known ones."""
    return lookup(WEIGHT_TREATMENTS, name, "weight treatment")


def treatment_fields() -> list[str]:
    """The per-layer fields of every registered treatment, in registration order."""
    return [treatment.field for treatment in WEIGHT_TREATMENTS.values()]
