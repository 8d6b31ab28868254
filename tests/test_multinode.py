"""Multi-node for real, on one machine: a two-node Ray cluster (recipes/cluster/local_ray.sh, one loopback address
per node, token auth on) and a two-node SLURM (recipes/cluster/slurm_local.sh, `slurmd -N n1/n2`), each running
the tiny recipe with NNODES=2 through verl's own trainer.

They take minutes and the SLURM half needs root and Debian's slurm-wlm and munge, so they run only where asked:
`.ci/run` runs them as a step of their own after the README's `python -m pytest`, with ISRV_MULTINODE=1 (and
`slurm_local.sh up` installs the packages there). Elsewhere each test is skipped, naming what is missing.

    ISRV_MULTINODE=1 python -m pytest tests/test_multinode.py -rs
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from isreshape_verl.launch.cluster import processes_of
from isreshape_verl.testing.recipe_runs import REPO, SMALL, metrics_by_step, processes_of_run, recipe_env, \
    write_tiny_data

pytestmark = pytest.mark.skipif(os.environ.get("ISRV_MULTINODE") != "1",
                                reason="multi-node tests run only with ISRV_MULTINODE=1 (.ci/run's multi-node step; "
                                       "minutes of verl runs on two Ray nodes and a two-node SLURM)")


def _ray_env(cluster: dict, **knobs: str) -> dict:
    """recipe_env (which drops every RAY_ variable of the caller) plus the cluster's address and token."""
    return recipe_env(**{**{k: cluster[k] for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}, **knobs})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes (127.0.0.2, 127.0.0.3), one logical GPU each, token auth on; stopped by marker after."""
    folder = Path(f"/tmp/isrv-t{os.getpid()}")
    started = time.monotonic()
    proc = subprocess.run(["bash", "recipes/cluster/local_ray.sh", "start", str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=recipe_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = dict(line.removeprefix("export ").split("=", 1) for line in proc.stdout.splitlines()
               if line.startswith("export "))
    env["start_s"] = f"{time.monotonic() - started:.1f}"
    env["folder"] = str(folder)
    yield env
    subprocess.run(["bash", "recipes/cluster/local_ray.sh", "stop", str(folder)], cwd=REPO, timeout=120,
                   env=recipe_env())
    assert processes_of(str(folder)) == [], "processes of the test's Ray cluster left behind"
    shutil.rmtree(folder, ignore_errors=True)


def _client(env: dict, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_a_client_without_the_token_is_refused_and_one_with_it_is_served(ray_cluster, tmp_path):
    code = f"import ray; ray.init(address={ray_cluster['RAY_ADDRESS']!r}); print('served', len(ray.nodes()))"
    base = {k: v for k, v in recipe_env(HOME=str(tmp_path)).items()}  # no ~/.ray/auth_token either
    served = _client({**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": ray_cluster["RAY_AUTH_TOKEN_PATH"]},
                     code)
    assert "served 2" in served.stdout, served.stderr[-2000:]
    no_token = _client({**base, "RAY_AUTH_MODE": "token"}, code)
    assert no_token.returncode != 0 and "AuthenticationError" in no_token.stderr
    wrong = _client({**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, code)
    assert wrong.returncode != 0 and "served" not in wrong.stdout


def test_the_nodes_have_distinct_loopback_addresses(ray_cluster):
    from isreshape_verl.launch.cluster import cluster_nodes

    nodes = cluster_nodes(ray_cluster["RAY_ADDRESS"], {**os.environ, **ray_cluster})
    assert sorted(n["ip"] for n in nodes) == ["127.0.0.2", "127.0.0.3"]
    assert all(n["gpus"] == 1 for n in nodes)


@pytest.mark.parametrize("knobs, line", [
    # MICRO_BATCH=2: 4 prompts x 2 answers split over 4 ranks pass verl's batch checks, so the cluster's is the one
    ({"NNODES": "4", "MICRO_BATCH": "2"}, "error: NNODES=4 x GPUS_PER_NODE=1 does not fit the Ray cluster at "
                                          "RAY_ADDRESS='{addr}': it has 2 node(s): "),
    ({"NNODES": "2", "GPUS_PER_NODE": "2", "MICRO_BATCH": "2"}, "does not fit the Ray cluster"),
    ({"NNODES": "2", "RAY_ADDRESS": "127.0.0.2:1"}, "error: RAY_ADDRESS='127.0.0.2:1' is not reachable"),
    ({"NNODES": "2", "RAY_ADDRESS": "nowhere"}, "error: RAY_ADDRESS='nowhere' is not allowed; it must be the "
                                                "cluster's HOST:PORT"),
    ({"NNODES": "2", "ASYNC": "separate", "ROLLOUT_NODES": "2"}, "error: ROLLOUT_NODES='2' is not allowed; it must be "
                                                                  "< NNODES (2)"),
])
def test_a_bad_cluster_input_is_one_line_before_verl_starts(ray_cluster, data, tmp_path, knobs, line):
    env = _ray_env(ray_cluster, DEVICE="cpu", DATA_DIR=str(data), RUN_ROOT=str(tmp_path), **{**SMALL, **knobs})
    started = time.monotonic()
    proc = subprocess.run(["bash", "recipes/tiny/isreshape.sh"], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and line.format(addr=ray_cluster["RAY_ADDRESS"]) in lines[0], proc.stderr
    assert time.monotonic() - started < 120  # not verl waiting for a placement group
    assert not (tmp_path / "tiny-isreshape-sync" / "train.log").exists()


def test_cpu_nnodes_2_without_a_cluster_is_refused(data, tmp_path):
    env = recipe_env(DEVICE="cpu", NNODES="2", DATA_DIR=str(data), RUN_ROOT=str(tmp_path), **SMALL)
    proc = subprocess.run(["bash", "recipes/tiny/isreshape.sh"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: NNODES=2 is not allowed with DEVICE=cpu without RAY_ADDRESS")


@pytest.mark.parametrize("mode", ["sync", "separate"])
def test_a_recipe_trains_on_two_ray_nodes_one_rank_each(ray_cluster, data, tmp_path, mode):
    """sync: FSDP world size 2, one rank per node (gloo across nodes). separate: the trainer on one node, the rollout
    on the other, weights crossing nodes through the CPU weight sync (isreshape_ray)."""
    from isreshape_verl.launch.cluster import placement

    env = _ray_env(ray_cluster, DEVICE="cpu", NNODES="2", ASYNC=mode, GPUS_PER_NODE="1", DATA_DIR=str(data),
                   RUN_ROOT=str(tmp_path), EXP_NAME=mode, **SMALL)
    proc = subprocess.run(["bash", "recipes/tiny/isreshape.sh"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 node(s) of the Ray cluster at" in proc.stdout
    rows = metrics_by_step(tmp_path / mode)
    assert {1, 2} <= set(rows) and rows[2]["timing_s/update_weights"] > 0
    assert processes_of_run(tmp_path) == [], "processes of the run left behind"

    actors = placement(ray_cluster["RAY_DASHBOARD"], {**os.environ, **ray_cluster})
    job = max(a["job"] for a in actors if a["class"].endswith("WorkerDict"))
    where = {}
    for a in actors:
        if a["job"] == job:
            where.setdefault(a["class"].rsplit(".", 1)[-1], set()).add(a["ip"])
    print(f"{mode}: placement {where}; step times {[round(rows[s]['timing_s/step'], 2) for s in (1, 2)]} s, "
          f"update_weights {[round(rows[s]['timing_s/update_weights'], 3) for s in (1, 2)]} s")
    if mode == "sync":  # two ranks, one on each node
        assert where["WorkerDict"] == {"127.0.0.2", "127.0.0.3"}
    else:  # the trainer's node is not the rollout's
        assert len(where["WorkerDict"]) == 1 and len(where["HFRolloutServer"]) == 1
        assert where["WorkerDict"] != where["HFRolloutServer"]


# ---- SLURM ----
def _slurm_missing() -> str:
    if os.geteuid() != 0:
        return "root (slurmd and munged are started by the test)"
    if not (shutil.which("apt-get") or (shutil.which("slurmd") and shutil.which("munged"))):
        return "slurm-wlm and munge (slurmd, munged), or apt-get to install them"
    return ""


@pytest.fixture(scope="module")
def slurm():
    missing = _slurm_missing()
    if missing:
        pytest.skip(f"the two-node SLURM test needs {missing}")
    folder = f"/tmp/isrv-s{os.getpid()}"
    proc = subprocess.run(["bash", "recipes/cluster/slurm_local.sh", "up", folder], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    yield {"SLURM_CONF": f"{folder}/slurm.conf", "folder": folder}
    subprocess.run(["bash", "recipes/cluster/slurm_local.sh", "down", folder], cwd=REPO, timeout=180)
    shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return str(s.getsockname()[1])


def _sbatch(slurm: dict, tmp_path: Path, *args: str, **knobs: str) -> tuple[subprocess.CompletedProcess, str, str]:
    exports = ",".join(["ALL", *(f"{k}={v}" for k, v in knobs.items())])
    proc = subprocess.run(["sbatch", "--parsable", "--wait", f"--output={tmp_path}/slurm-%j.out",
                           f"--export={exports}", *args, f"{REPO}/recipes/cluster/slurm.sbatch",
                           f"{REPO}/recipes/tiny/isreshape.sh"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env=recipe_env(SLURM_CONF=slurm["SLURM_CONF"]))
    job = proc.stdout.strip().split(";")[0]
    out = (tmp_path / f"slurm-{job}.out").read_text() if job.isdigit() else ""
    return proc, job, out


def test_sbatch_two_nodes_trains_and_stops_only_its_own_ray(slurm, ray_cluster, data, tmp_path):
    """The issue's command; the test's local Ray cluster runs beside it on the same host and must survive."""
    beside = len(processes_of(ray_cluster["folder"]))
    started = time.monotonic()
    proc, job, out = _sbatch(slurm, tmp_path, "--nodes=2", DEVICE="cpu", RUN_ROOT=str(tmp_path / "runs"),
                             DATA_DIR=str(data), RAY_PORT=_free_port(), **SMALL)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-2000:] + out[-4000:]
    assert "# Ray cluster ready: 2 node(s)" in out and "done: " in out, out[-4000:]
    rows = metrics_by_step(tmp_path / "runs" / "tiny-isreshape-sync")
    assert {1, 2} <= set(rows)
    print(f"sbatch job {job}: {wall:.0f} s from submit to end; step times "
          f"{[round(rows[s]['timing_s/step'], 2) for s in (1, 2)]} s")
    assert processes_of(f"slurm-{job}") == [], "Ray processes of the job left behind"
    assert not Path(f"/tmp/isrv-ray-{job}").exists()
    assert processes_of_run(tmp_path / "runs") == []
    assert len(processes_of(ray_cluster["folder"])) == beside, "the job's clean-up stopped another Ray"


def test_sbatch_nodes_differing_from_nnodes_is_one_line(slurm, data, tmp_path):
    proc, job, out = _sbatch(slurm, tmp_path, "--nodes=2", DEVICE="cpu", NNODES="3", RUN_ROOT=str(tmp_path),
                             DATA_DIR=str(data))
    assert proc.returncode != 0
    assert out.strip() == ("error: NNODES=3 is not allowed in this job: sbatch --nodes gave it 2 node(s) (unset "
                           "NNODES, or make them equal)")
