#!/usr/bin/env bash
# The width check: the package default before and after its widest width went from 1 to 0.25, against GRPO's
# clip, with 5 seeds at every lag of the lag study's settings (`--preset stress`: 2 passes × 4 mini-batches per
# rollout batch). Seeds 0–2 are the knob study's runs (copy runs/knob_study/runs/<name> into $OUT/runs/ and pass
# --resume: compare keeps finished runs); seeds 3 and 4 took 14 min at lags 0 and 4 (12 runs of 60 steps, run
# first, before the default changed) and 15.1 min at lags 16 and 32, on 2 CPU cores (2 jobs × 1 thread).
#
#   bash benchmarks/width_check.sh                     # writes runs/width_check/{report.md,*.png,summary.json}
#   OUT=/tmp/width bash benchmarks/width_check.sh --resume
#
# The committed copy of the report and plots is benchmarks/results/width_check/.
# dual_clip=none: these runs predate the dual_clip key (default 3 since); the committed report omits it.
set -euo pipefail
OUT=${OUT:-runs/width_check}
exec isreshape-verl compare --preset stress --out "$OUT" --lags 0 4 16 32 --seeds 0 1 2 3 4 --losses \
    vanilla \
    "is_reshape:width=1,localize_sft=true,width_mode=adaptive,width_target=0.01,dual_clip=none" \
    "is_reshape:width=0.25,localize_sft=true,width_mode=adaptive,width_target=0.01,dual_clip=none" \
    "$@"
