#!/usr/bin/env bash
# Quick start: install into .venv, compile the bundled model at half budget, apply the plan.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
"$VENV/bin/allocplan" compile --model bundled:ref-olmoe --budget 0.5 -o plan.yaml --profile-out profile.yaml
"$VENV/bin/allocplan" validate plan.yaml --model bundled:ref-olmoe
"$VENV/bin/allocplan" apply plan.yaml --prompt "The if statement is used" --max-new-tokens 24
