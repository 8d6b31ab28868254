"""The lab's outputs: `lab.csv` (every row), `lab.md` (tables) and three PNGs.

    lab.csv               one row per estimator × reward × behaviour distance × advantage mode
    lab.md                summary over off-policy cells, rel. MSE by distance, the behaviour policies
    lab_mse_vs_kl.png     relative MSE against per-token KL(μ‖π), one panel per reward × behaviour (GRPO)
    lab_bias_variance.png bias² against variance (÷‖∇J‖²), averaged over reward families (GRPO)
    lab_weights.png       the per-token gradient weight g(r) of every loss, read off verl's functions

`ref:oracle` rows come with several λ; tables and plots keep the best λ per cell ("ref:oracle*").
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pandas as pd

SUMMARY_COLUMNS = ["rel_mse", "rel_mse_best", "rel_bias2", "rel_var", "cosine", "ess", "zero_share", "cut_share"]
CELL = ["reward", "behaviour", "distance", "advantage"]
ORACLE = "ref:oracle*"
DEFAULT_LINE = "is_reshape (default)"  # the line of the package default, however its spec is spelled
BASELINES = ("vanilla", "sapo", "cispo", "gpg")  # drawn as their own line at verl's defaults (no overrides)
HIGHLIGHT = [*BASELINES, DEFAULT_LINE, "ref:is_seq", "ref:is_token", ORACLE]  # the highlighted lines, in colour order
CSV_NAME, MD_NAME = "lab.csv", "lab.md"
PNG_MSE, PNG_BV, PNG_WEIGHTS = "lab_mse_vs_kl.png", "lab_bias_variance.png", "lab_weights.png"


def best_oracle(df: pd.DataFrame) -> pd.DataFrame:
    """Replace the `ref:oracle:lambda=…` rows by the one with the lowest rel_mse per cell, named ref:oracle*."""
    is_oracle = df["loss"].map(lambda loss: getattr(_estimator(loss), "reference", None) == "ref:oracle").astype(bool)
    if not is_oracle.any():
        return df
    oracle = df[is_oracle]
    best = oracle.loc[oracle.groupby(CELL)["rel_mse"].idxmin()].copy()
    best["loss"] = ORACLE
    return pd.concat([df[~is_oracle], best], ignore_index=True)


def _fmt(x, digits=3) -> str:
    if isinstance(x, str):
        return x
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _table(frame: pd.DataFrame, index_name: str) -> str:
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join([index_name] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([f"`{idx}`"] + [_fmt(v) for v in row.values]) + " |")
    return "\n".join(lines)


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric over the off-policy cells (distance > 0), sorted by rel_mse; Δ vs the anchor ± SE."""
    off = best_oracle(df[df["distance"] > 0])
    table = off.groupby("loss")[SUMMARY_COLUMNS].mean()
    n = off.groupby("loss").size()
    table["d_rel_mse"] = off.groupby("loss")["d_rel_mse"].mean()
    table["d_rel_mse_se"] = off.groupby("loss")["d_rel_mse_se"].apply(lambda s: float((s**2).sum()) ** 0.5) / n
    table["d_cosine"] = off.groupby("loss")["d_cosine"].mean()
    table["d_cosine_se"] = off.groupby("loss")["d_cosine_se"].apply(lambda s: float((s**2).sum()) ** 0.5) / n
    return table.sort_values("rel_mse")


NEAR_KL = 0.05  # per-token KL(μ‖π) below which a cell counts as "near" (typical verl ppo_kl is 1e-3 … 3e-2)


def regime_table(df: pd.DataFrame) -> pd.DataFrame:
    """rel_mse, rel_mse_best and d_rel_mse ± SE for near (0 < KL ≤ NEAR_KL) and far (KL > NEAR_KL) cells."""
    off = best_oracle(df[df["distance"] > 0])
    parts = {}
    for name, mask in (("near", off["kl_per_token"] < NEAR_KL), ("far", off["kl_per_token"] >= NEAR_KL)):
        sub = off[mask]
        if sub.empty:
            continue
        grouped = sub.groupby("loss")
        n = grouped.size()
        parts[f"{name}: rel_mse"] = grouped["rel_mse"].mean()
        parts[f"{name}: rel_mse_best"] = grouped["rel_mse_best"].mean()
        parts[f"{name}: d_rel_mse"] = grouped["d_rel_mse"].mean()
        parts[f"{name}: ±se"] = grouped["d_rel_mse_se"].apply(lambda s: float((s**2).sum()) ** 0.5) / n
        parts[f"{name}: cosine"] = grouped["cosine"].mean()
        parts[f"{name}: d_cosine"] = grouped["d_cosine"].mean()
        parts[f"{name}: ±se "] = grouped["d_cosine_se"].apply(lambda s: float((s**2).sum()) ** 0.5) / n
    table = pd.DataFrame(parts)
    far_best = "far: rel_mse_best"
    return table.sort_values(far_best if far_best in table.columns else table.columns[1])


def distance_table(df: pd.DataFrame, behaviour: str, advantage: str, metric: str = "rel_mse") -> pd.DataFrame:
    """metric (mean over reward families) with one column per distance."""
    sub = best_oracle(df[(df["behaviour"] == behaviour) & (df["advantage"] == advantage)])
    table = sub.pivot_table(index="loss", columns="distance", values=metric, aggfunc="mean")
    kl = sub.groupby("distance")["kl_per_token"].mean()
    prefix = "KL " if behaviour == "kl" else "lag "
    table.columns = [f"{prefix}{d:g} (kl {kl[d]:.3g})" if behaviour == "lag" else f"{prefix}{d:g}" for d in table.columns]
    return table.sort_values(table.columns[-1])


def behaviour_table(df: pd.DataFrame) -> pd.DataFrame:
    first = df.drop_duplicates(["reward", "behaviour", "distance"])
    table = first.groupby(["behaviour", "distance"])[["kl_per_token", "ratio_p01", "ratio_p50", "ratio_p99", "ratio_max"]].mean()
    table.index = [f"{b} {d:g}" for b, d in table.index]
    return table


def _without_se(table: pd.DataFrame) -> pd.DataFrame:
    """`table` without its standard-error columns (d_rel_mse_se, 'far: ±se', ...)."""
    return table[[c for c in table.columns if not (str(c).endswith("_se") or str(c).strip().endswith("±se"))]]


def write_markdown(df: pd.DataFrame, path: Path, command: str, wall_s: float, settings: dict) -> None:
    """lab.md. The ± columns are standard errors over the replicates; with fewer than MIN_SEEDS replicates they
    are left out and the text says why (the same rule as compare's intervals, sandbox/stats.py)."""
    from isreshape_verl.sandbox.stats import MIN_SEEDS

    replicates = settings.get("replicates", MIN_SEEDS)
    shown = _without_se if replicates < MIN_SEEDS else (lambda table: table)
    errors = ("errors (the ± of a mean over cells combines the cells' SEs as independent)." if replicates >= MIN_SEEDS
              else f"errors, left out here: a standard error needs at least {MIN_SEEDS} replicates and this run has "
                   f"{replicates}, so no difference below comes with a ±.")
    parts = [
        "# Estimator lab",
        "",
        f"Reproduce: `{command}`  (wall time {wall_s:.0f} s)",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
        "Metrics are relative to ‖∇J‖² (exact). rel_mse = E‖ĝ − ∇J‖²/‖∇J‖² = rel_bias2 + rel_var; rel_mse_best is the",
        "MSE after the best scalar step-size multiplier (immune to plain shrinkage); cosine = E cos(ĝ, ∇J); ess = Kish",
        "ESS fraction of the token weights; zero_share / cut_share = tokens with weight 0 / weight < r/2;",
        "d_rel_mse / d_cosine = rel_mse / cosine minus the anchor's (first loss) on the same batches, ± paired standard",
        errors,
        "",
    ]
    if not (df["distance"] > 0).any():
        parts += ["No off-policy cells (every distance is 0): only the per-distance tables below.", ""]
    for adv in sorted(df["advantage"].unique()) if (df["distance"] > 0).any() else []:
        parts += [f"## Summary over all off-policy cells, advantage = {adv}", "",
                  _table(shown(summary_table(df[df["advantage"] == adv])), "loss"), ""]
    for adv in sorted(df["advantage"].unique()) if (df["distance"] > 0).any() else []:
        parts += [f"## Near (per-token KL < {NEAR_KL}) vs far cells, advantage = {adv} (sorted by far rel_mse_best)", "",
                  _table(shown(regime_table(df[df["advantage"] == adv])), "loss"), ""]
    for behaviour in sorted(df["behaviour"].unique()):
        for adv in sorted(df["advantage"].unique()):
            parts += [f"## rel_mse by distance: behaviour = {behaviour}, advantage = {adv} (mean over reward families)", "",
                      _table(distance_table(df, behaviour, adv), "loss"), ""]
    parts += ["## Behaviour policies (mean over reward families): per-token KL(μ‖π) and quantiles of r = π/μ", "",
              _table(behaviour_table(df), "μ"), ""]
    path.write_text("\n".join(parts))


_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#000000", "#bcbd22", "#17becf", "#e377c2", "#8c564b"]


@functools.lru_cache(maxsize=None)
def _estimator(loss: str):
    """The estimator (typed: spec or reference) a row's label names; None for a label that no longer parses."""
    from isreshape_verl.lab.estimators import estimator_from_label

    try:
        return estimator_from_label(loss)
    except ValueError:
        return None


@functools.lru_cache(maxsize=None)
def highlighted_line(loss: str) -> str | None:
    """The highlighted line (an entry of HIGHLIGHT) that a row's loss is drawn as, decided from the parsed
    estimator's typed fields, never from the label's text: DEFAULT_LINE for is_reshape at the package default
    (LossSpec.is_package_default), the mode for a baseline at verl's defaults, the reference for ref:is_seq,
    ref:is_token and the best-λ oracle; None (an "other variant") for the rest and for labels that no longer
    parse (a CSV from an older version)."""
    if loss == ORACLE:  # the report's own name for the best-λ rows (best_oracle)
        return ORACLE
    est = _estimator(loss)
    if est is None:
        return None
    if est.reference is not None:
        return est.reference if est.reference in HIGHLIGHT else None
    if est.spec.mode == "is_reshape":
        return DEFAULT_LINE if est.spec.is_package_default else None
    return est.spec.mode if est.spec.mode in BASELINES and not est.spec.overrides else None


KERNEL_FAMILY_WIDTH = 1.0  # the design notes compare their kernels (and γ) at width 1


def _kernel_family(est) -> bool:
    """An is_reshape variant, not highlighted, with two-sided kernels at width KERNEL_FAMILY_WIDTH: the design
    notes' comparison of kernels (and of γ) at one width, drawn dotted in lab_weights.png; other widths are grey."""
    if est.spec is None or est.spec.mode != "is_reshape" or highlighted_line(est.label) is not None:
        return False
    params = est.spec.reshape_params()
    return not params.one_sided and params.width == KERNEL_FAMILY_WIDTH


def _style(loss: str, extras: list[str]):
    line = highlighted_line(loss)
    if line is not None:
        return dict(lw=2.0, alpha=0.95, zorder=3, color=_COLORS[HIGHLIGHT.index(line)])
    if loss in extras:
        return dict(lw=2.0, alpha=0.95, zorder=3, ls="--", color=_COLORS[len(HIGHLIGHT) + extras.index(loss) % 2])
    return dict(lw=0.7, alpha=0.35, color="grey", zorder=1)


def _best_variants(df: pd.DataFrame, k: int = 2) -> list[str]:
    table = summary_table(df)
    return [loss for loss in table.index if highlighted_line(loss) is None][:k]


def plot_mse_vs_kl(df: pd.DataFrame, path: Path, advantage: str = "grpo") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    sub = best_oracle(df[df["advantage"] == advantage])
    rewards, behaviours = sorted(sub["reward"].unique()), sorted(sub["behaviour"].unique())
    extras = _best_variants(sub)
    fig, axes = plt.subplots(len(rewards), len(behaviours), figsize=(6.0 * len(behaviours), 3.6 * len(rewards)),
                             squeeze=False, sharey="row")
    for i, reward in enumerate(rewards):
        for j, behaviour in enumerate(behaviours):
            ax = axes[i][j]
            cell = sub[(sub["reward"] == reward) & (sub["behaviour"] == behaviour) & (sub["kl_per_token"] > 0)]
            for loss, rows in cell.groupby("loss", sort=False):
                rows = rows.sort_values("kl_per_token")
                style = _style(loss, extras)
                ax.plot(rows["kl_per_token"], rows["rel_mse"], marker="o", ms=3, label=loss, **style)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"reward={reward}, μ by {behaviour}", fontsize=10)
            ax.set_xlabel("per-token KL(μ‖π)")
            ax.set_ylabel("E‖ĝ − ∇J‖² / ‖∇J‖²")
            ax.grid(alpha=0.3, which="both")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and (highlighted_line(lab) is not None or lab in extras):
                handles.append(h)
                labels.append(lab)
    handles.append(plt.Line2D([], [], color="grey", lw=0.7))
    labels.append("other is_reshape variants")
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(f"Relative MSE of each loss's gradient vs the exact ∇J (advantage={advantage})", fontsize=12)
    fig.tight_layout(rect=(0, 0.02 + 0.025 * math.ceil(len(labels) / 5), 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_bias_variance(df: pd.DataFrame, path: Path, advantage: str = "grpo") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    sub = best_oracle(df[(df["advantage"] == advantage) & (df["distance"] > 0)])
    behaviours = sorted(sub["behaviour"].unique())
    extras = _best_variants(sub)
    fig, axes = plt.subplots(1, len(behaviours), figsize=(6.0 * len(behaviours), 5.0), squeeze=False)
    for j, behaviour in enumerate(behaviours):
        ax = axes[0][j]
        cell = sub[sub["behaviour"] == behaviour].groupby(["loss", "distance"])[["rel_bias2", "rel_var"]].mean().reset_index()
        for loss, rows in cell.groupby("loss", sort=False):
            rows = rows.sort_values("distance")
            style = _style(loss, extras)
            ax.plot(rows["rel_var"], rows["rel_bias2"].clip(lower=1e-4), marker="o", ms=3, label=loss, **style)
            if highlighted_line(loss) is not None or loss in extras:
                ax.annotate(loss, (rows["rel_var"].iloc[-1], max(rows["rel_bias2"].iloc[-1], 1e-4)), fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("variance / ‖∇J‖²")
        ax.set_ylabel("bias² / ‖∇J‖²  (clipped at 1e-4)")
        ax.set_title(f"μ by {behaviour}: each line runs from the smallest to the largest distance", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"Bias² vs variance (mean over reward families, advantage={advantage})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_weights(estimators, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    import torch

    from isreshape_verl.lab.estimators import weight_curve

    ratios = torch.logspace(math.log10(0.05), math.log10(8.0), 400, dtype=torch.float64)
    # sequence-level IS and the oracle's weights are not functions of r alone
    shown = [e for e in estimators if e.reference not in ("ref:is_seq", "ref:oracle")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, sign in zip(axes, (1.0, -1.0)):
        for est in shown:
            style = _style(est.label, [])
            if _kernel_family(est):
                style = dict(lw=1.4, alpha=0.9, ls=":", zorder=2)
            ax.plot(ratios, weight_curve(est, ratios, sign), label=est.label, **style)
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 3.0)
        ax.set_xlabel("r = π_θ / μ")
        ax.set_ylabel("gradient weight g(r)")
        ax.set_title(f"A {'> 0' if sign > 0 else '< 0'}", fontsize=10)
        ax.axvline(1.0, color="black", lw=0.5)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    by_label = {est.label: est for est in shown}
    keep = [(h, lab) for h, lab in zip(handles, labels)
            if highlighted_line(lab) is not None or _kernel_family(by_label[lab])]
    fig.legend(*zip(*keep), loc="center right", fontsize=7, frameon=False)
    fig.suptitle("Per-token gradient weight of each loss (read off verl's loss by autograd; grey: other widths)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_all(rows: list[dict], out: Path, estimators, command: str, wall_s: float, settings: dict, plots: bool = True) -> dict:
    """Write the CSV, the Markdown and (unless plots=False) the PNGs; return {name: path}."""
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    paths = {"csv": out / CSV_NAME, "md": out / MD_NAME}
    df.to_csv(paths["csv"], index=False, float_format="%.4g")
    write_markdown(df, paths["md"], command, wall_s, settings)
    if plots:
        adv = "grpo" if "grpo" in set(df["advantage"]) else df["advantage"].iloc[0]
        if (df["kl_per_token"] > 0).any():  # nothing to put on a log-KL axis otherwise
            paths.update(mse=out / PNG_MSE, bias_variance=out / PNG_BV)
            plot_mse_vs_kl(df, paths["mse"], adv)
            plot_bias_variance(df, paths["bias_variance"], adv)
        paths["weights"] = out / PNG_WEIGHTS
        plot_weights(estimators, paths["weights"])
    return paths


def compare_runs(csv_paths: dict[str, str], advantage: str = "grpo") -> str:
    """Markdown tables of near/far d_rel_mse and d_cosine (vs each run's anchor) across several lab runs.

    Used for the robustness check in benchmarks/results/lab_default/robustness.md:

        python -c "from isreshape_verl.lab.report import compare_runs; print(compare_runs({'seed 0': 'a/lab.csv', ...}))"
    """
    tables = {}
    for name, path in csv_paths.items():
        frame = pd.read_csv(path)
        tables[name] = regime_table(frame[frame["advantage"] == advantage])
    parts = []
    for regime in ("near", "far"):
        for metric in ("d_rel_mse", "d_cosine"):
            col = f"{regime}: {metric}"
            frame = pd.DataFrame({name: t[col] for name, t in tables.items() if col in t.columns})
            frame = frame.loc[frame.mean(axis=1).sort_values(ascending=metric == "d_rel_mse").index]
            parts += [f"### {regime} cells (per-token KL {'<' if regime == 'near' else '≥'} {NEAR_KL}): {metric} vs the anchor, advantage = {advantage}",
                      "", _table(frame, "loss"), ""]
    return "\n".join(parts)
