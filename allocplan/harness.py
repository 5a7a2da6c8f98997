"""``allocplan lm-eval``: lm-evaluation-harness's own command line, with the ``allocplan`` model type registered.

lm-eval discovers third-party model types only once their module is imported, so a plain
``lm_eval --model allocplan`` cannot see ours; this runs lm-eval's command line after the
import (see :mod:`allocplan.lm_eval_model`).
"""

from __future__ import annotations

import sys

from .errors import AllocplanError, first_line


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
    from .loading import hub_offline, hub_reachable

    # Without a hub, task data comes from the local datasets cache only: a miss is one line in seconds,
    # not a traceback after half a minute of retries per dataset.
    offline = "-h" not in args and "--help" not in args and not hub_reachable()
    saved = sys.argv
    sys.argv = ["lm-eval", *args]  # lm-eval's parser reads sys.argv itself
    try:
        with hub_offline(offline):
            cli_evaluate()
    except ConnectionError as exc:
        if not offline:
            raise
        raise AllocplanError(f"lm-eval needs task data that is not in the local datasets cache, and the hub cannot be"
                             f" reached (offline?): {first_line(exc, 200)}; run the task once where the hub is"
                             " reachable") from None
    finally:
        sys.argv = saved
