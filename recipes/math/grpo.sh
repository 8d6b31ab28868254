#!/usr/bin/env bash
# GRPO (verl's vanilla PPO-clip loss, GRPO advantages) on MATH train, MATH-500 test (default model Qwen2.5-1.5B-Instruct).
# Knobs: bash recipes/math/grpo.sh --help. Defaults and checks: isreshape_verl/launch/.
#   python data_prep/math_dataset.py && bash recipes/math/grpo.sh [hydra.key=value ...]
#   DRY_RUN=1 ASYNC=separate NNODES=2 bash recipes/math/grpo.sh   # print + check, no launch
set -euo pipefail
# shellcheck source=recipes/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch recipe math grpo "$@"
