"""The recipes train for real: verl's own trainer (`main_ppo`, v1 sync / colocate_async / separate_async)
with the `isreshape_hf` rollout, on CPU, through `bash recipes/tiny/isreshape.sh` and the GSM8K recipe.

Each run is 2 steps of 4 prompts x 2 answers on a freshly initialised tiny Qwen2 (`data_prep/tiny.py
--no-warm-start`): plumbing, not learning (`benchmarks/results/verl_cpu/` has the 40-step runs). About 70 s
of every run is start-up (Ray, verl's workers, TransferQueue), a chain of processes that keeps about 1.3 cores
busy (`benchmarks/results/verl_cpu_speed/startup-sync.txt`), so the runs go two at a time: the first test that
needs one starts the runs of every selected test in the background (`started_runs`), and each test waits for its
own.

What is asserted: exit 0; every `actor/is_reshape/*` metric logged and finite; sync mode's first step has
|ppo_kl| < 1e-4 (the rollout's log-probs are the actor's), and with ROLLOUT_CORRECTION=decoupled_token_is verl's
IS weights ≈ 1; an async mode trains on stale rollouts
(trajectory staleness > 0); a checkpoint at step 2 resumes at step 3; and no process of the run's Ray
cluster (found by its private temp folder) is left after a run, a failure or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from isreshape_verl.testing.recipe_runs import (REPO, SMALL, assert_is_reshape_metrics, metrics_by_step,
                                                processes_of, processes_of_run, recipe_env, write_tiny_data)
from isreshape_verl.testing.recipe_runs import run_recipe as _run_recipe

pytestmark = pytest.mark.e2e

SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
RUN_TIMEOUT = 600  # a hang guard; a run takes ≈ 90 s


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("tiny"))


def _run(script: str, run_root: Path, *args: str, **knobs: str) -> tuple[subprocess.CompletedProcess, Path]:
    proc, run_dir, _ = _run_recipe(script, run_root, *args, timeout=RUN_TIMEOUT, **knobs)
    return proc, run_dir


def _sync_then_resume(data: Path, root: Path) -> tuple:
    """A 2-step sync run saving at step 2, then the same run resumed to step 3. Returns the first run's process,
    folder and metrics (read before the resume rotates verl's metrics file), and the resumed run's process."""
    proc, run_dir = _run("recipes/tiny/isreshape.sh", root, **SMALL, DATA_DIR=str(data), SAVE_FREQ="2")
    if proc.returncode != 0:
        return proc, run_dir, None, None
    rows = metrics_by_step(run_dir)
    resumed, _ = _run("recipes/tiny/isreshape.sh", root, "trainer.resume_mode=auto", **{**SMALL, "STEPS": "3"},
                      DATA_DIR=str(data))
    return proc, run_dir, rows, resumed


def _gsm8k_step(data: Path, root: Path) -> tuple[subprocess.CompletedProcess, Path]:
    parquet = root / "gsm8k"
    subprocess.run([sys.executable, "data_prep/gsm8k.py", "--local-dir", str(SHARED_GSM8K), "--output-dir",
                    str(parquet), "--quiet"], cwd=REPO, check=True, capture_output=True)
    return _run("recipes/gsm8k/isreshape.sh", root, "data.val_max_samples=4", **{**SMALL, "STEPS": "1"},
                DEVICE="cpu", MODEL=str(data / "model"), DATA_DIR=str(parquet), MAX_PROMPT_LEN="512")


def _broken_model_run(data: Path, root: Path) -> tuple[subprocess.CompletedProcess, Path]:
    broken = root / "broken_model"
    broken.mkdir()
    for item in (data / "model").iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    return _run("recipes/tiny/isreshape.sh", root, **SMALL, DATA_DIR=str(data), MODEL=str(broken))


def _interrupted_run(data: Path, root: Path) -> tuple:
    """Ctrl-C once verl's workers run (the cluster is fully up), as a terminal sends it: SIGINT to the whole
    foreground group. Returns the exit code, the output after it, the Ray folder, the output before it, the Ray
    processes running before it, and what was left after it ({"ray": [pids], "run": [pids]})."""
    proc = subprocess.Popen(["bash", "recipes/tiny/isreshape.sh"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=recipe_env(RUN_ROOT=str(root), **SMALL, DATA_DIR=str(data), VERBOSE="1"))
    seen, folder = [], None
    deadline = time.monotonic() + RUN_TIMEOUT
    for line in proc.stdout:
        seen.append(line)
        folder = folder or (re.search(r"Ray in (\S+)", line) or [None, None])[1]
        if "WorkerDict" in line or time.monotonic() > deadline:
            break
    running = processes_of(folder) if folder else []
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    left = {"ray": processes_of(folder) if folder else [], "run": processes_of_run(root)}
    return proc.returncode, rest, folder, seen, running, left


RUNS = {  # test (pytest's name for it) -> its run(s), given the tiny data and a fresh folder; longest first
    "test_sync_trains_two_steps_with_on_policy_log_probs_then_resumes": _sync_then_resume,
    "test_async_modes_train_on_stale_rollouts[separate]": lambda data, root: _run(
        "recipes/tiny/isreshape.sh", root, **SMALL, DATA_DIR=str(data), ASYNC="separate"),
    "test_async_modes_train_on_stale_rollouts[colocate]": lambda data, root: _run(
        "recipes/tiny/isreshape.sh", root, **SMALL, DATA_DIR=str(data), ASYNC="colocate"),
    "test_decoupled_token_is_recomputes_pi_old_equal_to_mu_in_sync": lambda data, root: _run(
        "recipes/tiny/isreshape.sh", root, **SMALL, DATA_DIR=str(data), ROLLOUT_CORRECTION="decoupled_token_is"),
    "test_gsm8k_recipe_runs_a_step_on_the_real_parquet": _gsm8k_step,
    "test_a_failed_run_leaves_no_process": _broken_model_run,
    "test_ctrl_c_stops_every_process": _interrupted_run,
}
PARALLEL_RUNS = 2


@pytest.fixture(scope="module")
def started_runs(request, tiny_data, tmp_path_factory):
    """The runs of this module's selected tests (and only those: `-k colocate` starts one), two at a time in the
    background, as {test name: future of its result}. Leaving the module waits for any still running."""
    selected = [item.name for item in request.session.items
                if item.module is request.module and item.name in RUNS and not item.get_closest_marker("skip")
                and not any(mark.args and mark.args[0] for mark in item.iter_markers("skipif"))]
    with ThreadPoolExecutor(max_workers=PARALLEL_RUNS) as pool:
        yield {name: pool.submit(RUNS[name], tiny_data, tmp_path_factory.mktemp("run"))
               for name in RUNS if name in selected}


@pytest.fixture
def run_of_this_test(request, started_runs) -> tuple:
    future: Future = started_runs[request.node.name]
    return future.result()


def _assert_trained(proc: subprocess.CompletedProcess, run_dir: Path, steps: range) -> dict[int, dict]:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = metrics_by_step(run_dir)
    assert_is_reshape_metrics(rows, steps)
    return rows


def test_sync_trains_two_steps_with_on_policy_log_probs_then_resumes(run_of_this_test):
    proc, run_dir, rows, resumed = run_of_this_test
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert_is_reshape_metrics(rows, range(1, 3))
    assert abs(rows[1]["actor/ppo_kl"]) < 1e-4  # rollout log-probs = the actor's (fp32: ≈ 1e-8 seen)
    assert rows[1]["training/off_policy/trajectory_staleness/mean"] == 0
    assert "val-core/openai/gsm8k/acc/mean@1" in rows[0]  # validation before training, by data_source
    assert (run_dir / "checkpoints" / "global_step_2").is_dir()

    assert resumed.returncode == 0, resumed.stdout[-4000:]  # trainer.resume_mode=auto, STEPS=3, same folder
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 2 and "val-core/openai/gsm8k/acc/mean@1" in rows[0]["data"]  # validates step 2's weights
    assert [row["step"] for row in rows if "actor/ppo_kl" in row["data"]] == [3]  # then trains step 3 only
    kept = list(run_dir.glob("metrics.*.jsonl"))  # verl's file logger starts a new file: the first run's is kept
    assert len(kept) == 1 and [json.loads(line)["step"] for line in kept[0].read_text().splitlines()][-1] == 2


@pytest.mark.parametrize("mode", ["colocate", "separate"])
def test_async_modes_train_on_stale_rollouts(run_of_this_test, mode):
    rows = _assert_trained(*run_of_this_test, range(1, 3))
    staleness = max(rows[s]["training/off_policy/trajectory_staleness/mean"] for s in (1, 2))
    assert staleness > 0, f"{mode}: every step trained on fresh rollouts"


def test_decoupled_token_is_recomputes_pi_old_equal_to_mu_in_sync(run_of_this_test):
    """ROLLOUT_CORRECTION=decoupled_token_is: the actor recomputes π_old; in sync mode at step 1 it is μ up to
    numerics, so verl's TIS weights min(π_old/μ, 2) are ≈ 1 (within 4.8e-7 of 1 seen) and π_θ/π_old starts at 1."""
    first = _assert_trained(*run_of_this_test, range(1, 3))[1]
    assert abs(first["actor/ppo_kl"]) < 1e-6  # 0.0 seen
    for key in ("rollout_corr/rollout_is_mean", "rollout_corr/rollout_is_max", "rollout_corr/rollout_is_min"):
        assert abs(first[key] - 1) < 1e-4, (key, first[key])
    assert abs(first["rollout_corr/kl"]) < 1e-6


@pytest.mark.skipif(not (SHARED_GSM8K / "train.jsonl").is_file(),
                    reason=f"needs the real GSM8K JSON lines in {SHARED_GSM8K} (../shared/data beside the repo)")
def test_gsm8k_recipe_runs_a_step_on_the_real_parquet(run_of_this_test):
    rows = _assert_trained(*run_of_this_test, range(1, 2))
    assert "val-core/openai/gsm8k/acc/mean@1" in rows[0]  # the real rows were scored by their data_source


def test_a_failed_run_leaves_no_process(run_of_this_test):
    """verl fails inside its workers (unreadable weights): exit non-zero, nothing left running."""
    proc, run_dir = run_of_this_test
    assert proc.returncode == 1
    errors = proc.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and "safetensors" in errors[0].lower(), proc.stderr
    assert errors[0].endswith(f"; see {run_dir}/train.log")


@pytest.mark.parametrize("model,message", [
    ("{tmp}/none", "MODEL='{tmp}/none' is not a folder"),
    ("{tmp}", "MODEL='{tmp}' is not a model: it has no config.json"),
    ("{tmp}/no_weights", "MODEL='{tmp}/no_weights' has no weights"),
])
def test_a_model_folder_that_is_not_a_model_is_named_before_launch(tiny_data, tmp_path, model, message):
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    proc = subprocess.run(["bash", "recipes/tiny/isreshape.sh"], cwd=REPO, capture_output=True, text=True,
                          env=recipe_env(RUN_ROOT=str(tmp_path / "runs"), DATA_DIR=str(tiny_data),
                                   MODEL=model.format(tmp=tmp_path)), timeout=120)
    assert proc.returncode == 2 and message.format(tmp=tmp_path) in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_stops_every_process(run_of_this_test):
    returncode, rest, folder, seen, running, left = run_of_this_test
    assert folder and running, "".join(seen[-50:])
    assert returncode == 130
    assert rest.splitlines()[-1].startswith("interrupted (Ctrl-C): the run stopped after "), rest[-2000:]
    assert left == {"ray": [], "run": []}  # Ray's DashboardAgent and RuntimeEnvAgent too
