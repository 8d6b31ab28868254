"""Statistics of `compare` across seeds: bootstrap intervals, paired differences, AUC, strict JSON."""

import json
import math

import pytest

from isreshape_verl.sandbox.report import strict_json, verdict_table
from isreshape_verl.sandbox.stats import (
    MIN_SEEDS,
    area_under_curve,
    bootstrap_mean_ci,
    excludes_zero,
    mean_interval,
    verdict_rows,
)


def test_bootstrap_of_equal_values_is_a_point():
    assert bootstrap_mean_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3))


def test_bootstrap_of_two_values_has_the_exact_percentiles():
    """Resampled means of (0, 1) are 0, ½, 1 with probability ¼, ½, ¼: the 2.5 % and 97.5 % points are 0 and 1."""
    assert bootstrap_mean_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)


def test_bootstrap_interval_is_deterministic_and_inside_the_range():
    mean, low, high = bootstrap_mean_ci([0.1, 0.5, 0.3])
    assert mean == pytest.approx(0.3) and 0.1 <= low < mean < high <= 0.5
    assert bootstrap_mean_ci([0.1, 0.5, 0.3]) == (mean, low, high)


def test_bootstrap_skips_missing_values_and_gives_nan_when_empty():
    assert bootstrap_mean_ci([0.2, None, float("nan"), 0.2]) == pytest.approx((0.2, 0.2, 0.2))
    assert all(math.isnan(v) for v in bootstrap_mean_ci([]))


def test_area_under_curve_is_the_mean_accuracy_by_trapezoids():
    assert area_under_curve([(0, 0.4), (10, 0.6), (20, 0.6)]) == pytest.approx((0.5 * 10 + 0.6 * 10) / 20)
    assert area_under_curve([(0, 0.4)]) == 0.4


def _run(loss, lag, seed, final, collapsed=False):
    return {"loss": loss, "lag": lag, "seed": seed,
            "summary": {"final_acc": final, "best_acc": final, "auc": final, "collapsed": collapsed}}


def test_paired_differences_cancel_what_seeds_share():
    """Seeds differ by 0.2 but `b` is `a` + 0.05 on every seed: the paired interval is the point 0.05."""
    runs = [_run("a", 4, s, 0.3 + 0.1 * s) for s in range(3)]
    runs += [_run("b", 4, s, 0.35 + 0.1 * s, collapsed=(s == 2)) for s in range(3)]
    rows = {r["loss"]: r for r in verdict_rows(runs, reference="a")}
    assert rows["a"]["delta_final_acc"] is None
    low, high = rows["b"]["final_acc"][1:]
    assert high - low > 0.1  # unpaired: wide
    assert rows["b"]["delta_final_acc"] == pytest.approx((0.05, 0.05, 0.05))
    assert excludes_zero(rows["b"]["delta_final_acc"]) and rows["b"]["collapsed"] == 1
    table = verdict_table(runs, "a")
    assert "**+0.050 [+0.050, +0.050]**" in table and "| 1/3 |" in table


def test_differences_are_taken_at_the_same_lag_and_only_on_shared_seeds():
    runs = [_run("a", 0, 0, 0.5), _run("a", 16, 0, 0.2), _run("a", 16, 1, 0.3),
            _run("b", 0, 0, 0.4), _run("b", 16, 0, 0.4), _run("b", 16, 2, 0.9)]
    rows = {(r["loss"], r["lag"]): r for r in verdict_rows(runs, reference="a")}
    assert rows[("b", 0)]["delta_final_acc"][0] == pytest.approx(-0.1)
    assert rows[("b", 16)]["delta_final_acc"][0] == pytest.approx(0.2)  # seed 0 only: seed 2 has no reference


def test_strict_json_writes_null_for_nan_and_inf():
    text = json.dumps(strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": (0.5,)}), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": [0.5]}


def test_fewer_than_three_seeds_give_the_mean_and_no_interval():
    """One or two seeds: a bootstrap interval would be the value itself or the range of the two, so the bounds are
    NaN and no Δ 'excludes 0'; from MIN_SEEDS = 3 on, the interval is back."""
    assert MIN_SEEDS == 3
    for n in (1, 2):
        runs = [_run("a", 0, s, 0.5) for s in range(n)] + [_run("b", 0, s, 0.6 + 0.01 * s) for s in range(n)]
        b = {r["loss"]: r for r in verdict_rows(runs, reference="a")}["b"]
        assert (b["seeds"], b["paired"]) == (n, n)
        mean, low, high = b["delta_final_acc"]
        assert mean == pytest.approx(0.1 + 0.005 * (n - 1)) and math.isnan(low) and math.isnan(high)
        assert math.isnan(b["final_acc"][1]) and not excludes_zero(b["delta_final_acc"])
    assert mean_interval([0.1, 0.2, 0.3]) == bootstrap_mean_ci([0.1, 0.2, 0.3])
    assert mean_interval([0.1, None, float("nan"), 0.3])[0] == pytest.approx(0.2)  # 2 finite values: no interval
    assert math.isnan(mean_interval([0.1, None, float("nan"), 0.3])[1])
