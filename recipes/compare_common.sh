# shellcheck shell=bash
# run_compare DATASET [hydra overrides...]: the three losses in sequence, same knobs, one folder.
# shellcheck source=recipes/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

compare_usage() {
    cat <<USAGE
usage: [KNOB=value ...] bash recipes/$1/compare.sh [--help] [hydra.key=value ...]

Runs recipes/$1/{grpo,sapo,isreshape}.sh one after another with the same seed and
settings; each writes COMPARE_DIR/<loss>/ (metrics.jsonl, tensorboard/, train.log, command.sh).
A failed run is reported and the next one still runs; the exit status is non-zero if any failed.

  COMPARE_DIR   experiment folder (runs/$1-compare-<UTC date-time>)
  LOSSES        which losses, in order ("grpo sapo isreshape")
  every knob of the single-loss recipes (MODEL, ASYNC, STALENESS, NNODES, SEED, ...):
  see bash recipes/$1/grpo.sh --help. A loss-specific knob (CLIP_RATIO, SAPO_TAU_*, IS_*) reaches
  only its own loss's run. DRY_RUN=1 prints and checks the three commands. Every run's knobs are
  checked before the first one starts.

Then: isreshape-verl plot-runs COMPARE_DIR/* --out COMPARE_DIR/plots
USAGE
}

# compare_env LOSS COMMAND...: COMMAND without the knobs of the other losses (IS_WIDTH reaches isreshape only).
compare_env() {
    local loss=$1 other name unset=()
    shift
    for other in grpo sapo isreshape; do
        [[ $other == "$loss" ]] && continue
        for name in $(loss_knobs "$other"); do
            unset+=(-u "$name")
        done
    done
    env "${unset[@]}" "$@"
}

run_compare() {
    local dataset=$1
    shift
    local arg
    for arg in "$@"; do
        if [[ $arg == -h || $arg == --help ]]; then
            compare_usage "$dataset"
            exit 0
        fi
    done
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$dataset"
    : "${COMPARE_DIR:=runs/$dataset-compare-$(date -u +%Y%m%d-%H%M%S)}"
    : "${LOSSES:=grpo sapo isreshape}"
    local loss failed=() out
    for loss in $LOSSES; do
        [[ -f $here/$loss.sh ]] || die "LOSSES='$LOSSES' is not allowed: no recipe $here/$loss.sh (grpo, sapo, isreshape)"
    done
    # every run's knobs first, and before a real launch every run's config check too: a bad one stops the
    # comparison before anything starts (a dry run checks each config below anyway)
    local pre_check=0
    [[ ${DRY_RUN:-0} == 1 ]] || pre_check=${RECIPE_CHECK:-1}
    for loss in $LOSSES; do
        out=$(compare_env "$loss" DRY_RUN=1 RECIPE_CHECK="$pre_check" RUN_ROOT="$COMPARE_DIR" EXP_NAME="$loss" \
            bash "$here/$loss.sh" "$@" 2>&1 >/dev/null) || { grep -v '^warning: ' <<<"$out" >&2; exit 2; }
    done
    echo "# comparison of: $LOSSES -> $COMPARE_DIR"
    for loss in $LOSSES; do
        if ! compare_env "$loss" RUN_ROOT="$COMPARE_DIR" EXP_NAME="$loss" bash "$here/$loss.sh" "$@"; then
            echo "warning: the $loss run failed; continuing with the next loss" >&2
            failed+=("$loss")
        fi
    done
    echo "# plot with: isreshape-verl plot-runs $COMPARE_DIR/* --out $COMPARE_DIR/plots"
    if ((${#failed[@]})); then
        echo "error: failed runs: ${failed[*]}" >&2
        return 1
    fi
}
