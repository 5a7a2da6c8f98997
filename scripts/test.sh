#!/usr/bin/env bash
# The test suite (installs into .venv first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# The pytest console script, not `python -m pytest`: the latter would put the checkout
# first on sys.path and test the source tree instead of the installed package.
"$VENV/bin/pytest" -q "$@"
