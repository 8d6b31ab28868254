# shellcheck shell=bash
# run_compare DATASET [hydra overrides...]: the three losses in sequence, same knobs, one folder.

compare_usage() {
    cat <<USAGE
usage: [KNOB=value ...] bash recipes/$1/compare.sh [--help] [hydra.key=value ...]

Runs recipes/$1/{grpo,sapo,isreshape}.sh one after another with the same seed and
settings; each writes COMPARE_DIR/<loss>/ (metrics.jsonl, tensorboard/, train.log, command.sh).
A failed run is reported and the next one still runs; the exit status is non-zero if any failed.

  COMPARE_DIR   experiment folder (runs/$1-compare-<UTC date-time>)
  LOSSES        which losses, in order ("grpo sapo isreshape")
  every knob of the single-loss recipes (MODEL, ASYNC, STALENESS, NNODES, SEED, ...):
  see bash recipes/$1/grpo.sh --help. DRY_RUN=1 prints and checks the three commands.

Then: isreshape-verl plot-runs COMPARE_DIR/* --out COMPARE_DIR/plots
USAGE
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
    local loss failed=()
    for loss in $LOSSES; do
        [[ -f $here/$loss.sh ]] || { echo "error: no recipe $here/$loss.sh (LOSSES='$LOSSES')" >&2; exit 2; }
    done
    echo "# comparison of: $LOSSES -> $COMPARE_DIR"
    for loss in $LOSSES; do
        if ! RUN_ROOT="$COMPARE_DIR" EXP_NAME="$loss" bash "$here/$loss.sh" "$@"; then
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
