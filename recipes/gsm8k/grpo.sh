#!/usr/bin/env bash
# GRPO (verl's vanilla PPO-clip loss, GRPO advantages) on GSM8K (default model Qwen2.5-0.5B-Instruct).
# Knobs: bash recipes/gsm8k/grpo.sh --help. Defaults and checks: isreshape_verl/launch/.
#   python data_prep/gsm8k.py && bash recipes/gsm8k/grpo.sh [hydra.key=value ...]
#   DRY_RUN=1 ASYNC=separate NNODES=2 bash recipes/gsm8k/grpo.sh   # print + check, no launch
set -euo pipefail
# shellcheck source=recipes/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch recipe gsm8k grpo "$@"
