#!/usr/bin/env bash
# IS Reshape (this package's is_reshape loss) on the tiny task: the CPU sandbox's problems and warm-started tiny Qwen2 (DEVICE=cpu by default).
# Knobs: bash recipes/tiny/isreshape.sh --help. Defaults and checks: isreshape_verl/launch/.
#   python data_prep/tiny.py && bash recipes/tiny/isreshape.sh [hydra.key=value ...]
#   ASYNC=separate bash recipes/tiny/isreshape.sh        # standalone rollout, weights synced through Ray
set -euo pipefail
# shellcheck source=recipes/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch recipe tiny isreshape "$@"
