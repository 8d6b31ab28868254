#!/usr/bin/env bash
# Build .gpu_carry/: verl 0.9.1 and the few pure-Python packages that its loss code, the loss benchmark and
# pytest import, installed without dependencies (≈ 25 MiB), for a GPU machine whose image has torch but not
# verl. verl's heavy imports (Ray, transformers, tensordict, …) are stood in for by benchmarks/gpu/stubs.
# Then, on the GPU machine, in a copy of this repository with .gpu_carry/ next to it:
#     bash benchmarks/gpu/run.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
target=.gpu_carry
rm -rf "$target"
python -m pip install --quiet --no-deps --target "$target" \
    "verl==0.9.1" "omegaconf>=2.3,<2.4" "antlr4-python3-runtime==4.9.3" pyyaml packaging tqdm \
    pytest pluggy iniconfig pygments
rm -rf "${target:?}/bin" "$target/scripts" "$target/tests"  # verl's wheel ships a top-level `tests` package
du -sh "$target"
