"""Run a recipe script for real on CPU (`DEVICE=cpu`) and read back what it logged: the shared part of the
end-to-end tests (`tests/test_verl_cpu_recipes.py`, `tests/test_verl_cpu_vllm.py`).

    data = write_tiny_data(tmp)                                   # data_prep/tiny.py, untrained model
    proc, run_dir, ray_folder = run_recipe("recipes/tiny/isreshape.sh", tmp, DATA_DIR=str(data), **SMALL)
    rows = metrics_by_step(run_dir)                               # {step: {metric: value}}
    assert_is_reshape_metrics(rows, steps=(1, 2))
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

IS_RESHAPE_METRICS = {  # verl_loss.py's docstring lists them
    "weight_mean", "gamma_mean", "ess", "ratio_min", "ratio_p01", "ratio_p50", "ratio_p99", "ratio_max",
    "pos_up_share", "pos_up_weight", "pos_down_share", "pos_down_weight", "neg_up_share", "neg_up_weight",
    "neg_down_share", "neg_down_weight", "nonfinite_frac", "width", "width_neg", "width_stat",
}
SMALL = {"STEPS": "2", "TRAIN_BATCH": "4", "MINI_BATCH": "4", "MICRO_BATCH": "4", "ROLLOUT_N": "2",
         "TEST_FREQ": "2", "LR": "1e-3", "MAX_RESPONSE_LEN": "16"}
"""Knobs of a 2-step plumbing run: 4 prompts x 2 answers, at most 16 tokens."""


def write_tiny_data(out: Path) -> Path:
    """`data_prep/tiny.py --no-warm-start` into `out`: 64 train and 8 test problems, an untrained tiny Qwen2."""
    subprocess.run([sys.executable, "data_prep/tiny.py", "--output-dir", str(out), "--no-warm-start",
                    "--n-train", "64", "--n-test", "8", "--quiet"], cwd=REPO, check=True, capture_output=True)
    return out


def recipe_env(**knobs: str) -> dict:
    """The one environment of a recipe subprocess in the tests: this process's environment without any recipe knob
    (every name of `isreshape_verl.launch.knobs`) or a variable of the recipes' families (IS_*, SAPO_*, ...) and
    without the caller's VERL_/RAY_/VLLM_ settings, plus `knobs`; the recipe runs this interpreter (PYTHON) unless
    `knobs` names another. So the caller's shell cannot change a test's outcome."""
    from isreshape_verl.launch.knobs import KNOB_FAMILIES, KNOBS

    drop = (*KNOB_FAMILIES, "VERL_", "RAY_", "VLLM_")
    keep = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith(drop)}
    return {**keep, "PYTHON": sys.executable, **knobs}


def command_lines() -> dict[int, bytes]:
    """pid -> command line of every process but this one."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:
                pass
    return found


def processes_of(folder: str) -> list[int]:
    """pids of the processes whose command line names `folder` (a run's Ray processes)."""
    return [pid for pid, cmd in command_lines().items() if folder.encode() in cmd]


def processes_of_run(run_root: Path) -> list[int]:
    """pids of the processes a launch into `run_root` started: the launcher marks verl's environment
    (`isreshape_verl.launch.run.RUN_MARKER`) and every process of the run inherits it, Ray's agents included,
    which no longer name the Ray folder in their command line."""
    from isreshape_verl.launch.run import RUN_MARKER

    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if f"{RUN_MARKER}=".encode() in environ and f"RUN_ROOT={run_root}\0".encode() in environ:
                found.append(int(entry.name))
    return found


def ray_folder(output: str) -> str:
    """The private Ray folder a DEVICE=cpu recipe announces ("Ray in <folder>")."""
    match = re.search(r"Ray in (\S+)", output)
    assert match, "the recipe did not say where its Ray cluster lives:\n" + output[-4000:]
    return match.group(1)


def run_recipe(script: str, run_root: Path, *args: str, timeout: float = 900,
               **knobs: str) -> tuple[subprocess.CompletedProcess, Path, str]:
    """Run `bash script args` with `knobs` into `run_root/EXP_NAME` (default "run"); assert that no process
    of its Ray cluster is left and its folder is gone. Returns (process, run folder, Ray folder)."""
    exp = knobs.pop("EXP_NAME", "run")
    proc = subprocess.run(["bash", script, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=recipe_env(RUN_ROOT=str(run_root), EXP_NAME=exp, **knobs))
    folder = ray_folder(proc.stdout)
    assert processes_of(folder) == [], f"Ray processes left behind ({folder})"
    assert processes_of_run(run_root) == [], "processes of the run left behind"
    assert not Path(folder).exists(), f"the run's Ray folder {folder} was not removed"
    return proc, run_root / exp, folder


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    """verl's file logger's metrics.jsonl as {step: {metric: value}} (rows of one step merged)."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row["data"])
    return rows


def assert_is_reshape_metrics(rows: dict[int, dict], steps) -> None:
    """Every `actor/is_reshape/*` metric is logged at each of `steps`, and finite."""
    for step in steps:
        logged = {k.removeprefix("actor/is_reshape/"): v for k, v in rows[step].items()
                  if k.startswith("actor/is_reshape/")}
        assert set(logged) == IS_RESHAPE_METRICS, f"step {step}: {sorted(logged)}"
        assert all(math.isfinite(v) for v in logged.values()), logged
