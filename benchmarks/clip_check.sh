#!/usr/bin/env bash
# The clip check: what costs the default against GRPO's clip at lag 4? The default (one-sided Laplace, adaptive
# width ≤ 0.25, correctness γ with the SFT-like term localized) differs from `vanilla` (PPO-clip: one-sided box
# of fixed width 0.2, γ = 1, and verl's dual clip, which zeroes the gradient where A < 0 and r > 3) in the
# kernel's shape, the width rule, γ and that dual clip. The variants:
#   box                              the default with a hard cut at the adaptive width (the kernel's shape)
#   vanilla without its dual clip    IS Reshape's box, fixed width 0.2, γ = 1 (exactly PPO-clip without it)
#   dual_clip=3                      the default with verl's dual clip
# 5 seeds × lags 0 4 16 32 in the lag study's settings (`--preset stress`: 2 passes × 4 mini-batches per rollout
# batch). The `vanilla` and default runs are the width check's (copy runs/width_check/runs/<name> into
# $OUT/runs/ and pass --resume: compare keeps finished runs). Runs go seed by seed, so a stopped study has
# balanced seeds; the 60 new runs took 82 min on 2 CPU cores (2 jobs × 1 thread).
#
#   bash benchmarks/clip_check.sh                      # writes runs/clip_check/{report.md,*.png,summary.json}
#   OUT=/tmp/clip bash benchmarks/clip_check.sh --resume
#
# The committed copy of the report and plots is benchmarks/results/clip_check/.
# dual_clip=none: these runs predate the dual_clip key (default 3 since); the committed report omits it.
set -euo pipefail
OUT=${OUT:-runs/clip_check}
exec isreshape-verl compare --preset stress --out "$OUT" --lags 0 4 16 32 --seeds 0 1 2 3 4 --losses \
    vanilla \
    "is_reshape:width=0.25,localize_sft=true,width_mode=adaptive,width_target=0.01,dual_clip=none" \
    "is_reshape:width=0.25,localize_sft=true,width_mode=adaptive,width_target=0.01,kernel=box,dual_clip=none" \
    "is_reshape:kernel=box,width=0.2,width_mode=fixed,gamma_mode=fixed,gamma=1,dual_clip=none" \
    "is_reshape:width=0.25,localize_sft=true,width_mode=adaptive,width_target=0.01,dual_clip=3" \
    "$@"
