#!/usr/bin/env bash
# Submit a recipe to an existing Ray cluster with `ray job submit`. The job's runtime env
# uploads this repository as the working dir and installs this package on every node (a
# wheel built here without its dependencies, passed as a py_modules .whl: the cluster
# runs its own Ray and verl), and the recipe runs on the head node.
#
#   RAY_ADDRESS=http://HEAD:8265 NNODES=2 RUN_ROOT=/shared/runs DATA_DIR=/shared/data/gsm8k \
#       bash recipes/cluster/ray_job.sh recipes/gsm8k/compare.sh [hydra overrides]
#   DRY_RUN=1 NNODES=2 bash recipes/cluster/ray_job.sh recipes/gsm8k/grpo.sh   # print + check only
#
# Knobs: RAY_ADDRESS (the dashboard, http://127.0.0.1:8265), NO_WAIT=1 (return after submitting),
# plus every knob of the recipe (bash RECIPE --help), forwarded to the job when set here.
# RUN_ROOT / COMPARE_DIR must be absolute paths on a file system every node sees (the job's
# working dir is a temporary copy); DATA_DIR too.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    [[ $# -lt 1 ]] && exit 2
    exit 0
fi
RECIPE=$1
shift
[[ -f $RECIPE ]] || { echo "error: recipe '$RECIPE' not found (e.g. recipes/gsm8k/compare.sh)" >&2; exit 2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${DRY_RUN:=0}"
: "${RAY_ADDRESS:=http://127.0.0.1:8265}"
: "${NO_WAIT:=0}"
: "${NNODES:=2}"
export NNODES

for var in RUN_ROOT COMPARE_DIR; do
    if [[ -n ${!var:-} && ${!var} != /* ]]; then
        echo "error: $var='${!var}' must be an absolute path on a shared file system" >&2
        exit 2
    fi
done

if [[ $DRY_RUN != 1 && -z ${RUN_ROOT:-} && -z ${COMPARE_DIR:-} ]]; then
    echo "error: set RUN_ROOT (or COMPARE_DIR for compare.sh) to an absolute shared path; the job's working dir is temporary" >&2
    exit 2
fi

# the recipe knobs set here travel into the job (isreshape_verl/launch/knobs.py lists them; DRY_RUN and PYTHON
# are this machine's), and wandb's key
KNOBS=(WANDB_API_KEY)
for var in $(PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m isreshape_verl.launch knobs); do
    [[ $var == DRY_RUN || $var == PYTHON ]] || KNOBS+=("$var")
done
entry=(env)
for var in "${KNOBS[@]}"; do
    [[ -n ${!var:-} ]] && entry+=("$var=${!var}")
done
# the recipe runs from / (its path in the job's copy of this repository made absolute): started in the job's
# working dir, verl died at once with "Intel oneMKL FATAL ERROR: Cannot load .../torch/lib/libtorch_cpu.so"
# (Ray 2.60, measured on the local two-node cluster; the cause was not found), from / it trains
# shellcheck disable=SC2016  # expanded in the job
entry+=(bash -c 'recipe=$PWD/$1; shift; cd / && exec bash "$recipe" "$@"' ray-job "$RECIPE" "$@")

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml")
wheel="dist/job/isreshape_verl-$version-py3-none-any.whl"  # cluster.py job-wheel: Ray would pip-install its deps
runtime_env=$(printf '{"working_dir": "%s", "py_modules": ["%s"], "excludes": [".git", "runs", "dist/*.tar.gz", "*.parquet"]}' \
    "$REPO" "$REPO/$wheel")
submit=(ray job submit --address "$RAY_ADDRESS" --runtime-env-json "$runtime_env")
[[ $NO_WAIT == 1 ]] && submit+=(--no-wait)
submit+=(-- "${entry[@]}")

if [[ $DRY_RUN == 1 ]]; then
    echo "# DRY_RUN=1 ray job: $NNODES node(s) at $RAY_ADDRESS"
    echo "(cd $REPO && python3 -m pip wheel --no-deps -w dist . && python3 -m isreshape_verl.launch.cluster job-wheel ${wheel/job\//} dist/job)"
    printf '%q ' "${submit[@]}"
    printf '\n'
    exec bash "$RECIPE" "$@"
fi

(cd "$REPO" && python3 -m pip wheel --no-deps --quiet -w dist . &&
    "${PYTHON:-python3}" -m isreshape_verl.launch.cluster job-wheel "${wheel/job\//}" dist/job >/dev/null)
[[ -f $REPO/$wheel ]] || { echo "error: building $wheel failed" >&2; exit 1; }
"${submit[@]}"
