#!/usr/bin/env bash
# The GPU checks of the loss, on a machine with torch and CUDA (verl from .gpu_carry/ when it is not installed):
#   1. tests/test_cuda.py: CUDA gives the CPU's loss, gradient and metrics; the token loss makes no host sync;
#   2. benchmarks/loss_overhead.py: time, memory and ops of every loss, and the adaptive/fixed time ratio.
# Results go to OUT_DIR (default: $OUT, else runs/gpu): loss_overhead_cuda.txt, test_cuda.txt, machine.txt.
#     bash benchmarks/gpu/prepare.sh           # once, on a machine with pip access
#     bash benchmarks/gpu/run.sh [OUT_DIR]     # on the GPU machine (LOSS_OVERHEAD_ARGS="--reps 50" passes options)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-${OUT:-runs/gpu}}
mkdir -p "$out"
if ! python -c "import verl" 2>/dev/null; then
    [ -d .gpu_carry ] || { echo "verl is not installed and .gpu_carry/ is missing: run benchmarks/gpu/prepare.sh" >&2; exit 2; }
    export PYTHONPATH="$PWD/.gpu_carry:$PWD/benchmarks/gpu/stubs:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"; } \
    > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
python -m pytest tests/test_cuda.py -rs -p no:cacheprovider 2>&1 | tee "$out/test_cuda.txt"
tests_rc=${PIPESTATUS[0]}
python benchmarks/loss_overhead.py --no-progress ${LOSS_OVERHEAD_ARGS:-} 2>&1 | tee "$out/loss_overhead_cuda.txt"
bench_rc=${PIPESTATUS[0]}
echo "test_cuda exit $tests_rc, loss_overhead exit $bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
