"""The study tools' arithmetic on made-up runs: Study A's verdict page (benchmarks/correction_study_report.py) and
the soak's memory growth (benchmarks/verl_cpu_soak.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))  # the soak imports verl_cpu_speed beside it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


report = _load("correction_study_report")
soak = _load("verl_cpu_soak")

TIS = "vanilla:rollout_correction=decoupled_token_is"


def _run(loss: str, lag: int, seed: int, auc: float) -> dict:
    return {"loss": loss, "lag": lag, "seed": seed, "summary": {"auc": auc, "collapsed": auc < 0.3}}


def test_paired_delta_is_the_mean_of_per_seed_differences_over_shared_seeds():
    runs = [_run("is_reshape", 16, s, a) for s, a in enumerate((0.50, 0.40, 0.45, 0.30))]
    runs += [_run(TIS, 16, s, a) for s, a in enumerate((0.40, 0.42, 0.35))]  # seed 3 not finished
    interval, n = report.paired_delta(runs, "is_reshape", TIS, 16)
    assert n == 3
    assert interval[0] == pytest.approx((0.10 - 0.02 + 0.10) / 3)
    assert interval[1] <= interval[0] <= interval[2]
    assert report.paired_delta(runs, "is_reshape", TIS, 0) == (None, 0)


def test_the_best_arm_row_names_the_highest_mean_auc_and_counts_collapses():
    runs = [_run("vanilla", 16, s, a) for s, a in enumerate((0.46, 0.44, 0.45))]
    runs += [_run(TIS, 16, s, a) for s, a in enumerate((0.25, 0.40, 0.38))]  # one collapse (auc < 0.3 here)
    runs += [_run("is_reshape", 16, s, a) for s, a in enumerate((0.43, 0.43, 0.43))]
    (row,) = report.best_arm_table({"bf16": runs}).splitlines()[2:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["bf16", "16", "`vanilla`", "0.430", "`vanilla`: 0.450"]
    # is_reshape − vanilla per seed: −0.03, −0.01, −0.02; − GRPO + TIS: +0.18, +0.03, +0.05 (bold: 0 is outside)
    assert cells[5].startswith("**-0.020 [") and cells[5].endswith("]** (3)")
    assert cells[6].startswith("**+0.087 [") and cells[6].endswith("]** (3)") and cells[7] == "1/9"


def test_when_is_reshape_is_best_it_is_compared_with_the_runner_up():
    runs = [_run("is_reshape", 16, s, 0.50) for s in range(3)] + [_run(TIS, 16, s, 0.40) for s in range(3)]
    runs += [_run("vanilla", 16, s, a) for s, a in enumerate((0.46, 0.47, 0.48))]
    cells = [c.strip() for c in report.best_arm_table({"fp32": runs}).splitlines()[2].strip("|").split("|")]
    assert cells[2:5] == ["`is_reshape`", "0.500", "`vanilla`: 0.470"]
    assert cells[5].startswith("**+0.030 [")


def test_load_runs_leaves_out_unfinished_runs(tmp_path):
    for name, steps_done, checkpoint in (("a", 3, False), ("b", 2, False), ("c", 3, True)):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"loss": "vanilla", "lag": 0, "seed": 0, "rl": {"steps": 3}}))
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "test_acc": 0.4 + s / 100, "reward": 0.1, "lag": 0, "reward_ema": 0.1}) + "\n" for s in range(steps_done + 1)))
        if checkpoint:
            (run / "checkpoint.pt").write_bytes(b"")
    runs, unfinished = report.load_runs(tmp_path)
    assert [r["name"] for r in runs] == ["a"] and unfinished == 2
    assert runs[0]["summary"]["final_acc"] == pytest.approx(0.43)


def test_the_soak_flags_a_process_whose_memory_grew_past_the_limit():
    samples = [(t, 1, "ray::HFRolloutServer", 500 + 2 * t) for t in range(0, 200, 2)]  # +2 MiB/s
    samples += [(t, 2, "ray::WorkerDict", 700.0) for t in range(0, 200, 2)]
    samples += [(t, 3, "ray::IDLE", 30 + t) for t in range(0, 200, 2)]  # under 50 MiB at first: still checked
    samples += [(t, 4, "gone", 900.0) for t in range(0, 50, 2)]  # ended before the end: not judged
    rows, grown = soak.growth_table(samples, start=20, end=180, limit=100)
    by_name = {name: (first, last, growth) for name, _, first, last, growth in rows}
    assert by_name["ray::HFRolloutServer"] == (540, pytest.approx(500 + 2 * 189), pytest.approx(2 * 189 - 40))
    assert by_name["ray::WorkerDict"][2] == 0
    assert "gone" not in by_name
    assert grown == ["ray::HFRolloutServer", "ray::IDLE"]


def test_whole_seeds_keeps_only_seeds_every_arm_finished_at_that_lag():
    runs = [_run(loss, 16, seed, 0.4) for loss in ("vanilla", TIS, "is_reshape") for seed in (0, 1)]
    runs += [_run("vanilla", 16, 2, 0.4), _run(TIS, 16, 2, 0.4)]  # seed 2: is_reshape not finished yet
    runs += [_run("vanilla", 0, 0, 0.4)]  # lag 0: only one arm so far
    kept, left_out = report.whole_seeds(runs)
    assert sorted((r["lag"], r["seed"]) for r in kept) == [(16, 0)] * 3 + [(16, 1)] * 3
    assert left_out == 3
