"""Study A's verdict: the finished runs of `benchmarks/correction_study.sh`, both rollout dtypes, in one page.

For each setting (rollout dtype × lag) it answers the issue's questions with the sandbox's own statistics
(`isreshape_verl.sandbox.stats`, `sandbox.report`), over the seeds finished so far:

* which arm has the highest AUC (mean test accuracy over the run), and the default IS Reshape's paired Δ AUC to it
  and to GRPO + TIS (`vanilla:rollout_correction=decoupled_token_is`) [95 % bootstrap interval over seeds];
* per arm: final, best and AUC accuracy and collapses, with Δ to GRPO + TIS (the sandbox's verdict table);
* the diagnostics per arm: ppo_kl, ESS, ratio quantiles (r = π_θ/μ in bypass arms, π_θ/π_old in decoupled ones),
  and what says why: |log r| and |log π_old/μ| quantiles, the IS weights' mean and ESS, IS Reshape's width, the
  gradient norm and the entropy;
* one accuracy plot per dtype.

Runs still going (a checkpoint, or fewer rows than steps) are left out and counted, and so are the finished runs of a
seed that not every arm has finished at that lag: each setting's numbers are over the same seeds. Usage:

    python benchmarks/correction_study_report.py                   # runs/correction_study -> its verdict.md
    python benchmarks/correction_study_report.py --study runs/correction_study --out benchmarks/results/correction_study
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from isreshape_verl.sandbox.loop import read_metrics
from isreshape_verl.sandbox.report import (
    diagnostics_table,
    plot_accuracy,
    summarize_run,
    verdict_intro,
    verdict_table,
)
from isreshape_verl.sandbox.stats import MIN_SEEDS, excludes_zero, mean_interval

DTYPES = {"fp32": "fp32 rollouts (μ computed as π_θ is)", "bf16": "bf16 rollouts against the fp32 trainer"}
TIS = "vanilla:rollout_correction=decoupled_token_is"
DEFAULT = "is_reshape"


def load_runs(folder: Path) -> tuple[list[dict], int]:
    """The finished runs of one compare folder (loss, lag, seed, rows, summary) and how many are unfinished."""
    runs, unfinished = [], 0
    for run_dir in sorted((folder / "runs").iterdir()) if (folder / "runs").is_dir() else []:
        config, metrics = run_dir / "config.json", run_dir / "metrics.jsonl"
        if not (config.is_file() and metrics.is_file()):
            continue
        settings = json.loads(config.read_text())
        rows = read_metrics(str(metrics), partial_tail=True)
        if (run_dir / "checkpoint.pt").exists() or not rows or rows[-1]["step"] != settings["rl"]["steps"]:
            unfinished += 1
            continue
        runs.append({"name": run_dir.name, "loss": settings["loss"], "lag": settings["lag"],
                     "seed": settings["seed"], "rows": rows, "summary": summarize_run(rows)})
    return runs, unfinished


def whole_seeds(runs: list[dict]) -> tuple[list[dict], int]:
    """The runs of the seeds that every arm finished at their lag (so each setting's means and paired Δs are over
    the same seeds), and how many finished runs that leaves out."""
    arms = {r["loss"] for r in runs}
    done: dict = {}
    for r in runs:
        done.setdefault((r["lag"], r["seed"]), set()).add(r["loss"])
    kept = [r for r in runs if done[(r["lag"], r["seed"])] == arms]
    return kept, len(runs) - len(kept)


def paired_delta(runs: list[dict], loss: str, other: str, lag) -> tuple[tuple[float, float, float] | None, int]:
    """Mean [interval] of AUC(loss) − AUC(other) over the seeds both finished at `lag`, and their count."""
    auc = {}
    for run in runs:
        if run["lag"] == lag and run["loss"] in (loss, other):
            auc.setdefault(run["loss"], {})[run["seed"]] = run["summary"]["auc"]
    shared = sorted(set(auc.get(loss, {})) & set(auc.get(other, {})))
    if not shared:
        return None, 0
    return mean_interval([auc[loss][s] - auc[other][s] for s in shared]), len(shared)


def cell(interval, n: int) -> str:
    if interval is None:
        return "–"
    text = f"{interval[0]:+.3f}"
    if n >= MIN_SEEDS and math.isfinite(interval[1]):
        text += f" [{interval[1]:+.3f}, {interval[2]:+.3f}]"
        if excludes_zero(interval):
            text = f"**{text}**"
    return f"{text} ({n})"


def best_arm_table(by_dtype: dict[str, list[dict]]) -> str:
    """One row per setting: the arm with the highest mean AUC; the default IS Reshape against the best of the other
    arms and against GRPO + TIS."""
    lines = ["| rollout | lag | best arm by mean AUC | IS Reshape default: AUC | best other arm: AUC | Δ AUC to it "
             "(seeds) | Δ AUC to GRPO + TIS (seeds) | collapsed runs, all arms |", "|---|---|---|---|---|---|---|---|"]
    for dtype, runs in by_dtype.items():
        for lag in sorted({r["lag"] for r in runs}):
            at_lag = [r for r in runs if r["lag"] == lag]
            means = {}
            for run in at_lag:
                means.setdefault(run["loss"], []).append(run["summary"]["auc"])
            mean_auc = {loss: sum(v) / len(v) for loss, v in means.items()}
            best = max(mean_auc, key=mean_auc.get)
            others = {loss: auc for loss, auc in mean_auc.items() if loss != DEFAULT}
            other = max(others, key=others.get)
            collapsed = sum(bool(r["summary"]["collapsed"]) for r in at_lag)
            default_auc = f"{mean_auc[DEFAULT]:.3f}" if DEFAULT in mean_auc else "–"
            lines.append(f"| {dtype} | {lag} | `{best}` | {default_auc} | `{other}`: {others[other]:.3f} | "
                         f"{cell(*paired_delta(runs, DEFAULT, other, lag))} | "
                         f"{cell(*paired_delta(runs, DEFAULT, TIS, lag))} | {collapsed}/{len(at_lag)} |")
    return "\n".join(lines)


WHY = (("abs_log_ratio_p99", "\\|log r\\| p99"), ("abs_log_rho_p99", "\\|log π_old/μ\\| p99"),
       ("rc_is_mean", "IS weight mean"), ("rc_is_ess", "IS weight ESS"), ("width", "IS Reshape width"),
       ("grad_norm", "grad norm"), ("entropy", "entropy"))
"""Per-step metrics the sandbox logs that say why an arm learns or collapses (`docs/sandbox.md`, Outputs)."""


def why_table(runs: list[dict]) -> str:
    """Markdown: per (loss, lag), each WHY metric's mean over every step of every seed ("–": the arm has none)."""
    lines = ["| loss | lag | " + " | ".join(label for _, label in WHY) + " |", "|---|---|" + "---|" * len(WHY)]
    groups: dict = {}
    for run in runs:
        groups.setdefault((run["loss"], run["lag"]), []).append(run)
    for (loss, lag), members in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = []
        for key, _ in WHY:
            values = [row[key] for m in members for row in m["rows"]
                      if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
            cells.append(f"{sum(values) / len(values):.3g}" if values else "–")
        lines.append(f"| `{loss}` | {lag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path("runs/correction_study"))
    parser.add_argument("--out", type=Path, default=None, help="[default: the --study folder]")
    args = parser.parse_args(argv)
    out = args.out or args.study
    out.mkdir(parents=True, exist_ok=True)
    by_dtype, unfinished, partial = {}, {}, {}
    for dtype in DTYPES:
        runs, unfinished[dtype] = load_runs(args.study / dtype)
        runs, partial[dtype] = whole_seeds(runs)
        if runs:
            by_dtype[dtype] = runs
    if not by_dtype:
        print(f"error: no finished run under {args.study}/{{{','.join(DTYPES)}}}/runs", file=sys.stderr)
        return 2
    parts = ["# Study A: IS Reshape against the rollout corrections, with lag and engine mismatch", "",
             "Made by `python benchmarks/correction_study_report.py` from the finished runs of "
             "`bash benchmarks/correction_study.sh` (sandbox, `--preset stress`: 60 steps, 2 epochs × 4 "
             "mini-batches per rollout batch), over the seeds that every arm finished at a lag. Runs: "
             + "; ".join(f"{dtype} {len(runs)} (left out: {unfinished[dtype]} unfinished, {partial[dtype]} of seeds "
                         "not every arm finished)" for dtype, runs in by_dtype.items()) + ".", "",
             "## The question: is the default IS Reshape ≥ the best arm, and > GRPO + TIS?", "",
             "Δ AUC paired by seed, the default IS Reshape (bypass) minus the other arm [95 % bootstrap interval "
             f"over seeds, from {MIN_SEEDS} seeds]; **bold**: the interval excludes 0. AUC: mean greedy test "
             "accuracy over the run's evaluations.", "", best_arm_table(by_dtype), ""]
    for dtype, runs in by_dtype.items():
        plot = f"accuracy_{dtype}.png"
        plot_accuracy(sorted(runs, key=lambda run: run["lag"]), str(out / plot))  # panels by lag, ascending
        parts += [f"## {DTYPES[dtype]}", "", verdict_intro(runs, TIS), "", verdict_table(runs, TIS), "",
                  "Diagnostics, means over steps and seeds (ratio: π_θ/μ in the bypass arms, π_θ/π_old in the "
                  "decoupled ones):", "", diagnostics_table(runs), "",
                  "Why, means over steps and seeds (r: the loss's ratio; π_old/μ: what the decoupled arms' weights "
                  "correct):", "", why_table(runs), "", f"![test accuracy, {dtype}]({plot})", ""]
    (out / "verdict.md").write_text("\n".join(parts))
    print(f"written: {out / 'verdict.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
