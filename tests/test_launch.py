"""The launcher around verl's trainer (`isreshape_verl.launch`), without verl: a stand-in trainer (a script given
as PYTHON) plays `python -m verl.trainer.main_ppo`, so every path runs in seconds.

What is asserted: a changed setting never silently resumes a run's checkpoints (the first difference is named);
one run folder has one writer; Ctrl-C stops a comparison (exit 130) and says which runs finished; SIGTERM exits
143; every process the run started is stopped, also one that left the process group; a failed run ends in one
line; the console shows a line per step and a closing line; bad names and a missing PYTHON are one line, exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from isreshape_verl.launch import knobs as knobs_module
from isreshape_verl.launch.knobs import KnobError, resolve
from isreshape_verl.launch.run import RUN_MARKER, processes_of, step_summary, stop_processes
from isreshape_verl.testing.recipe_runs import recipe_env

REPO = Path(__file__).resolve().parents[1]

# A stand-in for `python -m verl.trainer.main_ppo`: prints verl-style step lines, writes metrics.jsonl, a
# checkpoint folder when asked, and can start a process that leaves the process group (as Ray's agents do).
FAKE_TRAINER = r'''#!/usr/bin/env bash
if [[ $2 != verl.trainer.main_ppo ]]; then exec {python} "$@"; fi
if [[ -n ${{FAKE_DAEMON:-}} ]]; then setsid sleep 300 </dev/null >/dev/null 2>&1 & fi
steps=${{FAKE_STEPS:-2}}
for ((s = 1; s <= steps; s++)); do
    for copy in 1 2; do  # a joined Ray cluster can relay a worker's line twice: the console shows it once
        echo "(TaskRunnerV1 pid=7) step:$s - actor/ppo_kl:0.001 - critic/score/mean:0.5 - timing_s/step:1.25"
    done
    echo "{{\"step\": $s, \"data\": {{\"val-core/tiny/acc/mean@1\": 0.25}}}}" >> "$VERL_FILE_LOGGER_PATH"
    if [[ -n ${{FAKE_SAVE:-}} ]]; then
        mkdir -p "${{FAKE_SAVE}}/global_step_$s"
    fi
    sleep "${{FAKE_SLEEP:-0}}"
done
if [[ -n ${{FAKE_RC:-}} ]]; then echo "ValueError: the stand-in failed on purpose"; exit "$FAKE_RC"; fi
'''


@pytest.fixture
def fake(tmp_path) -> dict:
    """Environment of a real (not dry) tiny launch with the stand-in trainer and empty data files."""
    data = tmp_path / "data"
    (data / "model").mkdir(parents=True)
    for split in ("train", "test"):
        (data / f"{split}.parquet").write_bytes(b"")
    (data / "model" / "config.json").write_text("{}")
    (data / "model" / "model.safetensors").write_bytes(b"")
    trainer = tmp_path / "fakepython"
    trainer.write_text(FAKE_TRAINER.format(python=sys.executable))
    trainer.chmod(0o755)
    return recipe_env(HOME=str(tmp_path), PYTHON=str(trainer), DATA_DIR=str(data), RUN_ROOT=str(tmp_path / "runs"),
                      RECIPE_CHECK="0", DEVICE="gpu", STEPS="2")


def launch(script: str, env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"recipes/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, **kw)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---- knobs ----
def test_presets_resolve_in_order_environment_dataset_device_default():
    tiny = resolve("tiny", "grpo", {"HOME": "/h"})
    assert (tiny["DEVICE"], tiny["TRAIN_BATCH"], tiny["GPUS_PER_NODE"], tiny["MODEL"]) == ("cpu", "32", "1",
                                                                                           "/h/data/tiny/model")
    gsm8k_cpu = resolve("gsm8k", "grpo", {"HOME": "/h", "DEVICE": "cpu", "TRAIN_BATCH": "12"})
    assert (gsm8k_cpu["TRAIN_BATCH"], gsm8k_cpu["MINI_BATCH"], gsm8k_cpu["MAX_PROMPT_LEN"]) == ("12", "8", "512")
    separate = resolve("gsm8k", "isreshape", {"HOME": "/h", "ASYNC": "separate"})
    assert (separate["STALENESS"], separate["ROLLOUT_GPUS"], separate["PARAM_SYNC_STEP"]) == ("2", "4", "4")
    assert resolve("math", "sapo", {"HOME": "/h", "EXP_NAME": ""})["EXP_NAME"] == "math-sapo-sync"  # empty = unset


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "."])
def test_a_run_name_outside_run_root_is_refused(name):
    with pytest.raises(KnobError, match=r"EXP_NAME='.*' is not allowed; it must be a folder name inside RUN_ROOT"):
        resolve("tiny", "grpo", {"EXP_NAME": name})


def test_every_knob_has_a_doc_and_help_lists_this_datasets_defaults():
    assert all(k.doc for k in knobs_module.KNOBS.values())
    tiny = subprocess.run(["bash", "recipes/tiny/grpo.sh", "--help"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
    gsm8k = subprocess.run(["bash", "recipes/gsm8k/grpo.sh", "--help"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout
    line = {name: next(l for l in text.splitlines() if l.strip().startswith("TRAIN_BATCH"))
            for name, text in (("tiny", tiny), ("gsm8k", gsm8k))}
    assert line["tiny"].endswith("[32]") and line["gsm8k"].endswith("[256; DEVICE=cpu: 8]")
    assert "SAPO_TAU_POS" not in tiny and "IS_WIDTH" not in tiny and "CLIP_RATIO" in tiny


def test_a_python_that_does_not_exist_is_one_line(tmp_path):
    proc = launch("tiny/grpo.sh", recipe_env(PYTHON="/nonexistent/python"))
    assert proc.returncode == 2
    assert one_error_line(proc) == ("error: PYTHON='/nonexistent/python' is not an executable; set PYTHON to the "
                                    "Python that has this package (pip install -e .)")


# ---- the run ----
def test_a_run_shows_a_line_per_step_and_one_closing_line(fake):
    proc = launch("tiny/grpo.sh", {**fake, "EXP_NAME": "r"})
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(fake["RUN_ROOT"]) / "r"
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert steps == ["step 1/2  time 1.25 s  score 0.5  ppo_kl 0.001", "step 2/2  time 1.25 s  score 0.5  ppo_kl 0.001"]
    assert proc.stdout.splitlines()[-1].startswith(f"done: {run_dir} in ")
    assert proc.stdout.splitlines()[-1].endswith("; val acc 0.25 at step 2")
    assert "step:1 - actor/ppo_kl:0.001" in (run_dir / "train.log").read_text()  # everything is in train.log
    assert json.loads((run_dir / "launch.json").read_text())["knobs"]["LR"] == "1e-4"
    assert (run_dir / "command.sh").read_text().startswith(f"{fake['PYTHON']} -m verl.trainer.main_ppo")


def test_a_failed_run_ends_in_one_line_with_its_status(fake):
    proc = launch("tiny/grpo.sh", {**fake, "EXP_NAME": "f", "FAKE_RC": "3"})
    assert proc.returncode == 3
    run_dir = Path(fake["RUN_ROOT"]) / "f"
    assert one_error_line(proc) == f"error: ValueError: the stand-in failed on purpose; see {run_dir}/train.log"


def test_a_failed_run_names_a_checkpoint_it_left_incomplete(fake):
    """A run that dies while saving (a full disk) leaves a step folder verl never recorded as complete."""
    run_dir = Path(fake["RUN_ROOT"]) / "partial"
    proc = launch("tiny/grpo.sh", {**fake, "EXP_NAME": "partial", "FAKE_RC": "1",
                                   "FAKE_SAVE": str(run_dir / "checkpoints")})
    assert proc.returncode == 1
    assert one_error_line(proc) == (
        f"error: ValueError: the stand-in failed on purpose; see {run_dir}/train.log; global_step_1, "
        f"global_step_2 in {run_dir}/checkpoints are incomplete (verl will not resume them): remove them")


def test_a_changed_setting_never_silently_resumes(fake):
    """Issue 25, BAD 1: `SAVE_FREQ=1 STEPS=2`, then the same with `STEPS=3 LR=5e-4` resumed with lr 1e-4."""
    run_dir = Path(fake["RUN_ROOT"]) / "res"
    env = {**fake, "EXP_NAME": "res", "SAVE_FREQ": "1", "FAKE_SAVE": str(run_dir / "checkpoints")}
    assert launch("tiny/grpo.sh", env).returncode == 0
    changed = launch("tiny/grpo.sh", {**env, "STEPS": "3", "LR": "5e-4"})
    assert changed.returncode == 2
    assert one_error_line(changed) == (
        f"error: EXP_NAME='res' has checkpoints up to global_step_2 in {run_dir}, which verl resumes (optimizer "
        "state included); they were made with LR=1e-4, now LR=5e-4: the change would be ignored; set another "
        f"EXP_NAME, or remove {run_dir}/checkpoints to start over (STEPS, EPOCHS, TEST_FREQ, SAVE_FREQ and the "
        "loggers may change on a resume)")
    assert json.loads((run_dir / "launch.json").read_text())["knobs"]["LR"] == "1e-4"  # the record is untouched
    override = launch("tiny/grpo.sh", {**env, "STEPS": "3"}, "actor_rollout_ref.actor.clip_ratio=0.3")
    assert override.returncode == 2 and "made with overrides [], now ['actor_rollout_ref.actor.clip_ratio=0.3']" \
        in override.stderr
    # the schedule may change on a resume, and resume_mode=disable starts over on purpose
    assert launch("tiny/grpo.sh", {**env, "STEPS": "3", "TEST_FREQ": "1"}).returncode == 0
    assert launch("tiny/grpo.sh", {**env, "LR": "5e-4"}, "trainer.resume_mode=disable").returncode == 0


def test_a_damaged_checkpoint_is_named_before_the_launch(fake):
    """Issue 25, BAD 6: a truncated checkpoint file made the rerun end in a Ray/Hydra traceback."""
    import torch

    run_dir = Path(fake["RUN_ROOT"]) / "dmg"
    env = {**fake, "EXP_NAME": "dmg"}
    assert launch("tiny/grpo.sh", env).returncode == 0  # launch.json of the run
    actor = run_dir / "checkpoints" / "global_step_1" / "actor"
    actor.mkdir(parents=True)
    for kind in ("model", "optim", "extra_state"):
        torch.save({"w": torch.ones(256)}, actor / f"{kind}_world_size_1_rank_0.pt")
    (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("1")
    with open(actor / "model_world_size_1_rank_0.pt", "r+b") as f:
        f.truncate(300)
    proc = launch("tiny/grpo.sh", env)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert line.startswith(f"error: checkpoint {actor}/model_world_size_1_rank_0.pt is damaged"), line
    assert "start a new EXP_NAME" in line and not (run_dir / "train.log").read_text().count("step:3")


def test_a_hub_model_that_cannot_be_reached_is_refused_in_seconds(fake):
    """Issue 25, BAD 7: verl retried the hub for 84 s and 1,092 lines; the launcher asks once, briefly."""
    started = time.monotonic()
    proc = launch("tiny/grpo.sh", {**fake, "EXP_NAME": "hub", "MODEL": "Qwen/Qwen2.5-0.5B-Instruct",
                                   "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(Path(fake["HOME"]) / "hf")})
    assert proc.returncode == 2 and time.monotonic() - started < 30
    assert one_error_line(proc).startswith("error: MODEL=Qwen/Qwen2.5-0.5B-Instruct is not in the Hugging Face cache")
    assert not (Path(fake["RUN_ROOT"]) / "hub").exists()


def test_one_run_folder_has_one_writer(fake):
    """Issue 25, BAD 2: two launches with the same RUN_ROOT and EXP_NAME at once."""
    env = {**fake, "EXP_NAME": "same", "FAKE_STEPS": "20", "FAKE_SLEEP": "0.5"}  # 10 s: the second starts within it
    first = subprocess.Popen(["bash", "recipes/tiny/grpo.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:  # the first one runs
            if line.startswith("step 1/"):
                break
        second = launch("tiny/grpo.sh", env)
        assert second.returncode == 2
        assert one_error_line(second) == (f"error: {fake['RUN_ROOT']}/same is in use by another launch (pid "
                                          f"{first.pid}); wait for it to end, or set another EXP_NAME")
    finally:
        first.communicate(timeout=60)
    assert first.returncode == 0
    rows = (Path(fake["RUN_ROOT"]) / "same" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == list(range(1, 21))


@pytest.mark.parametrize("sig,status,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_stops_the_run_and_every_process_it_started(fake, sig, status, name):
    env = {**fake, "EXP_NAME": "sig", "FAKE_STEPS": "100", "FAKE_SLEEP": "0.2", "FAKE_DAEMON": "1"}
    proc = subprocess.Popen(["bash", "recipes/tiny/grpo.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("step 2/"):
            break
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)  # Ctrl-C: the whole group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"interrupted ({name}): the run stopped after "), stderr
    assert lines[0].endswith(f"of its processes stopped; what it wrote is in {fake['RUN_ROOT']}/sig")
    leftover = subprocess.run(["pgrep", "-f", "sleep 300"], capture_output=True, text=True).stdout.split()
    assert not [pid for pid in leftover if f"{RUN_MARKER}=" in Path(f"/proc/{pid}/environ").read_text(errors="ignore")
                and str(fake["RUN_ROOT"]) in Path(f"/proc/{pid}/environ").read_text(errors="ignore")]


def test_stop_processes_finds_a_process_that_left_the_group_by_its_environment():
    """Ray's DashboardAgent and RuntimeEnvAgent outlive the raylet and no longer carry the Ray folder in their
    command line; the run's marker in their environment still finds them."""
    marker = uuid.uuid4().hex
    env = {**os.environ, RUN_MARKER: marker}
    subprocess.run(["bash", "-c", "setsid sleep 300 </dev/null >/dev/null 2>&1 &"], env=env, check=True)
    deadline = time.monotonic() + 10
    while not processes_of(marker, None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(processes_of(marker, None)) == 1
    assert stop_processes(marker, None) == 1
    assert processes_of(marker, None) == []


class _NodeDiesAfter:
    """A stand-in for cluster.NodeWatch: node 127.0.0.3 is dead `after` seconds after the watch began."""
    after = 0.0

    def __init__(self, address: str):
        self.start = time.monotonic()

    def dead(self) -> list[str]:
        return ["127.0.0.3"] if time.monotonic() > self.start + self.after else []


@pytest.mark.parametrize("cmd, after, status", [
    (["sleep", "60"], 0.3, 1),  # verl waits on the dead node: stopped NODE_WAIT s after the launcher saw it
    (["bash", "-c", "sleep 0.5; echo 'RuntimeError: Connection closed by peer'; exit 3"], 0.4, 3),  # verl fails
    (["bash", "-c", "sleep 0.5; echo 'RuntimeError: Connection closed by peer'; exit 3"], 99, 3),  # no node died
])
def test_a_node_of_the_joined_cluster_dying_ends_the_run_in_one_line_naming_it(tmp_path, monkeypatch, cmd, after,
                                                                              status):
    """On a joined cluster (RAY_ADDRESS) the launcher looks at the cluster's nodes while verl runs; a failed run whose
    node died is told by the node, not by verl's last error (a gloo peer gone). tests/test_multinode.py kills a node
    of a real run."""
    import io

    from isreshape_verl.launch import cluster, run

    monkeypatch.setattr(cluster, "NodeWatch", _NodeDiesAfter)
    monkeypatch.setattr(_NodeDiesAfter, "after", after)
    monkeypatch.setattr(run, "NODE_LOOK", 0.1)
    monkeypatch.setattr(run, "NODE_WAIT", 1.0)
    env = {**recipe_env(), "RAY_ADDRESS": "127.0.0.2:6379", "NNODES": "2"}
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    assert run._supervise(resolve("tiny", "grpo", env), cmd, tmp_path, None, env, out, err) == status
    assert time.monotonic() - started < 10
    line = err.getvalue()
    assert line.count("\n") == 1, line
    if after == 99:
        assert line == f"error: RuntimeError: Connection closed by peer; see {tmp_path}/train.log\n"
        return
    assert line.startswith("error: node 127.0.0.3 of the Ray cluster at RAY_ADDRESS='127.0.0.2:6379' died during the "
                           "run (its raylet is gone) and the run stopped after "), line
    assert line.endswith(" min; rerun the same command when the cluster has its 2 nodes again to resume from step 0 "
                         f"(no checkpoint: SAVE_FREQ); see {tmp_path}/train.log\n")


def test_ctrl_c_stops_a_comparison_and_says_which_runs_finished(fake):
    """Issue 25, BAD 4: one Ctrl-C stops the comparison, not only the current loss."""
    env = {**fake, "COMPARE_DIR": str(Path(fake["RUN_ROOT"]) / "cmp"), "FAKE_STEPS": "100", "FAKE_SLEEP": "0.1"}
    proc = subprocess.Popen(["bash", "recipes/tiny/compare.sh"], cwd=REPO, env={**env, "FAKE_STEPS": "3"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    proc.communicate(timeout=120)
    assert proc.returncode == 0  # three short runs finish
    proc = subprocess.Popen(["bash", "recipes/tiny/compare.sh"], cwd=REPO, env={**env, "LOSSES": "grpo sapo isreshape",
                            "COMPARE_DIR": env["COMPARE_DIR"] + "2"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:  # grpo's run gets interrupted
        seen.append(line)
        if line.startswith("step 2/"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert stderr.splitlines()[-1] == (f"interrupted: the comparison stopped (finished: none; stopped: grpo; not "
                                       f"started: sapo isreshape); runs are in {env['COMPARE_DIR']}2")


def test_step_summary_reads_verls_console_line():
    line = ("\x1b[36m(TaskRunnerV1 pid=1021)\x1b[0m step:3 - actor/ppo_kl:-2.1e-06 - critic/score/mean:0.125 - "
            "timing_s/step:11.203 - val-core/openai/gsm8k/acc/mean@1:0.375")
    assert step_summary(line, "60") == "step 3/60  time 11.2 s  score 0.125  ppo_kl -2.1e-06  val acc 0.375"
    assert step_summary("(WorkerDict pid=3) loading weights", "60") is None
    # verl's console logger prints numpy scalars by their repr (pprint.pformat)
    assert step_summary("step:0 - val-core/tiny/acc/mean@1:np.float64(0.0)", "") == "step 0/?  val acc 0"


# ---- compare.sh with SEEDS and arms ----
def test_compare_runs_every_arm_per_seed_resumes_and_reports(fake, capsys):
    """SEEDS and LOSS:CORRECTION arms: one run per arm and seed in COMPARE_DIR/<arm>-seed<S>/, seed by seed; a rerun
    skips the finished runs with one line each and runs what is left; report-runs reads the folder."""
    folder = Path(fake["RUN_ROOT"]) / "study"
    env = {**fake, "COMPARE_DIR": str(folder), "SEEDS": "0 1", "LOSSES": "grpo grpo:decoupled_token_is"}
    proc = launch("tiny/compare.sh", env)
    assert proc.returncode == 0, proc.stderr
    runs = ["grpo-seed0", "grpo-decoupled_token_is-seed0", "grpo-seed1", "grpo-decoupled_token_is-seed1"]
    assert proc.stdout.splitlines()[0] == (f"# comparison of: grpo grpo:decoupled_token_is x seeds 0 1 (4 runs, "
                                           f"<arm>-seed<S>/) -> {folder}")
    assert [line.split()[3] for line in proc.stdout.splitlines() if line.startswith("# run dir:")] == [
        f"{folder}/{run}" for run in runs]
    for run in runs:
        knobs = json.loads((folder / run / "launch.json").read_text())["knobs"]
        assert knobs["SEED"] == run[-1] and knobs.get("ROLLOUT_CORRECTION") == (
            "decoupled_token_is" if "decoupled" in run else None)
        assert f"data.seed={run[-1]}" in (folder / run / "command.sh").read_text()
    # a rerun: everything finished, nothing runs
    again = launch("tiny/compare.sh", env)
    assert again.returncode == 0 and "# run dir:" not in again.stdout
    assert [line for line in again.stdout.splitlines() if line.startswith("# skipped")] == [
        f"# skipped {run}: finished (2 steps logged) in {folder}/{run}" for run in runs]
    # one run stopped after step 1: the rerun runs it alone
    metrics = folder / "grpo-seed1" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    (folder / "grpo-seed1" / "finished.json").unlink()
    third = launch("tiny/compare.sh", env)
    assert third.returncode == 0, third.stderr
    assert [line.split()[3] for line in third.stdout.splitlines() if line.startswith("# run dir:")] == [
        f"{folder}/grpo-seed1"]
    assert third.stdout.count("# skipped") == 3
    from isreshape_verl.verl_report import main

    assert main([str(folder)]) == 0
    verdict = json.loads((folder / "summary.json").read_text())["verdict"]
    assert [(r["loss"], r["seeds"], r["final_acc"][0]) for r in verdict] == [
        ("grpo", 2, 0.25), ("grpo:decoupled_token_is", 2, 0.25)]
    assert "2 seeds per arm and setting: no interval" in (folder / "report.md").read_text()


@pytest.mark.parametrize("knobs, expected", [
    ({"LOSSES": "grpo grpo:nope"}, "LOSSES='grpo grpo:nope' is not allowed: 'grpo:nope' names no rollout correction "
     "after 'grpo:' (LOSS:CORRECTION takes bypass, decoupled_token_is, decoupled_seq_is, decoupled_token_icepop, "
     "decoupled_seq_is_rs, decoupled_geo_rs, decoupled_geo_rs_seq_tis, decoupled_geo_rs_token_tis, decoupled_k3_rs, "
     "decoupled_k3_rs_seq_tis, decoupled_k3_rs_token_tis)"),
    ({"LOSSES": "gpro:decoupled_token_is"}, "LOSSES='gpro:decoupled_token_is' is not allowed: no recipe "
     "recipes/tiny/gpro.sh (grpo, sapo, isreshape; an entry is LOSS or LOSS:CORRECTION)"),
    ({"LOSSES": "grpo grpo:bypass"}, "LOSSES='grpo grpo:bypass' is not allowed: 'grpo' and 'grpo:bypass' are the same "
     "run (grpo with ROLLOUT_CORRECTION=bypass)"),
    ({"SEEDS": "0 one"}, "SEEDS='0 one' is not allowed; it must be whole numbers >= 0 separated by spaces, e.g. "
     "'0 1 2'"),
    ({"SEEDS": "1 1"}, "SEEDS='1 1' is not allowed: it names a seed twice"),
    ({"SEEDS": "0 1", "SEED": "7"}, "SEED='7' and SEEDS='0 1' are both set; SEEDS gives each run its SEED: unset one"),
])
def test_a_bad_arm_or_seed_list_is_one_line(fake, knobs, expected):
    proc = launch("tiny/compare.sh", {**fake, "COMPARE_DIR": str(Path(fake["RUN_ROOT"]) / "bad"), **knobs})
    assert proc.returncode == 2
    assert one_error_line(proc) == f"error: {expected}"
    assert not (Path(fake["RUN_ROOT"]) / "bad").exists()


def test_seeds_belong_to_compare_only(fake):
    proc = launch("tiny/grpo.sh", {**fake, "SEEDS": "0 1"})
    assert proc.returncode == 2
    assert one_error_line(proc) == "error: SEEDS='0 1' only applies to compare.sh, not to grpo.sh; set SEED, or unset it"


# ---- verl's process started early (DEVICE=cpu): it imports while the launcher checks, and runs on `go` ----
TOY_ENTRY = """import sys
print("imported as", __name__, flush=True)
if __name__ == "__main__":
    print("ran with", sys.argv[1:], sys.argv[0].endswith("toy_entry.py"), flush=True)
"""


@pytest.fixture
def toy_command(tmp_path) -> tuple[list[str], dict]:
    """`python -m toy_entry a b=1`, a module that says when it is imported and when it runs as `__main__`."""
    (tmp_path / "toy_entry.py").write_text(TOY_ENTRY)
    return [sys.executable, "-m", "toy_entry", "a", "b=1"], {**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"}


def test_an_early_start_imports_waits_and_on_go_runs_the_module_as_python_m(toy_command):
    from isreshape_verl.launch.run import EarlyStart

    early = EarlyStart(*toy_command)
    assert early.proc.stdout.readline() == "imported as toy_entry\n"
    time.sleep(0.5)
    assert early.proc.poll() is None  # imported, and waits for the launcher
    proc = early.go()
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert rest == "imported as __main__\nran with ['a', 'b=1'] True\n"  # argv as `python -m toy_entry a b=1`
    early.stop()  # after go: nothing to stop
    assert proc.returncode == 0


def test_an_early_start_that_never_gets_go_does_not_run(toy_command):
    from isreshape_verl.launch.run import EarlyStart

    stopped = EarlyStart(*toy_command)  # a failed check: the launcher stops it
    assert stopped.proc.stdout.readline() == "imported as toy_entry\n"
    stopped.stop()
    assert stopped.proc.returncode == -signal.SIGKILL
    (python, _, *module_and_args), env = toy_command
    orphan = subprocess.run([python, "-m", "isreshape_verl.launch.early", *module_and_args], input="",
                            capture_output=True, text=True, env=env, timeout=30)
    assert (orphan.returncode, orphan.stdout) == (1, "imported as toy_entry\n")  # the launcher gone: stdin closed
