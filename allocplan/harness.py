"""``allocplan lm-eval``: lm-evaluation-harness's own command line, with the ``allocplan`` model type registered.

lm-eval discovers third-party model types only once their module is imported, so a plain
``lm_eval --model allocplan`` cannot see ours; this runs lm-eval's command line after the
import (see :mod:`allocplan.lm_eval_model`).
"""

from __future__ import annotations

import sys

from .errors import AllocplanError


def run_lm_eval(args: list[str]) -> None:
    """Run lm-eval's command line with ``args`` (as after ``lm_eval``), ``--model allocplan`` available.

    Raises:
        AllocplanError: lm-evaluation-harness is not installed.
    """
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise AllocplanError("allocplan lm-eval needs lm-evaluation-harness; pip install 'allocplan[lm-eval]'") from None
    from . import lm_eval_model  # noqa: F401  (registers the model type)

    saved = sys.argv
    sys.argv = ["lm-eval", *args]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
