"""`isreshape-verl compare`: clear errors before any work, the smoke preset end to end, --model and --data."""

import json
import math
import os
import subprocess
import sys

import pytest

from isreshape_verl.sandbox.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--losses", "grpo"], "unknown loss 'grpo'"),
        (["--losses", "is_reshape:kernel=nope"], "allowed: gaussian"),
        (["--lags", "0", "-1"], "--lags must be a list of lags >= 0"),
        (["--steps", "0"], "--steps must be > 0"),
        (["--prompts-per-step", "6", "--mini-batches", "4"], "must be a multiple of --mini-batches"),
        (["--samples-per-prompt", "1"], "must be >= 2"),
        (["--difficulty", "7"], "--difficulty must be 1..5"),
    ],
)
def test_bad_arguments_fail_before_work(argv, message, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_unwritable_output_and_bad_model_and_data(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main(["--out", str(blocker / "sub")]) == 2
    assert "is not writable" in capsys.readouterr().err
    empty = tmp_path / "empty_model"
    empty.mkdir()
    assert main(["--model", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "is not a model" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["--data", str(blocker), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable parquet" in capsys.readouterr().err


def test_help_everywhere():
    for argv in (["compare", "--help"],):
        out = subprocess.run([sys.executable, "-m", "isreshape_verl.cli", *argv], capture_output=True, text=True)
        assert out.returncode == 0 and "--losses" in out.stdout and "--preset" in out.stdout
    out = subprocess.run([sys.executable, "-m", "isreshape_verl.sandbox", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "isreshape-verl compare" in out.stdout


def _reject_nan(constant):
    raise ValueError(f"{constant} is not strict JSON")


def test_smoke_preset_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("ISRESHAPE_CACHE", str(tmp_path / "cache"))  # cold cache: the warm start is part of it
    out = tmp_path / "smoke"
    assert main(["--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    for name in ("report.md", "accuracy.png", "ratios.png", "g_curves.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    json.loads((out / "summary.json").read_text(), parse_constant=_reject_nan)
    report = (out / "report.md").read_text()
    for loss in ("vanilla", "sapo", "is_reshape"):
        assert f"| `{loss}` | 0 |" in report and f"| `{loss}` | 2 |" in report
    runs = sorted(os.listdir(out / "runs"))
    assert len(runs) == 6
    for run in runs:
        config = json.loads((out / "runs" / run / "config.json").read_text())
        rows = [json.loads(l, parse_constant=_reject_nan)  # strict JSON: no NaN/Infinity
                for l in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == config["rl"]["steps"]
        for row in rows[1:]:
            for key in ("loss", "entropy", "ppo_kl", "reward", "reward_ema", "grad_norm", "lag",
                        "gen_tokens_per_s", "train_tokens_per_s", "ratio_min", "ratio_max"):
                assert math.isfinite(row[key]), (run, key)
        assert {r["lag"] for r in rows[1:]} <= {0, 1, 2}
    # a second invocation reuses the cached warm start and, with --resume, the finished runs
    assert main(["--preset", "smoke", "--out", str(out), "--no-progress", "--resume"]) == 0


def test_local_model_folder_and_verl_parquet(tmp_path, monkeypatch):
    """--model DIR (a saved Hugging Face folder) and --data FILE.parquet (verl format) through the same code."""
    import pandas as pd

    from isreshape_verl.sandbox.model import TinyModelArgs, tiny_policy
    from isreshape_verl.sandbox.task import make_split

    policy = tiny_policy(TinyModelArgs(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                       intermediate_size=64), 0)
    model_dir = tmp_path / "model"
    policy.model.save_pretrained(model_dir)
    policy.tokenizer.save_pretrained(model_dir)
    problems = make_split(3, 60, 1)
    pd.DataFrame({
        "data_source": ["openai/gsm8k"] * len(problems),
        "prompt": [[{"role": "user", "content": p.prompt}] for p in problems],
        "reward_model": [{"style": "rule", "ground_truth": p.answer} for p in problems],
        "extra_info": [{"answer": p.solution} for p in problems],
    }).to_parquet(tmp_path / "train.parquet")
    monkeypatch.setenv("ISRESHAPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--data", str(tmp_path / "train.parquet"), "--out", str(out), "--losses",
            "vanilla", "--lags", "1", "--steps", "2", "--prompts-per-step", "4", "--samples-per-prompt", "2",
            "--mini-batches", "1", "--eval-problems", "8", "--warm-max-steps", "5", "--warm-eval-every", "5",
            "--warm-batch-size", "8", "--warm-eval-problems", "8", "--max-new-tokens", "8", "--no-progress"]
    assert main(argv) == 0
    config = json.loads((out / "runs" / "vanilla__lag1__seed0" / "config.json").read_text())
    assert config["compare"]["model"] == str(model_dir)
    assert "parquet" in (out / "report.md").read_text()


def test_cli_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
    """Interrupt every run of a comparison after 3 steps (--stop-after), resume, compare with a run never stopped."""
    from isreshape_verl.sandbox.loop import read_metrics, without_timings

    monkeypatch.setenv("ISRESHAPE_CACHE", str(tmp_path / "cache"))
    common = ["--preset", "smoke", "--losses", "sapo", "is_reshape", "--lags", "2", "--steps", "6",
              "--ckpt-every", "2", "--jobs", "1", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "full")]) == 0
    assert main(common + ["--out", str(tmp_path / "cut"), "--stop-after", "3"]) == 0
    assert not (tmp_path / "cut" / "report.md").exists()
    assert main(common + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    for run in ("sapo__lag2__seed0", "is_reshape__lag2__seed0"):
        full = read_metrics(str(tmp_path / "full" / "runs" / run / "metrics.jsonl"))
        cut = read_metrics(str(tmp_path / "cut" / "runs" / run / "metrics.jsonl"))
        assert cut[-1]["step"] == 6
        assert without_timings(cut) == without_timings(full)


def test_a_second_comparison_into_the_same_folder_is_refused(tmp_path, capsys):
    from isreshape_verl.sandbox.cli import lock_output

    with lock_output(str(tmp_path)):
        assert main(["--preset", "smoke", "--out", str(tmp_path), "--no-progress"]) == 2
        assert f"is in use by a running comparison (pid {os.getpid()})" in capsys.readouterr().err
    with lock_output(str(tmp_path)):  # released when the first one ends
        pass


def test_sigterm_stops_every_worker_and_says_how_to_resume(tmp_path):
    """`kill PID` (or Ctrl-C) stops the workers too, with one line on how to continue, no traceback; exit 143."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    env = {**os.environ, "ISRESHAPE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "isreshape_verl.sandbox", "--preset", "smoke", "--out", str(out),
                             "--no-progress", "--jobs", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("runs/*/metrics.jsonl")):
        time.sleep(0.5)
    assert list(out.glob("runs/*/metrics.jsonl")), "no run started"
    import psutil

    children = psutil.Process(proc.pid).children(recursive=True)
    assert children
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143  # 128 + SIGTERM, as a shell reports a process killed by it
    assert "terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err, err
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive


def test_data_whose_prompts_do_not_fit_the_model_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """A verl parquet of prompts longer than the tiny model's 256 positions: exit 2 before the warm start."""
    import pandas as pd

    from isreshape_verl.sandbox.task import make_split

    problems = make_split(3, 40, 1)
    pd.DataFrame({
        "data_source": ["openai/gsm8k"] * len(problems),
        "prompt": [[{"role": "user", "content": p.prompt + " " * 300}] for p in problems],
        "reward_model": [{"style": "rule", "ground_truth": p.answer} for p in problems],
        "extra_info": [{"answer": p.solution} for p in problems],
    }).to_parquet(tmp_path / "long.parquet")
    monkeypatch.setenv("ISRESHAPE_CACHE", str(tmp_path / "cache"))
    code = main(["--data", str(tmp_path / "long.parquet"), "--out", str(tmp_path / "out"), "--no-progress",
                 "--eval-problems", "8", "--warm-eval-problems", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "no train problem fits" in err[0] and "at most 228 tokens" in err[0]  # 256 positions − 28 new tokens
    assert not (tmp_path / "cache").exists()  # refused before the warm start
