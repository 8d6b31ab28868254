"""Ray clusters for multi-node runs: a local cluster of several Ray nodes on this machine, the check a recipe
makes before it joins a cluster, and the placement of a run's workers.

    python -m isreshape_verl.launch.cluster start DIR [--nodes 2] [--gpus-per-node 1] [--cpus-per-node 8]
    source DIR/env                     # RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH, RAY_DASHBOARD
    python -m isreshape_verl.launch.cluster placement DIR     # which node each actor of the last jobs ran on
    python -m isreshape_verl.launch.cluster stop DIR
    python -m isreshape_verl.launch.cluster kill-node DIR IP    # kill -9 one node's processes (a node dying)
    python -m isreshape_verl.launch.cluster start-missing DIR   # start again the nodes of DIR that have none
    python -m isreshape_verl.launch.cluster stop-marked MARKER   # the Ray processes one SLURM job started
    python -m isreshape_verl.launch.cluster check ADDRESS NNODES GPUS   # exit 2 unless the cluster has them
    python -m isreshape_verl.launch.cluster job-wheel WHEEL OUT_DIR     # the wheel ray_job.sh gives Ray (no deps)

Why several Ray nodes on one machine: it is how Ray tests itself (ray.cluster_utils.Cluster), and the only way
to run the multi-node path (placement groups across nodes, gloo across nodes, weights crossing nodes) without a
cluster. Each node gets its own loopback address (127.0.0.2, 127.0.0.3, ...) so that Ray sees distinct node IPs,
and `--num-gpus` logical GPUs, so that verl's resource pools place one rank per node. Ray's token authentication
is on (RAY_AUTH_MODE=token, a fresh token in DIR/token, mode 0600): a client without it is refused.

Every process of a cluster carries ISRESHAPE_RAY_CLUSTER=<marker> in its environment (Ray's workers inherit the
raylet's), so `stop` ends exactly the processes this cluster started and no other Ray on the machine; `ray stop`
would stop them all. Each also carries ISRESHAPE_RAY_NODE=<folder>@<node ip>, so one node can be killed alone.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from isreshape_verl.launch import run
from isreshape_verl.launch.knobs import KnobError

MARKER = "ISRESHAPE_RAY_CLUSTER"
"""Environment variable on every process of a cluster started here (its value: the cluster's folder or job)."""
NODE_MARKER = "ISRESHAPE_RAY_NODE"
"""Environment variable on every process of one node of a local cluster (its value: <folder>@<node ip>)."""
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
"""The `ray` command of this interpreter (a PATH lookup may find another Python's)."""
CONNECT_TIMEOUT = 5.0
"""Seconds to open a TCP connection to RAY_ADDRESS: ray.init itself waits minutes for an unreachable one."""
QUERY_TIMEOUT = 90.0
"""Seconds to read the cluster's nodes (ray.init with a wrong token fails only after ~20 s)."""


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_ip(first: str, i: int) -> str:
    """The i-th node's loopback address, counting from `first` (127.0.0.2: 127.0.0.1 stays the host's own)."""
    a, b, c, d = (int(x) for x in first.split("."))
    if a != 127 or d + i > 254:
        raise KnobError(f"--first-ip='{first}' is not allowed; it must be a loopback address 127.x.y.z with room "
                        f"for {i + 1} node(s)")
    return f"{a}.{b}.{c}.{d + i}"


def cluster_env(folder: Path) -> dict[str, str]:
    """What a client of the cluster in `folder` needs: address, token mode and token, dashboard (ray_job.sh)."""
    info = json.loads((folder / "cluster.json").read_text())
    return {"RAY_ADDRESS": info["address"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(folder / "token"),
            "RAY_DASHBOARD": info["dashboard"]}


def start(folder: Path, nodes: int = 2, gpus_per_node: int = 1, cpus_per_node: int = 8,
          first_ip: str = "127.0.0.2", object_store_mb: int = 512, timeout: float = 120.0) -> dict[str, str]:
    """Start `nodes` Ray nodes on this machine, node i on first_ip + i, the head first; wait until all joined.
    Returns cluster_env. On any failure every process started so far is stopped."""
    folder = folder.resolve()
    if len(str(folder)) > 40:  # Ray's socket paths (folder/r/session_<date>_<pid>/sockets/...) must stay < 108
        raise KnobError(f"cluster folder '{folder}' is too long ({len(str(folder))} characters); use a short one "
                        "(at most 40, e.g. /tmp/isrv-c1)")
    if (folder / "cluster.json").exists() and processes_of(str(folder)):
        raise KnobError(f"a cluster is already running in {folder}; stop it first (stop {folder})")
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    ips = [node_ip(first_ip, i) for i in range(nodes)]
    port, dash_port = free_port(ips[0]), free_port(ips[0])
    info = {"address": f"{ips[0]}:{port}", "dashboard": f"http://{ips[0]}:{dash_port}", "nodes": ips,
            "gpus_per_node": gpus_per_node}
    (folder / "cluster.json").write_text(json.dumps(info) + "\n")
    env = {**os.environ, MARKER: str(folder), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    common = [f"--num-gpus={gpus_per_node}", f"--num-cpus={cpus_per_node}", f"--temp-dir={folder}/r",
              f"--object-store-memory={object_store_mb * 2**20}", "--disable-usage-stats"]
    info["common"] = common
    started = time.monotonic()
    try:
        for i, ip in enumerate(ips):
            extra = [f"--port={port}", f"--dashboard-host={ip}", f"--dashboard-port={dash_port}",
                     f"--ray-client-server-port={free_port(ip)}"] if i == 0 else []
            _start_node(folder, info, i, env, extra, timeout)
        _wait_for_nodes(folder, info, nodes, started, timeout)
    except BaseException:
        stop_marked(str(folder))
        raise
    info["start_s"] = round(time.monotonic() - started, 1)
    (folder / "cluster.json").write_text(json.dumps(info) + "\n")
    (folder / "env").write_text("".join(f"export {k}={v}\n" for k, v in cluster_env(folder).items()))
    return cluster_env(folder)


def _start_node(folder: Path, info: dict, i: int, env: Mapping[str, str], extra: list[str], timeout: float) -> None:
    """`ray start` node i of the cluster (the head when i == 0, with `extra` arguments), marked as its node."""
    ip = info["nodes"][i]
    args = [f"--node-ip-address={ip}", f"--dashboard-agent-listen-port={free_port(ip)}", *info["common"]]
    args = ["--head", *extra, *args] if i == 0 else [f"--address={info['address']}", *args]
    with open(folder / f"node{i}.log", "w") as log:
        proc = subprocess.run([*RAY, "start", *args], env={**env, NODE_MARKER: f"{folder}@{ip}"}, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode:
        tail = (folder / f"node{i}.log").read_text().strip().splitlines()[-1:] or ["?"]
        raise KnobError(f"ray start of node {i} ({ip}) failed: {tail[0]} (log: {folder}/node{i}.log)")


def _wait_for_nodes(folder: Path, info: dict, nodes: int, started: float, timeout: float) -> None:
    client = {**os.environ, **cluster_env(folder)}
    while True:
        have = cluster_nodes(info["address"], client)
        if len(have) >= nodes:
            return
        if time.monotonic() - started > timeout:
            raise KnobError(f"only {len(have)} of {nodes} Ray nodes joined in {timeout:.0f} s (logs: {folder})")
        time.sleep(1)


def node_processes(folder: Path, ip: str) -> list[int]:
    """pids of the processes of the cluster's node at `ip` (its raylet, agents and workers)."""
    return run.processes_of(f"{folder.resolve()}@{ip}", variable=NODE_MARKER)


def kill_node(folder: Path, ip: str) -> int:
    """kill -9 every process of one node, as if the machine died; returns how many there were."""
    info = json.loads((folder / "cluster.json").read_text())
    if ip not in info["nodes"]:
        raise KnobError(f"node '{ip}' is not allowed; it must be one of the cluster's nodes: {', '.join(info['nodes'])}")
    if ip == info["nodes"][0]:
        raise KnobError(f"node '{ip}' is not allowed; it is the head (kill a worker node: "
                        f"{', '.join(info['nodes'][1:]) or 'none'})")
    marker, seen = f"{folder.resolve()}@{ip}", set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = run.processes_of(marker, variable=NODE_MARKER)
        if not pids:
            break
        seen.update(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return len(seen)


def start_missing(folder: Path, timeout: float = 120.0) -> list[str]:
    """Start again the worker nodes of the cluster in `folder` that have no process left; returns their IPs."""
    folder = folder.resolve()
    info = json.loads((folder / "cluster.json").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env.update({MARKER: str(folder), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(folder / "token"),
                "RAY_USAGE_STATS_ENABLED": "0"})
    started = time.monotonic()
    missing = [i for i, ip in enumerate(info["nodes"]) if i and not node_processes(folder, ip)]
    for i in missing:
        _start_node(folder, info, i, env, [], timeout)
    _wait_for_nodes(folder, info, len(info["nodes"]), started, timeout)
    return [info["nodes"][i] for i in missing]


def stop(folder: Path) -> int:
    """Stop every process of the cluster in `folder`; returns how many there were."""
    return stop_marked(str(folder.resolve()))


# ---- processes, by marker ----
def processes_of(marker: str) -> list[int]:
    """pids of the processes whose environment has ISRESHAPE_RAY_CLUSTER=<marker> exactly."""
    return run.processes_of(marker, variable=MARKER)


def stop_marked(marker: str, grace: float = 5.0) -> int:
    """Stop the marker's processes (`run.stop_processes`); returns how many there were."""
    return run.stop_processes(marker, grace=grace, variable=MARKER)


# ---- what a recipe checks before it joins a cluster ----
_NODES = """
import json, ray
ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
print("NODES=" + json.dumps([{{"ip": n["NodeManagerAddress"], "gpus": n["Resources"].get("GPU", 0)}}
                             for n in ray.nodes() if n["Alive"]]))
"""


def cluster_nodes(address: str, env: Mapping[str, str]) -> list[dict]:
    """The alive nodes of the cluster at `address` ({"ip", "gpus"} each), read by a separate Python (ray.init
    in this process would make it a driver of that cluster); raises KnobError with one line."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise KnobError(f"RAY_ADDRESS='{address}' is not allowed; it must be the cluster's HOST:PORT (the GCS "
                        "address `ray start --head` prints, e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise KnobError(f"RAY_ADDRESS='{address}' is not reachable ({exc.strerror or exc}): start the cluster "
                        "first, or fix the address") from None
    try:
        proc = subprocess.run([sys.executable, "-c", _NODES.format(address=address)], env=dict(env),
                              capture_output=True, text=True, timeout=QUERY_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise KnobError(f"RAY_ADDRESS='{address}' did not answer as a Ray cluster in {QUERY_TIMEOUT:.0f} s") from None
    for line in proc.stdout.splitlines():
        if line.startswith("NODES="):
            return json.loads(line[6:])
    text = proc.stderr
    if "AuthenticationError" in text or "InvalidAuthToken" in text or "Unauthenticated" in text:
        raise KnobError(f"the Ray cluster at RAY_ADDRESS='{address}' refused this client's token: set "
                        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to the cluster's token")
    last = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "no output")
    raise KnobError(f"RAY_ADDRESS='{address}' is not a Ray cluster this client can join: {last.strip()[:200]}")


def check_cluster(address: str, nnodes: int, gpus_per_node: int, env: Mapping[str, str]) -> list[dict]:
    """A run on an existing cluster needs NNODES alive nodes with GPUS_PER_NODE (logical) GPUs each: else verl
    would wait forever for its placement groups. Raises KnobError naming what the cluster has."""
    nodes = cluster_nodes(address, env)
    fit = [n for n in nodes if n["gpus"] >= gpus_per_node]
    if len(fit) < nnodes:
        have = ", ".join(f"{n['ip']} ({n['gpus']:g} GPU)" for n in nodes) or "no alive node"
        raise KnobError(f"NNODES={nnodes} x GPUS_PER_NODE={gpus_per_node} does not fit the Ray cluster at "
                        f"RAY_ADDRESS='{address}': it has {len(nodes)} node(s): {have}")
    return nodes


# ---- a node dying during a run ----
class NodeWatch:
    """The nodes of the cluster at `address` that are alive now; `dead()` names those of them that died since.
    Reads the GCS directly (a few ms, no driver: ray.init would make this process one), with the token of this
    process's environment (RAY_AUTH_MODE, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)."""

    def __init__(self, address: str):
        from ray._raylet import GcsClient

        self.gcs = GcsClient(address=address.removeprefix("ray://"))
        self.nodes = {node_id: (info.node_manager_address, info.node_manager_port)
                      for node_id, info in self._read().items() if info.state == 0}  # GcsNodeInfo.ALIVE

    def _read(self) -> dict:
        return self.gcs.get_all_node_info(timeout=5)

    def dead(self) -> list[str]:
        """The addresses of the nodes alive at the start that are dead now: the GCS says so (which takes it ~15 s of
        missed health checks), or the node's raylet no longer accepts a connection (at once for a killed raylet)."""
        try:
            now = self._read()
        except Exception:  # the GCS busy: ask the raylets alone
            now = None
        gone = []
        for node_id, (ip, port) in self.nodes.items():
            if now is not None and (node_id not in now or now[node_id].state != 0):
                gone.append(ip)
                continue
            try:
                socket.create_connection((ip, port), timeout=CONNECT_TIMEOUT).close()
            except OSError:
                gone.append(ip)
        return sorted(gone)


# ---- the package for a Ray job ----
def job_wheel(wheel: Path, out_dir: Path) -> Path:
    """A copy of `wheel` in `out_dir` without its Requires-Dist lines (RECORD rehashed). Ray installs a py_modules
    wheel with `pip install WHEEL --target=DIR` on every node, dependencies included: verl, torch, numpy, ... beside
    the cluster's own, minutes of installing, and here a numpy that failed to import (its openblas library was not
    found). The cluster already runs Ray and verl; the job needs this package alone, with its entry point."""
    import base64
    import hashlib
    import zipfile

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / wheel.name
    with zipfile.ZipFile(wheel) as src:
        files = {info.filename: src.read(info) for info in src.infolist()}
    record = next(name for name in files if name.endswith(".dist-info/RECORD"))
    for name in files:
        if name.endswith(".dist-info/METADATA"):
            files[name] = b"".join(line for line in files[name].splitlines(keepends=True)
                                   if not line.startswith(b"Requires-Dist:"))
    rows = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
            f"{len(data)}" for name, data in files.items() if name != record]
    files[record] = ("\n".join([*rows, f"{record},,"]) + "\n").encode()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in files.items():
            dst.writestr(name, data)
    return out


# ---- where the workers ran ----
_PLACEMENT = """
import json
from ray.util.state import list_actors, list_nodes
ips = {{n.node_id: n.node_ip for n in list_nodes(address={dashboard!r}, raise_on_missing_output=False)}}
rows = list_actors(address={dashboard!r}, detail=True, limit=10000, raise_on_missing_output=False)
print("ACTORS=" + json.dumps([{{"class": a.class_name, "ip": ips.get(a.node_id, a.node_id), "pid": a.pid,
                                "job": a.job_id, "state": a.state}} for a in rows]))
"""


def placement(dashboard: str, env: Mapping[str, str]) -> list[dict]:
    """Every actor the cluster knows (alive or dead, the last jobs'): class name, node IP, job id, state."""
    proc = subprocess.run([sys.executable, "-c", _PLACEMENT.format(dashboard=dashboard)], env=dict(env),
                          capture_output=True, text=True, timeout=QUERY_TIMEOUT)
    for line in proc.stdout.splitlines():
        if line.startswith("ACTORS="):
            return json.loads(line[7:])
    raise RuntimeError(f"listing the actors of {dashboard} failed: {proc.stderr.strip()[-500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m isreshape_verl.launch.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("start", help="start Ray nodes on this machine's loopback addresses")
    p.add_argument("dir", type=Path)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus-per-node", type=int, default=1, help="logical GPUs per node (DEVICE=cpu)")
    p.add_argument("--cpus-per-node", type=int, default=8, help="logical CPUs per node")
    p.add_argument("--first-ip", default="127.0.0.2")
    for name in ("stop", "placement", "env", "start-missing"):
        sub.add_parser(name).add_argument("dir", type=Path)
    p = sub.add_parser("kill-node", help="kill -9 every process of one worker node (a node dying)")
    p.add_argument("dir", type=Path)
    p.add_argument("ip")
    sub.add_parser("stop-marked").add_argument("marker")
    p = sub.add_parser("job-wheel", help="a copy of the package's wheel without its dependencies, for a Ray job")
    p.add_argument("wheel", type=Path)
    p.add_argument("out_dir", type=Path)
    p = sub.add_parser("check", help="exit 0 when ADDRESS has NNODES alive nodes with GPUS logical GPUs each")
    p.add_argument("address")
    p.add_argument("nnodes", type=int)
    p.add_argument("gpus", type=int)
    args = parser.parse_args(argv)
    try:
        if args.what == "start":
            if not 1 <= args.nodes <= 16:
                raise KnobError(f"--nodes={args.nodes} is not allowed; it must be 1 to 16")
            env = start(args.dir, args.nodes, args.gpus_per_node, args.cpus_per_node, args.first_ip)
            info = json.loads((args.dir / "cluster.json").read_text())
            print(f"# {args.nodes} Ray node(s) on {', '.join(info['nodes'])} in {info['start_s']} s; token auth on; "
                  f"source {args.dir.resolve()}/env to use it")
            print("".join(f"export {k}={v}\n" for k, v in env.items()), end="")
        elif args.what == "stop":
            print(f"# stopped {stop(args.dir)} process(es) of the cluster in {args.dir}")
        elif args.what == "kill-node":
            print(f"# killed {kill_node(args.dir, args.ip)} process(es) of node {args.ip} (kill -9)")
        elif args.what == "start-missing":
            print(f"# started again: {', '.join(start_missing(args.dir)) or 'none (every node has its processes)'}")
        elif args.what == "job-wheel":
            print(job_wheel(args.wheel, args.out_dir))
        elif args.what == "stop-marked":
            print(f"# stopped {stop_marked(args.marker)} process(es) marked {MARKER}={args.marker}")
        elif args.what == "check":
            nodes = check_cluster(args.address, args.nnodes, args.gpus, os.environ)
            print(f"# {len(nodes)} node(s): {', '.join(n['ip'] for n in nodes)}")
        elif args.what == "env":
            print("".join(f"export {k}={v}\n" for k, v in cluster_env(args.dir).items()), end="")
        else:
            env = {**os.environ, **cluster_env(args.dir)}
            for row in placement(env["RAY_DASHBOARD"], env):
                print(f"{row['class']:<28} {row['ip']:<16} pid {row['pid']:<8} job {row['job']} {row['state']}")
    except KnobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
