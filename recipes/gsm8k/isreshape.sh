#!/usr/bin/env bash
# IS Reshape (this package's is_reshape loss) on GSM8K (default model Qwen2.5-0.5B-Instruct).
# Knobs: bash recipes/gsm8k/isreshape.sh --help. Shared defaults: recipes/common.sh.
#   python data_prep/gsm8k.py && bash recipes/gsm8k/isreshape.sh [hydra.key=value ...]
#   DRY_RUN=1 ASYNC=separate NNODES=2 bash recipes/gsm8k/isreshape.sh   # print + check, no launch
set -euo pipefail
# shellcheck source=recipes/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/common.sh"
run_recipe gsm8k isreshape "$@"
