#!/usr/bin/env bash
# The CI recipe for a committed plan (docs/ci.md): rebuild it, check it against the model,
# diff it against the committed one by meaning, and write a reviewer's report.
#
# Settings (environment):
#   PLAN     the committed plan                  [plans/ref-olmoe-budget-0.5.yaml]
#   PROFILE  the committed profile it came from  [profiles/ref-olmoe.yaml]
#   MODEL    the model to validate against; empty: check the plan file alone  [bundled:ref-olmoe]
#   BUDGET   the budget the plan was solved at   [0.5]
#   MODE     solve: re-solve PROFILE on CPU, no model weights (seconds);
#            compile: profile MODEL again and solve (the full compile; minutes to hours)  [solve]
#   OUT      where the rebuilt plan, profile and report go (the artifacts to upload)  [ci-artifacts]
#   ALLOCPLAN  the allocplan command  [allocplan]
#   PICTURES   --pictures (needs allocplan[report], i.e. matplotlib) or --no-pictures  [--pictures]
#   GITHUB_STEP_SUMMARY  when set (GitHub Actions), the report and the diff are appended to it.
#
# Exit status: 0 when the rebuilt plan is equivalent to the committed one, 1 when they differ
# (the diff says how), 2 on bad input. The artifacts are written either way.
set -uo pipefail
PLAN=${PLAN:-plans/ref-olmoe-budget-0.5.yaml}
PROFILE=${PROFILE:-profiles/ref-olmoe.yaml}
MODEL=${MODEL-bundled:ref-olmoe}
BUDGET=${BUDGET:-0.5}
MODE=${MODE:-solve}
OUT=${OUT:-ci-artifacts}
ALLOCPLAN=${ALLOCPLAN:-allocplan}
PICTURES=${PICTURES:---pictures}

mkdir -p "$OUT"
case "$MODE" in
    solve)
        cp "$PROFILE" "$OUT/profile.yaml"
        for sidecar in "$(dirname "$PROFILE")"/compensation-*.safetensors; do
            [ -e "$sidecar" ] && cp "$sidecar" "$OUT/"
        done
        $ALLOCPLAN solve "$OUT/profile.yaml" --budget "$BUDGET" -o "$OUT/plan.yaml" -q || exit 2 ;;
    compile)
        $ALLOCPLAN compile --model "$MODEL" --budget "$BUDGET" -o "$OUT/plan.yaml" --profile-out "$OUT/profile.yaml" -q \
            || exit 2 ;;
    *)
        echo "ci_plan_check: MODE must be solve or compile, got '$MODE'" >&2; exit 2 ;;
esac

if [ -n "$MODEL" ]; then
    $ALLOCPLAN validate "$OUT/plan.yaml" --model "$MODEL" || exit 2
else
    $ALLOCPLAN validate "$OUT/plan.yaml" || exit 2
fi

$ALLOCPLAN diff "$PLAN" "$OUT/plan.yaml" > "$OUT/diff.txt"
status=$?
cat "$OUT/diff.txt"
[ "$status" -le 1 ] || exit 2

$ALLOCPLAN report "$OUT/plan.yaml" --profile "$OUT/profile.yaml" -o "$OUT/report" "$PICTURES" -q || exit 2

if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
    {
        echo "## allocplan: $PLAN"
        echo
        echo '```'
        cat "$OUT/diff.txt"
        echo '```'
        echo
        # The pictures are in the uploaded artifact; a job summary cannot show files by relative link.
        grep -v '^!\[' "$OUT/report/report.md"
    } >> "$GITHUB_STEP_SUMMARY"
fi
exit "$status"
