"""Loss specs: one small syntax, shared by every command, for a verl policy loss and its settings.

    MODE[:KEY=VALUE,KEY=VALUE,...]

    vanilla                                   GRPO's PPO-clip (verl `vanilla`)
    vanilla:clip_ratio=0.2                    sets clip_ratio_low and clip_ratio_high too, unless given
    sapo:tau_pos=1,tau_neg=1.05               SAPO (verl `sapo`)
    gpg                                       plain REINFORCE on μ's samples (weight 1)
    cispo:clip_ratio_high=4                   CISPO (verl `cispo`)
    is_reshape                                IS Reshape with its defaults
    is_reshape:kernel=gaussian,width=0.5,gamma_mode=fixed,gamma=1

Every spec also accepts `loss_agg_mode` (token-mean | token-sum | seq-mean-token-sum |
seq-mean-token-mean | seq-mean-token-sum-norm). Unknown modes, keys or values fail here, before
any work, with a message listing what is allowed.

`LossSpec.actor_config()` builds verl's own `ActorConfig` and `LossSpec.loss_fn` is the function in
verl's registry, so a caller computes the loss exactly as verl's trainer would:

    spec = parse_loss_spec("sapo:tau_pos=2")
    loss, metrics = spec.loss_fn(old_log_prob=..., log_prob=..., advantages=..., response_mask=...,
                                 loss_agg_mode=spec.loss_agg_mode, config=spec.actor_config())
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from isreshape_verl.kernels import KERNEL_NAMES
from isreshape_verl.reshape import GAMMA_MODES, ISReshapeParams

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# Keys of verl's ActorConfig that each built-in loss reads.
_ACTOR_KEYS = {
    "vanilla": {"clip_ratio": float, "clip_ratio_low": float, "clip_ratio_high": float, "clip_ratio_c": float},
    "sapo": {"tau_pos": float, "tau_neg": float},
    "gpg": {},
    "cispo": {"clip_ratio": float, "clip_ratio_low": float, "clip_ratio_high": float},
}
_RESHAPE_TYPES = {
    "kernel": str,
    "width": float,
    "width_neg": "optional_float",
    "one_sided": bool,
    "gamma_mode": str,
    "gamma": float,
    "gamma_base": float,
    "gamma_max": float,
    "gamma_tau": float,
    "gamma_beta": float,
    "log_ratio_clamp": float,
}
_CHOICES = {"kernel": KERNEL_NAMES, "gamma_mode": GAMMA_MODES, "loss_agg_mode": LOSS_AGG_MODES}
LOSS_MODES = tuple(_ACTOR_KEYS) + ("is_reshape",)

assert set(_RESHAPE_TYPES) == {f.name for f in fields(ISReshapeParams)}, "spec keys out of sync with ISReshapeParams"


def allowed_keys(mode: str) -> dict:
    """Key → type accepted by a mode (including the common `loss_agg_mode`)."""
    keys = dict(_RESHAPE_TYPES) if mode == "is_reshape" else dict(_ACTOR_KEYS[mode])
    keys["loss_agg_mode"] = str
    return keys


def _parse_value(mode: str, key: str, text: str, kind):
    where = f"in loss spec {mode}:{key}={text}"
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{key}={text!r} is not a boolean {where}; allowed: true, false")
    if kind == "optional_float" and text.lower() in ("none", "null"):
        return None
    if kind in (float, "optional_float"):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{key}={text!r} is not a number {where}") from None
        if not math.isfinite(value):
            raise ValueError(f"{key}={text!r} must be finite {where}")
        return value
    if key in _CHOICES and text not in _CHOICES[key]:
        raise ValueError(f"{key}={text!r} is not allowed {where}; allowed: {', '.join(_CHOICES[key])}")
    return text


def _format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value).removesuffix(".0") if value.is_integer() else repr(value)
    return str(value)


@dataclass(frozen=True)
class LossSpec:
    """A parsed loss spec: a verl registry name and the settings that differ from its defaults."""

    mode: str
    overrides: tuple[tuple[str, object], ...] = ()

    def __str__(self) -> str:
        if not self.overrides:
            return self.mode
        return self.mode + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in self.overrides)

    @property
    def label(self) -> str:
        """A short name for tables and plots (the canonical spec text)."""
        return str(self)

    @property
    def loss_agg_mode(self) -> str:
        return dict(self.overrides).get("loss_agg_mode", "token-mean")

    @property
    def loss_fn(self):
        """The policy-loss function registered in verl under this mode."""
        import verl  # noqa: F401  (loads the plugin entry points, registering is_reshape)
        from verl.trainer.ppo.core_algos import get_policy_loss_fn

        return get_policy_loss_fn(self.mode)

    def actor_config(self):
        """verl's ActorConfig with this spec's settings (policy_loss is ISReshapeLossConfig for is_reshape)."""
        from verl.workers.config.actor import ActorConfig, PolicyLossConfig

        settings = dict(self.overrides)
        loss_agg_mode = settings.pop("loss_agg_mode", "token-mean")
        if self.mode == "is_reshape":
            from isreshape_verl.config import ISReshapeLossConfig

            policy_loss, actor_settings = ISReshapeLossConfig(**settings), {}
        else:
            policy_loss, actor_settings = PolicyLossConfig(loss_mode=self.mode), settings
            if "clip_ratio" in actor_settings:
                for side in ("clip_ratio_low", "clip_ratio_high"):
                    actor_settings.setdefault(side, actor_settings["clip_ratio"])
        return ActorConfig(
            strategy="fsdp",
            rollout_n=1,
            ppo_mini_batch_size=1,
            ppo_micro_batch_size_per_gpu=1,
            loss_agg_mode=loss_agg_mode,
            policy_loss=policy_loss,
            **actor_settings,
        )


def parse_loss_spec(text: str) -> LossSpec:
    """Parse `MODE[:KEY=VALUE,...]`; raises ValueError naming the bad part and what is allowed."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty loss spec {text!r}; expected MODE[:KEY=VALUE,...] with MODE in {', '.join(LOSS_MODES)}")
    mode, _, rest = text.strip().partition(":")
    mode = mode.strip()
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss {mode!r} in spec {text!r}; allowed: {', '.join(LOSS_MODES)}")
    keys = allowed_keys(mode)
    overrides: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not value.strip():
            raise ValueError(f"{item!r} in loss spec {text!r} is not KEY=VALUE")
        if key not in keys:
            allowed = ", ".join(keys) if keys else "(none)"
            raise ValueError(f"unknown key {key!r} for loss {mode!r} in spec {text!r}; allowed: {allowed}")
        if key in overrides:
            raise ValueError(f"key {key!r} given twice in loss spec {text!r}")
        overrides[key] = _parse_value(mode, key, value.strip(), keys[key])
    spec = LossSpec(mode, tuple(overrides.items()))
    if mode == "is_reshape":  # range checks (width > 0, γ in [0, 1], ...) live in one place
        reshape_settings = {k: v for k, v in overrides.items() if k != "loss_agg_mode"}
        try:
            ISReshapeParams(**reshape_settings)
        except ValueError as err:
            raise ValueError(f"{err} (in loss spec {text!r})") from None
    return spec


def parse_loss_specs(texts) -> list[LossSpec]:
    """Parse several specs (e.g. argparse `nargs='+'`), rejecting duplicates."""
    specs = [parse_loss_spec(t) for t in texts]
    seen = set()
    for spec in specs:
        if str(spec) in seen:
            raise ValueError(f"loss spec {str(spec)!r} is given twice")
        seen.add(str(spec))
    return specs
