"""`isreshape-verl report-runs DIR` on verl-style run folders written here (launch.json, command.sh, verl's
FileLogger lines) in the layout compare.sh writes with SEEDS and arms (COMPARE_DIR/<arm>-seed<S>/): the numbers are
the sandbox's own statistics (`sandbox/stats.py`) on the accuracies written; partial and missing runs are named; bad
input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from isreshape_verl import verl_runs
from isreshape_verl.sandbox.stats import area_under_curve, mean_interval
from isreshape_verl.verl_report import main

ACC = "val-core/openai/gsm8k/acc/mean@1"
START = 0.40
FINALS = {("grpo", None): [0.50, 0.52, 0.54], ("grpo", "decoupled_token_is"): [0.55, 0.60, 0.56],
          ("isreshape", None): [0.45, 0.61, 0.58]}


def write_run(folder: Path, loss: str, seed: int, final: float, correction: str | None = None, steps: int = 4,
              planned: int | None = 4, knobs: dict | None = None, nan_at: int | None = None) -> Path:
    """A run folder as the launcher leaves it: validation at steps 0, 2, 4 (START, midway, `final`), training rows
    with verl's metric names at steps 1..`steps`."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"ASYNC": "sync", "STALENESS": "1", "SEED": str(seed), "LR": "1e-4", **(knobs or {})}
    if correction:
        settings["ROLLOUT_CORRECTION"] = correction
    (folder / "launch.json").write_text(json.dumps({"dataset": "tiny", "loss": loss, "knobs": settings,
                                                    "overrides": []}))
    (folder / "command.sh").write_text("python3 -m verl.trainer.main_ppo \\\n    trainer.total_epochs=1"
                                       + (f" \\\n    trainer.total_training_steps={planned}" if planned else "") + "\n")
    with open(folder / "metrics.jsonl", "w") as f:
        for step in range(steps + 1):
            data = {ACC: {0: START, 2: (START + final) / 2, 4: final}[step]} if step % 2 == 0 else {}
            if step > 0:
                data.update({"critic/score/mean": 0.3, "actor/ppo_kl": 1e-3, "actor/pg_loss": 0.1,
                             "actor/entropy_loss": 0.5, "actor/grad_norm": float("nan") if step == nan_at else 1.0,
                             "training/off_policy/trajectory_staleness/mean": 1.0, "timing_s/step": 2.0})
            f.write(json.dumps({"step": step, "data": data}) + "\n")
    return folder


def write_study(root: Path) -> None:
    for (loss, correction), finals in FINALS.items():
        for seed, final in enumerate(finals):
            write_run(root / (loss + (f"-{correction}" if correction else "") + f"-seed{seed}"), loss, seed, final,
                      correction)


def auc(final: float) -> float:
    return area_under_curve([(0, START), (2, (START + final) / 2), (4, final)])


def test_three_seeds_two_arms_give_the_sandboxs_delta_and_interval(tmp_path, capsys):
    write_study(tmp_path)
    assert main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {row["loss"]: row for row in summary["verdict"]}
    assert summary["reference"] == "grpo" and list(rows) == ["grpo", "grpo:decoupled_token_is", "isreshape"]
    ref, tis = FINALS[("grpo", None)], FINALS[("grpo", "decoupled_token_is")]
    expected = mean_interval([a - b for a, b in zip(tis, ref)])  # +0.05 [+0.02, +0.08]
    assert rows["grpo:decoupled_token_is"]["delta_final_acc"] == pytest.approx(list(expected), abs=1e-12)
    assert expected == pytest.approx((0.05, 0.02, 0.08), abs=1e-9)
    assert rows["grpo:decoupled_token_is"]["delta_auc"] == pytest.approx(
        list(mean_interval([auc(a) - auc(b) for a, b in zip(tis, ref)])), abs=1e-12)
    assert rows["grpo"]["final_acc"] == pytest.approx(list(mean_interval(ref)), abs=1e-12)
    assert rows["grpo"]["delta_final_acc"] is None and rows["isreshape"]["paired"] == 3
    assert all(row["lag"] == "ASYNC=sync STALENESS=1" and row["collapsed"] == 0 for row in rows.values())
    report = (tmp_path / "report.md").read_text()
    assert ("| `grpo:decoupled_token_is` | ASYNC=sync STALENESS=1 | 3 | 0.570 [0.550, 0.600] | 0.570 [0.550, 0.600] "
            "| 0.485 [0.475, 0.500] | **+0.050 [+0.020, +0.080]** | **+0.025 [+0.010, +0.040]** | 0/3 |") in report
    assert "| `isreshape` | ASYNC=sync STALENESS=1 | 3 | 0.547 [0.450, 0.610]" in report
    assert "None: every run logged its planned steps" in report and (tmp_path / "accuracy.png").stat().st_size
    assert capsys.readouterr().err == ""


def test_fewer_than_three_seeds_say_no_interval_and_partial_and_missing_runs_are_named(tmp_path, capsys):
    write_study(tmp_path)
    seed2 = tmp_path / "isreshape-seed2"
    write_run(seed2, "isreshape", 2, 0.58, steps=3)  # stopped after step 3 of 4
    for path in (tmp_path / "grpo-decoupled_token_is-seed1").iterdir():
        path.unlink()
    (tmp_path / "grpo-decoupled_token_is-seed1").rmdir()
    assert main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: not in the statistics: isreshape-seed2: partial, 3 of 4 steps logged (isreshape, ASYNC=sync "
        "STALENESS=1, seed 2); rerun the same compare.sh to continue it",
        "warning: not in the statistics: grpo:decoupled_token_is: no run of seed 1 in setting ASYNC=sync STALENESS=1, "
        "which other arms have"]
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    rows = {row["loss"]: row for row in summary["verdict"]}
    assert (rows["isreshape"]["seeds"], rows["isreshape"]["paired"]) == (2, 2)
    ref, rs = FINALS[("grpo", None)], FINALS[("isreshape", None)]
    mean = (rs[0] - ref[0] + rs[1] - ref[1]) / 2
    assert rows["isreshape"]["delta_final_acc"][0] == pytest.approx(mean)
    assert rows["isreshape"]["delta_final_acc"][1] is None  # no interval from 2 seeds (NaN in strict JSON)
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"| {mean:+.3f} (2 paired seeds: no interval) |" in report
    assert "- isreshape-seed2: partial, 3 of 4 steps logged" in report
    assert [r["used"] for r in summary["runs"] if r["name"] == "isreshape-seed2"] == [False]


def test_a_collapse_and_settings_that_differ_are_told_apart(tmp_path):
    """A NaN metric flags a collapse; runs in separate mode with a larger STALENESS are another setting, and the
    knobs that only follow ASYNC (GPUS_PER_NODE) stay out of its name; IS_* knobs that differ name the arm."""
    for seed in range(3):
        write_run(tmp_path / "sync" / "grpo" / f"seed{seed}", "grpo", seed, 0.5)
        write_run(tmp_path / "sync" / "isreshape" / f"seed{seed}", "isreshape", seed, 0.5, nan_at=3 if seed else None)
        write_run(tmp_path / "sep" / "grpo" / f"seed{seed}", "grpo", seed, 0.5,
                  knobs={"ASYNC": "separate", "STALENESS": "4", "GPUS_PER_NODE": "2"})
        write_run(tmp_path / "sep" / "isreshape" / f"seed{seed}", "isreshape", seed, 0.5,
                  knobs={"ASYNC": "separate", "STALENESS": "4", "GPUS_PER_NODE": "2", "IS_WIDTH": "0.5"})
    assert main([str(tmp_path)]) == 0
    rows = {(r["loss"], r["lag"]): r for r in json.loads((tmp_path / "summary.json").read_text())["verdict"]}
    assert set(rows) == {("grpo", "ASYNC=sync STALENESS=1"), ("isreshape IS_WIDTH=(unset)", "ASYNC=sync STALENESS=1"),
                         ("grpo", "ASYNC=separate STALENESS=4"),
                         ("isreshape IS_WIDTH=0.5", "ASYNC=separate STALENESS=4")}
    assert rows[("isreshape IS_WIDTH=(unset)", "ASYNC=sync STALENESS=1")]["collapsed"] == 2
    assert rows[("grpo", "ASYNC=separate STALENESS=4")]["collapsed"] == 0


def test_a_resumed_run_reads_its_whole_history():
    """verl truncates metrics.jsonl on a resume; the launcher keeps the old file as metrics.<time>.jsonl, and the
    history takes each later file from its first step on."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        (run / "metrics.20250101-000000.jsonl").write_text("".join(
            json.dumps({"step": s, "data": {"x": float(s)}}) + "\n" for s in range(6)))  # died after step 5
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "data": {"x": 10.0 + s}}) + "\n" for s in range(4, 8)))  # resumed at step 4
        steps, bad = verl_runs.history(run)
        assert {s: row["x"] for s, row in steps.items()} == {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0, 4: 14.0, 5: 15.0,
                                                             6: 16.0, 7: 17.0}
        assert bad == [] and verl_runs.last_step(run) == 7


@pytest.mark.parametrize("case", ["empty", "no_launch_json", "bad_reference", "not_a_folder"])
def test_bad_input_is_one_line(case, tmp_path, capsys):
    target = tmp_path
    argv = []
    if case == "no_launch_json":
        write_study(tmp_path)
        (tmp_path / "grpo-seed1" / "launch.json").unlink()
        expected = (f"{tmp_path}/grpo-seed1 has no launch.json: its arm, setting and seed are unknown (the launcher "
                    "writes it in every run folder; isreshape-verl plot-runs reads bare metrics files)")
    elif case == "bad_reference":
        write_study(tmp_path)
        argv = ["--reference", "sapo"]
        expected = "--reference 'sapo' is not an arm of these runs (grpo, grpo:decoupled_token_is, isreshape)"
    elif case == "not_a_folder":
        target = tmp_path / "nope"
        expected = f"DIR {str(target)!r} is not a folder (a COMPARE_DIR, or a folder of verl runs)"
    else:
        expected = (f"DIR {str(tmp_path)!r} holds no verl run: no metrics.jsonl or launch.json under it (the "
                    "folders compare.sh and the recipes write)")
    assert main([str(target), *argv]) == 2
    assert capsys.readouterr().err.splitlines() == [f"isreshape-verl report-runs: error: {expected}"]
    assert not (tmp_path / "report.md").exists()
