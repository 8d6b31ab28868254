"""Rollout correction: which of verl 0.9.1's modes an arm uses, and its weights, from verl's own code.

Three policies take part: μ, the rollout (behaviour) policy whose log-probs the sampler recorded; π_old, the
trainer's weights when an RL step starts; π_θ, the weights being optimised.

    bypass              old_log_prob = log μ: the loss's ratio is r = π_θ/μ, no extra weights
                        (`algorithm.rollout_correction.bypass_mode=True`, this project's default)
    decoupled_<preset>  old_log_prob = log π_old, recomputed by the trainer before the update: r = π_θ/π_old,
                        and each token's loss is multiplied by a weight w computed on ρ = π_old/μ
                        (`verl.trainer.ppo.rollout_corr_helper`), or its token/sequence dropped from the mask:

        TIS, token      (rollout_is=token, threshold C)        w_t = min(ρ_t, C)
        IcePop, token   (rollout_is=token, threshold "lo_hi")  w_t = ρ_t · 1[lo ≤ ρ_t ≤ hi]
        sequence        (rollout_is=sequence)                  w_t = min(Π_t ρ_t, C) for every token of the response
        rejection       (rollout_rs=...)                       mask_t = 0 where a divergence of ρ is out of bounds

    w is detached (it changes the measure, not the objective). verl computes it once per RL step, on π_old.

The decoupled presets are the classmethods of `verl.trainer.config.algorithm.RolloutCorrectionConfig` whose names
start with `decoupled_`; `PRESETS` lists them so that a recipe's dry run needs no verl, and a test pins the list
to verl's. Their values (thresholds, modes) are always read from verl's classmethod, never re-typed here.
"""

from __future__ import annotations

import dataclasses

import torch

PRESETS = (
    "decoupled_token_is", "decoupled_seq_is", "decoupled_token_icepop", "decoupled_seq_is_rs", "decoupled_geo_rs",
    "decoupled_geo_rs_seq_tis", "decoupled_geo_rs_token_tis", "decoupled_k3_rs", "decoupled_k3_rs_seq_tis",
    "decoupled_k3_rs_token_tis",
)
"""verl 0.9.1's decoupled presets (RolloutCorrectionConfig classmethods)."""
CORRECTIONS = ("bypass", *PRESETS)
"""What an arm may select: `bypass`, or a decoupled preset."""


def preset_settings(name: str) -> dict:
    """The fields `RolloutCorrectionConfig.<name>()` sets (rollout_is, rollout_is_threshold, rollout_rs, ...,
    bypass_mode, loss_type), read from verl."""
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    if name not in PRESETS:
        raise ValueError(f"rollout correction {name!r} is not a verl decoupled preset ({', '.join(PRESETS)})")
    preset = getattr(RolloutCorrectionConfig, name)()
    return {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset) if not f.name.startswith("_")}


def correction_weights(
    name: str,
    old_log_prob: torch.Tensor,  # (B, T) log π_old, the trainer's recomputed log-probs
    rollout_log_prob: torch.Tensor,  # (B, T) log μ
    response_mask: torch.Tensor,  # (B, T)
    rollout_is_threshold: str | float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """verl's `compute_rollout_correction_and_rejection_mask` with preset `name`'s settings, on plain tensors:
    (the weights w (B, T) to pass as `rollout_is_weights`, or None where the preset sets no rollout_is; the
    response mask after rejection (B, T); verl's `rollout_corr/*` metrics). `rollout_is_threshold` replaces the
    preset's (C for TIS, "lo_hi" for IcePop); None keeps it."""
    from verl.trainer.ppo.rollout_corr_helper import (
        compute_rollout_correction_and_rejection_mask,
    )

    settings = preset_settings(name)
    if rollout_is_threshold is not None:
        settings["rollout_is_threshold"] = rollout_is_threshold
    weights, mask, metrics = compute_rollout_correction_and_rejection_mask(
        old_log_prob=old_log_prob, rollout_log_prob=rollout_log_prob, response_mask=response_mask,
        rollout_is=settings["rollout_is"], rollout_is_threshold=settings["rollout_is_threshold"],
        rollout_is_batch_normalize=settings["rollout_is_batch_normalize"], rollout_rs=settings["rollout_rs"],
        rollout_rs_threshold=settings["rollout_rs_threshold"],
    )
    return (None if weights is None else weights.batch["rollout_is_weights"]), mask, metrics
