"""Check a verl 0.9.1 launch on CPU, before it reaches a GPU cluster.

``check_overrides(overrides)`` composes the Hydra overrides of a ``python -m verl.trainer.main_ppo``
command with verl's own ``ppo_trainer`` config (exactly as ``main_ppo`` would), then

1. builds the dataclasses verl builds at start-up: ``omega_conf_to_dataclass`` on
   ``actor_rollout_ref.actor`` (with our ``policy_loss._target_`` swap, so an unknown or
   out-of-range IS Reshape knob fails here), ``actor_rollout_ref.rollout`` and ``algorithm``;
2. runs ``verl.utils.config.validate_config`` as ``main_ppo`` does;
3. re-states the start-up assertions of verl's v1 trainers and workers that ``validate_config``
   does not cover (each one cites where verl asserts it), and
4. the invariants of this project's comparison recipes (``policy=True``): the importance ratio
   r = π_θ/μ is taken against the behaviour policy μ, i.e. ``bypass_mode=True``, rollout
   log-probs on, ``top_p = 1`` and ``top_k = -1`` (vLLM's processed log-probs would otherwise
   be those of a truncated, renormalised distribution that the trainer never recomputes).

Every problem is reported at once (:class:`RecipeCheckError` lists them); the recipes'
``DRY_RUN=1`` and the tests call this same function. From bash::

    python -m isreshape_verl.recipe_check [--cluster-nodes N --gpus-per-node G] -- key=value ...
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAINER_MODES = ("sync", "colocate_async", "separate_async")
ASYNC_TO_MODE = {"sync": "sync", "colocate": "colocate_async", "separate": "separate_async"}


class RecipeCheckError(ValueError):
    """Raised with every problem found, one per line."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("recipe check failed:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass
class CheckResult:
    """The composed config and what was checked."""

    config: Any
    checked: list[str] = field(default_factory=list)


def verl_config_dir() -> Path:
    """Folder of verl's Hydra configs (``verl/trainer/config``)."""
    import verl

    return Path(verl.__file__).resolve().parent / "trainer" / "config"


def compose(overrides: Sequence[str], config_name: str = "ppo_trainer"):
    """Compose verl's config with command-line overrides, the way ``@hydra.main`` does
    (struct mode: unknown keys without ``+`` are an error)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(verl_config_dir()), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def _try(problems: list[str], what: str, fn) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reported problem
        msg = str(exc).strip().splitlines()
        problems.append(f"{what}: {type(exc).__name__}: {' '.join(m.strip() for m in msg)[:600]}")
        return None


def check_config(
    cfg,
    *,
    policy: bool = True,
    cluster_nodes: int | None = None,
    gpus_per_node: int | None = None,
) -> CheckResult:
    """Check a composed verl config; raise :class:`RecipeCheckError` listing every problem.

    ``policy``: also enforce this project's comparison invariants (see module docstring).
    ``cluster_nodes`` / ``gpus_per_node``: when given, the trainer (and, in separate_async,
    the standalone rollout) GPUs must fit in that cluster.
    """
    from omegaconf import OmegaConf

    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.trainer.ppo.utils import need_critic, need_reference_policy, need_reward_model
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    problems: list[str] = []
    result = CheckResult(cfg)
    sel = lambda key, default=None: OmegaConf.select(cfg, key, default=default)  # noqa: E731

    # 1. the dataclasses verl builds at start-up
    actor = _try(problems, "actor_rollout_ref.actor -> dataclass",
                 lambda: omega_conf_to_dataclass(cfg.actor_rollout_ref.actor))
    rollout = _try(problems, "actor_rollout_ref.rollout -> dataclass",
                   lambda: omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout))
    _try(problems, "algorithm -> dataclass", lambda: omega_conf_to_dataclass(cfg.algorithm))
    result.checked.append("omega_conf_to_dataclass(actor, rollout, algorithm)")

    # 2. verl's own validation, as main_ppo calls it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        use_critic = need_critic(cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # verl prints its own "checks passed" line
        _try(problems, "verl.utils.config.validate_config",
             lambda: validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=use_critic))
    result.checked.append("validate_config")

    # 3. start-up assertions of the v1 trainers and workers that validate_config does not make
    loss_mode = sel("actor_rollout_ref.actor.policy_loss.loss_mode")
    _try(problems, f"policy loss {loss_mode!r} (core_algos.get_policy_loss_fn)", lambda: get_policy_loss_fn(loss_mode))
    if actor is not None and loss_mode == "is_reshape":
        target = sel("actor_rollout_ref.actor.policy_loss._target_")
        if type(actor.policy_loss).__name__ != "ISReshapeLossConfig":
            problems.append(
                f"loss_mode=is_reshape needs actor_rollout_ref.actor.policy_loss._target_="
                f"isreshape_verl.config.ISReshapeLossConfig (got {target!r}); its knobs would be ignored"
            )

    use_v1 = bool(sel("trainer.use_v1", True))
    mode = sel("trainer.v1.trainer_mode")
    if not use_v1:
        problems.append("trainer.use_v1=False selects the deprecated v0 trainer; the recipes need the v1 trainers")
    if mode not in TRAINER_MODES:  # trainer_base.get_trainer_cls
        problems.append(f"trainer.v1.trainer_mode={mode!r} is not one of {', '.join(TRAINER_MODES)}")

    train_bs = int(sel("data.train_batch_size"))
    mini_bs = int(sel("actor_rollout_ref.actor.ppo_mini_batch_size"))
    n = int(sel("actor_rollout_ref.rollout.n"))
    trainer_nodes = int(sel("trainer.nnodes"))
    trainer_gpn = int(sel("trainer.n_gpus_per_node"))
    trainer_gpus = trainer_nodes * trainer_gpn
    hybrid = bool(sel("actor_rollout_ref.hybrid_engine", True))
    pss = int(sel(f"trainer.v1.{mode}.parameter_sync_step", 1) or 1) if mode in TRAINER_MODES else 1

    # trainer_base.PPOTrainer.step
    if train_bs % pss:
        problems.append(f"data.train_batch_size ({train_bs}) must be divisible by parameter_sync_step ({pss})")
    threshold = sel("trainer.v1.sampler.max_off_policy_threshold")
    if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool) or threshold <= 0):
        # replay_buffer.ReplayBuffer.__init__
        problems.append(f"trainer.v1.sampler.max_off_policy_threshold={threshold!r} must be a positive int or null")
    if sel("trainer.v1.sampler.max_off_policy_strategy") not in ("drop", "wait"):
        problems.append(
            f"trainer.v1.sampler.max_off_policy_strategy={sel('trainer.v1.sampler.max_off_policy_strategy')!r} "
            "must be 'drop' or 'wait'"
        )
    # ppo_trainer.yaml: hybrid_engine=False only with separate_async
    if not hybrid and mode != "separate_async":
        problems.append(f"actor_rollout_ref.hybrid_engine=False is only supported by separate_async, not {mode!r}")

    rollout_nodes = int(sel("actor_rollout_ref.rollout.nnodes", 0) or 0)
    rollout_gpn = int(sel("actor_rollout_ref.rollout.n_gpus_per_node", 0) or 0)
    if mode == "separate_async":  # trainer_separate_async.PPOTrainerSeparateAsync.__init__
        if train_bs != pss * mini_bs:
            problems.append(
                f"separate_async needs data.train_batch_size == trainer.v1.separate_async.parameter_sync_step "
                f"x actor.ppo_mini_batch_size, got {train_bs} != {pss} x {mini_bs}"
            )
        if rollout_nodes <= 0 or rollout_gpn <= 0:
            problems.append(
                "separate_async needs standalone rollout GPUs: actor_rollout_ref.rollout.nnodes > 0 and "
                f"actor_rollout_ref.rollout.n_gpus_per_node > 0 (got {rollout_nodes} x {rollout_gpn})"
            )
        backend = sel("actor_rollout_ref.rollout.checkpoint_engine.backend")
        if backend == "naive":
            problems.append(
                "separate_async needs actor_rollout_ref.rollout.checkpoint_engine.backend other than 'naive' "
                "(nccl, nixl, mooncake, ...) to sync weights to the standalone rollout"
            )
        if need_reward_model(cfg) and not sel("reward.reward_model.enable_resource_pool"):
            problems.append("separate_async with a reward model needs reward.reward_model.enable_resource_pool=True")

    # engine_workers.ActorRolloutRefWorker: rollout world size divisible by the inference parallel size
    tp = int(sel("actor_rollout_ref.rollout.tensor_model_parallel_size", 1))
    dp = int(sel("actor_rollout_ref.rollout.data_parallel_size", 1))
    pp = int(sel("actor_rollout_ref.rollout.pipeline_model_parallel_size", 1))
    infer_world = tp * dp * pp
    if hybrid and trainer_gpus % infer_world:
        problems.append(
            f"trainer GPUs ({trainer_nodes} x {trainer_gpn} = {trainer_gpus}) not divisible by the rollout's "
            f"tensor x data x pipeline parallel size ({tp} x {dp} x {pp})"
        )
    if mode == "separate_async" and rollout_nodes * rollout_gpn % infer_world:
        problems.append(
            f"standalone rollout GPUs ({rollout_nodes} x {rollout_gpn}) not divisible by the rollout's "
            f"tensor x data x pipeline parallel size ({tp} x {dp} x {pp})"
        )
    # engine_workers: the actor's dynamic-batch flag must match the rollout log-prob one
    use_dyn = bool(sel("actor_rollout_ref.actor.use_dynamic_bsz"))
    if use_dyn != bool(sel("actor_rollout_ref.rollout.log_prob_use_dynamic_bsz")):
        problems.append("actor.use_dynamic_bsz must equal rollout.log_prob_use_dynamic_bsz")
    # engine_workers.TrainingWorker.train_batch: the global mini-batch splits evenly over data-parallel ranks
    sp = int(sel("actor_rollout_ref.actor.ulysses_sequence_parallel_size", 1) or 1)
    actor_dp = max(trainer_gpus // sp, 1)
    if (mini_bs * n) % actor_dp:
        problems.append(
            f"actor mini-batch ppo_mini_batch_size x rollout.n = {mini_bs} x {n} = {mini_bs * n} sequences "
            f"must be divisible by the actor's data-parallel size ({actor_dp})"
        )
    if train_bs % mini_bs:
        problems.append(
            f"data.train_batch_size ({train_bs}) must be a multiple of ppo_mini_batch_size ({mini_bs}) "
            "(recipe rule: otherwise every step ends with a short PPO mini-batch)"
        )
    # bypass mode reads rollout_log_probs (trainer_base._compute_old_log_prob, rollout_corr_helper)
    bypass = bool(sel("algorithm.rollout_correction.bypass_mode", False))
    if bypass and not sel("actor_rollout_ref.rollout.calculate_log_probs"):
        problems.append("algorithm.rollout_correction.bypass_mode=True needs actor_rollout_ref.rollout.calculate_log_probs=True")
    if sel("algorithm.adv_estimator") == "grpo" and n < 2:
        problems.append(f"GRPO needs rollout.n >= 2 answers per prompt for a group baseline (got {n})")
    if rollout is not None and getattr(rollout, "name", None) in (None, "???"):
        problems.append("actor_rollout_ref.rollout.name must be set (vllm or sglang)")
    result.checked.append("v1 trainer / worker start-up assertions")

    # resources
    if cluster_nodes is not None and gpus_per_node is not None:
        need = trainer_gpus + (rollout_nodes * rollout_gpn if mode == "separate_async" else 0)
        have = cluster_nodes * gpus_per_node
        if need > have:
            problems.append(f"the run needs {need} GPUs but the cluster has {cluster_nodes} x {gpus_per_node} = {have}")
        if trainer_gpn > gpus_per_node or (mode == "separate_async" and rollout_gpn > gpus_per_node):
            problems.append(f"more GPUs per node requested than the {gpus_per_node} a node has")
        result.checked.append(f"fits {cluster_nodes} x {gpus_per_node} GPUs")

    # 4. this project's comparison invariants
    if policy:
        if not bypass:
            problems.append("comparison recipes need algorithm.rollout_correction.bypass_mode=True (r against the behaviour policy)")
        if not sel("actor_rollout_ref.rollout.calculate_log_probs"):
            problems.append("comparison recipes need actor_rollout_ref.rollout.calculate_log_probs=True")
        top_p, top_k = sel("actor_rollout_ref.rollout.top_p"), sel("actor_rollout_ref.rollout.top_k")
        if float(top_p) != 1.0 or int(top_k) != -1:
            problems.append(
                f"comparison recipes need top_p=1 and top_k=-1 (got top_p={top_p}, top_k={top_k}): "
                "truncated sampling makes the rollout log-probs those of another distribution and biases r"
            )
        if float(sel("actor_rollout_ref.rollout.temperature")) <= 0:
            problems.append("rollout temperature must be > 0 for on-policy sampling")
        result.checked.append("comparison invariants (bypass_mode, rollout log-probs, top_p=1, top_k=-1)")

    if problems:
        raise RecipeCheckError(problems)
    return result


def check_overrides(
    overrides: Sequence[str],
    *,
    policy: bool = True,
    cluster_nodes: int | None = None,
    gpus_per_node: int | None = None,
) -> CheckResult:
    """Compose ``overrides`` with verl's ``ppo_trainer`` config and :func:`check_config` it.
    A composition error (typo in a key, a missing ``+``) is reported as a RecipeCheckError."""
    try:
        cfg = compose(overrides)
    except Exception as exc:  # noqa: BLE001
        raise RecipeCheckError([f"Hydra could not compose the overrides: {type(exc).__name__}: {exc}"]) from exc
    return check_config(cfg, policy=policy, cluster_nodes=cluster_nodes, gpus_per_node=gpus_per_node)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m isreshape_verl.recipe_check",
        description="Compose verl main_ppo overrides with verl's ppo_trainer config and check them "
        "(dataclasses, validate_config, v1 trainer start-up assertions, comparison invariants).",
    )
    parser.add_argument("--cluster-nodes", type=int, default=None, help="nodes available (checks the GPUs fit)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node available")
    parser.add_argument(
        "--no-policy", action="store_true", help="skip this project's comparison invariants (bypass_mode, top_p, top_k)"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides as passed to verl.trainer.main_ppo")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = check_overrides(
            args.overrides, policy=not args.no_policy, cluster_nodes=args.cluster_nodes, gpus_per_node=args.gpus_per_node
        )
    except RecipeCheckError as exc:
        print(exc, file=sys.stderr)
        return 1
    if not args.quiet:
        print("recipe check OK: " + "; ".join(result.checked))
    return 0


if __name__ == "__main__":
    sys.exit(main())
