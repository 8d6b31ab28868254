"""`isreshape-verl plot-runs` on logs written by verl's own FileLogger (on CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from isreshape_verl import plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(root: Path, name: str, loss: str, steps: int, monkeypatch, val_every: int = 5) -> Path:
    """A run folder as the recipes write it (RUN_ROOT/EXP_NAME/metrics.jsonl), through verl's FileLogger,
    with metric names as verl's v1 trainer and the is_reshape loss log them."""
    from verl.utils.tracking import FileLogger

    run_dir = root / name
    run_dir.mkdir(parents=True)
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(run_dir / "metrics.jsonl"))
    logger = FileLogger(project_name="isreshape-gsm8k", experiment_name=name)
    offset = {"grpo": 0.0, "sapo": 0.05, "isreshape": 0.1}[loss]
    for step in range(0, steps + 1):
        if step % val_every == 0:  # validation before training and every val_every steps
            logger.log({"val-core/openai/gsm8k/reward/mean@1": np.float64(0.3 + offset + 0.02 * step),
                        "val-aux/openai/gsm8k/reward/std@1": 0.4}, step=step)
        if step == 0:
            continue
        data = {
            "critic/score/mean": np.float32(0.2 + offset + 0.01 * step),
            "actor/entropy_loss": 1.0 - 0.01 * step,
            "actor/ppo_kl": 1e-3 * step,
            "actor/pg_loss": -0.1,
            "training/global_step": step,
            "some/text": "not a number",
        }
        if loss == "isreshape":
            data["actor/is_reshape/weight_mean"] = 0.9 - 0.001 * step
            data["actor/is_reshape/ess"] = np.float64(0.95)
        logger.log(data, step=step)
    logger.finish()
    return run_dir


@pytest.fixture
def experiment(tmp_path, monkeypatch):
    exp = tmp_path / "gsm8k-compare"
    for loss in ("grpo", "sapo", "isreshape"):
        _write_run(exp, loss, loss, steps=20, monkeypatch=monkeypatch)
    return exp


def test_plots_and_table_from_verl_file_logger(experiment, tmp_path, capsys):
    out = tmp_path / "plots"
    rc = plot_runs.main([str(experiment / "grpo"), str(experiment / "sapo"), str(experiment / "isreshape"),
                         "--out", str(out), "--smooth", "3"])
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["entropy.png", "is_reshape_ess.png", "is_reshape_mean_g.png", "ppo_kl.png", "reward.png",
                    "val_accuracy.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5_000
    import matplotlib.image as mpimg

    assert mpimg.imread(out / "val_accuracy.png").shape[:2] == (504, 840)  # 7 x 4.2 in at 120 dpi

    table = (out / "summary.md").read_text().splitlines()
    header = "| run | last step | val first | val last | val best (step) | reward | entropy | ppo_kl | mean g | ESS |"
    assert header in table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table if line.startswith("| ")}
    # grpo: val at steps 0,5,...,20 = 0.3 + 0.02 step; reward mean of last 5 steps (16..20) = 0.2 + 0.01*18
    assert rows["grpo"][:4] == ["20", "0.3", "0.7", "0.7 (20)"]
    assert float(rows["grpo"][4]) == pytest.approx(0.38, abs=1e-6)
    assert float(rows["grpo"][5]) == pytest.approx(1.0 - 0.18)
    assert float(rows["grpo"][6]) == pytest.approx(0.018)
    assert rows["grpo"][7:] == ["–", "–"]  # no IS Reshape metrics in a GRPO run
    assert rows["sapo"][1:3] == ["0.35", "0.75"]
    assert float(rows["isreshape"][7]) == pytest.approx(0.9 - 0.018)
    assert float(rows["isreshape"][8]) == pytest.approx(0.95)
    stdout = capsys.readouterr().out
    assert header in stdout and f"wrote {out / 'summary.md'}" in stdout


def test_folder_of_runs_and_plain_jsonl_files(experiment, tmp_path, monkeypatch):
    # a compare.sh experiment folder expands into its runs
    runs = plot_runs.find_runs([str(experiment)])
    assert sorted(r.name for r in runs) == ["grpo", "isreshape", "sapo"]
    grpo = next(r for r in runs if r.name == "grpo")
    assert sorted(grpo.steps) == list(range(21))
    assert grpo.steps[5]["val-core/openai/gsm8k/reward/mean@1"] == pytest.approx(0.4)
    assert grpo.steps[5]["critic/score/mean"] == pytest.approx(0.25)  # validation and training merged
    assert "some/text" not in grpo.steps[5]
    # verl's default FileLogger location: <root>/<project>/<experiment>.jsonl
    from verl.utils.tracking import FileLogger

    monkeypatch.delenv("VERL_FILE_LOGGER_PATH", raising=False)
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(tmp_path / "logs"))
    logger = FileLogger("proj", "only-train")
    for step in (1, 2, 3):
        logger.log({"critic/score/mean": 0.5, "actor/entropy": 0.7}, step=step)
    logger.finish()
    out = tmp_path / "plots2"
    assert plot_runs.main([str(tmp_path / "logs" / "proj"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["entropy.png", "reward.png"]
    assert "| only-train | 3 | – | – | – | 0.5 | 0.7 | – | – | – |" in (out / "summary.md").read_text()


def test_truncated_line_is_reported_not_silent(experiment, tmp_path, capsys):
    path = experiment / "sapo" / "metrics.jsonl"
    with path.open("ab") as fh:
        fh.write(b'{"step": 21, "data": {"critic/score/me')  # a run killed mid-write
    assert plot_runs.main([str(experiment / "sapo"), "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {path}: skipped 1 line(s)" in err and "(lines 26)" in err


def test_errors_name_the_path(tmp_path, capsys):
    assert plot_runs.main([str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert plot_runs.main([str(tmp_path / "empty")]) == 2
    expected = "no metrics.jsonl, */metrics.jsonl, runs/*/metrics.jsonl (a compare --out folder) or *.jsonl inside"
    assert expected in capsys.readouterr().err
    (tmp_path / "blank.jsonl").write_text("\n")
    assert plot_runs.main([str(tmp_path / "blank.jsonl")]) == 2
    assert "no metrics in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_runs.main([str(tmp_path / "blank.jsonl"), "--smooth", "0"])
    assert "--smooth must be >= 1; got 0" in capsys.readouterr().err


def test_smooth_is_a_trailing_moving_average():
    assert plot_runs.smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert plot_runs.smooth([1.0, 5.0], 1) == [1.0, 5.0]


def test_runs_as_module_and_through_the_cli(experiment, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "isreshape_verl.plot_runs", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: isreshape-verl plot-runs")
    from isreshape_verl.cli import main as cli_main

    out = tmp_path / "cli"
    assert cli_main(["plot-runs", str(experiment), "--out", str(out)]) == 0
    assert (out / "val_accuracy.png").is_file() and (out / "summary.md").is_file()


def test_unwritable_out_is_a_one_line_error(experiment, tmp_path, capsys):
    from isreshape_verl.plot_runs import main as plot_main

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert plot_main([str(experiment), "--out", str(blocker / "plots")]) == 2
    assert "--out" in capsys.readouterr().err


def _write_compare_out(root: Path, names: list[str]) -> Path:
    """A `compare --out` folder as the sandbox writes it: report files beside runs/<name>/metrics.jsonl, flat rows
    {"step", metric: value} with null where a metric had no value (every advantage 0) and a list-valued histogram."""
    import json

    for k, name in enumerate(names):
        run_dir = root / "runs" / name
        run_dir.mkdir(parents=True)
        rows = [{"step": 0, "test_acc": 0.4, "time_eval": 1.0}]
        for step in (1, 2, 3, 4):
            row = {"step": step, "loss": -0.1, "ppo_kl": 0.01 * step, "entropy": 0.5 + k,
                   "g_mean": None if step == 2 else 1.0 - 0.01 * step, "ess": None if step == 2 else 0.9,
                   "ratio_p99": 1.2, "log_ratio_hist": [1, 2, 3], "reward": 0.1 * step, "lag": 0}
            if step % 2 == 0:
                row["test_acc"] = 0.4 + 0.05 * step / 2  # 0.45 at step 2, 0.5 at step 4
            rows.append(row)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    (root / "report.md").write_text("# isreshape-verl compare\n")
    (root / "summary.json").write_text("{}")
    return root


def test_compare_out_folder_each_run_a_curve(tmp_path, capsys):
    out_dir = _write_compare_out(tmp_path / "cmp", ["vanilla__lag0__seed0", "sapo__lag0__seed0"])
    plots = tmp_path / "plots"
    assert plot_runs.main([str(out_dir), "--out", str(plots), "--last", "2"]) == 0
    assert capsys.readouterr().err == ""  # every line read: none skipped
    assert sorted(p.name for p in plots.glob("*.png")) == [
        "entropy.png", "is_reshape_ess.png", "is_reshape_mean_g.png", "ppo_kl.png", "reward.png", "val_accuracy.png"]
    for png in plots.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5_000
    table = (plots / "summary.md").read_text()
    # val (test_acc) 0.4 at step 0, 0.45 at 2, 0.5 at 4; mean of the last 2 points: reward (0.3 + 0.4)/2 = 0.35,
    # ppo_kl (0.03 + 0.04)/2 = 0.035, g (steps 3, 4; step 2 is null) (0.97 + 0.96)/2 = 0.965, ESS 0.9
    assert "| vanilla__lag0__seed0 | 4 | 0.4 | 0.5 | 0.5 (4) | 0.35 | 0.5 | 0.035 | 0.965 | 0.9 |" in table
    assert "| sapo__lag0__seed0 | 4 | 0.4 | 0.5 | 0.5 (4) | 0.35 | 1.5 | 0.035 | 0.965 | 0.9 |" in table
    run = next(r for r in plot_runs.find_runs([str(out_dir)]) if r.name == "sapo__lag0__seed0")
    assert run.steps[2]["val-core/sandbox/acc/mean@1"] == pytest.approx(0.45)  # read under verl's names
    assert run.steps[3]["ratio_p99"] == 1.2 and "actor/is_reshape/ess" not in run.steps[2]  # null: no value


def test_sandbox_and_verl_runs_in_one_command(experiment, tmp_path):
    out_dir = _write_compare_out(tmp_path / "cmp", ["vanilla__lag0__seed0"])
    runs = plot_runs.find_runs([str(out_dir / "runs" / "vanilla__lag0__seed0"), str(experiment / "grpo")])
    assert [r.name for r in runs] == ["vanilla__lag0__seed0", "grpo"]
    written = plot_runs.plot_runs(runs, tmp_path / "plots")
    assert (tmp_path / "plots" / "reward.png") in written
    # many runs: the legend moves beside the axes and the figure grows to the right; the axes keep 7 x 4.2 in
    many = _write_compare_out(tmp_path / "many", [f"loss{i}__lag0__seed0" for i in range(12)])
    plot_runs.plot_runs(plot_runs.find_runs([str(many)]), tmp_path / "many_plots")
    import matplotlib.image as mpimg

    assert mpimg.imread(tmp_path / "many_plots" / "reward.png").shape[1] > 840
