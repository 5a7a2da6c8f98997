#!/usr/bin/env bash
# The whole GPU check, as one script for a machine with one CUDA GPU (well under 8 minutes):
#   1. the runtime tests that need CUDA (tests/test_cuda.py);
#   2. the bench presets at budget 0.5 in bfloat16: prefill at batch 1 and 16, decode at batch 1
#      and 16, with Alloc-T off and on;
#   3. docs/benchmarks-gpu.md, written from those runs with the GPU's name.
# Usage: bash scripts/gpu_check.sh [--dry-run]
#   --dry-run  print what would run and check that its inputs exist (no GPU needed); exit 0 when ready.
# ALLOCPLAN (default: allocplan on PATH) and PYTHON (default: python3) name the commands; OUT
# (default: gpu-check) holds the JSON of every bench run.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
ALLOCPLAN=${ALLOCPLAN:-allocplan}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu-check}
PRESETS="dsv2-lite-small mixtral-small"

commands=("ALLOCPLAN_TEST_DEVICE=cuda $PYTHON -m pytest -q -p no:cacheprovider tests/test_cuda.py")
for preset in $PRESETS; do
    for level in --no-token-level --token-level; do
        for batch in 1 16; do
            name="$preset${level/--/_}_b$batch"
            commands+=("$ALLOCPLAN bench --config $preset --budget 0.5 $level --batch $batch --decode-batch 16 --device cuda --dtype bfloat16 --repeat 5 -q > $OUT/$name.json")
        done
    done
done
commands+=("$PYTHON scripts/make_benchmarks_gpu.py $OUT docs/benchmarks-gpu.md")

if [ "$DRY" = 1 ]; then
    missing=0
    for path in tests/test_cuda.py tests/tiny_models.py scripts/make_benchmarks_gpu.py; do
        [ -f "$path" ] || { echo "missing: $path" >&2; missing=1; }
    done
    command -v "${ALLOCPLAN%% *}" >/dev/null || { echo "missing: the $ALLOCPLAN command" >&2; missing=1; }
    $PYTHON -c "import torch, pytest, allocplan" 2>/dev/null || { echo "missing: torch, pytest or allocplan for $PYTHON" >&2; missing=1; }
    for preset in $PRESETS; do
        $ALLOCPLAN bench --help | grep -q "$preset" || { echo "missing: bench preset $preset" >&2; missing=1; }
    done
    $ALLOCPLAN bench --help | grep -q -- "--decode-batch" || { echo "missing: bench --decode-batch" >&2; missing=1; }
    echo "would run (${#commands[@]} steps):"
    printf '  %s\n' "${commands[@]}"
    $PYTHON -c "import torch; print('  CUDA available here:', torch.cuda.is_available())"
    exit "$missing"
fi

$PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device (torch.cuda.is_available() is false); use --dry-run')"
mkdir -p "$OUT"
start=$(date +%s)
for command in "${commands[@]}"; do
    echo "== $command"
    eval "$command"
done
echo "gpu_check: done in $(( $(date +%s) - start )) s"
