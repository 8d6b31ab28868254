#!/usr/bin/env bash
# Study B of the verdict: the arms through verl's own trainer on CPU (the tiny recipe, `hf` rollout), several seeds.
#
# 5 arms (compare.sh LOSSES): GRPO bypass, GRPO + token TIS (decoupled), SAPO, IS Reshape bypass, IS Reshape + TIS,
# seeds 0 1 2, in three settings, each one compare.sh into $OUT/<setting>/:
#   sync        ASYNC=sync: staleness 0
#   lag         ASYNC=separate with the rollout 4 batches ahead (verl's trainer.v1.separate_async.num_warmup_batches=4)
#               and STALENESS=5: real lag of several versions, not separate's default one (verl syncs the weights
#               once per train batch: its check wants train_batch_size = parameter_sync_step x ppo_mini_batch_size).
#               Measured in an 8-step run (2 Intel Xeon cores): trajectory staleness 0, 1, 2, 3, 4, 4, 2.6, 1.0
#               (mean 2.2 over steps 2-8; step 8 evicted samples 6 versions old), steps 6.5-9.7 s
#   lag-bf16    the same with ROLLOUT_DTYPE=bfloat16: lag plus the engine mismatch
# then `isreshape-verl report-runs $OUT` writes one report.md over all three (paired Δ, bootstrap intervals, collapse
# flags; the reference arm is GRPO + TIS). Every run resumes: run the script again to continue a stopped study
# (finished runs are skipped). Cost, from the measured step (benchmarks/results/verl_cpu_speed/, 2 cores): about
# 50 s of start-up + STEPS x 7-8 s + a validation every 10 steps (12 s) per run, 45 runs: about 5.5 h at 40 steps.
#
#   bash benchmarks/verl_study_b.sh                          # runs/study_b/{sync,lag,lag-bf16}/ and report.md
#   SETTINGS="sync" SEEDS="0" STEPS=10 bash benchmarks/verl_study_b.sh   # a small first look
#   DRY_RUN=1 bash benchmarks/verl_study_b.sh                # the commands, checked, nothing run
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/study_b}
export SEEDS=${SEEDS:-0 1 2} STEPS=${STEPS:-40} TEST_FREQ=${TEST_FREQ:-10}
export LOSSES="grpo grpo:decoupled_token_is sapo isreshape isreshape:decoupled_token_is"
ahead=(trainer.v1.separate_async.num_warmup_batches=4)
for setting in ${SETTINGS:-sync lag lag-bf16}; do
    case $setting in
        sync) knobs=(ASYNC=sync) overrides=() ;;
        lag) knobs=(ASYNC=separate STALENESS=5) overrides=("${ahead[@]}") ;;
        lag-bf16) knobs=(ASYNC=separate STALENESS=5 ROLLOUT_DTYPE=bfloat16) overrides=("${ahead[@]}") ;;
        *) echo "error: SETTINGS has '$setting'; allowed: sync lag lag-bf16" >&2; exit 2 ;;
    esac
    echo "# Study B, $setting: ${knobs[*]} ${overrides[*]}, seeds $SEEDS, $STEPS steps"
    env "${knobs[@]}" DEVICE=cpu COMPARE_DIR="$OUT/$setting" bash recipes/tiny/compare.sh "${overrides[@]}"
done
[[ ${DRY_RUN:-0} == 1 ]] || isreshape-verl report-runs "$OUT" --reference grpo:decoupled_token_is
