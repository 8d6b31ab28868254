#!/usr/bin/env bash
# SAPO (verl's sapo loss: soft sech² gates, tau_pos / tau_neg) on GSM8K (default model Qwen2.5-0.5B-Instruct).
# Knobs: bash recipes/gsm8k/sapo.sh --help. Defaults and checks: isreshape_verl/launch/.
#   python data_prep/gsm8k.py && bash recipes/gsm8k/sapo.sh [hydra.key=value ...]
#   DRY_RUN=1 ASYNC=separate NNODES=2 bash recipes/gsm8k/sapo.sh   # print + check, no launch
set -euo pipefail
# shellcheck source=recipes/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch recipe gsm8k sapo "$@"
