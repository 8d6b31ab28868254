"""The comparison report: report.md and the terminal summary say the same thing, and the terminal names the files."""

import os
from pathlib import Path

from isreshape_verl.sandbox.report import (
    REPORT_FILES,
    markdown_table,
    summarize_run,
    table_rows,
    terminal_table,
    write_report,
)


def _rows(final_acc: float) -> list[dict]:
    """A 2-step run's metrics.jsonl rows: test accuracy 0.5 at step 0 and `final_acc` at step 2."""
    train = {"loss": -0.1, "entropy": 0.1, "grad_norm": 0.3, "ppo_kl": 0.01, "reward": 0.4, "reward_ema": 0.4,
             "lag": 0, "ess": 0.99, "g_mean": 1.0, "log_ratio_hist": [1] * 40}
    return [{"step": 0, "test_acc": 0.5}, {"step": 1, **train}, {"step": 2, **train, "test_acc": final_acc}]


def _runs() -> list[dict]:
    # loss "a": both seeds end at 0.55 (no collapse); loss "b": seed 1 ends at 0.3 < 0.5 - COLLAPSE_DROP (0.10)
    finals = {("a", 0): 0.55, ("a", 1): 0.55, ("b", 0): 0.55, ("b", 1): 0.3}
    return [{"name": f"{loss}__lag0__seed{seed}", "loss": loss, "lag": 0, "seed": seed,
             "rows": _rows(acc), "summary": summarize_run(_rows(acc))} for (loss, seed), acc in finals.items()]


def test_terminal_collapse_column_uses_the_reports_wording():
    rows = table_rows(_runs())
    assert [r["collapsed"] for r in rows] == [0, 1]
    cells = [line.split("|") for line in markdown_table(rows).splitlines()[2:]]
    markdown = {cell[1].strip(" `"): cell[8].strip() for cell in cells}  # column 8: collapsed
    assert markdown == {"a": "no (0)", "b": "**yes** (1)"}
    terminal = {line.split()[0]: line[-9:].strip() for line in terminal_table(rows).splitlines()[2:]}
    assert terminal == {"a": "no (0)", "b": "yes (1)"}  # the report's words, without the Markdown bold


def test_terminal_summary_lists_the_written_report_and_plots(tmp_path):
    from isreshape_verl.specs import parse_loss_specs

    runs = _runs()
    context = {"command": "isreshape-verl compare", "machine": "test", "wall_seconds": 60.0, "policy": "tiny",
               "parameters": 1e6, "task": "t", "rl": "2 steps",
               "warm_start": {"seconds": 1.0, "accuracy": 0.5, "steps": 10}}
    report = write_report(str(tmp_path), runs, parse_loss_specs(["vanilla"]), context)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(REPORT_FILES) and report == os.path.join(tmp_path, "report.md")
    text = terminal_table(table_rows(runs), out_dir=str(tmp_path))
    assert text.splitlines()[-len(REPORT_FILES) - 1:] == [f"written to {tmp_path}:"] + [
        f"  {os.path.join(tmp_path, name)}" for name in REPORT_FILES]
    assert "written to" not in terminal_table(table_rows(runs))  # without out_dir: the table only


def test_g_curves_reach_past_the_dual_clip(tmp_path):
    """g_curves.png's r axis goes past r = 3, where verl's dual clip (clip_ratio_c) zeroes GRPO's weight of A < 0
    tokens: the plot shows the clip acting, not the axis ending on it."""
    import numpy as np

    from isreshape_verl.sandbox.report import G_CURVE_R_MAX, g_curve, plot_g_curves
    from isreshape_verl.specs import parse_loss_specs

    specs = parse_loss_specs(["vanilla", "sapo", "is_reshape"])
    clip = specs[0].actor_config().clip_ratio_c
    assert G_CURVE_R_MAX >= clip + 1
    g = g_curve(specs[0], np.array([clip - 0.5, clip + 0.5]), -1.0)
    assert g[0] > 0 and g[1] == 0  # what the extended axis makes visible
    plot_g_curves(specs, str(tmp_path / "g_curves.png"))
    assert (tmp_path / "g_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["g_curves.png"]  # no temporary file left


def _report(tmp_path, seeds: int) -> str:
    """report.md of loss `a` (final accuracy 0.55 + 0.01·seed) and `b` (`a` + 0.05 on every seed), one lag."""
    from isreshape_verl.specs import parse_loss_specs

    finals = {(loss, seed): 0.55 + 0.01 * seed + (0.05 if loss == "b" else 0.0)
              for loss in ("a", "b") for seed in range(seeds)}
    runs = [{"name": f"{loss}__lag0__seed{seed}", "loss": loss, "lag": 0, "seed": seed,
             "rows": _rows(acc), "summary": summarize_run(_rows(acc))} for (loss, seed), acc in finals.items()]
    context = {"command": "isreshape-verl compare", "machine": "test", "wall_seconds": 60.0, "policy": "tiny",
               "parameters": 1e6, "task": "t", "rl": "2 steps",
               "warm_start": {"seconds": 1.0, "accuracy": 0.5, "steps": 10}}
    return Path(write_report(str(tmp_path), runs, parse_loss_specs(["vanilla"]), context)).read_text()


def test_one_seed_report_says_in_words_that_it_has_no_interval(tmp_path):
    """The README's main job runs one seed: the report shows each mean alone, says why, and marks nothing (no
    bold, no degenerate interval such as +0.050 [+0.050, +0.050])."""
    text = _report(tmp_path, seeds=1)
    assert ("AUC: mean test accuracy over the run (trapezoid over the evaluations). Δ: paired by seed (same prompts, "
            "sampling seed and warm start), loss − `a` at the same lag. 1 seed per loss and lag: no interval, and no "
            "difference is marked. An interval needs at least 3 seeds (from 1 seed a bootstrap interval is the value "
            "itself, from 2 the range of the two), so every number here is one measurement; `--seeds 0 1 2` or "
            "`--preset full` gives intervals.\n") in text
    # AUC = (0.5 + final) / 2 over the evaluations at steps 0 and 2; Δ = 0.05 (final) and 0.025 (AUC)
    assert ("| `a` | 0 | 1 | 0.550 (1 seed: no interval) | 0.550 (1 seed: no interval) | 0.525 (1 seed: no interval) "
            "| – | – | 0/1 |") in text
    assert ("| `b` | 0 | 1 | 0.600 (1 seed: no interval) | 0.600 (1 seed: no interval) | 0.550 (1 seed: no interval) "
            "| +0.050 (1 paired seed: no interval) | +0.025 (1 paired seed: no interval) | 0/1 |") in text
    verdict = text.split("### Across seeds")[1].split("### Ratio spread")[0]
    assert "**" not in verdict and "[" not in verdict.replace("[95 %", "")


def test_three_seeds_still_give_intervals_and_mark_a_difference(tmp_path):
    text = _report(tmp_path, seeds=3)
    assert ("Mean over seeds [95 % percentile-bootstrap interval over seeds]; **bold**: a Δ whose interval excludes "
            "0. With 3 seeds an interval is coarse (10 distinct resamples).\n") in text
    assert "| **+0.050 [+0.050, +0.050]** |" in text and "no interval" not in text
