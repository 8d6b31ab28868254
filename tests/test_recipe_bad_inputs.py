"""A bad recipe input stops the recipe before anything launches: exit status 2 and ONE line on stderr
(`error: ...`) that names the bad value and what is allowed. DRY_RUN-based: the knob rows need no verl
(RECIPE_CHECK=0); the IS Reshape value rows run ISReshapeParams' own checks and the loss_mode rows verl's config
check (about 10 s).

The recipes run in `recipe_env`, the tests' one environment policy for recipe subprocesses, so the caller's
shell cannot change a row's outcome.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from isreshape_verl.testing.recipe_runs import recipe_env

REPO = Path(__file__).resolve().parents[1]
IS_KNOBS = ("IS_KERNEL IS_WIDTH IS_WIDTH_NEG IS_ONE_SIDED IS_DUAL_CLIP IS_GAMMA_MODE IS_GAMMA IS_GAMMA_BASE "
            "IS_GAMMA_MAX IS_GAMMA_TAU IS_GAMMA_BETA IS_LOG_RATIO_CLAMP IS_LOCALIZE_SFT IS_WIDTH_MODE "
            "IS_WIDTH_TARGET IS_WIDTH_MIN IS_WIDTH_MAX")


def run(script: str, *args: str, tmp: Path, **knobs: str) -> subprocess.CompletedProcess:
    env = recipe_env(**{"HOME": "/home/user", "DRY_RUN": "1", "RECIPE_CHECK": "0", "RUN_ROOT": str(tmp / "runs"),
                        **knobs})
    return subprocess.run(["bash", f"recipes/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line (a dry run's DATA_DIR warning aside); nothing else on stderr."""
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# (row, recipe, knobs, the error line's text); every one is a pure-bash check
BASH_ROWS = [
    ("19-is-knob-typo", "gsm8k/isreshape.sh", {"IS_WIDHT": "0.5"},
     f"error: IS_WIDHT is not an IS Reshape knob (known: {IS_KNOBS}); unset it, a misspelt knob would be ignored"),
    ("19-is-knob-typo-grpo", "gsm8k/grpo.sh", {"IS_GAMA": "0.5"}, "IS_GAMA is not an IS Reshape knob (known: "),
    ("20-lr-word", "gsm8k/grpo.sh", {"LR": "fast"},
     "error: LR='fast' is not allowed; it must be a number in (0, 1), e.g. 1e-6"),
    ("21-lr-negative", "gsm8k/isreshape.sh", {"LR": "-1"},
     "error: LR='-1' is not allowed; it must be a number in (0, 1), e.g. 1e-6"),
    ("22-temperature-word", "gsm8k/sapo.sh", {"TEMPERATURE": "abc"},
     "error: TEMPERATURE='abc' is not allowed; it must be a number > 0, e.g. 1.0"),
    ("temperature-zero", "math/grpo.sh", {"TEMPERATURE": "0"}, "TEMPERATURE='0' is not allowed; it must be a number > 0"),
    ("lr-leading-zero", "math/grpo.sh", {"LR": "01e-6"}, "LR='01e-6' is not allowed"),
    ("gpu-mem-util", "gsm8k/grpo.sh", {"GPU_MEM_UTIL": "1.5"},
     "error: GPU_MEM_UTIL='1.5' is not allowed; it must be a number in (0, 1], e.g. 0.6"),
    ("clip-ratio", "gsm8k/grpo.sh", {"CLIP_RATIO": "abc"},
     "error: CLIP_RATIO='abc' is not allowed; it must be a number in (0, 1), e.g. 0.2"),
    ("sapo-tau", "gsm8k/sapo.sh", {"SAPO_TAU_NEG": "-1"},
     "error: SAPO_TAU_NEG='-1' is not allowed; it must be a number > 0, e.g. 1.05"),
    ("train-batch", "gsm8k/grpo.sh", {"TRAIN_BATCH": "0"},
     "error: TRAIN_BATCH='0' is not allowed; it must be a whole number >= 1"),
    ("mini-batch", "gsm8k/grpo.sh", {"MINI_BATCH": "6.5"}, "MINI_BATCH='6.5' is not allowed; it must be a whole number >= 1"),
    ("micro-batch", "gsm8k/grpo.sh", {"MICRO_BATCH": "-4"}, "MICRO_BATCH='-4' is not allowed"),
    ("rollout-n", "gsm8k/grpo.sh", {"ROLLOUT_N": "two"}, "ROLLOUT_N='two' is not allowed; it must be a whole number >= 1"),
    ("rollout-tp", "gsm8k/grpo.sh", {"ROLLOUT_TP": "0"}, "ROLLOUT_TP='0' is not allowed"),
    ("prompt-len-leading-zero", "gsm8k/grpo.sh", {"MAX_PROMPT_LEN": "0512"},
     "MAX_PROMPT_LEN='0512' is not allowed; it must be a whole number >= 1"),
    ("response-len", "gsm8k/grpo.sh", {"MAX_RESPONSE_LEN": "1k"}, "MAX_RESPONSE_LEN='1k' is not allowed"),
    ("epochs", "gsm8k/grpo.sh", {"EPOCHS": "1.5"}, "EPOCHS='1.5' is not allowed; it must be a whole number >= 1"),
    ("steps", "gsm8k/grpo.sh", {"STEPS": "0"},
     "error: STEPS='0' is not allowed; it must be a whole number >= 1 (or empty: EPOCHS decide)"),
    ("seed", "gsm8k/grpo.sh", {"SEED": "-1"}, "SEED='-1' is not allowed; it must be a whole number >= 0"),
    ("staleness", "gsm8k/grpo.sh", {"ASYNC": "colocate", "STALENESS": "0"},
     "STALENESS='0' is not allowed; it must be a whole number >= 1 (model versions)"),
    ("nnodes", "gsm8k/grpo.sh", {"NNODES": "0"}, "error: NNODES='0' is not allowed; it must be a whole number >= 1"),
    ("gpus-per-node", "gsm8k/grpo.sh", {"GPUS_PER_NODE": "eight"}, "GPUS_PER_NODE='eight' is not allowed"),
    ("test-freq", "gsm8k/grpo.sh", {"TEST_FREQ": "x"}, "TEST_FREQ='x' is not allowed; it must be a whole number >= 0"),
    ("save-freq", "gsm8k/grpo.sh", {"SAVE_FREQ": "-2"},
     "SAVE_FREQ='-2' is not allowed; it must be a whole number >= -1 (-1: never)"),
    ("rollout-gpus", "gsm8k/grpo.sh", {"ASYNC": "separate", "ROLLOUT_GPUS": "8"},
     "ROLLOUT_GPUS='8' is not allowed; it must be < GPUS_PER_NODE (8)"),
    ("rollout-nodes", "gsm8k/grpo.sh", {"ASYNC": "separate", "NNODES": "2", "ROLLOUT_NODES": "x"},
     "ROLLOUT_NODES='x' is not allowed; it must be a whole number >= 1"),
    ("param-sync-step", "gsm8k/grpo.sh", {"ASYNC": "separate", "PARAM_SYNC_STEP": "0"},
     "PARAM_SYNC_STEP='0' is not allowed; it must be a whole number >= 1"),
    ("wandb", "gsm8k/grpo.sh", {"WANDB": "yes"}, "error: WANDB='yes' is not allowed; it must be 0 or 1"),
    ("dry-run-word", "gsm8k/grpo.sh", {"DRY_RUN": "yes"}, "error: DRY_RUN='yes' is not allowed; it must be 0 or 1"),
    ("recipe-check-word", "gsm8k/grpo.sh", {"RECIPE_CHECK": "no"}, "RECIPE_CHECK='no' is not allowed; it must be 0 or 1"),
    # a knob of another loss
    ("is-knob-to-grpo", "gsm8k/grpo.sh", {"IS_WIDTH": "0.5"},
     "error: IS_WIDTH='0.5' only applies to isreshape.sh, not to grpo.sh; unset it"),
    ("is-knob-to-sapo", "math/sapo.sh", {"IS_KERNEL": "cauchy"},
     "error: IS_KERNEL='cauchy' only applies to isreshape.sh, not to sapo.sh; unset it"),
    ("sapo-knob-to-grpo", "gsm8k/grpo.sh", {"SAPO_TAU_POS": "1.1"}, "SAPO_TAU_POS='1.1' only applies to sapo.sh"),
    ("grpo-knob-to-isreshape", "tiny/isreshape.sh", {"CLIP_RATIO": "0.3"},
     "CLIP_RATIO='0.3' only applies to grpo.sh, not to isreshape.sh"),
    # a misspelt knob of one of the recipes' families
    ("train-batch-typo", "gsm8k/grpo.sh", {"TRAIN_BATCHES": "64"},
     "error: TRAIN_BATCHES is not a recipe knob (known: TRAIN_BATCH); unset it, a misspelt knob would be ignored"),
    ("rollout-typo", "gsm8k/grpo.sh", {"ROLLOUT_NUM": "4"},
     "ROLLOUT_NUM is not a recipe knob (known: ROLLOUT_N ROLLOUT_TP ROLLOUT_CORRECTION ROLLOUT_DTYPE ROLLOUT_NODES "
     "ROLLOUT_GPUS)"),
    ("sapo-typo", "gsm8k/sapo.sh", {"SAPO_TAU": "1"}, "SAPO_TAU is not a recipe knob (known: SAPO_TAU_POS SAPO_TAU_NEG)"),
    ("recipe-check-typo", "gsm8k/grpo.sh", {"RECIPE_CHEK": "0"}, "RECIPE_CHEK is not a recipe knob (known: RECIPE_CHECK)"),
    ("compare-is-knob-typo", "gsm8k/compare.sh", {"IS_WIDHT": "0.5"}, "IS_WIDHT is not an IS Reshape knob"),
    ("compare-lr", "math/compare.sh", {"LR": "fast"}, "LR='fast' is not allowed"),
    ("compare-losses", "gsm8k/compare.sh", {"LOSSES": "grpo ppo"}, "LOSSES='grpo ppo' is not allowed: no recipe"),
]


@pytest.mark.parametrize("recipe,knobs,message", [r[1:] for r in BASH_ROWS], ids=[r[0] for r in BASH_ROWS])
def test_bad_knob_is_one_line_before_anything_launches(tmp_path, recipe, knobs, message):
    proc = run(recipe, tmp=tmp_path, **knobs)
    assert message in error_line(proc)
    assert "verl.trainer.main_ppo" not in proc.stdout  # stopped before the command was even composed
    assert not (tmp_path / "runs").exists()


# IS Reshape values: their types and ranges are ISReshapeParams' (no verl)
IS_VALUE_ROWS = [
    ("is-width-word", {"IS_WIDTH": "abc"},
     "error: bad IS Reshape knob: IS_WIDTH='abc' is not allowed: width='abc' is not allowed; it must be a finite number > 0"),
    ("is-gamma-range", {"IS_GAMMA": "1.5"}, "IS_GAMMA='1.5' is not allowed: gamma=1.5 is not allowed; it must be a number in [0, 1]"),
    ("is-one-sided-word", {"IS_ONE_SIDED": "maybe"}, "IS_ONE_SIDED='maybe' is not allowed: one_sided='maybe' is not allowed; "
     "it must be true or false"),
    ("is-kernel-name", {"IS_KERNEL": "triangle"}, "IS_KERNEL='triangle' is not allowed: kernel='triangle' is not a known kernel"),
]


@pytest.mark.parametrize("knobs,message", [r[1:] for r in IS_VALUE_ROWS], ids=[r[0] for r in IS_VALUE_ROWS])
def test_bad_is_reshape_value_is_one_line(tmp_path, knobs, message):
    proc = run("gsm8k/isreshape.sh", tmp=tmp_path, RECIPE_CHECK="1", **knobs)
    assert message in error_line(proc)
    assert "verl.trainer.main_ppo" not in proc.stdout


def test_good_is_reshape_values_pass_the_check():
    from isreshape_verl.launch.knobs import check_is_knobs, resolve

    knobs = resolve("gsm8k", "isreshape", {"IS_WIDTH": "0.5", "IS_WIDTH_NEG": "null", "IS_ONE_SIDED": "false",
                                           "IS_KERNEL": "cauchy"})
    assert check_is_knobs(knobs) is None
    assert knobs["IS_WIDTH_NEG"] == "null"


# rows 23 and 24: the ISReshapeLossConfig target with another loss_mode would train that loss and ignore
# every IS key; ISReshapeLossConfig refuses it, and the recipe check reports it in one line
LOSS_MODE = "loss_mode='vanilla' is not allowed for ISReshapeLossConfig; it must be 'is_reshape'"
PL = "actor_rollout_ref.actor.policy_loss"
LOSS_MODE_ROWS = [
    ("23-target-with-vanilla", "gsm8k/grpo.sh",
     (f"{PL}._target_=isreshape_verl.config.ISReshapeLossConfig", f"++{PL}.width=0.5")),
    ("23-isreshape-with-vanilla", "gsm8k/isreshape.sh", (f"{PL}.loss_mode=vanilla",)),
]


@pytest.mark.parametrize("recipe,overrides", [r[1:] for r in LOSS_MODE_ROWS], ids=[r[0] for r in LOSS_MODE_ROWS])
def test_is_reshape_target_with_another_loss_mode_is_one_line(tmp_path, recipe, overrides):
    proc = run(recipe, *overrides, tmp=tmp_path, RECIPE_CHECK="1")
    line = error_line(proc)
    assert line.startswith("error: the command above does not pass isreshape_verl.recipe_check: ")
    assert LOSS_MODE in line
    assert not (tmp_path / "runs").exists()


def test_the_check_reports_a_non_number_temperature_override_in_one_problem(tmp_path):
    """TEMPERATURE is checked in bash; the same value as a Hydra override is a problem line, not a traceback."""
    from isreshape_verl import recipe_check

    proc = run("gsm8k/grpo.sh", "actor_rollout_ref.rollout.temperature=abc", tmp=tmp_path)
    text = proc.stdout.replace("\\\n", " ")
    overrides = shlex.split(next(line for line in text.splitlines() if "verl.trainer.main_ppo" in line))[3:]
    with pytest.raises(recipe_check.RecipeCheckError) as info:
        recipe_check.check_overrides(overrides)
    assert [p for p in info.value.problems if "temperature" in p] == [
        "actor_rollout_ref.rollout.temperature='abc' is not allowed; it must be a finite number > 0 (on-policy sampling)"
    ]


def test_data_dir_dry_run_warns_real_launch_stops(tmp_path):
    """DRY_RUN may print a command for another machine's data (a cluster's shared DATA_DIR): one warning line,
    exit 0. A real launch stops with one error line naming DATA_DIR and the file."""
    missing = tmp_path / "none"
    proc = run("gsm8k/grpo.sh", tmp=tmp_path, DATA_DIR=str(missing))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"warning: DATA_DIR='{missing}' has no train.parquet and test.parquet here; a real launch would stop "
        "(run python data_prep/gsm8k.py, or set DATA_DIR)"
    ]
    proc = run("gsm8k/grpo.sh", tmp=tmp_path, DATA_DIR=str(missing), DRY_RUN="0")
    assert error_line(proc) == (f"error: DATA_DIR='{missing}': {missing}/train.parquet not found: "
                                "run python data_prep/gsm8k.py (or set DATA_DIR)")
    assert not (tmp_path / "runs").exists()


def test_what_is_not_a_typo_passes(tmp_path):
    """Unrelated variables (other tools', the sandbox's IS_SANDBOX) and the knobs of compare.sh pass; compare.sh
    hands each loss-specific knob to its own loss only."""
    proc = run("gsm8k/grpo.sh", tmp=tmp_path, IS_SANDBOX="yes", PYTHONHASHSEED="0", WANDB_API_KEY="k",
               MODEL_NAME="x", RAY_ADDRESS="auto", LR="2e-6", TEMPERATURE=".7", CLIP_RATIO="0.28", SAVE_FREQ="-1")
    assert proc.returncode == 0, proc.stderr
    proc = run("gsm8k/compare.sh", tmp=tmp_path, COMPARE_DIR=str(tmp_path / "exp"), IS_WIDTH="0.5",
               SAPO_TAU_POS="1.1", CLIP_RATIO="0.3")
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.replace("\\\n", " ").splitlines() if "verl.trainer.main_ppo" in line]
    assert len(commands) == 3
    grpo, sapo, isreshape = commands
    assert "clip_ratio=0.3" in grpo and "tau_pos=1.1" in sapo and f"{PL}.width=0.5" in isreshape
    assert "width=0.5" not in grpo + sapo and "tau_pos=1.1" not in grpo + isreshape


@pytest.mark.parametrize("extra, ignored", [
    (["algorithm.filter_groups.enable=True", "algorithm.filter_groups.metric=acc"], "algorithm.filter_groups.enable"),
    (["trainer.v1.sampler.sync_refill_failed_groups=True"], "trainer.v1.sampler.sync_refill_failed_groups"),
])
def test_a_setting_verl_drops_with_cpu_modes_replay_buffer_is_one_line(tmp_path, extra, ignored):
    """DEVICE=cpu plugs its fast-polling replay buffer in as verl's custom sampler, which verl builds without the
    group filter and sync_refill_failed_groups: asking for them is refused, not silently ignored."""
    proc = run("tiny/isreshape.sh", *extra, tmp=tmp_path, DEVICE="cpu", RECIPE_CHECK="1")
    assert error_line(proc) == (
        f"error: the command above does not pass isreshape_verl.recipe_check: {ignored}=True would be ignored: "
        "verl builds the custom sampler trainer.v1.sampler.custom_sampler.name=FastPollReplayBuffer without them "
        "(DEVICE=cpu sets one: isreshape_verl/cpu/replay_buffer.py)")
    proc = run("gsm8k/isreshape.sh", *extra, tmp=tmp_path, DEVICE="gpu", RECIPE_CHECK="1")  # verl's own buffer
    assert proc.returncode == 0, proc.stderr
