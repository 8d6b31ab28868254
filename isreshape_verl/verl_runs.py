"""A verl run folder as the launcher leaves it (RUN_ROOT/EXP_NAME; compare.sh: COMPARE_DIR/<arm>[-seed<S>]): its
settings, its whole metric history, and whether it finished. Read by `compare.sh` (a finished run is skipped) and
by `isreshape-verl report-runs` (isreshape_verl/verl_report.py). No verl import.

    launch.json     the knobs and trailing overrides the run was made with (isreshape_verl/launch/run.py)
    command.sh      the exact command; `trainer.total_training_steps=N` in it is the planned number of steps
    metrics.jsonl   verl's FileLogger of the latest launch; earlier launches' files are metrics.<UTC time>.jsonl
    finished.json   written by compare.sh when verl ended with exit 0: {"last_step", "STEPS", "EPOCHS"}

The history of a run that was resumed: verl's FileLogger truncates metrics.jsonl when it starts, so the launcher
keeps the previous file as metrics.<UTC time>.jsonl. A resumed run logs again from its checkpoint's step c on
(validation before training at c, then c + 1, ...): whatever an older file logged from that step on was redone. So

    history = the files in time order, each one replacing every step from its own first logged step on.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

METRICS, LAUNCH, COMMAND, FINISHED = "metrics.jsonl", "launch.json", "command.sh", "finished.json"


def metric_files(run_dir: Path) -> list[Path]:
    """The run's metrics files, oldest first (the kept ones sort by their UTC time stamp; metrics.jsonl is last)."""
    files = sorted(run_dir.glob("metrics.*.jsonl"))
    return files + ([run_dir / METRICS] if (run_dir / METRICS).is_file() else [])


def history(run_dir: Path) -> tuple[dict[int, dict[str, float]], list[str]]:
    """({step: {metric: value}} over every launch of the run (module docstring), ['file: lines a, b' for lines
    that are not FileLogger records])."""
    from isreshape_verl.plot_runs import read_run

    steps: dict[int, dict[str, float]] = {}
    bad = []
    for path in metric_files(run_dir):
        run = read_run(path)
        if run.bad_lines:
            bad.append(f"{path}: line{'s' * (len(run.bad_lines) > 1)} {', '.join(map(str, run.bad_lines[:5]))}")
        if run.steps:
            first = min(run.steps)
            steps = {s: row for s, row in steps.items() if s < first}
            steps.update(run.steps)
    return dict(sorted(steps.items())), bad


def last_step(run_dir: Path) -> int | None:
    """The last training step logged over the run's launches (step 0 is the validation before training)."""
    steps = [s for s in history(run_dir)[0] if s > 0]
    return max(steps) if steps else None


def planned_steps(run_dir: Path) -> int | None:
    """`trainer.total_training_steps` of the run's command.sh (the STEPS knob), or None (EPOCHS decide)."""
    try:
        args = shlex.split((run_dir / COMMAND).read_text().replace("\\\n", " "))
    except (OSError, ValueError):
        return None
    for arg in args:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "trainer.total_training_steps" and value.isdigit():
            return int(value)
    return None


def settings(run_dir: Path) -> dict | None:
    """launch.json: {"dataset", "loss", "knobs": {...}, "overrides": [...]}, or None when absent or unreadable."""
    try:
        record = json.loads((run_dir / LAUNCH).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("knobs"), dict) else None


def mark_finished(run_dir: Path, steps: str, epochs: str) -> None:
    """Record that verl ended this run with exit 0 under STEPS / EPOCHS (compare.sh, after the run)."""
    record = {"last_step": last_step(run_dir), "STEPS": steps, "EPOCHS": epochs}
    tmp = run_dir / f".{FINISHED}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(run_dir / FINISHED)


def finished(run_dir: Path, made_with: dict, steps: str, epochs: str) -> int | None:
    """The number of steps logged when `run_dir` holds this very run (launch.json equal to `made_with`) with every
    step logged: STEPS set and a step >= STEPS logged, or a finished.json of the same STEPS and EPOCHS; else None
    (the launcher then resumes, refuses a changed setting, or starts over)."""
    if settings(run_dir) != made_with:
        return None
    last = last_step(run_dir)
    if last is None:
        return None
    if steps and last >= int(steps):
        return last
    try:
        mark = json.loads((run_dir / FINISHED).read_text())
    except (OSError, ValueError):
        return None
    return last if (mark.get("STEPS"), mark.get("EPOCHS")) == (steps, epochs) else None
