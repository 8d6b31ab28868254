"""Loss specs: one small syntax, shared by every command, for a verl policy loss and its settings.

    MODE[:KEY=VALUE,KEY=VALUE,...]

    vanilla                                   GRPO's PPO-clip (verl `vanilla`)
    dppo_tv                                   DPPO-Binary-TV (verl `dppo_tv`, prime-rl's default loss)
    vanilla:clip_ratio=0.2                    sets clip_ratio_low and clip_ratio_high too, unless given
    sapo:tau_pos=1,tau_neg=1.05               SAPO (verl `sapo`)
    gpg                                       plain REINFORCE on μ's samples (weight 1)
    cispo:clip_ratio_high=4                   CISPO (verl `cispo`)
    is_reshape                                IS Reshape with its defaults
    is_reshape:kernel=gaussian,width=0.5,gamma_mode=fixed,gamma=1
    is_reshape:width_mode=adaptive,width_target=0.01

MODE is any loss in verl's policy-loss registry. The options of verl's built-in losses are range-checked
here (clip ratios > 0, vanilla's dual-clip bound > 1, SAPO's τ > 0, ...); a loss another plugin registers
takes `loss_agg_mode` only.

Every spec also accepts `loss_agg_mode` (token-mean | token-sum | seq-mean-token-sum |
seq-mean-token-mean | seq-mean-token-sum-norm) and, for the sandbox, `rollout_correction` (bypass, the
default: r = π_θ/μ; or one of verl's decoupled presets, `isreshape_verl.rollout_correction`: r = π_θ/π_old
and verl's weights on π_old/μ), with `rollout_is_threshold` replacing the preset's threshold:

    vanilla:rollout_correction=decoupled_token_is                      GRPO + token TIS (C = 2, verl's)
    vanilla:rollout_correction=decoupled_token_icepop,rollout_is_threshold=0.5_2
    is_reshape:rollout_correction=decoupled_token_is
 Unknown modes, keys or values fail here, before
any work, with a message listing what is allowed.

`LossSpec.actor_config()` builds verl's own `ActorConfig` and `LossSpec.loss_fn` is the function in
verl's registry, so a caller computes the loss exactly as verl's trainer would:

    spec = parse_loss_spec("sapo:tau_pos=2")
    loss, metrics = spec.loss_fn(old_log_prob=..., log_prob=..., advantages=..., response_mask=...,
                                 loss_agg_mode=spec.loss_agg_mode, config=spec.actor_config())

The dependency goes one way: this module reads verl's registry as any verl user does and never imports
`isreshape_verl.verl_loss`, which registers `is_reshape` through verl's plugin entry point and imports
nothing from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from isreshape_verl.kernels import KERNEL_NAMES
from isreshape_verl.reshape import GAMMA_MODES, LOSS_AGG_MODES, WIDTH_MODES, ISReshapeParams
from isreshape_verl.rollout_correction import CORRECTIONS


def _positive(v):
    return v > 0


def _share(v):
    return 0 < v <= 1


def _non_negative(v):
    return v >= 0


# The options of verl's built-in losses: key → (type, range check, the range in words). Keys live on verl's
# ActorConfig (clip ratios, SAPO's τ) or PolicyLossConfig (clip_cov_*, kl_cov_ratio, ppo_kl_coef, dro_beta).
_CLIP = {
    "clip_ratio": (float, _positive, "> 0"),
    "clip_ratio_low": (float, _positive, "> 0"),
    "clip_ratio_high": (float, _positive, "> 0"),
}
_BUILTIN_KEYS = {
    "vanilla": {**_CLIP, "clip_ratio_c": (float, lambda v: v > 1, "> 1 (dual-clip bound)")},
    "dppo_tv": {**_CLIP, "clip_ratio_c": (float, _positive, "> 0 (truncation of the IS weight)")},
    "dppo_kl": {**_CLIP, "clip_ratio_c": (float, _positive, "> 0 (truncation of the IS weight)")},
    "gspo": dict(_CLIP),
    "sapo": {"tau_pos": (float, _positive, "> 0"), "tau_neg": (float, _positive, "> 0")},
    "gpg": {},
    "clip_cov": {**_CLIP, "clip_cov_ratio": (float, _share, "in (0, 1]"), "clip_cov_lb": (float, _positive, "> 0"),
                 "clip_cov_ub": (float, _positive, "> 0")},
    "kl_cov": {"kl_cov_ratio": (float, _share, "in (0, 1]"), "ppo_kl_coef": (float, _non_negative, ">= 0")},
    "geo_mean": dict(_CLIP),
    "dro": {"dro_beta": (float, _positive, "> 0")},
    "cispo": dict(_CLIP),
}
_REQUIRED_KEYS = {"dro": ("dro_beta",)}  # options without a default in verl
_POLICY_LOSS_KEYS = {"clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef", "dro_beta"}
# Registered in verl but not a loss a spec can select: the driver's rollout-correction dispatcher.
_NOT_SPEC_LOSSES = {"bypass_mode": "it is verl's rollout-correction dispatcher, set by algorithm.rollout_correction"}


def _reshape_keys() -> dict:
    """ISReshapeParams' fields with their types (ranges are checked by ISReshapeParams itself)."""
    kinds = {"str": str, "float": float, "float | None": "optional_float", "bool": bool}
    return {f.name: (kinds[str(f.type)], None, "") for f in fields(ISReshapeParams)}


_CHOICES = {"kernel": KERNEL_NAMES, "gamma_mode": GAMMA_MODES, "width_mode": WIDTH_MODES,
            "loss_agg_mode": LOSS_AGG_MODES, "rollout_correction": CORRECTIONS}
ARM_KEYS = ("loss_agg_mode", "rollout_correction", "rollout_is_threshold")
"""Keys of every spec that are not the loss's own settings: how tokens are aggregated and corrected."""
LOSS_MODES = tuple(_BUILTIN_KEYS) + ("is_reshape",)  # the modes a spec names without consulting verl


def registered_losses() -> tuple[str, ...]:
    """Every policy loss in verl's registry that a spec can select (imports verl and its plugins, this
    package's `is_reshape` among them)."""
    import verl  # noqa: F401  (loads the plugin entry points, as for any verl user)
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    return tuple(name for name in POLICY_LOSS_REGISTRY if name not in _NOT_SPEC_LOSSES)


def allowed_keys(mode: str) -> dict:
    """Key → (type, range check or None, range in words) accepted by a mode, `loss_agg_mode` included.

    A loss registered in verl by someone else (not one of verl's built-ins) takes `loss_agg_mode` only.
    """
    keys = _reshape_keys() if mode == "is_reshape" else dict(_BUILTIN_KEYS.get(mode, {}))
    keys["loss_agg_mode"] = (str, None, "")
    keys["rollout_correction"] = (str, None, "")
    keys["rollout_is_threshold"] = ("threshold", _threshold_ok,
                                    "a number > 0 (TIS) or lo_hi with 0 < lo <= hi (IcePop)")
    return keys


def _threshold_ok(value) -> bool:
    """verl's own parser of rollout_is_threshold decides (a float: TIS's C; "lo_hi": IcePop's band)."""
    from verl.trainer.ppo.rollout_corr_helper import _parse_rollout_is_threshold

    try:
        _parse_rollout_is_threshold(value)
    except (ValueError, TypeError):
        return False
    return True


def _parse_value(mode: str, key: str, text: str, kind):
    where = f"in loss spec {mode}:{key}={text}"
    if kind == "threshold":  # "0.5_2" is IcePop's band, not Python's 0.52
        try:
            return text if "_" in text else float(text)
        except ValueError:
            return text
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

    def reshape_params(self) -> ISReshapeParams:
        """The ISReshapeParams of an is_reshape spec: its settings over the package defaults."""
        if self.mode != "is_reshape":
            raise ValueError(f"loss {self.mode!r} has no IS Reshape parameters")
        return ISReshapeParams(**{k: v for k, v in self.overrides if k not in ARM_KEYS})

    @property
    def rollout_correction(self) -> str:
        """`bypass` (r = π_θ/μ) or a verl decoupled preset (r = π_θ/π_old, verl's weights on π_old/μ)."""
        return dict(self.overrides).get("rollout_correction", "bypass")

    @property
    def rollout_is_threshold(self):
        """The threshold replacing the preset's, or None (the preset's own)."""
        return dict(self.overrides).get("rollout_is_threshold")

    @property
    def is_package_default(self) -> bool:
        """True for is_reshape with every setting at the package default, however many the spec spells out
        (`is_reshape` and `is_reshape:kernel=laplace,...` with the default values alike)."""
        return (self.mode == "is_reshape" and self.reshape_params() == ISReshapeParams()
                and self.loss_agg_mode == LossSpec(self.mode).loss_agg_mode and self.rollout_correction == "bypass")

    def drawn_at_fixed_width(self) -> "LossSpec":
        """This loss with `width_mode=adaptive` replaced by its widest fixed width (the one an on-policy
        batch gets), for plots of g(r): an adaptive width depends on the whole batch, so a curve read off
        one synthetic batch of ratios would show an arbitrary width. Any other spec is returned unchanged."""
        if self.mode != "is_reshape":
            return self
        settings = dict(self.overrides)
        params = self.reshape_params()
        if params.width_mode != "adaptive":
            return self
        scale = params.widest / params.width
        settings.update(width_mode="fixed", width=params.widest)
        if params.width_neg is not None:
            settings["width_neg"] = params.width_neg * scale
        return LossSpec(self.mode, tuple(settings.items()))

    @property
    def loss_fn(self):
        """The policy-loss function registered in verl under this mode.

        Looked up as any verl user would: `import verl` loads the `verl.plugins` entry points, which
        register `is_reshape` (`isreshape_verl.verl_loss`). With discovery off
        (`VERL_USE_EXTERNAL_PLUGINS=none`) the error says how to load it.
        """
        import verl  # noqa: F401  (loads the plugin entry points, as for any verl user)
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn

        if self.mode == "is_reshape" and self.mode not in POLICY_LOSS_REGISTRY:
            raise ValueError("is_reshape is not in verl's policy-loss registry: verl's plugin discovery is off "
                             "(VERL_USE_EXTERNAL_PLUGINS); allow the is_reshape plugin, or import "
                             "isreshape_verl.verl_loss first")
        return get_policy_loss_fn(self.mode)

    def actor_config(self):
        """verl's ActorConfig with this spec's settings (policy_loss is ISReshapeLossConfig for is_reshape)."""
        from verl.workers.config.actor import ActorConfig, PolicyLossConfig

        settings = dict(self.overrides)
        loss_agg_mode = settings.pop("loss_agg_mode", "token-mean")
        for key in ARM_KEYS:
            settings.pop(key, None)
        if self.mode == "is_reshape":
            from isreshape_verl.config import ISReshapeLossConfig

            policy_loss, actor_settings = ISReshapeLossConfig(**settings), {}
        else:
            loss_settings = {k: v for k, v in settings.items() if k in _POLICY_LOSS_KEYS}
            actor_settings = {k: v for k, v in settings.items() if k not in _POLICY_LOSS_KEYS}
            policy_loss = PolicyLossConfig(loss_mode=self.mode, **loss_settings)
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
    """Parse `MODE[:KEY=VALUE,...]`; raises ValueError naming the bad part and what is allowed.

    MODE is any policy loss in verl's registry (verl's built-ins, `is_reshape`, or another plugin's).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty loss spec {text!r}; expected MODE[:KEY=VALUE,...] with MODE in {', '.join(LOSS_MODES)}")
    mode, _, rest = text.strip().partition(":")
    mode = mode.strip()
    if mode in _NOT_SPEC_LOSSES:
        raise ValueError(f"loss {mode!r} in spec {text!r} cannot be compared: {_NOT_SPEC_LOSSES[mode]}")
    if mode not in LOSS_MODES and mode not in registered_losses():
        raise ValueError(f"unknown loss {mode!r} in spec {text!r}; allowed (verl's registry): "
                         f"{', '.join(registered_losses())}")
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
        kind, check, allowed_range = keys[key]
        overrides[key] = _parse_value(mode, key, value.strip(), kind)
        if check is not None and not check(overrides[key]):
            raise ValueError(f"{key}={value.strip()} is not allowed in loss spec {text!r}; it must be {allowed_range}")
    missing = [key for key in _REQUIRED_KEYS.get(mode, ()) if key not in overrides]
    if missing:
        raise ValueError(f"loss {mode!r} needs {', '.join(missing)} (verl has no default) in spec {text!r}")
    if mode == "clip_cov" and overrides.get("clip_cov_lb", 1.0) >= overrides.get("clip_cov_ub", 5.0):
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub in loss spec {text!r} (verl's defaults: 1 and 5)")
    if overrides.get("rollout_correction") == "bypass":  # the default, spelt out: one canonical label
        del overrides["rollout_correction"]
    if "rollout_is_threshold" in overrides:
        from isreshape_verl.rollout_correction import PRESETS, preset_settings

        weighted = [name for name in PRESETS if preset_settings(name)["rollout_is"] is not None]
        if overrides.get("rollout_correction") not in weighted:
            raise ValueError(f"rollout_is_threshold in loss spec {text!r} needs a rollout_correction with IS weights "
                             f"({', '.join(weighted)})")
    spec = LossSpec(mode, tuple(overrides.items()))
    if mode == "is_reshape":  # range checks (width > 0, γ in [0, 1], ...) live in one place
        reshape_settings = {k: v for k, v in overrides.items() if k not in ARM_KEYS}
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
