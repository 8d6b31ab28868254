#!/usr/bin/env bash
# Start or stop a Ray cluster of several nodes on this machine (one loopback address per node, token auth on),
# to run the multi-node recipes without a cluster (isreshape_verl/launch/cluster.py):
#
#   bash recipes/cluster/local_ray.sh start /tmp/isrv-c1 [--nodes 2] [--gpus-per-node 1] [--cpus-per-node 8]
#   source /tmp/isrv-c1/env      # RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH, RAY_DASHBOARD
#   DEVICE=cpu NNODES=2 RUN_ROOT=/tmp/runs bash recipes/tiny/isreshape.sh
#   bash recipes/cluster/local_ray.sh placement /tmp/isrv-c1   # the node of every worker of the last jobs
#   bash recipes/cluster/local_ray.sh stop /tmp/isrv-c1        # only this cluster's processes, not `ray stop`
set -euo pipefail
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    [[ $# -lt 1 ]] && exit 2
    exit 0
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m isreshape_verl.launch.cluster "$@"
