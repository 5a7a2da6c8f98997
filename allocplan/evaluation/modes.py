"""The ways ``allocplan eval`` scores text, by how many tokens one forward holds (pure data, no torch).

Alloc-T pools a layer's budget over the tokens of one forward, so a plan's quality depends on it:
``prefill`` runs windows whole in batches of 8; ``decode-b1`` and ``decode-b8`` feed 1 or 8
independent windows token by token through the KV cache, as generation does
(:mod:`allocplan.evaluation.metrics`).
"""

from __future__ import annotations

# Mode -> sequences per forward; prefill runs them whole, the decode modes token by token.
EVAL_MODES: dict[str, int] = {"prefill": 8, "decode-b1": 1, "decode-b8": 8}
