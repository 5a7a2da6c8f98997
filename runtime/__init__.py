"""The runtime shim: apply an allocation to a loaded Hugging Face model, reversibly.

It reads allocations (``allocplan.formats``) and the family registry, and never
imports the planner. Installed as ``allocplan.runtime``::

    from allocplan.runtime.apply import apply_plan
    from allocplan.runtime.allocation_builder import allocation_for

Modules: ``families`` (the registry, as data), ``layers`` (find a model's MoE
blocks), ``allocation_builder`` (allocations built in code), ``routing_rules`` and ``scores``
(Alloc-T and weight rules as tensor functions), ``routing`` (one layer's routing
decision and the hooks that apply it), ``router_formats`` (router output layouts),
``experts`` (the experts implementation that pays only for kept pairs), ``fast_paths``
(the batch-1 short forms' switches), ``native`` (the batch-1 stand-in kernel),
``apply`` (``apply_plan`` and its handle), ``measure`` (activation counting).
"""
