#!/usr/bin/env bash
# The study of docs/evidence, as run.  Resumable: running it again skips what
# finished and continues what was interrupted.  Runs go to runs/study/<difficulty>/seed_S,
# reports to docs/evidence/study-<difficulty>.{json,md,png}.
# Seeds alternate between the difficulties (default seed 0, hard seed 0, default seed 1, ...) so
# that an interrupted study holds complete seeds of both.  Two choices made for CPU time
# before any result, the same for every mode: evaluation every 30 (default, 150 steps) and 25
# (hard, 100 steps) steps instead of 15, and the `exact` verifier (string equality of the
# boxed answer, in-process) instead of math-verify's worker processes, which took a quarter of
# each step; the toy's answers are plain integers.
# Usage, from the repository root: bash docs/evidence/run_study.sh [JOBS]
# (LENS_STUDY overrides the command, LENS_STUDY_OUT the report folder)
set -euo pipefail
jobs=${1:-2}
study=${LENS_STUDY:-lens-study}
out=${LENS_STUDY_OUT:-docs/evidence}
common=(--verifier exact --report-dir "$out" --jobs "$jobs")
default=(--difficulty default --modes lens,grpo --eval-every 30 "${common[@]}")
hard=(--difficulty hard --modes lens,grpo,lens-mixed-only,lens-negative-only
      --steps 100 --eval-every 25 "${common[@]}")
for seed in 0 1 2 3 4 5 6 7; do
  $study "${default[@]}" --seeds "0-$seed"
  if [ "$seed" -lt 5 ]; then
    $study "${hard[@]}" --seeds "0-$seed"
  fi
done
