#!/usr/bin/env bash
# GRPO, SAPO and IS Reshape on math, one after another, with identical seed and settings,
# into one experiment folder (COMPARE_DIR/{grpo,sapo,isreshape}/metrics.jsonl ...), then:
#   isreshape-verl plot-runs COMPARE_DIR/* --out COMPARE_DIR/plots
# Every knob of the single-loss recipes applies to all three runs (bash recipes/math/grpo.sh --help);
# extra arguments are Hydra overrides passed to all three.
set -euo pipefail
# shellcheck source=recipes/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch compare math "$@"
