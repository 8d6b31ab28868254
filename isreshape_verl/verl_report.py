"""`isreshape-verl report-runs DIR`: a folder of verl runs (compare.sh's COMPARE_DIR, several of them, or any
RUN_ROOT) as the same report.md the sandbox's `isreshape-verl compare` writes.

Every run folder under DIR (one that holds launch.json or metrics*.jsonl, isreshape_verl/verl_runs.py) is read:

    arm      launch.json's loss, and its ROLLOUT_CORRECTION unless bypass (grpo, grpo:decoupled_token_is), plus the
             loss's own knobs (IS_*, CLIP_RATIO, SAPO_TAU_*) where runs of that loss differ in them
    setting  ASYNC and STALENESS, plus every other knob or trailing override in which the runs differ (ROLLOUT,
             LR, ...), except those that only follow ASYNC (GPUS_PER_NODE, ROLLOUT_GPUS, PARAM_SYNC_STEP)
    seed     SEED

verl's metrics become the sandbox's row keys (VERL_TO_SANDBOX; test_acc from `val-core/<source>/acc/mean@<n>`),
and the sandbox's own functions make the numbers: `summarize_run` per run (start, final and best accuracy, AUC,
collapse), `sandbox/stats.py` across seeds (mean and 95 % percentile-bootstrap interval from MIN_SEEDS = 3 seeds;
with fewer, the mean alone, "no interval"), Δ paired by seed against the reference arm (the first, or
--reference) in the same setting. A run enters the statistics only when it logged every step it planned (STEPS in
its command.sh; without it, as many as the longest run of its setting): partial runs, runs without a logged step,
and (arm, seed) cells that other arms of a setting have and this arm lacks are named in report.md and on stderr.

Writes into --out (default DIR): report.md, summary.json (strict JSON), accuracy.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from isreshape_verl.cli_args import ArgumentParser, fail

PROG = "isreshape-verl report-runs"

VERL_TO_SANDBOX = {
    "reward": ("critic/score/mean",),  # mean sequence score of the sampled training batch
    "ppo_kl": ("actor/ppo_kl",),
    "loss": ("actor/pg_loss",),
    "entropy": ("actor/entropy_loss", "actor/entropy"),  # verl logs the mean token entropy as entropy_loss
    "grad_norm": ("actor/grad_norm",),
    # model versions between the trajectory's freshest weights and the trained policy (verl's lower bound; the
    # worst case, from its oldest weights, is trajectory_staleness_worst)
    "lag": ("training/off_policy/trajectory_staleness/mean",),
    "lag_worst": ("training/off_policy/trajectory_staleness_worst/max",),
    "ess": ("actor/is_reshape/ess",),  # IS Reshape's (Σg)²/(N·Σg²); other losses do not log one
    "g_mean": ("actor/is_reshape/weight_mean",),
    "ratio_p01": ("actor/is_reshape/ratio_p01",),
    "ratio_p99": ("actor/is_reshape/ratio_p99",),
    "rc_is_mean": ("rollout_corr/rollout_is_mean",),  # decoupled arms: verl's rollout-correction weights
    "rc_is_ess": ("rollout_corr/rollout_is_eff_sample_size",),
    "time_step": ("timing_s/step",),
    "time_gen": ("timing_s/gen",),
    "time_logprob": ("timing_s/old_log_prob",),
    "time_train": ("timing_s/update_actor",),
    "time_eval": ("timing_s/testing",),
}
"""The sandbox's metric (sandbox/loop.py's rows) <- verl's, the first present."""
REWARD_EMA = 0.9
"""reward_ema = 0.9·reward_ema + 0.1·reward, from the first step's reward, as the sandbox's loop."""
FOLLOW_ASYNC = ("GPUS_PER_NODE", "ROLLOUT_GPUS", "ROLLOUT_NODES", "PARAM_SYNC_STEP", "CKPT_BACKEND")
NOT_SETTING = ("SEED", "EXP_NAME", "ROLLOUT_CORRECTION")
ASYNC_ORDER = ("sync", "colocate", "separate")


class ReportError(ValueError):
    """A refused input: the message is the one line after "isreshape-verl report-runs: error: "."""


def accuracy_key(keys) -> str | None:
    """verl's validation accuracy: `val-core/<source>/acc/mean@<n>` (else .../reward/...), the largest n, the first
    source in sorted order."""
    from isreshape_verl.plot_runs import VAL_RE

    found = [(m["var"] != "acc", -int(m["n"]), key) for key in keys if (m := VAL_RE.match(key))]
    return min(found)[2] if found else None


def sandbox_rows(steps: dict[int, dict[str, float]], acc_key: str | None) -> list[dict]:
    """verl's {step: {metric: value}} as the sandbox's rows: test_acc at validation steps; at training steps
    (step > 0 with a reward) the VERL_TO_SANDBOX metrics present and reward_ema."""
    rows, ema = [], None
    for step, data in sorted(steps.items()):
        row: dict = {"step": step}
        if acc_key and acc_key in data:
            row["test_acc"] = data[acc_key]
        if step > 0 and any(k in data for k in VERL_TO_SANDBOX["reward"]):
            for name, keys in VERL_TO_SANDBOX.items():
                key = next((k for k in keys if k in data), None)
                if key is not None:
                    row[name] = data[key]
            row.setdefault("lag", float("nan"))
            ema = row["reward"] if ema is None else REWARD_EMA * ema + (1 - REWARD_EMA) * row["reward"]
            row["reward_ema"] = ema
        if len(row) > 1:
            rows.append(row)
    return rows


# ---- the runs under DIR ----
def run_folders(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) that holds launch.json or a metrics*.jsonl, not inside a
    checkpoints/ folder."""
    found = {p.parent for pattern in ("launch.json", "metrics*.jsonl") for p in root.rglob(pattern)}
    return sorted(p for p in found if "checkpoints" not in p.relative_to(root).parts)


def read_runs(root: Path) -> tuple[list[dict], list[str]]:
    """(every run under `root` with its arm, setting, seed, rows and summary, sorted; warnings for unreadable
    metrics lines). Raises ReportError for no runs, or a run that cannot be named (no or bad launch.json)."""
    from isreshape_verl import verl_runs

    if not root.is_dir():
        raise ReportError(f"DIR {str(root)!r} is not a folder (a COMPARE_DIR, or a folder of verl runs)")
    folders = run_folders(root)
    if not folders:
        raise ReportError(f"DIR {str(root)!r} holds no verl run: no metrics.jsonl or launch.json under it (the "
                          "folders compare.sh and the recipes write)")
    runs, warnings = [], []
    for folder in folders:
        record = verl_runs.settings(folder)
        if record is None:
            what = "an unreadable launch.json" if (folder / verl_runs.LAUNCH).exists() else "no launch.json"
            raise ReportError(f"{folder} has {what}: its arm, setting and seed are unknown (the launcher writes it "
                              "in every run folder; isreshape-verl plot-runs reads bare metrics files)")
        steps, bad = verl_runs.history(folder)
        warnings += [f"{line}: not FileLogger records, skipped" for line in bad]
        knobs = record["knobs"]
        seed = knobs.get("SEED", "42")
        runs.append({"path": folder, "name": str(folder.relative_to(root)) if folder != root else folder.name,
                     "record": record, "steps": steps, "seed": int(seed) if str(seed).isdigit() else seed,
                     "planned": verl_runs.planned_steps(folder)})
    _name_arms_and_settings(runs)
    keys = {k for run in runs for data in run["steps"].values() for k in data}
    acc_key = accuracy_key(keys)
    from isreshape_verl.sandbox.report import summarize_run

    for run in runs:
        run["acc_key"] = acc_key
        run["rows"] = sandbox_rows(run["steps"], acc_key)
        run["summary"] = summarize_run(run["rows"])
        run["last"] = max([s for s in run["steps"] if s > 0], default=None)
    seen: dict = {}
    for run in runs:
        key = (run["loss"], run["lag"], run["seed"])
        if key in seen:
            raise ReportError(f"{seen[key]['path']} and {run['path']} are the same arm, setting and seed ({run['loss']}, "
                              f"{run['lag']}, seed {run['seed']}): report a folder that holds one of them")
        seen[key] = run
    runs.sort(key=lambda r: (r["arm_order"], r["setting_order"], str(r["seed"])))
    return runs, warnings


def _name_arms_and_settings(runs: list[dict]) -> None:
    """Set each run's `loss` (the arm's label), `lag` (the setting's label) and their sort keys (module docstring)."""
    from isreshape_verl.launch.knobs import KNOBS, LOSSES
    from isreshape_verl.rollout_correction import CORRECTIONS

    def knob(run, name):
        return run["record"]["knobs"].get(name, "(unset)")

    loss_only = {name for name, k in KNOBS.items() if k.loss is not None}
    for run in runs:
        record = run["record"]
        run["correction"] = record["knobs"].get("ROLLOUT_CORRECTION") or "bypass"
        items = {"dataset": record.get("dataset")}
        items.update({k: v for k, v in record["knobs"].items() if k not in loss_only and k not in NOT_SETTING})
        items["overrides"] = " ".join(record.get("overrides") or []) or "(none)"
        run["items"] = items
    names = sorted({k for run in runs for k in run["items"]})
    varying = [k for k in names if len({run["items"].get(k, "(unset)") for run in runs}) > 1]
    shown = [k for k in varying if k not in ("ASYNC", "STALENESS") and not (
        k in FOLLOW_ASYNC and all(len({r["items"].get(k) for r in runs if r["items"].get("ASYNC") == a}) == 1
                                  for a in {r["items"].get("ASYNC") for r in runs}))]
    for run in runs:
        items = run["items"]
        run["lag"] = " ".join([f"ASYNC={items.get('ASYNC', 'sync')}", f"STALENESS={items.get('STALENESS', '?')}"]
                              + [f"{k}={items.get(k, '(unset)')}" for k in shown])
        async_mode = items.get("ASYNC", "sync")
        staleness = items.get("STALENESS", "0")
        run["setting_order"] = (ASYNC_ORDER.index(async_mode) if async_mode in ASYNC_ORDER else len(ASYNC_ORDER),
                                int(staleness) if str(staleness).isdigit() else 0, run["lag"])
    for run in runs:
        same = [r for r in runs if (r["record"]["loss"], r["correction"]) == (run["record"]["loss"], run["correction"])]
        own = sorted({k for r in same for k in r["record"]["knobs"] if k in loss_only})
        differ = [k for k in own if len({knob(r, k) for r in same}) > 1]
        loss = run["record"]["loss"]
        run["loss"] = (loss + ("" if run["correction"] == "bypass" else f":{run['correction']}")
                       + "".join(f" {k}={knob(run, k)}" for k in differ))
        run["arm_order"] = (LOSSES.index(loss) if loss in LOSSES else len(LOSSES),
                            CORRECTIONS.index(run["correction"]) if run["correction"] in CORRECTIONS else 99,
                            run["loss"])


def left_out(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """(the runs the statistics use, a line for every run or cell they leave out and why). A run is used when it
    logged its planned steps (STEPS; without it, the most any run of its setting logged)."""
    used, lines = [], []
    longest: dict = {}
    for run in runs:
        if run["last"] is not None:
            longest[run["lag"]] = max(longest.get(run["lag"], 0), run["last"])
    for run in runs:
        planned = run["planned"] or longest.get(run["lag"])
        if run["last"] is None:
            lines.append(f"{run['name']}: no training step logged ({run['loss']}, {run['lag']}, seed {run['seed']})")
        elif planned and run["last"] < planned:
            lines.append(f"{run['name']}: partial, {run['last']} of {planned} steps logged ({run['loss']}, "
                         f"{run['lag']}, seed {run['seed']}); rerun the same compare.sh to continue it")
        else:
            used.append(run)
    present = {(r["loss"], r["lag"], r["seed"]) for r in runs}
    for setting in dict.fromkeys(r["lag"] for r in runs):
        arms = list(dict.fromkeys(r["loss"] for r in runs))
        seeds = sorted({r["seed"] for r in runs if r["lag"] == setting}, key=str)
        for arm in arms:
            lacking = [s for s in seeds if (arm, setting, s) not in present]
            if len(lacking) == len(seeds):
                lines.append(f"{arm}: no run in setting {setting}")
            elif lacking:
                lines.append(f"{arm}: no run of seed{'s' * (len(lacking) > 1)} {', '.join(map(str, lacking))} in "
                             f"setting {setting}, which other arms have")
    return used, lines


# ---- report.md ----
def write(out: Path, root: Path, runs: list[dict], reference: str | None, warnings: list[str]) -> tuple[Path, list[dict], list[str]]:
    """report.md, summary.json and accuracy.png in `out`; returns (report path, table rows, left-out lines)."""
    from isreshape_verl.paths import write_atomic
    from isreshape_verl.sandbox.report import (
        ACC_THRESHOLD_GAIN,
        COLLAPSE_DROP,
        Words,
        _fmt,
        diagnostics_table,
        markdown_table,
        plot_accuracy,
        strict_json,
        table_rows,
        verdict_intro,
        verdict_table,
    )
    from isreshape_verl.sandbox.stats import verdict_rows

    used, missing = left_out(runs)
    words = Words(loss="arm", lag="setting", paired_by="same SEED: the same data order, rollout seed and initial "
                  "model", more_seeds='`SEEDS="0 1 2"` in compare.sh')
    arms = list(dict.fromkeys(r["loss"] for r in runs))
    if reference is not None and reference not in arms:
        raise ReportError(f"--reference {reference!r} is not an arm of these runs ({', '.join(arms)})")
    ref = reference or (used[0]["loss"] if used else arms[0])
    rows = table_rows(used)
    acc_key = runs[0]["acc_key"] or "(none: no validation logged)"
    if used:
        plot_accuracy(used, str(out / "accuracy.png"), panel="{}")
    lines = [
        "# isreshape-verl report-runs",
        "",
        f"Runs: `{root}`, {len(runs)} run folder(s), {len(used)} in the statistics. Test accuracy: verl's "
        f"`{acc_key}` (greedy validation on the test split); reward: `critic/score/mean`; lag: "
        "`training/off_policy/trajectory_staleness/mean` (model versions behind the trained policy).",
        "",
        "## Results",
        "",
        "Mean over seeds, ± the standard deviation across seeds. 'reached +5 pts': runs whose test accuracy reached "
        f"start + {ACC_THRESHOLD_GAIN:.2f}, and the median step at which they did. 'collapsed': final accuracy ≥ "
        f"{COLLAPSE_DROP:.2f} below the start, or non-finite metrics. ESS: IS Reshape's (Σg)²/(N·Σg²) "
        "(`actor/is_reshape/ess`); other losses log none.",
        "",
        markdown_table(rows, words),
        "",
        f"### Across seeds, against `{ref}`",
        "",
        verdict_intro(used, ref, words),
        "",
        verdict_table(used, ref, words),
        "",
        "### Ratio spread",
        "",
        "Mean over steps and seeds: verl's `actor/ppo_kl`, and IS Reshape's ESS and ratio quantiles "
        "(`actor/is_reshape/*`).",
        "",
        diagnostics_table(used, words),
        "",
    ]
    if used:
        lines += ["![test accuracy](accuracy.png)", ""]
    lines += ["## Not in the statistics", ""]
    lines += [f"- {line}" for line in missing] or ["None: every run logged its planned steps, and every arm has "
                                                   "every seed of its setting."]
    lines += ["", "## Runs", "",
              "| run | arm | setting | seed | steps logged | planned | lag: mean (worst) | s/step | final acc |",
              "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        train = [r for r in run["rows"] if "reward" in r]
        worst = max((r["lag_worst"] for r in train if "lag_worst" in r), default=float("nan"))
        step_s = [r["time_step"] for r in train if "time_step" in r]
        lines.append(f"| {run['name']} | `{run['loss']}` | {run['lag']} | {run['seed']} | {run['last'] or 0} "
                     f"| {run['planned'] or '–'} | {_fmt(run['summary']['lag_mean'], 2)} ({_fmt(worst, 0)}) "
                     f"| {_fmt(sum(step_s) / len(step_s) if step_s else None, 1)} "
                     f"| {_fmt(run['summary']['final_acc'])} |")
    lines += ["", f"Made with `isreshape-verl report-runs {root}`; per-run metrics are in each run's metrics*.jsonl, "
              "settings in its launch.json.", ""]
    summary = {"reference": ref, "accuracy_metric": runs[0]["acc_key"], "table": rows,
               "verdict": verdict_rows(used, ref), "left_out": missing, "warnings": warnings,
               "runs": [{"name": r["name"], "arm": r["loss"], "setting": r["lag"], "seed": r["seed"],
                         "steps": r["last"], "planned": r["planned"], "used": id(r) in {id(u) for u in used},
                         "summary": r["summary"]}
                        for r in runs]}
    write_atomic(str(out / "summary.json"),
                 lambda f: json.dump(strict_json(summary), f, indent=1, default=str, allow_nan=False))
    path = out / "report.md"
    write_atomic(str(path), lambda f: f.write("\n".join(lines)))  # last: a report.md means every file is written
    return path, rows, missing


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Turn a folder of verl runs (compare.sh's COMPARE_DIR with LOSSES arms and SEEDS, or several) "
        "into the report.md the sandbox's compare writes: accuracy per arm and setting, mean and 95 % bootstrap "
        "interval over seeds (from 3 seeds), Δ paired by seed against the first arm, collapse flags; partial and "
        "missing runs named.",
        epilog='example: SEEDS="0 1 2" LOSSES="grpo grpo:decoupled_token_is isreshape" COMPARE_DIR=runs/b '
        "bash recipes/tiny/compare.sh && isreshape-verl report-runs runs/b",
    )
    parser.add_argument("dir", metavar="DIR", help="folder holding verl run folders (launch.json, metrics.jsonl)")
    parser.add_argument("--out", default=None, help="folder for report.md, summary.json, accuracy.png (default: DIR)")
    parser.add_argument("--reference", default=None, metavar="ARM",
                        help="the arm every Δ is taken against (default: the first: grpo, then sapo, isreshape; "
                        "bypass before decoupled presets)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from isreshape_verl.paths import ensure_writable_dir, os_error_line
    from isreshape_verl.sandbox.report import Words, markdown_table

    args = build_parser().parse_args(argv)
    root = Path(args.dir).expanduser().absolute()
    out = Path(args.out).expanduser().absolute() if args.out else root
    try:
        runs, warnings = read_runs(root)
        ensure_writable_dir(str(out))
        path, rows, missing = write(out, root, runs, args.reference, warnings)
    except ReportError as exc:
        return fail(PROG, str(exc))
    except ValueError as exc:  # --out not writable (ensure_writable_dir), one line naming it
        return fail(PROG, str(exc))
    except OSError as exc:
        return fail(PROG, os_error_line(exc))
    for line in warnings + [f"not in the statistics: {line}" for line in missing]:
        print(f"warning: {line}", file=sys.stderr)
    print(markdown_table(rows, Words(loss="arm", lag="setting")))
    written = [path, out / "summary.json"] + ([out / "accuracy.png"] if rows else [])
    print("\nwrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
