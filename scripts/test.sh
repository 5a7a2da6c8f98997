#!/usr/bin/env bash
# The test suite (installs into .venv first if needed): the default run leaves out the checks
# marked slow (CI runs them too: .ci/run). Extra arguments go to pytest, e.g. `-m slow` or `-m ""`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# The pytest console script, not `python -m pytest`: the latter would put the checkout
# first on sys.path and test the source tree instead of the installed package.
if [[ " $* " == *" -m "* ]]; then
    "$VENV/bin/pytest" -q "$@"
else
    "$VENV/bin/pytest" -q -m "not slow" "$@"
fi
