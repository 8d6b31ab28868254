#!/usr/bin/env bash
# Study A of the verdict: IS Reshape against the rollout corrections verl users run, with lag and engine mismatch.
#
# 6 arms × lags 0 4 16 × seeds 0-4 at the `stress` preset of `isreshape-verl compare`, once with fp32 rollouts
# (μ and π_θ computed alike) and once with bf16 rollouts against the fp32 trainer (the engine mismatch):
#   vanilla                                        GRPO's PPO-clip in bypass mode: r = π_θ/μ
#   vanilla:rollout_correction=decoupled_token_is      GRPO, r = π_θ/π_old, × verl's token TIS min(π_old/μ, 2)
#   vanilla:rollout_correction=decoupled_token_icepop  GRPO, r = π_θ/π_old, × verl's IcePop band [0.5, 5]
#   sapo                                           verl's SAPO, bypass
#   is_reshape                                     the package default, bypass
#   is_reshape:rollout_correction=decoupled_token_is   IS Reshape on π_θ/π_old × token TIS
# The two dtypes write two folders (the rollout dtype is a comparison-wide flag): $OUT/fp32 and $OUT/bf16, each
# with report.md, summary.json and the plots. They run side by side, one core each. 180 runs of 60 steps.
# Runs go seed by seed (seed 0 of every arm and lag first), so a study stopped early holds whole seeds:
#
#   bash benchmarks/correction_study.sh                     # runs/correction_study/{fp32,bf16}/
#   bash benchmarks/correction_study.sh --resume            # continue; finished runs are kept
#   bash benchmarks/correction_study.sh --resume --seeds 0 1 2   # report on the seeds finished so far
#   bash benchmarks/correction_study.sh --resume --lags 16       # one lag at a time (the last flag wins)
#
# The committed copy of the reports is benchmarks/results/correction_study/.
set -euo pipefail
OUT=${OUT:-runs/correction_study}
ARMS=(
    vanilla
    vanilla:rollout_correction=decoupled_token_is
    vanilla:rollout_correction=decoupled_token_icepop
    sapo
    is_reshape
    is_reshape:rollout_correction=decoupled_token_is
)
pids=()
# shellcheck disable=SC2329  # called by the trap below
stop() { for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; wait; }
trap stop INT TERM
for dtype in float32 bfloat16; do
    folder=$OUT/$([[ $dtype == float32 ]] && echo fp32 || echo bf16)
    mkdir -p "$folder"
    isreshape-verl compare --preset stress --lags 0 4 16 --seeds 0 1 2 3 4 --jobs 1 --threads 1 --no-progress \
        --rollout-dtype "$dtype" --out "$folder" --losses "${ARMS[@]}" "$@" >"$folder/compare.log" 2>&1 &
    pids+=($!)
    # the second waits for the first's warm start (trained once, then cached) instead of training it twice
    until grep -q "^warm start:" "$folder/compare.log" || ! kill -0 "$!" 2>/dev/null; do sleep 2; done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
for dtype in fp32 bf16; do tail -n 3 "$OUT/$dtype/compare.log"; done
exit "$status"
