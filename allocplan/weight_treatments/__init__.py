"""Weight treatments: per-layer numbers a plan carries besides k, one module each, in one registry.

``normalizer_width`` (k2, for families that renormalise) and ``gain`` (for the others) are
registered here, in the order plans write their fields; a new treatment is one module that
registers a :class:`~allocplan.weight_treatments.registry.WeightTreatment` with
:func:`register_weight_treatment`. Pure at import: no torch.
"""

from .registry import (WEIGHT_TREATMENTS, WeightTreatment, get_weight_treatment, register_weight_treatment,
                       treatment_fields)
from . import normalizer_width, gain  # noqa: F401,E402  (registers the built-in treatments, in this order)

__all__ = ["WEIGHT_TREATMENTS", "WeightTreatment", "get_weight_treatment", "register_weight_treatment",
           "treatment_fields"]
