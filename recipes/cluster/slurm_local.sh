#!/usr/bin/env bash
# A two-node SLURM on this machine, to run recipes/cluster/slurm.sbatch for real without a cluster: Debian's
# slurm-wlm (22.05) and munge (installed with apt-get where missing, as root), one slurmctld and one slurmd per
# node (slurmd -N n1, -N n2), node i at loopback address 127.0.0.(i+1) so that Ray sees distinct node IPs, and a
# munged of its own; every file in DIR, every daemon on ports of its own, stopped by pid on `down`.
#
#   bash recipes/cluster/slurm_local.sh up /tmp/isrv-slurm [NODES]     # prints: export SLURM_CONF=DIR/slurm.conf
#   export SLURM_CONF=/tmp/isrv-slurm/slurm.conf
#   sbatch --nodes=2 --wait --export=ALL,DEVICE=cpu,STEPS=2,RUN_ROOT=/tmp/runs,DATA_DIR=$HOME/data/tiny \
#       recipes/cluster/slurm.sbatch recipes/tiny/isreshape.sh
#   bash recipes/cluster/slurm_local.sh down /tmp/isrv-slurm
#
# Needs root (slurmd runs jobs as their user; munged as munge). Knobs: CPUS (2 per node), MEMORY_MB (8000 per node).
set -euo pipefail
if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    [[ ${1:-} == -h || ${1:-} == --help ]] && exit 0
    exit 2
fi
what=$1 dir=$2 nodes=${3:-2}
[[ $dir == /* ]] || { echo "error: DIR='$dir' must be an absolute path" >&2; exit 2; }
[[ $nodes =~ ^[1-9]$ ]] || { echo "error: NODES='$nodes' is not allowed; it must be 1 to 9" >&2; exit 2; }

stop_pidfile() {  # the daemon a pid file names, if it is still the one we started (its command names DIR)
    local file=$1 pid
    [[ -f $file ]] || return 0
    pid=$(<"$file")
    if [[ -n $pid ]] && grep -qF "$dir" "/proc/$pid/cmdline" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

if [[ $what == down ]]; then
    export SLURM_CONF=$dir/slurm.conf
    if [[ -f $SLURM_CONF ]]; then  # the jobs first: their steps stop their own Ray (slurm.sbatch)
        mapfile -t jobs < <(squeue -h -o %i 2>/dev/null)
        ((${#jobs[@]} == 0)) || scancel --quiet --full "${jobs[@]}" 2>/dev/null || true
        for _ in $(seq 60); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 1; done
    fi
    for ((i = 1; i <= nodes; i++)); do stop_pidfile "$dir/slurmd-n$i.pid"; done
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
    echo "# SLURM in $dir stopped"
    exit 0
fi
[[ $what == up ]] || { echo "error: '$what' is not allowed (up, down)" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "error: slurm_local.sh up needs root (slurmd, munged)" >&2; exit 2; }

if ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "# installing slurm-wlm and munge (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
[[ -d /run/munge ]] || install -d -o munge -g munge -m 0755 /run/munge

mkdir -p "$dir/state" "$dir/spool" && chmod 755 "$dir"
install -d -o munge -g munge -m 0755 "$dir/munge"
[[ -f $dir/munge/munge.key ]] || { mungekey -c -k "$dir/munge/munge.key" && chown munge:munge "$dir/munge/munge.key"; }
runuser -u munge -- munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
names=()
for ((i = 1; i <= nodes; i++)); do names+=("n$i"); done
cat > "$dir/slurm.conf" <<CONF
ClusterName=isrv
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
# job ids from the clock, not from 1: each cluster starts with a fresh state, and a job's /tmp/isrv-ray-JOBID
# must not meet a folder of an earlier cluster's job of the same id
FirstJobId=$(( $(date +%s) % 50000000 + 1 ))
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
# SLURM's default: a job step's EXIT trap (stopping its node's Ray, by marker) has time before SIGKILL
KillWait=30
$(for ((i = 1; i <= nodes; i++)); do
    echo "NodeName=n$i NodeAddr=127.0.0.$((i + 1)) NodeHostname=localhost Port=$(free_port) CPUs=${CPUS:-2} RealMemory=${MEMORY_MB:-8000} State=UNKNOWN"
done)
PartitionName=debug Nodes=$(IFS=,; echo "${names[*]}") Default=YES OverSubscribe=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
for name in "${names[@]}"; do slurmd -f "$SLURM_CONF" -N "$name"; done
for _ in $(seq 60); do
    idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
    ((idle >= nodes)) && break
    sleep 1
done
((idle >= nodes)) || { echo "error: only $idle of $nodes SLURM nodes came up (logs in $dir)" >&2; exit 1; }
echo "# SLURM with $nodes node(s) up in $dir"
echo "export SLURM_CONF=$SLURM_CONF"
