# Sourced by the quick-start and test scripts: make a virtual environment with
# allocplan installed, once. torch==2.13.0 is installed first, on its own: it is the
# CPU build that lies on this machine's disk, and pinning it keeps pip from pulling
# a multi-GB CUDA build to satisfy the project's torch range.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/allocplan" ] || [ pyproject.toml -nt "$VENV/.allocplan-installed" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]"
    touch "$VENV/.allocplan-installed"
fi
