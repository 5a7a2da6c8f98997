"""lm-evaluation-harness model type ``allocplan``: a Hugging Face model with a plan applied.

Importing this module registers the type with lm-eval's model registry (lm-eval finds
third-party types only once their module is imported; ``allocplan lm-eval`` does that and
then runs lm-eval's own command line)::

    allocplan lm-eval --model allocplan \\
        --model_args pretrained=bundled:ref-olmoe,plan=plan.yaml,device=cpu --tasks hellaswag

or, in Python::

    import allocplan.lm_eval_model  # registers "allocplan"
    lm_eval.simple_evaluate(model="allocplan", model_args="pretrained=...,plan=plan.yaml", tasks=[...])

``AllocplanLM`` is lm-eval's ``HFLM`` (every ``hf`` model argument works the same:
``dtype``, ``device``, ``batch_size``, ``parallelize``, ...) plus ``plan``: a plan file to
apply after loading. Without ``plan``, a checkpoint written by ``allocplan export`` gets
the plan it carries, as ``allocplan.from_pretrained`` would. ``pretrained`` also takes
allocplan's ``bundled:<name>``.

Token-level allocation (Alloc-T) with ``scope: batch`` shares a layer's budget between all
the sequences of a forward pass, so a request's score depends on what lm-eval batches it
with, and changes with ``--batch_size``. Evaluate such plans with ``--batch_size 1``, or
compile with ``--scope sequence``, which gives each sequence its own share and the same
scores at any batch size (see docs/serving.md).
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .export import attach_plan
from .loading import resolve_model_source

MODEL_TYPE = "allocplan"


@register_model(MODEL_TYPE)
class AllocplanLM(HFLM):
    """``HFLM`` with an allocplan plan applied (``plan=PATH`` in ``--model_args``)."""

    def __init__(self, pretrained: Any, plan: str | None = None, **kwargs: Any) -> None:
        import warnings

        name = pretrained
        if isinstance(pretrained, str):
            pretrained = resolve_model_source(pretrained)
        super().__init__(pretrained=pretrained, **kwargs)
        self.allocplan_handle = attach_plan(self.model, pretrained if isinstance(pretrained, str) else name, plan,
                                            revision=kwargs.get("revision"))
        allocation = getattr(self.allocplan_handle, "allocation", None)
        batch = kwargs.get("batch_size", 1)
        if (allocation is not None and allocation.token_level.enabled and allocation.token_level.scope == "batch"
                and str(batch) != "1"):
            warnings.warn(f"allocplan: warning: the plan shares each layer's budget across the batch (Alloc-T, scope"
                          f" batch), so scores depend on --batch_size {batch} and on how lm-eval groups requests;"
                          " use --batch_size 1 or a plan compiled with --scope sequence", stacklevel=2)
