"""Statistics of a comparison across seeds: bootstrap intervals, paired differences, area under the curve.

With a handful of seeds per (loss, lag), every figure is a mean over seeds with a 95 % percentile-bootstrap
interval (resampling seeds with replacement). Differences to the reference loss are paired: for each seed,
loss − reference on the same prompts, sampling seeds and warm start, so that what the seeds share cancels.
With n seeds the bootstrap has at most C(2n − 1, n) distinct resamples (10 for n = 3), so an interval from
3 seeds is coarse: it is the range of plausible means, not a test at a stated level. Below MIN_SEEDS no interval
is given at all (the mean alone; the report says why): from 1 seed the bootstrap interval is the value itself,
so any nonzero Δ would "exclude 0"; from 2 it is the range of the two values, and "excludes 0" only says that
both seeds moved the same way, which a loss with no effect does half the time.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MIN_SEEDS = 3  # fewest seeds (paired seeds for a Δ; replicates in the lab) an interval or ± is shown for


def bootstrap_mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile-bootstrap interval; NaNs when `values` is empty."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = x[rng.integers(0, x.size, size=(BOOTSTRAP_RESAMPLES, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(x.mean()), float(low), float(high)


def mean_interval(values) -> tuple[float, float, float]:
    """`bootstrap_mean_ci` from MIN_SEEDS values on; with fewer, (mean, NaN, NaN): the mean, and no interval that
    could exclude 0 (see the module docstring)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < MIN_SEEDS:
        return (float(np.mean(finite)) if finite else float("nan")), float("nan"), float("nan")
    return bootstrap_mean_ci(finite)


def area_under_curve(evals: list[tuple[int, float]]) -> float:
    """Mean accuracy over training: trapezoid area under (step, accuracy) divided by the steps covered."""
    if len(evals) < 2:
        return evals[0][1] if evals else float("nan")
    steps = np.array([s for s, _ in evals], dtype=float)
    acc = np.array([a for _, a in evals], dtype=float)
    return float(np.sum((acc[1:] + acc[:-1]) / 2.0 * np.diff(steps)) / (steps[-1] - steps[0]))


def verdict_rows(runs: list[dict], reference: str) -> list[dict]:
    """Per (loss, lag): mean and interval of final, best and AUC accuracy; paired Δ to `reference`; collapses.
    An interval needs MIN_SEEDS seeds (`seeds`; `paired` for a Δ): below, its bounds are NaN (`mean_interval`).

    `runs`: dicts with loss, lag, seed and summary (final_acc, best_acc, auc, collapsed).
    """
    by_key: dict = {}
    for run in runs:
        by_key.setdefault((run["loss"], run["lag"]), {})[run["seed"]] = run["summary"]
    rows = []
    for (loss, lag), seeds in by_key.items():
        ref = by_key.get((reference, lag), {})
        shared = sorted(set(seeds) & set(ref))
        row = {"loss": loss, "lag": lag, "seeds": len(seeds), "paired": len(shared) if loss != reference else 0,
               "collapsed": sum(bool(s["collapsed"]) for s in seeds.values())}
        for key in ("final_acc", "best_acc", "auc"):
            row[key] = mean_interval([s[key] for s in seeds.values()])
            if loss != reference and shared:
                row[f"delta_{key}"] = mean_interval([seeds[k][key] - ref[k][key] for k in shared])
            else:
                row[f"delta_{key}"] = None
        rows.append(row)
    return rows


def excludes_zero(interval) -> bool:
    return interval is not None and math.isfinite(interval[1]) and (interval[1] > 0 or interval[2] < 0)
