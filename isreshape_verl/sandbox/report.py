"""The comparison report: report.md with a table, and PNG plots (matplotlib, Agg backend).

    accuracy.png   greedy test accuracy vs step, one line per loss (mean over seeds, band = min..max),
                   one panel per lag, with the smoothed sampled train reward dashed
    ratios.png     histograms of log r = log π_θ/μ over all training tokens, per loss, one panel per lag
    g_curves.png   the per-token weight g(r) of each compared loss for A > 0 and A < 0, computed from
                   verl's own loss function by autograd (loss-agnostic, see diagnostics.effective_weights)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from isreshape_verl.paths import write_atomic
from isreshape_verl.sandbox.stats import (
    MIN_SEEDS,
    area_under_curve,
    excludes_zero,
    verdict_rows,
)

REPORT_MD, SUMMARY_JSON = "report.md", "summary.json"
ACCURACY_PNG, RATIOS_PNG, G_CURVES_PNG = "accuracy.png", "ratios.png", "g_curves.png"
REPORT_FILES = (REPORT_MD, SUMMARY_JSON, ACCURACY_PNG, RATIOS_PNG, G_CURVES_PNG)  # what write_report writes
ACC_THRESHOLD_GAIN = 0.05  # "steps to threshold": first evaluation ≥ start accuracy + 5 points
G_CURVE_R_MAX = 5.0  # g_curves.png's r axis: past the dual clip at r = 3 (clip_ratio_c), so its effect shows
COLLAPSE_DROP = 0.10  # collapse: final accuracy ≥ 10 points below the start, or non-finite metrics
FINITE_KEYS = ("loss", "entropy", "grad_norm", "ppo_kl", "reward")  # a non-finite one in any step: collapsed


@dataclass(frozen=True)
class Words:
    """What the tables call their rows and groups: the sandbox compares losses at lags (the default);
    `isreshape-verl report-runs` compares arms in settings of verl's trainer (isreshape_verl/verl_report.py)."""

    loss: str = "loss"
    lag: str = "lag"
    paired_by: str = "same prompts, sampling seed and warm start"
    """What two runs of the same seed share, so that it cancels in a paired Δ."""
    more_seeds: str = "`--seeds 0 1 2` or `--preset full`"
    """How to get intervals."""


SANDBOX = Words()


def _fmt(x, digits=3):
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def collapsed_cell(count: int, bold: bool = False) -> str:
    """The 'collapsed' cell of a (loss, lag) row: 'no (0)' or 'yes (2)', the number of seeds that collapsed;
    report.md bolds the yes."""
    word = "yes" if count else "no"
    return f"{f'**{word}**' if bold and count else word} ({count})"


def summarize_run(rows: list[dict]) -> dict:
    """Scalars of one run from its metrics rows."""
    evals = [(r["step"], r["test_acc"]) for r in rows if r.get("test_acc") is not None]
    start = evals[0][1] if evals else float("nan")
    final = evals[-1][1] if evals else float("nan")
    best = max(a for _, a in evals) if evals else float("nan")
    hit = next((s for s, a in evals if a >= start + ACC_THRESHOLD_GAIN), None)
    train = [r for r in rows if r["step"] > 0 and "reward" in r]
    lags = [r["lag"] for r in train]
    # g/ESS/quantiles are NaN legitimately when every group has equal rewards (no token has A ≠ 0)
    finite = all(isinstance(r[k], (int, float)) and math.isfinite(r[k])  # null in the file = not finite
                 for r in train for k in FINITE_KEYS if k in r)  # a metric a trainer does not log: not a collapse

    def mean(key):
        values = [r[key] for r in train if isinstance(r.get(key), float) and math.isfinite(r[key])]
        return float(np.mean(values)) if values else float("nan")
    return {
        "start_acc": start,
        "final_acc": final,
        "best_acc": best,
        "auc": area_under_curve(evals),
        "ppo_kl": mean("ppo_kl"),
        "ratio_p01": mean("ratio_p01"),
        "ratio_p99": mean("ratio_p99"),
        "steps_to_threshold": hit,
        "collapsed": (not finite) or final < start - COLLAPSE_DROP,
        "final_reward_ema": train[-1]["reward_ema"] if train else float("nan"),
        "lag_counts": {str(k): lags.count(k) for k in sorted(set(lags))},
        "lag_mean": float(np.mean(lags)) if lags else float("nan"),
        "ess": mean("ess"),
        "g_mean": mean("g_mean"),
        "ratio_absdev": mean("ratio_absdev"),
        "entropy_final": train[-1].get("entropy", float("nan")) if train else float("nan"),
        "gen_tokens_per_s": mean("gen_tokens_per_s"),
        "time_gen": mean("time_gen"),
        "time_logprob": mean("time_logprob"),
        "time_train": mean("time_train"),
        "train_tokens_per_s": mean("train_tokens_per_s"),
        "seconds": sum(r.get("time_step", 0.0) + r.get("time_eval", 0.0) for r in rows),
        "steps": train[-1]["step"] if train else 0,
    }


def group_runs(runs: list[dict]) -> dict:
    """{(loss, lag): [run, ...]} keeping the order in which losses and lags first appear."""
    groups: dict = {}
    for run in runs:
        groups.setdefault((run["loss"], run["lag"]), []).append(run)
    return groups


def table_rows(runs: list[dict]) -> list[dict]:
    out = []
    for (loss, lag), members in group_runs(runs).items():
        s = [m["summary"] for m in members]
        finals = [x["final_acc"] for x in s]
        hits = [x["steps_to_threshold"] for x in s]
        out.append({
            "loss": loss,
            "lag": lag,
            "seeds": len(s),
            "start": float(np.mean([x["start_acc"] for x in s])),
            "final": float(np.mean(finals)),
            "final_sd": float(np.std(finals)) if len(finals) > 1 else float("nan"),
            "best": float(np.mean([x["best_acc"] for x in s])),
            "hits": f"{sum(h is not None for h in hits)}/{len(hits)}"
            + (f" (median {int(np.median([h for h in hits if h is not None]))})" if any(h is not None for h in hits) else ""),
            "collapsed": sum(x["collapsed"] for x in s),
            "reward": float(np.mean([x["final_reward_ema"] for x in s])),
            "lag_mean": float(np.mean([x["lag_mean"] for x in s])),
            "ess": float(np.mean([x["ess"] for x in s])),
        })
    return out


def markdown_table(rows: list[dict], words: Words = SANDBOX) -> str:
    head = (f"| {words.loss} | {words.lag} | seeds | start acc | final acc (± sd) | best acc | reached +5 pts (median step) "
            "| collapsed | final reward (EMA) | measured lag (mean) | ESS |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        sd = f" ± {r['final_sd']:.3f}" if math.isfinite(r["final_sd"]) else ""
        lines.append(
            f"| `{r['loss']}` | {r['lag']} | {r['seeds']} | {_fmt(r['start'])} | {_fmt(r['final'])}{sd} | {_fmt(r['best'])} "
            f"| {r['hits']} | {collapsed_cell(r['collapsed'], bold=True)} | {_fmt(r['reward'])} "
            f"| {_fmt(r['lag_mean'], 2)} | {_fmt(r['ess'])} |"
        )
    return "\n".join(lines)


def _seeds(n: int, paired: bool = False) -> str:
    return f"{n}{' paired' if paired else ''} seed{'' if n == 1 else 's'}"


def _interval(ci, n: int, signed=False) -> str:
    """'mean [low, high]', bold for a Δ whose interval excludes 0; 'mean (1 seed: no interval)' below MIN_SEEDS."""
    if ci is None:
        return "–"
    mean, low, high = ci
    if not math.isfinite(mean):
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    if not (math.isfinite(low) and math.isfinite(high)):  # fewer than MIN_SEEDS seeds (stats.mean_interval)
        return f"{f.format(mean)} ({_seeds(n, paired=signed)}: no interval)"
    text = f"{f.format(mean)} [{f.format(low)}, {f.format(high)}]"
    return f"**{text}**" if signed and excludes_zero(ci) else text


def verdict_table(runs: list[dict], reference: str, words: Words = SANDBOX) -> str:
    """Markdown: mean [95 % bootstrap interval over seeds] per (loss, lag), paired Δ to the reference; the mean
    alone, saying so, for fewer than MIN_SEEDS seeds."""
    head = (f"| {words.loss} | {words.lag} | seeds | final acc | best acc | AUC (mean acc) | Δ final vs ref. | Δ AUC vs ref. "
            "| collapsed |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(verdict_rows(runs, reference), key=lambda r: (_lag_key(r["lag"]), )):
        n, paired = r["seeds"], r["paired"]
        lines.append(
            f"| `{r['loss']}` | {r['lag']} | {n} | {_interval(r['final_acc'], n)} | {_interval(r['best_acc'], n)} "
            f"| {_interval(r['auc'], n)} | {_interval(r['delta_final_acc'], paired, True)} "
            f"| {_interval(r['delta_auc'], paired, True)} | {r['collapsed']}/{n} |"
        )
    return "\n".join(lines)


def verdict_intro(runs: list[dict], reference: str, words: Words = SANDBOX) -> str:
    """The paragraph above the verdict table: what its numbers are, and what its brackets and bold mean, or, with
    fewer than MIN_SEEDS seeds, in words why there are none (a one-seed table must not look like a finding)."""
    rows = verdict_rows(runs, reference)
    counts = [r["seeds"] for r in rows] + [r["paired"] for r in rows if r["paired"]]  # 0: no Δ in that row
    text = ("AUC: mean test accuracy over the run (trapezoid over the evaluations). Δ: paired by seed "
            f"({words.paired_by}), {words.loss} − `{reference}` at the same {words.lag}. ")
    if counts and max(counts) < MIN_SEEDS:
        few = _seeds(max(counts)) if min(counts) == max(counts) else f"{min(counts)} to {max(counts)} seeds"
        return text + (f"{few} per {words.loss} and {words.lag}: no interval, and no difference is marked. An "
                       f"interval needs at least {MIN_SEEDS} seeds (from 1 seed a bootstrap interval is the value "
                       "itself, from 2 the range of the two), so every number here is one measurement; "
                       f"{words.more_seeds} gives intervals.")
    text += ("Mean over seeds [95 % percentile-bootstrap interval over seeds]; **bold**: a Δ whose interval "
             "excludes 0. With 3 seeds an interval is coarse (10 distinct resamples).")
    if counts and min(counts) < MIN_SEEDS:
        text += f" Rows with fewer than {MIN_SEEDS} seeds (paired seeds for a Δ) show the mean alone."
    return text


def diagnostics_table(runs: list[dict], words: Words = SANDBOX) -> str:
    """Markdown: mean over steps and seeds of ppo_kl, ESS and ratio quantiles per (loss, lag)."""
    head = f"| {words.loss} | {words.lag} | ppo_kl | ESS | ratio p01 | ratio p99 | mean \\|r − 1\\| |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for (loss, lag), members in sorted(group_runs(runs).items(), key=lambda kv: _lag_key(kv[0][1])):
        s = [m["summary"] for m in members]

        def mean(key):
            values = [x[key] for x in s if x.get(key) is not None and math.isfinite(x[key])]
            return float(np.mean(values)) if values else float("nan")
        lines.append(f"| `{loss}` | {lag} | {_fmt(mean('ppo_kl'), 4)} | {_fmt(mean('ess'))} | {_fmt(mean('ratio_p01'))} "
                     f"| {_fmt(mean('ratio_p99'))} | {_fmt(mean('ratio_absdev'))} |")
    return "\n".join(lines)


def _lag_key(lag):
    return (0, lag) if isinstance(lag, int) else (1, str(lag))


def strict_json(value):
    """The same structure with NaN/±Inf floats as None, so that strict JSON readers accept the file."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def terminal_table(rows: list[dict], out_dir: str | None = None) -> str:
    """The results table for the terminal (same columns and wording as report.md's); with `out_dir`, followed
    by the files `write_report` wrote there (report, summary and plots)."""
    header = f"{'loss':<40} {'lag':>5} {'seeds':>5} {'start':>6} {'final':>6} {'±sd':>6} {'best':>6} {'collapsed':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['loss'][:40]:<40} {str(r['lag']):>5} {r['seeds']:>5} {_fmt(r['start']):>6} {_fmt(r['final']):>6} "
            f"{_fmt(r['final_sd']):>6} {_fmt(r['best']):>6} {collapsed_cell(r['collapsed']):>9}"
        )
    if out_dir is not None:
        lines += ["", f"written to {out_dir}:"] + [f"  {path}" for path in report_files(out_dir)]
    return "\n".join(lines)


def _lag_order(runs):
    lags = []
    for r in runs:
        if r["lag"] not in lags:
            lags.append(r["lag"])
    return lags


def _loss_order(runs):
    losses = []
    for r in runs:
        if r["loss"] not in losses:
            losses.append(r["loss"])
    return losses


def save_figure(fig, path: str) -> None:
    """Save a PNG whole or not at all (a full disk leaves no 0-byte plot), and free the figure either way."""
    import matplotlib.pyplot as plt

    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=90), "wb")
    finally:
        plt.close(fig)


def plot_accuracy(runs: list[dict], path: str, panel: str = "lag {}") -> None:
    """Test accuracy (and the reward's EMA, dashed) against step, one panel per lag (`panel`: its title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lags, losses = _lag_order(runs), _loss_order(runs)
    colors = {loss: f"C{i}" for i, loss in enumerate(losses)}
    fig, axes = plt.subplots(1, len(lags), figsize=(5.2 * len(lags), 4.2), squeeze=False, sharey=True)
    for ax, lag in zip(axes[0], lags):
        seeds = set()  # runs per loss in this panel, for its title (the legend is shared by the panels)
        for loss in losses:
            members = [r for r in runs if r["loss"] == loss and r["lag"] == lag]
            if not members:
                continue
            seeds.add(len(members))
            curves = [[(row["step"], row["test_acc"]) for row in m["rows"] if row.get("test_acc") is not None] for m in members]
            steps = sorted(set.intersection(*[set(s for s, _ in c) for c in curves]))
            acc = np.array([[dict(c)[s] for s in steps] for c in curves])  # (seeds, evals)
            ax.plot(steps, acc.mean(0), color=colors[loss], lw=2, label=loss)
            if len(members) > 1:
                ax.fill_between(steps, acc.min(0), acc.max(0), color=colors[loss], alpha=0.15)
            rew = [[(row["step"], row["reward_ema"]) for row in m["rows"] if "reward_ema" in row] for m in members]
            rsteps = sorted(set.intersection(*[set(s for s, _ in c) for c in rew])) if rew and rew[0] else []
            if rsteps:
                ra = np.array([[dict(c)[s] for s in rsteps] for c in rew])
                ax.plot(rsteps, ra.mean(0), color=colors[loss], lw=1, ls="--", alpha=0.8)
        counts = "–".join(str(n) for n in sorted({min(seeds), max(seeds)})) if seeds else "0"
        ax.set_title(f"{panel.format(lag)} ({counts} seed{'' if counts == '1' else 's'})")
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("greedy test accuracy (solid)\nsampled train reward, EMA (dashed)")
    # legend under the panels: with many losses it would hide the curves
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = 2 if len(lags) > 1 else 1
    legend_rows = -(-len(labels) // columns)
    fig.set_figwidth(max(fig.get_figwidth(), 7.0))
    fig.set_figheight(4.2 + 0.25 * legend_rows)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.25 * legend_rows / fig.get_figheight() + 0.02, 1, 1))
    save_figure(fig, path)


def plot_ratios(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lags, losses = _lag_order(runs), _loss_order(runs)
    edges = np.linspace(-1, 1, 41)
    centers = 0.5 * (edges[1:] + edges[:-1])
    fig, axes = plt.subplots(1, len(lags), figsize=(5.2 * len(lags), 3.8), squeeze=False, sharey=True)
    for ax, lag in zip(axes[0], lags):
        for i, loss in enumerate(losses):
            hist = np.zeros(40)
            for m in (r for r in runs if r["loss"] == loss and r["lag"] == lag):
                for row in m["rows"]:
                    if "log_ratio_hist" in row:
                        hist += np.array(row["log_ratio_hist"], dtype=float)
            if hist.sum() > 0:
                ax.step(centers, hist / hist.sum(), where="mid", color=f"C{i}", label=loss)
        ax.set_yscale("log")
        ax.set_title(f"lag {lag}: log r = log π_θ/μ (clipped to ±1)")
        ax.set_xlabel("log r")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of training tokens")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def g_curve(spec, ratios: np.ndarray, advantage: float) -> np.ndarray:
    """g(r) of a loss, numerically from verl's registry function (see diagnostics.effective_weights); an
    adaptive-width loss is drawn at its widest width (LossSpec.drawn_at_fixed_width)."""
    import torch

    spec = spec.drawn_at_fixed_width()
    from isreshape_verl.diagnostics import effective_weights

    log_prob = torch.log(torch.tensor(ratios, dtype=torch.float32))[None, :]  # (1, N), log μ = 0
    old = torch.zeros_like(log_prob)
    adv = torch.full_like(log_prob, advantage)
    mask = torch.ones_like(log_prob)
    config = spec.actor_config()
    g, _ = effective_weights(spec.loss_fn, old, log_prob, adv, mask, spec.loss_agg_mode, config)
    return g[0].numpy()


def plot_g_curves(specs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # past r = 3, where the default's dual clip (clip_ratio_c = 3) acts: the axis shows it acting
    r = np.linspace(0.05, G_CURVE_R_MAX, 400)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, adv in zip(axes, (1.0, -1.0)):
        for i, spec in enumerate(specs):
            note = " (adaptive width: at its widest)" if spec.drawn_at_fixed_width() != spec else ""
            ax.plot(r, g_curve(spec, r, adv), color=f"C{i}", label=spec.label + note)
        ax.axvline(1.0, color="gray", lw=0.5)
        if adv < 0:  # verl's dual clip bounds the loss of A < 0 tokens at clip_ratio_c: g = 0 past it
            for c in sorted({getattr(spec.actor_config(), "clip_ratio_c", None) for spec in specs} - {None}):
                ax.axvline(c, color="gray", lw=0.8, ls=":")
                ax.annotate(f"dual clip\nclip_ratio_c = {c:g}", (c, 0.98), xycoords=("data", "axes fraction"),
                            xytext=(4, 0), textcoords="offset points", va="top", fontsize=7, color="gray")
        ax.set_xlim(0, G_CURVE_R_MAX)
        ax.set_title(f"A {'> 0' if adv > 0 else '< 0'}: weight g(r) on −A·∇log π_θ")
        ax.set_xlabel("r = π_θ/μ")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("g(r)  (1 = on-policy policy gradient)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def report_files(out_dir: str) -> list[str]:
    """Paths of the files `write_report` writes into `out_dir` (REPORT_FILES), those that exist."""
    return [path for path in (os.path.join(out_dir, name) for name in REPORT_FILES) if os.path.exists(path)]


def write_report(out_dir: str, runs: list[dict], specs, context: dict) -> str:
    """The PNGs, summary.json and, last, report.md in `out_dir` (each whole or absent, so a report.md means a
    complete report); returns the report path. `runs`: dicts with loss, lag, seed, rows, summary."""
    plot_accuracy(runs, os.path.join(out_dir, ACCURACY_PNG))
    plot_ratios(runs, os.path.join(out_dir, RATIOS_PNG))
    plot_g_curves(specs, os.path.join(out_dir, G_CURVES_PNG))
    rows = table_rows(runs)
    lines = [
        "# isreshape-verl compare",
        "",
        f"Command: `{context['command']}`",
        "",
        f"Machine: {context['machine']}. Wall time: {context['wall_seconds'] / 60:.1f} min "
        f"(warm start {context['warm_start']['seconds']:.0f} s{', cached' if context['warm_start'].get('cached') else ''}).",
        "",
        f"Policy: {context['policy']} ({context['parameters'] / 1e6:.2f} M parameters). Task: {context['task']}. "
        f"Warm-start greedy accuracy: {context['warm_start']['accuracy']:.3f} after {context['warm_start']['steps']} supervised steps.",
        "",
        f"RL: {context['rl']}",
        "",
        "## Results",
        "",
        "Accuracies are greedy test accuracies (verl's GSM8K scorer); mean over seeds, ± the standard deviation "
        f"across seeds. 'reached +5 pts': runs whose test accuracy reached start + {ACC_THRESHOLD_GAIN:.2f}, and the "
        f"median step at which they did. 'collapsed': final accuracy ≥ {COLLAPSE_DROP:.2f} below the start, or "
        "non-finite metrics. ESS: (Σg)²/(N·Σg²) of the per-token gradient weights, 1 = on-policy.",
        "",
        markdown_table(rows),
        "",
        f"### Across seeds, against `{runs[0]['loss']}`" if runs else "",
        "",
        verdict_intro(runs, runs[0]["loss"]) if runs else "",
        "",
        verdict_table(runs, runs[0]["loss"]) if runs else "",
        "",
        "### Ratio spread",
        "",
        "Mean over RL steps and seeds: verl's `ppo_kl` (mean −log r), ESS of the gradient weights, the 1 % and 99 % "
        "ratio quantiles of the training tokens, and mean |r − 1|.",
        "",
        diagnostics_table(runs),
        "",
        f"![test accuracy]({ACCURACY_PNG})",
        "",
        f"![ratio histograms]({RATIOS_PNG})",
        "",
        f"![g(r) of each loss]({G_CURVES_PNG})",
        "",
        "## Measured lag of every run",
        "",
        "Lag = updates done by the trained policy − updates done by the behaviour policy that generated the batch.",
        "",
        "| run | lag: number of steps | mean | gen tok/s | train tok/s | s/step: generate + behaviour log-probs + train | run time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = run["summary"]
        counts = ", ".join(f"{k}: {v}" for k, v in s["lag_counts"].items())
        lines.append(
            f"| {run['name']} | {counts} | {_fmt(s['lag_mean'], 2)} | {s['gen_tokens_per_s']:.0f} "
            f"| {s['train_tokens_per_s']:.0f} | {s['time_gen']:.2f} + {s['time_logprob']:.2f} + {s['time_train']:.2f} "
            f"| {s['seconds']:.0f} |"
        )
    lines += ["", "Per-run metrics are in `runs/*/metrics.jsonl`, settings in `runs/*/config.json`; "
              f"`isreshape-verl plot-runs {out_dir}` plots every run as a curve, beside cluster runs if given.", ""]
    summary = {"table": rows, "verdict": verdict_rows(runs, runs[0]["loss"]) if runs else [],
               "runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs]}
    write_atomic(os.path.join(out_dir, SUMMARY_JSON),
                 lambda f: json.dump(strict_json(summary), f, indent=1, default=str, allow_nan=False))
    path = os.path.join(out_dir, REPORT_MD)
    write_atomic(path, lambda f: f.write("\n".join(lines)))  # last: a report.md means every file is written
    return path
