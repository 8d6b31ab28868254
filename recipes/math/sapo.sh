#!/usr/bin/env bash
# SAPO (verl's sapo loss: soft sech² gates, tau_pos / tau_neg) on MATH train, MATH-500 test (default model Qwen2.5-1.5B-Instruct).
# Knobs: bash recipes/math/sapo.sh --help. Defaults and checks: isreshape_verl/launch/.
#   python data_prep/math_dataset.py && bash recipes/math/sapo.sh [hydra.key=value ...]
#   DRY_RUN=1 ASYNC=separate NNODES=2 bash recipes/math/sapo.sh   # print + check, no launch
set -euo pipefail
# shellcheck source=recipes/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch recipe math sapo "$@"
