"""Stand-in kinds for dropped experts (``--compensation``), one module each, in one registry.

``expert`` (MoNE), ``layer`` and ``linear`` are registered here; a new kind is one module that
registers a :class:`~allocplan.standins.registry.StandInKind` (its fit, the terms its runtime
step reads, its report line) with :func:`register_stand_in_kind`. Pure at import: no torch.
"""

from .registry import (STAND_IN_KINDS, StandInKind, get_stand_in_kind, map_multiply_adds, multiply_adds,
                       register_stand_in_kind, sidecar_shapes)
from . import expert, layer, linear  # noqa: F401,E402  (registers the built-in kinds, in this order)

__all__ = ["STAND_IN_KINDS", "StandInKind", "get_stand_in_kind", "map_multiply_adds", "multiply_adds",
           "register_stand_in_kind", "sidecar_shapes"]
