"""Evaluation: quality and measured activations of a model under a routing method.

``metrics`` scores a model as it is now (NLL on held-out windows, arithmetic
exact match, activations counted at the experts); ``methods`` is the registry of
routing methods compared at a matched budget (uniform top-k, the baselines, the
Alloc-MoE ablations), each turned into an allocation and applied through the
runtime; ``compare`` holds the comparisons the results page reports; ``run``
is what ``allocplan eval`` does.
"""
