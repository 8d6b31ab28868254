#!/usr/bin/env bash
# The knob study: the lag study's settings (`--preset stress`: lags 0 4 16 32, seeds 0 1 2, 2 passes ×
# 4 mini-batches per rollout batch) with the knobs the lag study held fixed, each changed alone from the
# package default when it ran (one-sided Laplace, width 1, correctness γ, localize_sft, adaptive width at
# target 0.01): the width target (0.003, 0.03), γ (fixed γ = 1: kernelized IS with no SFT-like term), the kernel
# (Gaussian), the sidedness (the default two-sided, and the design notes' two-sided sech2 with the default's
# trust regions), the widest width the adaptive rule may choose (0.5, 0.25 instead of 1), and GRPO's clip
# (DAPO's clip-higher, ε_high = 0.28). vanilla and the default are the references; the runs they share with
# the lag study may be reused (copy runs/lag_study/runs/<name> into $OUT/runs/ and pass --resume: compare keeps
# finished runs). 132 runs of 60 steps on 2 CPU cores (2 jobs), added in three rounds: the first 64 new ones
# took 99 min (the machine shared with other work), the 24 two-sided runs 37.5 min, the 24 narrower-width runs
# 31.5 min; all 132 about 2.8 h.
#
#   bash benchmarks/knob_study.sh                      # writes runs/knob_study/{report.md,*.png,summary.json}
#   OUT=/tmp/knobs bash benchmarks/knob_study.sh --resume
#
# The committed copy of the report and plots is benchmarks/results/knob_study/.
# dual_clip=none: these runs predate the dual_clip key (default 3 since); the committed report omits it.
set -euo pipefail
OUT=${OUT:-runs/knob_study}
exec isreshape-verl compare --preset stress --out "$OUT" --losses \
    vanilla \
    "is_reshape:width=1,localize_sft=true,width_mode=adaptive,width_target=0.01,dual_clip=none" \
    "vanilla:clip_ratio_high=0.28" \
    "is_reshape:width=1,localize_sft=true,width_mode=adaptive,width_target=0.003,dual_clip=none" \
    "is_reshape:width=1,localize_sft=true,width_mode=adaptive,width_target=0.03,dual_clip=none" \
    "is_reshape:width=1,localize_sft=true,width_mode=adaptive,width_target=0.01,gamma_mode=fixed,gamma=1.0,dual_clip=none" \
    "is_reshape:kernel=gaussian,width=1,localize_sft=true,width_mode=adaptive,width_target=0.01,dual_clip=none" \
    "is_reshape:width=1,one_sided=false,localize_sft=true,width_mode=adaptive,width_target=0.01,dual_clip=none" \
    "is_reshape:kernel=sech2,width=1,one_sided=false,localize_sft=true,width_mode=adaptive,width_target=0.01,dual_clip=none" \
    "is_reshape:width=0.5,localize_sft=true,width_mode=adaptive,width_target=0.01,dual_clip=none" \
    "is_reshape:width=0.25,localize_sft=true,width_mode=adaptive,width_target=0.01,dual_clip=none" \
    "$@"
