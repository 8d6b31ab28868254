"""The recipe check's key check: a misspelt key, with or without `+`, is refused naming the nearest existing key;
every new key the recipes add (and the free-form maps verl hands on as keyword arguments) passes.

Why: Hydra composes `+trainer.total_trainng_steps=3` without complaint and verl never reads it, so a launch
silently trains the default number of steps; and for a misspelt existing key Hydra's own advice is to add `+`,
which turns the error into that silent typo.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from isreshape_verl.recipe_check import RecipeCheckError, check_keys, check_overrides, main

REPO = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((REPO / "tests" / "golden" / "dry_runs.json").read_text())
PL = "actor_rollout_ref.actor.policy_loss"
IS_RESHAPE = f"{PL}._target_=isreshape_verl.config.ISReshapeLossConfig"
DELIBERATE_TYPO = "+trainer.extra=1"  # a golden case adds it on purpose: the only new key the recipes pass on


def golden_commands() -> list[tuple[str, list[str]]]:
    """Every `main_ppo` command the golden dry runs print (compare.sh prints three), as its overrides."""
    commands = []
    for case_id, case in GOLDEN.items():
        for line in case["stdout"].replace("\\\n", " ").splitlines():
            try:
                argv = shlex.split(line.replace("{REPO}", str(REPO)))
            except ValueError:
                continue
            if "verl.trainer.main_ppo" in argv:
                commands.append((case_id, argv[argv.index("verl.trainer.main_ppo") + 1:]))
    return commands


COMMANDS = golden_commands()
GSM8K_GRPO = next(ov for case_id, ov in COMMANDS if case_id == "ASYNC=sync DEVICE=gpu recipes/gsm8k/grpo.sh")
GSM8K_IS_RESHAPE = next(ov for case_id, ov in COMMANDS if case_id == "ASYNC=sync DEVICE=gpu recipes/gsm8k/isreshape.sh")


def problems_of(*overrides: str) -> list[str]:
    return check_keys(list(overrides))[0]


NEW_KEY_TYPOS = [
    ("+trainer.total_trainng_steps=3", "trainer.total_trainng_steps", "trainer.total_training_steps"),
    ("+data.max_promt_length=256", "data.max_promt_length", "data.max_prompt_length"),
    ("+actor_rollout_ref.actor.ppo_mini_bach_size=8", "actor_rollout_ref.actor.ppo_mini_bach_size",
     "actor_rollout_ref.actor.ppo_mini_batch_size"),
    ("+actor_rollout_ref.rollout.temprature=0.7", "actor_rollout_ref.rollout.temprature",
     "actor_rollout_ref.rollout.temperature"),
    ("+algorithm.adv_estimater=grpo", "algorithm.adv_estimater", "algorithm.adv_estimator"),
    ("++trainer.total_trainng_steps=3", "trainer.total_trainng_steps", "trainer.total_training_steps"),
]


@pytest.mark.parametrize("override,key,nearest", NEW_KEY_TYPOS, ids=[t[0] for t in NEW_KEY_TYPOS])
def test_a_misspelt_new_key_is_refused_naming_the_nearest(override, key, nearest):
    assert problems_of(override) == [
        f"{override}: verl has no key {key} (did you mean {nearest}?); a new key would be ignored"
    ]


PLAIN_TYPOS = [
    ("trainer.total_trainng_steps=3", "trainer.total_trainng_steps", "trainer.total_training_steps"),
    ("trainr.total_training_steps=3", "trainr.total_training_steps", "trainer.total_training_steps"),
    ("actor_rollout_ref.rollot.temperature=0.7", "actor_rollout_ref.rollot.temperature",
     "actor_rollout_ref.rollout.temperature"),
    ("algorithm.rollout_correction.bypass_mod=True", "algorithm.rollout_correction.bypass_mod",
     "algorithm.rollout_correction.bypass_mode"),
]


@pytest.mark.parametrize("override,key,nearest", PLAIN_TYPOS, ids=[t[0] for t in PLAIN_TYPOS])
def test_a_misspelt_key_or_section_names_the_nearest_not_hydras_plus(override, key, nearest):
    assert problems_of(override) == [f"{override}: verl has no key {key} (did you mean {nearest}?)"]


def test_a_misspelt_is_reshape_key_without_plus_names_the_field():
    assert problems_of(IS_RESHAPE, f"{PL}.kernal=cauchy") == [
        f"{PL}.kernal=cauchy: verl has no key {PL}.kernal (did you mean {PL}.kernel?)"
    ]


def test_no_suggestion_when_nothing_is_near():
    assert problems_of("+trainer.zzz=1") == ["+trainer.zzz=1: verl has no key trainer.zzz; a new key would be ignored"]


def test_the_whole_check_reports_the_typo_alone_and_checks_the_rest():
    """check_overrides (what the recipes call) leaves the refused override out and checks the rest: one line."""
    for extra, problem in [
        ("+trainer.total_trainng_steps=3", ("+trainer.total_trainng_steps=3: verl has no key trainer.total_trainng_steps "
                                            "(did you mean trainer.total_training_steps?); a new key would be ignored")),
        ("trainer.total_trainng_steps=3", ("trainer.total_trainng_steps=3: verl has no key trainer.total_trainng_steps "
                                           "(did you mean trainer.total_training_steps?)")),
    ]:
        with pytest.raises(RecipeCheckError) as info:
            check_overrides([*GSM8K_GRPO, extra])
        assert info.value.problems == [problem]


def test_the_command_line_prints_the_typo(capsys):
    assert main(["--one-line", *GSM8K_GRPO, "+trainer.total_trainng_steps=3"]) == 1
    assert capsys.readouterr().err.strip() == (
        "recipe check failed: +trainer.total_trainng_steps=3: verl has no key trainer.total_trainng_steps "
        "(did you mean trainer.total_training_steps?); a new key would be ignored")


def test_the_golden_commands_cover_the_new_keys_the_recipes_use():
    new_keys = {o.split("=", 1)[0] for _, ov in COMMANDS for o in ov if o.startswith("+")}
    assert len(COMMANDS) >= len(GOLDEN) and len(new_keys) >= 20
    assert {"+actor_rollout_ref.rollout.enable_sleep_mode", "+ray_kwargs.ray_init.num_gpus",
            "+actor_rollout_ref.model.override_config.attn_implementation",
            "+actor_rollout_ref.rollout.engine_kwargs.vllm.worker_extension_cls",
            "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype", f"+{PL}.width"} <= new_keys


def test_every_key_the_recipes_pass_is_one_verl_reads():
    """All golden commands (every recipe x ASYNC x DEVICE, knob combinations, compare, cluster launchers)."""
    refused = {}
    for case_id, overrides in COMMANDS:
        problems, _ = check_keys([o for o in overrides if o != DELIBERATE_TYPO])
        if problems:
            refused[case_id] = problems
    assert refused == {}


def test_the_deliberate_extra_key_of_the_golden_cases_is_refused():
    (overrides,) = [ov for _, ov in COMMANDS if DELIBERATE_TYPO in ov]
    assert check_keys(overrides) == (
        [f"{DELIBERATE_TYPO}: verl has no key trainer.extra; a new key would be ignored"], [DELIBERATE_TYPO])


LEGITIMATE_NEW_KEYS = [
    ("+ray_kwargs.ray_init.runtime_env.env_vars.ANYTHING=1",),  # ray.init's keyword arguments
    ("+ray_kwargs.ray_init._temp_dir=/tmp/x",),
    ("+actor_rollout_ref.rollout.enable_sleep_mode=False",),  # a RolloutConfig field verl's yaml lacks
    ("+actor_rollout_ref.model.override_config.attn_implementation=sdpa",),  # HFModelConfig.override_config: dict
    ("+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",),  # Optional[dict]
    ("+actor_rollout_ref.rollout.engine_kwargs.vllm.anything=1",),  # RolloutConfig.engine_kwargs: dict
    ("+data.apply_chat_template_kwargs.enable_thinking=False",),  # a map verl's yaml leaves empty
    ("+data.cache_dir=/tmp/cache",),  # read by RLHFDataset with .get, absent from the yaml
    ("+reward.custom_reward_function.reward_kwargs.scale=2",),  # the reward function's kwargs
    ("data.custom_cls.path=my_dataset.py", "+data.qqq=1"),  # handed to the user's dataset class
    (f"+{PL}.rollout_correction.bypass_mode=True",),  # a dataclass-typed field of PolicyLossConfig
    (IS_RESHAPE, f"++{PL}.width=0.5"),  # an ISReshapeLossConfig field
    (IS_RESHAPE, f"+{PL}.kernel=cauchy", f"++{PL}.kernel=box"),
    ("++trainer.total_epochs=3",),  # ++ on an existing key
    ("hydra.run.dir=/tmp/x",),  # Hydra's own
]


@pytest.mark.parametrize("overrides", LEGITIMATE_NEW_KEYS, ids=[o[-1] for o in LEGITIMATE_NEW_KEYS])
def test_legitimate_new_keys_pass(overrides):
    assert problems_of(*overrides) == []


def test_a_misspelt_is_reshape_key_is_refused_naming_the_field():
    assert problems_of(IS_RESHAPE, f"++{PL}.widht=0.5") == [
        f"++{PL}.widht=0.5: verl has no key {PL}.widht (did you mean {PL}.width?); a new key would be ignored"
    ]


def test_is_reshape_keys_need_the_is_reshape_target():
    """Without the _target_ swap the section is verl's PolicyLossConfig, which has no `width`."""
    assert problems_of(f"++{PL}.width=0.5") == [f"++{PL}.width=0.5: verl has no key {PL}.width; a new key would be ignored"]


def test_a_misspelt_is_reshape_key_is_reported_once_by_the_whole_check():
    """Refused before composition, so the actor dataclass does not fail a second time on the unknown keyword."""
    with pytest.raises(RecipeCheckError) as info:
        check_overrides([*GSM8K_IS_RESHAPE, f"++{PL}.widht=0.5"])
    assert info.value.problems == [
        f"++{PL}.widht=0.5: verl has no key {PL}.widht (did you mean {PL}.width?); a new key would be ignored"
    ]


def test_a_field_verl_reads_but_its_yaml_lacks_needs_plus_and_says_so():
    key = "actor_rollout_ref.rollout.enable_sleep_mode"
    assert problems_of(f"{key}=False") == [
        f"{key}=False: verl's yaml has no key {key} to set, though verl reads it; add it with + (+{key}=False)"
    ]


def test_free_form_maps_are_only_the_maps():
    """Next to a free-form map its section is still checked: `ray_kwargs` itself, the rest of `data`."""
    assert problems_of("+ray_kwargs.timeline_jsn_file=t.json") == [
        ("+ray_kwargs.timeline_jsn_file=t.json: verl has no key ray_kwargs.timeline_jsn_file "
         "(did you mean ray_kwargs.timeline_json_file?); a new key would be ignored")
    ]
    assert problems_of("+data.qqq=1") == ["+data.qqq=1: verl has no key data.qqq; a new key would be ignored"]
    assert problems_of("+actor_rollout_ref.actor.fsdp_config.mixed_precison.param_dtype=fp32")[0].startswith(
        "+actor_rollout_ref.actor.fsdp_config.mixed_precison.param_dtype=fp32: verl has no key "
        "actor_rollout_ref.actor.fsdp_config.mixed_precison.param_dtype (did you mean "
        "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype?)")


def test_a_defaults_choice_changes_which_keys_exist():
    """`model_engine=megatron` composes the Megatron actor: its `megatron` section exists, FSDP's does not."""
    assert problems_of("model_engine=megatron", "actor_rollout_ref.actor.megatron.seed=1") == []
    assert problems_of("actor_rollout_ref.actor.megatron.seed=1") == [
        "actor_rollout_ref.actor.megatron.seed=1: verl has no key actor_rollout_ref.actor.megatron.seed"
    ]
