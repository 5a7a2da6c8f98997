"""The runtime shim: apply an allocation to a loaded Hugging Face model, reversibly.

It reads allocations (``allocplan.formats``) and the family registry, and never
imports the planner. Installed as ``allocplan.runtime``::

    from allocplan.runtime.apply import apply_plan
    from allocplan.runtime.allocations import allocation_for

Modules: ``families`` (the registry, as data), ``layers`` (find a model's MoE
blocks), ``allocations`` (allocations built in code), ``routing`` and ``scores``
(Alloc-T and weight rules as tensor functions), ``router_formats`` (router output
layouts), ``experts`` (the experts implementation that pays only for kept pairs),
``apply`` (``apply_plan`` and its handle), ``measure`` (activation counting).
"""
