"""Summarise `recipes/tiny/compare.sh` runs (verl's trainer on CPU) as one markdown table.

For each run folder (COMPARE_DIR/<loss>/metrics.jsonl, as verl's file logger writes it): validation
accuracy before training and at the last validation, the best one, mean training reward over the first
and last 5 steps, median step time and its split (generation, actor update, weight sync), trajectory
staleness, and the wall time outside the training steps (from `command.sh`, written just before launch,
to the last logged row: start-up, validations and the trainer's overhead between steps). Medians skip step 1.

    python benchmarks/verl_cpu_report.py runs/tiny-compare-*/ --title "sync, 40 steps"
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from isreshape_verl.testing.recipe_runs import metrics_by_step

ACC = "val-core/openai/gsm8k/acc/mean@1"


def median_of(rows: dict[int, dict], key: str) -> float:
    values = [r[key] for s, r in rows.items() if s > 1 and key in r]  # step 1 carries one-off costs
    return statistics.median(values) if values else float("nan")


def summarise(run_dir: Path) -> list[str]:
    rows = metrics_by_step(run_dir)
    train = sorted(s for s, r in rows.items() if "timing_s/step" in r)
    accs = {s: r[ACC] for s, r in rows.items() if ACC in r}
    first, last = min(accs), max(accs)
    reward = [rows[s]["critic/score/mean"] for s in train]
    staleness = [rows[s].get("training/off_policy/trajectory_staleness/mean", 0.0) for s in train]
    # wall time from command.sh (written just before launch) to the last logged row, minus the training steps:
    # start-up, the validations and the trainer's own overhead between steps
    log, command = run_dir / "metrics.jsonl", run_dir / "command.sh"
    overhead = float("nan")
    if command.exists():
        overhead = log.stat().st_mtime - command.stat().st_mtime - sum(rows[s]["timing_s/step"] for s in train)
    return [
        run_dir.name, f"{len(train)}", f"{accs[first]:.3f} (step {first})", f"{accs[last]:.3f} (step {last})",
        f"{max(accs.values()):.3f}", f"{statistics.mean(reward[:5]):.3f} → {statistics.mean(reward[-5:]):.3f}",
        f"{median_of(rows, 'timing_s/step'):.1f}", f"{median_of(rows, 'timing_s/gen'):.1f}",
        f"{median_of(rows, 'timing_s/update_actor'):.1f}", f"{median_of(rows, 'timing_s/update_weights'):.2f}",
        f"{statistics.mean(staleness):.2f} (max {max(staleness):.0f})", f"{overhead:.0f}",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compare_dir", type=Path)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    runs = sorted(p.parent for p in args.compare_dir.glob("*/metrics.jsonl"))
    if not runs:
        print(f"error: no */metrics.jsonl under {args.compare_dir}", file=sys.stderr)
        return 2
    head = ["run", "steps", "val acc before", "val acc last", "best", "train reward first 5 → last 5",
            "step s", "gen s", "update s", "weight sync s", "staleness", "wall − steps s"]
    lines = [f"### {args.title}" if args.title else "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(summarise(run)) + " |" for run in runs]
    print("\n".join(line for line in lines if line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
