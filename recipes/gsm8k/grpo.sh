#!/usr/bin/env bash
# GRPO (verl's vanilla PPO-clip loss, GRPO advantages) on GSM8K (default model Qwen2.5-0.5B-Instruct).
# Knobs: bash recipes/gsm8k/grpo.sh --help. Shared defaults: recipes/common.sh.
#   python data_prep/gsm8k.py && bash recipes/gsm8k/grpo.sh [hydra.key=value ...]
#   DRY_RUN=1 ASYNC=separate NNODES=2 bash recipes/gsm8k/grpo.sh   # print + check, no launch
set -euo pipefail
# shellcheck source=recipes/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/common.sh"
run_recipe gsm8k grpo "$@"
