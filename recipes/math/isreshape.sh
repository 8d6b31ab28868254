#!/usr/bin/env bash
# IS Reshape (this package's is_reshape loss) on MATH train, MATH-500 test (default model Qwen2.5-1.5B-Instruct).
# Knobs: bash recipes/math/isreshape.sh --help. Defaults and checks: isreshape_verl/launch/.
#   python data_prep/math_dataset.py && bash recipes/math/isreshape.sh [hydra.key=value ...]
#   DRY_RUN=1 ASYNC=separate NNODES=2 bash recipes/math/isreshape.sh   # print + check, no launch
set -euo pipefail
# shellcheck source=recipes/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch recipe math isreshape "$@"
