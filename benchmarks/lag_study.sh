#!/usr/bin/env bash
# The lag study: does IS Reshape learn better than GRPO's clip from stale rollouts, and is its default safe?
#
# 7 losses through verl's registry (baselines at verl's defaults) × lags 0 4 16 32 × seeds 0 1 2, in the
# (IS Reshape: the package default when it ran — one-sided Laplace, width 1 (0.25 since the width check),
# correctness γ, localize_sft, adaptive width at target 0.01 — the same with a fixed width, and the design
# notes' two-sided sech² with the adaptive γ;
# each spec names the settings it depends on, so the labels stay true if defaults change)
# `stress` preset of `isreshape-verl compare` (2 passes × 4 mini-batches per rollout batch). 84 runs of
# 60 steps: about 1.6 h on 2 CPU cores (72 of the runs took 81 min here; warm start cached, +4 min once
# if not). Interrupted? Run it again
# with --resume: finished runs are kept, the others continue from their last checkpoint.
#
#   bash benchmarks/lag_study.sh                       # writes runs/lag_study/{report.md,*.png,summary.json}
#   OUT=/tmp/study bash benchmarks/lag_study.sh --resume
#   bash benchmarks/lag_study.sh --seeds 0 1 2 3 4     # any other compare flag is passed on
#
# The committed copy of the report and plots is benchmarks/results/lag_study/.
# dual_clip=none: these runs predate the dual_clip key (default 3 since); the committed report omits it.
set -euo pipefail
OUT=${OUT:-runs/lag_study}
exec isreshape-verl compare --preset stress --out "$OUT" --losses \
    vanilla \
    sapo \
    cispo \
    dppo_tv \
    "is_reshape:width=1,localize_sft=true,width_mode=adaptive,width_target=0.01,dual_clip=none" \
    "is_reshape:width=1,localize_sft=true,width_mode=fixed,dual_clip=none" \
    "is_reshape:kernel=sech2,width=1,one_sided=false,localize_sft=false,width_mode=fixed,dual_clip=none" \
    "$@"
