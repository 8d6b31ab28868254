"""Multi-node for real, on one machine: a two-node Ray cluster (recipes/cluster/local_ray.sh, one loopback address
per node, token auth on) and a two-node SLURM (recipes/cluster/slurm_local.sh, `slurmd -N n1/n2`), each running
the tiny recipe with NNODES=2 through verl's own trainer; and the faults: a node killed in a step (one line, then a
resume compared with an uninterrupted run), `scancel` of an sbatch job (nothing of it left) and its resubmit
resuming; the two training runs are submitted with `ray_job.sh` through Ray's job API, the node-kill runs join the
cluster directly.

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


def _two_node_env(cluster: dict, data: Path, run_root: Path, mode: str, **knobs: str) -> dict:
    return _ray_env(cluster, DEVICE="cpu", NNODES="2", ASYNC=mode, GPUS_PER_NODE="1", DATA_DIR=str(data),
                    RUN_ROOT=str(run_root), EXP_NAME=mode, **{**SMALL, **knobs})


def _ray_job(cluster: dict, data: Path, run_root: Path, mode: str, **knobs: str) -> subprocess.CompletedProcess:
    """The tiny recipe submitted with recipes/cluster/ray_job.sh through Ray's job API: the repository as the job's
    working dir, the package as a wheel without its dependencies, the knobs set here forwarded; the recipe runs on
    the head and joins the cluster."""
    started = time.monotonic()
    env = _two_node_env(cluster, data, run_root, mode, RAY_ADDRESS=cluster["RAY_DASHBOARD"], **knobs)
    proc = subprocess.run(["bash", "recipes/cluster/ray_job.sh", "recipes/tiny/isreshape.sh"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=env)
    print(f"ray_job.sh ({mode}): {time.monotonic() - started:.0f} s from the wheel's build to the job's end")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def sync_run(ray_cluster, data, tmp_path_factory):
    """One uninterrupted sync run, NNODES=2, through ray_job.sh: the training test reads it, the resume test (whose
    runs join the cluster from here) compares with it."""
    root = tmp_path_factory.mktemp("sync")
    return _ray_job(ray_cluster, data, root, "sync", SAVE_FREQ="1"), root


@pytest.mark.parametrize("mode", ["sync", "separate"])
def test_a_recipe_trains_on_two_ray_nodes_one_rank_each(ray_cluster, data, tmp_path, mode, request):
    """Both submitted with ray_job.sh. sync: FSDP world size 2, one rank per node (gloo across nodes). separate: the
    trainer on one node, the rollout on the other, weights crossing nodes through the CPU weight sync
    (isreshape_ray), whose holder, a detached actor named after the run's Ray job, is gone when the run is (the
    cluster outlives it)."""
    from isreshape_verl.cpu.weight_sync import HOLDER_PREFIX
    from isreshape_verl.launch.cluster import placement

    if mode == "sync":
        proc, tmp_path = request.getfixturevalue("sync_run")
    else:
        proc = _ray_job(ray_cluster, data, tmp_path, mode)
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
        holders = [a for a in actors if a["job"] == job and a["class"].endswith("WeightHolder")]
        assert len(holders) == 1, "the run's weights did not go through its holder"
        named = _client(_ray_env(ray_cluster), "import ray; ray.init(logging_level='ERROR'); "
                        "print('NAMED', [a['name'] for a in ray.util.list_named_actors(all_namespaces=True)])")
        assert "NAMED" in named.stdout, named.stderr[-2000:]
        assert f"'{HOLDER_PREFIX}{job}'" not in named.stdout and holders[0]["state"] == "DEAD", named.stdout


def _wait_for_checkpoint(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 600,
                         into: float = 1.0) -> None:
    """Until verl recorded step `step`'s checkpoint as complete (its tracker file), then `into` s into the next."""
    from isreshape_verl.launch.diagnose import TRACKER

    tracker, deadline = run_dir / "checkpoints" / TRACKER, time.monotonic() + timeout
    while not (tracker.is_file() and tracker.read_text().strip() == str(step)):
        assert proc.poll() is None and time.monotonic() < deadline, f"no checkpoint of step {step} in {run_dir}"
        time.sleep(0.1)
    time.sleep(into)


RESUME_SAME = ("prompt_length/", "critic/", "val-", "training/", "num_turns/", "actor/lr", "actor/grad_norm",
               "actor/loss", "actor/pg_loss", "actor/pg_clipfrac")
"""Metrics of step 2 that a resumed sync run has equal to an uninterrupted one (the dataloader resumes at the right
batch: prompt_length; the rewards, advantages and validation; the update's size, 0 here: the untrained tiny model
earns no reward)."""
RESUME_DIFFER = {  # measured: which of step 2's metrics differ after a resume, and why
    "response_length": "the hf rollout's sampler restarts from its seed on a resume (a torch.Generator seeded when "
                       "the rollout starts, isreshape_verl/cpu/hf_rollout.py; its state is not in the checkpoint): "
                       "step 2 after a resume draws the random numbers of step 1",
    "global_seqlen/": "the answers' lengths, as response_length",
    "perf/": "tokens and time",
    "timing": "time",
    "actor/perf/": "memory",
    "actor/entropy_loss": "per-token statistics of ratios 1 ± 1e-7: they differ between two uninterrupted runs too "
                          "(measured at step 1: gloo across two nodes is not bitwise reproducible here)",
    "actor/ppo_kl": "as actor/entropy_loss",
    "actor/is_reshape/": "as actor/entropy_loss",
}


def test_a_node_killed_in_a_step_ends_the_run_in_one_line_and_a_rerun_resumes(ray_cluster, data, tmp_path,
                                                                             sync_run):
    """kill -9 of every process of node 127.0.0.3 during step 2 of a sync run (FSDP across both nodes; SAVE_FREQ=1):
    the run ends within 60 s with one line naming the node, and nothing of it is left. With the node back, the same
    command resumes from global_step_1 and trains step 2, whose metrics are compared with the uninterrupted run's."""
    from isreshape_verl.launch.cluster import kill_node, node_processes, start_missing

    folder = Path(ray_cluster["folder"])
    env = _two_node_env(ray_cluster, data, tmp_path, "sync", SAVE_FREQ="1")
    proc = subprocess.Popen(["bash", "recipes/tiny/isreshape.sh"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_checkpoint(tmp_path / "sync", 1, proc, into=0)  # a step lasts 1.4-2.8 s here: kill in-process
        killed_processes, killed = kill_node(folder, "127.0.0.3"), time.monotonic()
        out, err = proc.communicate(timeout=120)
    except BaseException:
        start_missing(folder)  # the next tests need both nodes
        raise
    finally:
        proc.kill()
    took = time.monotonic() - killed
    print(f"node killed: {killed_processes} processes of 127.0.0.3; the run ended {took:.1f} s later")
    lines = err.strip().splitlines()
    try:
        assert killed_processes > 2 and node_processes(folder, "127.0.0.3") == []
        assert proc.returncode == 1 and took < 60, out[-2000:] + err[-2000:]
        assert len(lines) == 1 and lines[0].startswith(
            f"error: node 127.0.0.3 of the Ray cluster at RAY_ADDRESS='{ray_cluster['RAY_ADDRESS']}' died during "
            "the run (its raylet is gone) and the run stopped after "), err
        assert lines[0].endswith(" min; rerun the same command when the cluster has its 2 nodes again to resume "
                                 f"from global_step_1; see {tmp_path}/sync/train.log"), "not killed in step 2"
        assert processes_of_run(tmp_path) == [], "processes of the run left behind"
    except AssertionError:
        start_missing(folder)  # the next tests need both nodes
        raise

    started = time.monotonic()
    back = subprocess.run(["bash", "recipes/cluster/local_ray.sh", "start-missing", str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=180, env=recipe_env())
    assert back.stdout.strip() == "# started again: 127.0.0.3", back.stderr[-2000:]
    resumed = subprocess.run(["bash", "recipes/tiny/isreshape.sh"], cwd=REPO, capture_output=True, text=True,
                             timeout=900, env=env)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    print(f"node back and the run resumed to its end in {time.monotonic() - started:.0f} s")
    rows = metrics_by_step(tmp_path / "sync")
    assert sorted(rows) == [1, 2] and "actor/ppo_kl" not in rows[1]  # validates step 1's weights, trains step 2
    assert "Resuming from " in (tmp_path / "sync" / "train.log").read_text()
    assert processes_of_run(tmp_path) == []

    full = metrics_by_step(sync_run[1] / "sync")[2]
    assert set(rows[2]) == set(full)
    same = {k for k in full if k.startswith(RESUME_SAME)}
    assert {k: rows[2][k] for k in same} == {k: full[k] for k in same}
    differ = sorted(k for k in full if rows[2][k] != full[k])
    print(f"after the resume, step 2 differs in: {differ}")
    assert all(k.startswith(tuple(RESUME_DIFFER)) for k in differ), differ


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


def _sbatch_command(tmp_path: Path, *args: str, **knobs: str) -> list[str]:
    exports = ",".join(["ALL", *(f"{k}={v}" for k, v in knobs.items())])
    return ["sbatch", "--parsable", "--wait", f"--output={tmp_path}/slurm-%j.out", f"--export={exports}", *args,
            f"{REPO}/recipes/cluster/slurm.sbatch", f"{REPO}/recipes/tiny/isreshape.sh"]


def _sbatch(slurm: dict, tmp_path: Path, *args: str, **knobs: str) -> tuple[subprocess.CompletedProcess, str, str]:
    proc = subprocess.run(_sbatch_command(tmp_path, *args, **knobs), cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env=recipe_env(SLURM_CONF=slurm["SLURM_CONF"]))
    job = proc.stdout.strip().split(";")[0]
    out = (tmp_path / f"slurm-{job}.out").read_text() if job.isdigit() else ""
    return proc, job, out


def _processes_of_job(job: str) -> list[int]:
    """pids of every process of a SLURM job: its steps, the Ray nodes they start and the run (all inherit
    SLURM_JOB_ID), and Ray's workers (the job's Ray marker)."""
    from isreshape_verl.launch.run import processes_of as marked

    return sorted(set(marked(job, variable="SLURM_JOB_ID")) | set(processes_of(f"slurm-{job}")))


def test_sbatch_nodes_differing_from_nnodes_is_one_line(slurm, data, tmp_path):
    proc, job, out = _sbatch(slurm, tmp_path, "--nodes=2", DEVICE="cpu", NNODES="3", RUN_ROOT=str(tmp_path),
                             DATA_DIR=str(data))
    assert proc.returncode != 0
    assert out.strip() == ("error: NNODES=3 is not allowed in this job: sbatch --nodes gave it 2 node(s) (unset "
                           "NNODES, or make them equal)")


def test_sbatch_two_nodes_trains_scancel_stops_it_everywhere_and_a_resubmit_resumes(slurm, ray_cluster, data,
                                                                                   tmp_path):
    """The issue's command, with SAVE_FREQ=1 and 3 steps: it trains step 1; scancel a second into step 2 leaves no
    process of the job on either node (its steps, Ray's, the run's); the same command again resumes from the last
    checkpoint (global_step_1, or global_step_2 when step 2 finished before the cancel landed: a race the test
    accepts), trains to step 3 and ends with every process of the job gone. The test's local Ray cluster runs beside
    it on the same host and must survive both clean-ups (no `ray stop`)."""
    beside = len(processes_of(ray_cluster["folder"]))
    knobs = dict(DEVICE="cpu", RUN_ROOT=str(tmp_path / "runs"), DATA_DIR=str(data), **{**SMALL, "STEPS": "3"},
                 SAVE_FREQ="1")
    env = recipe_env(SLURM_CONF=slurm["SLURM_CONF"])
    proc = subprocess.Popen(_sbatch_command(tmp_path, "--nodes=2", RAY_PORT=_free_port(), **knobs), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        job = proc.stdout.readline().strip().split(";")[0]
        assert job.isdigit(), proc.stderr.read()
        _wait_for_checkpoint(tmp_path / "runs" / "tiny-isreshape-sync", 1, proc)
        running = len(_processes_of_job(job))
        assert running > 4  # the job runs: its steps, two Ray nodes, the run
        subprocess.run(["scancel", job], check=True, env=env, timeout=30)
        cancelled = time.monotonic()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    while _processes_of_job(job) and time.monotonic() < cancelled + 60:
        time.sleep(0.5)
    took = time.monotonic() - cancelled
    left = _processes_of_job(job)
    print(f"scancel {job} in step 2: {running} processes of the job; sbatch returned and every one was gone "
          f"{took:.1f} s later")
    # the job's state, not sbatch --wait's exit code: scancel marks the job CANCELLED at once, and a --wait poll that
    # lands before the batch script reports its exit reads that state with exit code 0 (a race CI met)
    state = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env).stdout
    assert " JobState=CANCELLED " in state, state
    assert left == [], {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in left}
    assert processes_of_run(tmp_path / "runs") == [] and not Path(f"/tmp/isrv-ray-{job}").exists()

    started = time.monotonic()
    again, job, out = _sbatch(slurm, tmp_path, "--nodes=2", RAY_PORT=_free_port(), **knobs)
    wall = time.monotonic() - started
    assert again.returncode == 0, again.stderr[-2000:] + out[-4000:]
    assert "# Ray cluster ready: 2 node(s)" in out and "checkpoints up to global_step_3" in out, out[-4000:]
    rows = metrics_by_step(tmp_path / "runs" / "tiny-isreshape-sync")  # the resubmit's rows only (file rotated)
    resumed_from = min(rows)  # its validation before training is logged at the step it resumed from
    assert resumed_from in (1, 2) and sorted(rows) == list(range(resumed_from, 4)), sorted(rows)
    assert "actor/ppo_kl" not in rows[resumed_from]
    assert all("actor/ppo_kl" in rows[step] for step in range(resumed_from + 1, 4))
    print(f"sbatch job {job} (the resubmit): resumed from global_step_{resumed_from}, {wall:.0f} s from submit to "
          f"end; step 3 took {rows[3]['timing_s/step']:.2f} s")
    assert _processes_of_job(job) == [], "processes of the job left behind"
    assert not Path(f"/tmp/isrv-ray-{job}").exists()
    assert processes_of_run(tmp_path / "runs") == []
    assert len(processes_of(ray_cluster["folder"])) == beside, "the job's clean-up stopped another Ray"
