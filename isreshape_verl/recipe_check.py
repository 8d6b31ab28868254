"""Check a verl 0.9.1 launch on CPU, before it reaches a GPU cluster.

``check_overrides(overrides)`` first checks the key of every override (:func:`check_keys`): a key that
does not exist, or a new ``+key`` that verl would compose and then never read (a misspelt
``+trainer.total_trainng_steps=3`` silently keeps the default), is refused, naming the nearest existing
key. It composes the other overrides with verl's own ``ppo_trainer`` config (exactly as ``main_ppo``
would), then

1. builds the dataclasses verl builds at start-up: ``omega_conf_to_dataclass`` on
   ``actor_rollout_ref.actor`` (with our ``policy_loss._target_`` swap, so an unknown or
   out-of-range IS Reshape knob fails here), ``actor_rollout_ref.rollout`` and ``algorithm``;
2. runs ``verl.utils.config.validate_config`` as ``main_ppo`` does;
3. re-states the start-up assertions of verl's v1 trainers and workers that ``validate_config``
   does not cover (each one cites where verl asserts it), and
4. the invariants of this project's comparison recipes (``comparison_invariants=True``): the
   importance ratio r = π_θ/μ is taken against the behaviour policy μ, i.e. ``bypass_mode=True`` (or, in
   decoupled mode, π_old/μ is corrected: ``rollout_is`` or ``rollout_rs`` set, as ROLLOUT_CORRECTION's verl
   presets do), rollout log-probs on, ``top_p = 1`` and ``top_k = -1`` (vLLM's processed log-probs would otherwise
   be those of a truncated, renormalised distribution that the trainer never recomputes).

Every problem is reported at once (:class:`RecipeCheckError` lists them); the recipes'
``DRY_RUN=1`` and the tests call this same function. From bash::

    python -m isreshape_verl.recipe_check [--cluster-nodes N --gpus-per-node G] -- key=value ...
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import io
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

TRAINER_MODES = ("sync", "colocate_async", "separate_async")


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
    (struct mode: unknown keys without ``+`` are an error).

    The project's one way to compose verl's config: the recipe check, the CPU worker harness
    (``isreshape_verl.testing.verl_worker``) and the tests call it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(verl_config_dir()), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


# ---- keys: every key an override names must be one that verl (or this project's loss) reads ----
FREE_FORM_MAPS = {
    "ray_kwargs.ray_init": "main_ppo.run_ppo: ray.init(**ray_kwargs.ray_init); ray refuses unknown keywords itself",
    "reward.custom_reward_function.reward_kwargs": "ppo/reward.get_custom_reward_fn: the reward function's kwargs",
    "custom_reward_function.reward_kwargs": "the same, in verl's legacy top-level reward section",
}
"""Sections without a dataclass whose keys are someone else's keyword arguments: any key below is accepted."""

KEYS_READ_OUTSIDE_THE_YAML = {
    "data": ("cache_dir", "chat_template_func", "filter_prompts", "need_tools_kwargs"),  # RLHFDataset.__init__
    "trainer": ("remove_previous_ckpt_in_save",),  # v1/trainer_base.py, deprecated but read
}
"""Keys verl 0.9.1 reads with ``.get(key, default)`` in sections that no dataclass describes, though its yaml
lacks them (``+data.cache_dir=...`` is legitimate)."""

_FREE = "free"  # any key below
_LEAF = "leaf"  # no key below


def _is_defaults_override(override) -> bool:
    """``model_engine=megatron``, ``actor@actor_rollout_ref.actor=...``, ``group/option=...``: a choice in
    the defaults list, which changes the config's structure rather than a value."""
    key = override.key_or_group
    return "/" in key or override.package is not None or ("." not in key and (verl_config_dir() / key).is_dir())


def _is_hydra_key(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


@functools.lru_cache(maxsize=8)
def _base_config(defaults_overrides: tuple[str, ...]):
    """verl's config with only the defaults-list choices applied: the keys that exist before any override."""
    from omegaconf import OmegaConf

    cfg = compose(defaults_overrides)
    OmegaConf.set_readonly(cfg, True)
    return cfg


@functools.cache
def _dataclass_of(target: str):
    """The class a ``_target_`` names, or None where it is no dataclass or does not import (the dataclass
    build reports that)."""
    from hydra.utils import get_class

    try:
        cls = get_class(target)
    except Exception:  # noqa: BLE001
        return None
    return cls if dataclasses.is_dataclass(cls) else None


@functools.cache
def _field_kinds(cls) -> dict[str, Any]:
    """Each field of a dataclass -> the dataclass it is built into, _FREE (dict, Mapping, Any) or _LEAF."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: accept anything below that field
        hints = {}
    return {f.name: _kind_of_type(hints.get(f.name, Any)) for f in dataclasses.fields(cls)}


def _kind_of_type(tp) -> Any:
    if tp is Any:
        return _FREE
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        kinds = {_kind_of_type(a) for a in typing.get_args(tp) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else _FREE
    if dataclasses.is_dataclass(tp):
        return tp
    if tp in (dict, Mapping) or origin in (dict, Mapping):
        return _FREE
    return _LEAF


@dataclass
class KeyCheck:
    """Which keys of verl's config exist, and which new ones verl would read.

    A key exists when verl's composed config (with the overrides' defaults-list choices) has it. A new key
    (``+key`` or ``++key``) is one verl reads when it is

    * a field of the dataclass its section is built into (the section's ``_target_`` after the overrides:
      ``+actor_rollout_ref.rollout.enable_sleep_mode`` is a RolloutConfig field; with
      ``policy_loss._target_=isreshape_verl.config.ISReshapeLossConfig`` the IS Reshape keys are fields), or
    * anywhere below a map meant to be filled: a field typed dict, Mapping or Any (``model.override_config``,
      ``fsdp_config.mixed_precision``, ``rollout.engine_kwargs``), a map that verl's yaml leaves empty
      (``data.apply_chat_template_kwargs``), a :data:`FREE_FORM_MAPS` entry, a section whose ``_target_`` is no
      dataclass (its keys are a callable's arguments), or ``data`` when ``data.custom_cls.path`` hands it to
      a user's dataset class, or
    * one of :data:`KEYS_READ_OUTSIDE_THE_YAML`.

    Anything else would be composed and then never read: a misspelt key silently keeps verl's default.
    """

    base: Any  # verl's config before the value overrides
    values: dict[str, Any]  # key -> value of the last override that sets it

    def value(self, key: str):
        from omegaconf import OmegaConf

        return self.values[key] if key in self.values else OmegaConf.select(self.base, key, default=None)

    def exists(self, segments: Sequence[str]) -> bool:
        from omegaconf import DictConfig

        node = self.base
        for seg in segments:
            if not isinstance(node, DictConfig) or seg not in node.keys():  # noqa: SIM118 - `in` misses a ??? value
                return False
            node = node._get_node(seg)
        return True

    def children(self, path: str, node, kind) -> dict[str, tuple[Any, Any]] | None:
        """The keys allowed right below ``path`` -> (base node, kind) of each; None: any key.
        ``node``: the DictConfig at ``path`` in the base config (None where it has none); ``kind``: what the
        parent's dataclass says the section is (a dataclass, _FREE, _LEAF or None)."""
        from omegaconf import DictConfig

        if kind == _FREE or path in FREE_FORM_MAPS:
            return None
        target = self.value(f"{path}._target_" if path else "_target_")
        if target:
            kind = _dataclass_of(str(target))
            if kind is None:
                return None
        if path == "data" and self.value("data.custom_cls.path"):
            return None
        if isinstance(node, DictConfig) and len(node) == 0 and not dataclasses.is_dataclass(kind):
            return None
        fields = _field_kinds(kind) if dataclasses.is_dataclass(kind) else {}
        out: dict[str, tuple[Any, Any]] = {}
        if isinstance(node, DictConfig):
            for key in node:
                child = node._get_node(key)
                out[str(key)] = (child if isinstance(child, DictConfig) and not child._is_none() else None,
                                 fields.get(key))
        for key, field_kind in fields.items():
            out.setdefault(key, (None, field_kind))
        for key in KEYS_READ_OUTSIDE_THE_YAML.get(path, ()):
            out.setdefault(key, (None, _LEAF))
        for free in FREE_FORM_MAPS:
            parent, _, key = free.rpartition(".")
            if parent == path:
                out.setdefault(key, (None, _FREE))
        return out

    def _walk(self, segments: Sequence[str]) -> tuple[int, dict] | None:
        """None when verl reads the key; else (index of the first unknown segment, the keys allowed there)."""
        path, node, kind = "", self.base, None
        for i, seg in enumerate(segments):
            kids = {} if kind == _LEAF and node is None else self.children(path, node, kind)
            if kids is None:
                return None
            if seg not in kids:
                return i, kids
            node, kind = kids[seg]
            path = f"{path}.{seg}" if path else seg
        return None

    def known(self, segments: Sequence[str]) -> bool:
        return self._walk(segments) is None

    def nearest(self, segments: Sequence[str]) -> str | None:
        """The existing key nearest to a misspelt one, segment by segment (difflib); None when a segment has
        no close match."""
        miss = self._walk(segments)
        if miss is None:
            return None
        i, kids = miss
        fixed = list(segments[:i])
        for seg in segments[i:]:
            if kids is None:  # below a free-form map: the rest stays as written
                fixed.append(seg)
                continue
            match = seg if seg in kids else next(iter(difflib.get_close_matches(seg, list(kids), n=1)), None)
            if match is None:
                return None
            fixed.append(match)
            node, kind = kids[match]
            kids = {} if kind == _LEAF and node is None else self.children(".".join(fixed), node, kind)
        return ".".join(fixed)


def check_keys(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Every key an override names -> (problems, the overrides refused), one problem per refused override.

    ``+key`` / ``++key`` that verl would never read (see :class:`KeyCheck`): Hydra composes it and verl
    silently keeps its default, so it is refused here, naming the nearest existing key. A plain ``key=value``
    on a key that does not exist is one Hydra refuses too; it is reported the same way rather than with
    Hydra's advice to add ``+`` (which would make the typo pass), or, for a key verl does read but its yaml
    lacks, with that advice. ``hydra.*`` keys are Hydra's own and not checked; overrides Hydra cannot parse
    are left to :func:`compose` to report."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.append((text, parser.parse_override(text)))
        except Exception:  # noqa: BLE001, S112 - compose() reports what Hydra cannot parse
            continue
    defaults = tuple(t for t, o in parsed if _is_defaults_override(o) and not _is_hydra_key(o.key_or_group))
    try:
        base = _base_config(defaults)
    except Exception:  # noqa: BLE001 - compose() reports it
        return [], []
    values = {}
    for _, o in parsed:
        if o.type != OverrideType.DEL and not _is_defaults_override(o):
            try:
                values[o.key_or_group] = o.value()
            except Exception:  # noqa: BLE001, S110 - compose() reports it
                pass
    keys = KeyCheck(base, values)

    problems, refused, earlier = [], [], []
    for text, o in parsed:
        key = o.key_or_group
        if o.type == OverrideType.DEL or _is_defaults_override(o) or _is_hydra_key(key):
            continue
        segments = key.split(".")
        new = o.type in (OverrideType.ADD, OverrideType.FORCE_ADD)
        if keys.exists(segments) or (not new and any(key == k or key.startswith(k + ".") for k in earlier)):
            earlier.append(key)
        elif keys.known(segments):
            if new:
                earlier.append(key)
            else:  # Hydra refuses a key its yaml lacks, however legitimate
                problems.append(f"{text}: verl's yaml has no key {key} to set, though verl reads it; "
                                f"add it with + (+{text})")
                refused.append(text)
        else:
            nearest = keys.nearest(segments)
            hint = f" (did you mean {nearest}?)" if nearest else ""
            problems.append(f"{text}: verl has no key {key}{hint}" + ("; a new key would be ignored" if new else ""))
            refused.append(text)
    return problems, refused


def _one_line(exc: BaseException) -> str:
    return " ".join(m.strip() for m in str(exc).strip().splitlines())


def _try(problems: list[str], what: str, fn) -> Any:
    """Run ``fn``; a failure becomes one line of ``problems``. A Hydra InstantiationException is reported by
    the error of the constructor it wraps (``ValueError: width='abc' is not allowed ...``) and the config key;
    the same error reached a second way (the dataclasses, then validate_config) is reported once."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reported problem
        detail = f"{type(exc).__name__}: {_one_line(exc)}"
        cause = exc.__cause__
        if type(exc).__name__ == "InstantiationException" and cause is not None:
            key = re.search(r"full_key: (\S+)", str(exc))
            detail = (f"{key.group(1)}: " if key else "") + f"{type(cause).__name__}: {_one_line(cause)}"
        detail = detail[:600]
        if not any(p.endswith(detail) for p in problems):
            problems.append(f"{what}: {detail}")
        return None


@dataclass
class Launch:
    """A composed config, the dataclasses verl built from it, and the numbers the checks compare.

    Each number is read from the config here, once; a check reads it by name."""

    cfg: Any
    actor: Any = None  # verl's ActorConfig, None when it did not build
    rollout: Any = None  # verl's RolloutConfig, None when it did not build
    comparison_invariants: bool = True

    def get(self, key: str, default=None):
        from omegaconf import OmegaConf

        return OmegaConf.select(self.cfg, key, default=default)

    @cached_property
    def mode(self) -> str | None:
        return self.get("trainer.v1.trainer_mode")

    @property
    def separate(self) -> bool:
        return self.mode == "separate_async"

    @cached_property
    def train_batch(self) -> int:
        return int(self.get("data.train_batch_size"))

    @cached_property
    def mini_batch(self) -> int:
        return int(self.get("actor_rollout_ref.actor.ppo_mini_batch_size"))

    @cached_property
    def n(self) -> int:
        return int(self.get("actor_rollout_ref.rollout.n"))

    @cached_property
    def parameter_sync_step(self) -> int:
        if self.mode not in TRAINER_MODES:
            return 1
        return int(self.get(f"trainer.v1.{self.mode}.parameter_sync_step", 1) or 1)

    @cached_property
    def hybrid(self) -> bool:
        return bool(self.get("actor_rollout_ref.hybrid_engine", True))

    @cached_property
    def trainer_nodes(self) -> int:
        return int(self.get("trainer.nnodes"))

    @cached_property
    def trainer_gpus_per_node(self) -> int:
        return int(self.get("trainer.n_gpus_per_node"))

    @property
    def trainer_gpus(self) -> int:
        return self.trainer_nodes * self.trainer_gpus_per_node

    @cached_property
    def rollout_nodes(self) -> int:
        return int(self.get("actor_rollout_ref.rollout.nnodes", 0) or 0)

    @cached_property
    def rollout_gpus_per_node(self) -> int:
        return int(self.get("actor_rollout_ref.rollout.n_gpus_per_node", 0) or 0)

    @cached_property
    def rollout_parallel(self) -> tuple[int, int, int]:
        """The rollout's (tensor, data, pipeline) parallel sizes."""
        return tuple(
            int(self.get(f"actor_rollout_ref.rollout.{kind}_parallel_size", 1))
            for kind in ("tensor_model", "data", "pipeline_model")
        )

    @cached_property
    def bypass(self) -> bool:
        return bool(self.get("algorithm.rollout_correction.bypass_mode", False))


# ---- the start-up assertions of verl's v1 trainers and workers that validate_config does not make ----
def loss_is_registered(c: Launch) -> Iterator[str]:
    """core_algos.get_policy_loss_fn: the loss mode is in verl's registry (plugins loaded)."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    problems: list[str] = []
    loss_mode = c.get("actor_rollout_ref.actor.policy_loss.loss_mode")
    _try(problems, f"policy loss {loss_mode!r} (core_algos.get_policy_loss_fn)", lambda: get_policy_loss_fn(loss_mode))
    yield from problems


def is_reshape_knobs_reach_the_loss(c: Launch) -> Iterator[str]:
    """loss_mode=is_reshape with verl's own PolicyLossConfig would silently drop every IS Reshape knob."""
    if c.actor is None or c.get("actor_rollout_ref.actor.policy_loss.loss_mode") != "is_reshape":
        return
    if type(c.actor.policy_loss).__name__ != "ISReshapeLossConfig":
        target = c.get("actor_rollout_ref.actor.policy_loss._target_")
        yield (
            f"loss_mode=is_reshape needs actor_rollout_ref.actor.policy_loss._target_="
            f"isreshape_verl.config.ISReshapeLossConfig (got {target!r}); its knobs would be ignored"
        )


def v1_trainer(c: Launch) -> Iterator[str]:
    """trainer_base.get_trainer_cls: the v1 trainers and their three modes."""
    if not bool(c.get("trainer.use_v1", True)):
        yield "trainer.use_v1=False selects the deprecated v0 trainer; the recipes need the v1 trainers"
    if c.mode not in TRAINER_MODES:
        yield f"trainer.v1.trainer_mode={c.mode!r} is not one of {', '.join(TRAINER_MODES)}"


def batch_divides_by_sync_step(c: Launch) -> Iterator[str]:
    """trainer_base.PPOTrainer.step."""
    if c.train_batch % c.parameter_sync_step:
        yield (f"data.train_batch_size ({c.train_batch}) must be divisible by "
               f"parameter_sync_step ({c.parameter_sync_step})")


def off_policy_threshold(c: Launch) -> Iterator[str]:
    """replay_buffer.ReplayBuffer.__init__."""
    threshold = c.get("trainer.v1.sampler.max_off_policy_threshold")
    if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool) or threshold <= 0):
        yield f"trainer.v1.sampler.max_off_policy_threshold={threshold!r} must be a positive int or null"


def custom_sampler_settings(c: Launch) -> Iterator[str]:
    """trainer_base.PPOTrainerBase._build_replay_buffer: a custom sampler is built without the group filter and
    sync_refill_failed_groups, which would then be ignored."""
    if not c.get("trainer.v1.sampler.custom_sampler.name"):
        return
    ignored = [key for key in ("algorithm.filter_groups.enable", "trainer.v1.sampler.sync_refill_failed_groups")
               if c.get(key)]
    if ignored:
        yield (f"{' and '.join(f'{key}=True' for key in ignored)} would be ignored: verl builds the custom sampler "
               f"trainer.v1.sampler.custom_sampler.name={c.get('trainer.v1.sampler.custom_sampler.name')} without "
               "them (DEVICE=cpu sets one: isreshape_verl/cpu/replay_buffer.py)")


def off_policy_strategy(c: Launch) -> Iterator[str]:
    strategy = c.get("trainer.v1.sampler.max_off_policy_strategy")
    if strategy not in ("drop", "wait"):
        yield f"trainer.v1.sampler.max_off_policy_strategy={strategy!r} must be 'drop' or 'wait'"


def hybrid_engine_mode(c: Launch) -> Iterator[str]:
    """ppo_trainer.yaml: hybrid_engine=False only with separate_async."""
    if not c.hybrid and not c.separate:
        yield f"actor_rollout_ref.hybrid_engine=False is only supported by separate_async, not {c.mode!r}"


def separate_async_batch(c: Launch) -> Iterator[str]:
    """trainer_separate_async.PPOTrainerSeparateAsync.__init__ (and the three checks below)."""
    if c.separate and c.train_batch != c.parameter_sync_step * c.mini_batch:
        yield (
            f"separate_async needs data.train_batch_size == trainer.v1.separate_async.parameter_sync_step "
            f"x actor.ppo_mini_batch_size, got {c.train_batch} != {c.parameter_sync_step} x {c.mini_batch}"
        )


def separate_async_rollout_gpus(c: Launch) -> Iterator[str]:
    if c.separate and (c.rollout_nodes <= 0 or c.rollout_gpus_per_node <= 0):
        yield (
            "separate_async needs standalone rollout GPUs: actor_rollout_ref.rollout.nnodes > 0 and "
            f"actor_rollout_ref.rollout.n_gpus_per_node > 0 (got {c.rollout_nodes} x {c.rollout_gpus_per_node})"
        )


def separate_async_weight_sync(c: Launch) -> Iterator[str]:
    if c.separate and c.get("actor_rollout_ref.rollout.checkpoint_engine.backend") == "naive":
        yield (
            "separate_async needs actor_rollout_ref.rollout.checkpoint_engine.backend other than 'naive' "
            "(nccl, nixl, mooncake, ...) to sync weights to the standalone rollout"
        )


def separate_async_reward_pool(c: Launch) -> Iterator[str]:
    if not c.separate:
        return
    from verl.trainer.ppo.utils import need_reward_model

    if need_reward_model(c.cfg) and not c.get("reward.reward_model.enable_resource_pool"):
        yield "separate_async with a reward model needs reward.reward_model.enable_resource_pool=True"


def rollout_parallel_divides_gpus(c: Launch) -> Iterator[str]:
    """engine_workers.ActorRolloutRefWorker: rollout world size divisible by the inference parallel size."""
    tp, dp, pp = c.rollout_parallel
    world = tp * dp * pp
    if c.hybrid and c.trainer_gpus % world:
        yield (
            f"trainer GPUs ({c.trainer_nodes} x {c.trainer_gpus_per_node} = {c.trainer_gpus}) not divisible by "
            f"the rollout's tensor x data x pipeline parallel size ({tp} x {dp} x {pp})"
        )
    if c.separate and c.rollout_nodes * c.rollout_gpus_per_node % world:
        yield (
            f"standalone rollout GPUs ({c.rollout_nodes} x {c.rollout_gpus_per_node}) not divisible by the "
            f"rollout's tensor x data x pipeline parallel size ({tp} x {dp} x {pp})"
        )


def dynamic_batch_flags_match(c: Launch) -> Iterator[str]:
    """engine_workers: the actor's dynamic-batch flag must match the rollout log-prob one."""
    if bool(c.get("actor_rollout_ref.actor.use_dynamic_bsz")) != bool(
        c.get("actor_rollout_ref.rollout.log_prob_use_dynamic_bsz")
    ):
        yield "actor.use_dynamic_bsz must equal rollout.log_prob_use_dynamic_bsz"


def mini_batch_splits_over_data_parallel(c: Launch) -> Iterator[str]:
    """engine_workers.TrainingWorker.train_batch: the global mini-batch splits evenly over data-parallel ranks."""
    sp = int(c.get("actor_rollout_ref.actor.ulysses_sequence_parallel_size", 1) or 1)
    actor_dp = max(c.trainer_gpus // sp, 1)
    sequences = c.mini_batch * c.n
    if sequences % actor_dp:
        yield (
            f"actor mini-batch ppo_mini_batch_size x rollout.n = {c.mini_batch} x {c.n} = {sequences} sequences "
            f"must be divisible by the actor's data-parallel size ({actor_dp})"
        )


def micro_batch_divides_rank_mini_batch(c: Launch) -> Iterator[str]:
    """engine/utils.py prepare_micro_batches (without dynamic batch size): each rank's share of a mini-batch
    is a whole number of micro-batches ("data size must be divisible by ... micro_batch_size_per_gpu")."""
    if c.get("actor_rollout_ref.actor.use_dynamic_bsz"):
        return
    sp = int(c.get("actor_rollout_ref.actor.ulysses_sequence_parallel_size", 1) or 1)
    actor_dp = max(c.trainer_gpus // sp, 1)
    micro = int(c.get("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu") or 0)
    per_rank = c.mini_batch * c.n // actor_dp
    if micro > 0 and per_rank % micro:
        yield (
            f"each data-parallel rank gets ppo_mini_batch_size x rollout.n / {actor_dp} = {per_rank} sequences per "
            f"mini-batch, not a multiple of actor.ppo_micro_batch_size_per_gpu ({micro})"
        )


def train_batch_is_whole_mini_batches(c: Launch) -> Iterator[str]:
    """Recipe rule (not a verl assertion)."""
    if c.train_batch % c.mini_batch:
        yield (
            f"data.train_batch_size ({c.train_batch}) must be a multiple of ppo_mini_batch_size ({c.mini_batch}) "
            "(recipe rule: otherwise every step ends with a short PPO mini-batch)"
        )


def rollout_log_probs_recorded(c: Launch) -> Iterator[str]:
    """Bypass mode reads rollout_log_probs (trainer_base._compute_old_log_prob, rollout_corr_helper);
    the comparison invariants need bypass mode, hence the log-probs too."""
    if (c.bypass or c.comparison_invariants) and not c.get("actor_rollout_ref.rollout.calculate_log_probs"):
        who = "algorithm.rollout_correction.bypass_mode=True needs" if c.bypass else "comparison recipes need"
        yield f"{who} actor_rollout_ref.rollout.calculate_log_probs=True"


def grpo_has_groups(c: Launch) -> Iterator[str]:
    if c.get("algorithm.adv_estimator") == "grpo" and c.n < 2:
        yield f"GRPO needs rollout.n >= 2 answers per prompt for a group baseline (got {c.n})"


def rollout_engine_named(c: Launch) -> Iterator[str]:
    if c.rollout is not None and getattr(c.rollout, "name", None) in (None, "???"):
        yield "actor_rollout_ref.rollout.name must be set (vllm, sglang, or isreshape_hf with DEVICE=cpu)"


STARTUP_CHECKS: tuple[Callable[[Launch], Iterator[str]], ...] = (
    loss_is_registered,
    is_reshape_knobs_reach_the_loss,
    v1_trainer,
    batch_divides_by_sync_step,
    off_policy_threshold,
    off_policy_strategy,
    custom_sampler_settings,
    hybrid_engine_mode,
    separate_async_batch,
    separate_async_rollout_gpus,
    separate_async_weight_sync,
    separate_async_reward_pool,
    rollout_parallel_divides_gpus,
    dynamic_batch_flags_match,
    mini_batch_splits_over_data_parallel,
    micro_batch_divides_rank_mini_batch,
    train_batch_is_whole_mini_batches,
    rollout_log_probs_recorded,
    grpo_has_groups,
    rollout_engine_named,
)


# ---- resources ----
def fits_cluster(c: Launch, cluster_nodes: int, gpus_per_node: int) -> Iterator[str]:
    """The trainer GPUs (and, in separate_async, the standalone rollout's) fit in the cluster."""
    rollout_gpus = c.rollout_nodes * c.rollout_gpus_per_node if c.separate else 0
    need = c.trainer_gpus + rollout_gpus
    have = cluster_nodes * gpus_per_node
    if need > have:
        yield f"the run needs {need} GPUs but the cluster has {cluster_nodes} x {gpus_per_node} = {have}"
    if c.trainer_gpus_per_node > gpus_per_node or (c.separate and c.rollout_gpus_per_node > gpus_per_node):
        yield f"more GPUs per node requested than the {gpus_per_node} a node has"


# ---- this project's comparison invariants (r against the behaviour policy μ, untruncated sampling) ----
def bypass_mode_on(c: Launch) -> Iterator[str]:
    """r against μ (bypass mode), or decoupled mode with a rollout correction (verl's weights or rejection on
    π_old/μ, what ROLLOUT_CORRECTION=<verl preset> sets); a bare decoupled mode would leave π_old/μ uncorrected."""
    if c.bypass:
        return
    corrected = c.get("algorithm.rollout_correction.rollout_is") or c.get("algorithm.rollout_correction.rollout_rs")
    if not corrected:
        yield ("comparison recipes need algorithm.rollout_correction.bypass_mode=True (r against the behaviour "
               "policy) or a rollout correction (rollout_is or rollout_rs set, as ROLLOUT_CORRECTION=<verl preset> "
               "sets); decoupled mode without one leaves π_old/μ uncorrected")


def _number(value) -> float | None:
    """A config value as a number; None for anything else ('abc', a list, a bool)."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def untruncated_sampling(c: Launch) -> Iterator[str]:
    top_p, top_k = c.get("actor_rollout_ref.rollout.top_p"), c.get("actor_rollout_ref.rollout.top_k")
    if _number(top_p) != 1.0 or _number(top_k) != -1:
        yield (
            f"comparison recipes need top_p=1 and top_k=-1 (got top_p={top_p}, top_k={top_k}): "
            "truncated sampling makes the rollout log-probs those of another distribution and biases r"
        )


def positive_temperature(c: Launch) -> Iterator[str]:
    temperature = c.get("actor_rollout_ref.rollout.temperature")
    value = _number(temperature)
    if value is None or not 0 < value < float("inf"):
        yield (f"actor_rollout_ref.rollout.temperature={temperature!r} is not allowed; "
               "it must be a finite number > 0 (on-policy sampling)")


COMPARISON_CHECKS: tuple[Callable[[Launch], Iterator[str]], ...] = (
    bypass_mode_on,
    untruncated_sampling,
    positive_temperature,
)


def build_dataclasses(c: Launch, problems: list[str]) -> None:
    """Build the dataclasses verl builds at start-up (the IS Reshape knobs are range-checked here)."""
    from verl.utils.config import omega_conf_to_dataclass

    c.actor = _try(problems, "actor_rollout_ref.actor -> dataclass",
                   lambda: omega_conf_to_dataclass(c.cfg.actor_rollout_ref.actor))
    c.rollout = _try(problems, "actor_rollout_ref.rollout -> dataclass",
                     lambda: omega_conf_to_dataclass(c.cfg.actor_rollout_ref.rollout))
    _try(problems, "algorithm -> dataclass", lambda: omega_conf_to_dataclass(c.cfg.algorithm))


def run_verl_validation(c: Launch, problems: list[str]) -> None:
    """verl.utils.config.validate_config, as main_ppo calls it."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        use_critic = need_critic(c.cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # verl prints its own "checks passed" line
        _try(problems, "verl.utils.config.validate_config",
             lambda: validate_config(c.cfg, use_reference_policy=need_reference_policy(c.cfg), use_critic=use_critic))


def check_config(
    cfg,
    *,
    comparison_invariants: bool = True,
    cluster_nodes: int | None = None,
    gpus_per_node: int | None = None,
) -> CheckResult:
    """Check a composed verl config; raise :class:`RecipeCheckError` listing every problem.

    ``comparison_invariants``: also enforce this project's comparison invariants (see module docstring).
    ``cluster_nodes`` / ``gpus_per_node``: when given, the trainer (and, in separate_async,
    the standalone rollout) GPUs must fit in that cluster.
    """
    problems: list[str] = []
    result = CheckResult(cfg)
    launch = Launch(cfg, comparison_invariants=comparison_invariants)

    build_dataclasses(launch, problems)
    result.checked.append("omega_conf_to_dataclass(actor, rollout, algorithm)")
    run_verl_validation(launch, problems)
    result.checked.append("validate_config")
    for check in STARTUP_CHECKS:
        problems.extend(check(launch))
    result.checked.append("v1 trainer / worker start-up assertions")
    if cluster_nodes is not None and gpus_per_node is not None:
        problems.extend(fits_cluster(launch, cluster_nodes, gpus_per_node))
        result.checked.append(f"fits {cluster_nodes} x {gpus_per_node} GPUs")
    if comparison_invariants:
        for check in COMPARISON_CHECKS:
            problems.extend(check(launch))
        result.checked.append("comparison invariants (bypass_mode or a rollout correction, rollout log-probs, "
                              "top_p=1, top_k=-1)")

    if problems:
        raise RecipeCheckError(problems)
    return result


def check_overrides(
    overrides: Sequence[str],
    *,
    comparison_invariants: bool = True,
    cluster_nodes: int | None = None,
    gpus_per_node: int | None = None,
) -> CheckResult:
    """Check the keys the overrides name (:func:`check_keys`), compose the others with verl's ``ppo_trainer``
    config and :func:`check_config` it; raise :class:`RecipeCheckError` listing every problem.

    A refused override is left out of the composition, so the rest is checked as it would run (and a
    misspelt IS Reshape key is reported once, by name, not again by the dataclass it would break). Any other
    composition error (a value Hydra cannot parse, ``+`` on a key that exists) is reported as Hydra words it."""
    problems, refused = check_keys(overrides)
    try:
        cfg = compose([o for o in overrides if o not in refused])
    except Exception as exc:  # noqa: BLE001
        problems.append(f"Hydra could not compose the overrides: {type(exc).__name__}: {_one_line(exc)}")
        raise RecipeCheckError(problems) from exc
    try:
        result = check_config(
            cfg, comparison_invariants=comparison_invariants, cluster_nodes=cluster_nodes, gpus_per_node=gpus_per_node
        )
    except RecipeCheckError as exc:
        raise RecipeCheckError([*problems, *exc.problems]) from None
    if problems:
        raise RecipeCheckError(problems)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m isreshape_verl.recipe_check",
        description="Compose verl main_ppo overrides with verl's ppo_trainer config and check them "
        "(dataclasses, validate_config, v1 trainer start-up assertions, comparison invariants).",
    )
    parser.add_argument("--cluster-nodes", type=int, default=None, help="nodes available (checks the GPUs fit)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node available")
    parser.add_argument(
        "--no-comparison-invariants",
        action="store_true",
        help="skip this project's comparison invariants (bypass_mode, rollout log-probs, top_p, top_k)",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    parser.add_argument("--one-line", action="store_true",
                        help="on failure print one line: 'recipe check failed: PROBLEM | PROBLEM ...'")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides as passed to verl.trainer.main_ppo")
    return parser


def _report(problems: Sequence[str], one_line: bool) -> None:
    if one_line:
        print("recipe check failed: " + " | ".join(problems), file=sys.stderr)
    else:
        print(RecipeCheckError(problems), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = check_overrides(
            args.overrides,
            comparison_invariants=not args.no_comparison_invariants,
            cluster_nodes=args.cluster_nodes,
            gpus_per_node=args.gpus_per_node,
        )
    except RecipeCheckError as exc:
        _report(exc.problems, args.one_line)
        return 1
    if not args.quiet:
        print("recipe check OK: " + "; ".join(result.checked))
    return 0


if __name__ == "__main__":
    sys.exit(main())
