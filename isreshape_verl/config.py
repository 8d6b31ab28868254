"""verl-facing hyperparameters of the `is_reshape` policy loss.

Select them in verl's Hydra config with

    actor_rollout_ref.actor.policy_loss._target_=isreshape_verl.config.ISReshapeLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=is_reshape
    +actor_rollout_ref.actor.policy_loss.kernel=laplace ...

The fields, their meaning and ranges are those of `isreshape_verl.reshape.ISReshapeParams` (the
plain-torch definition, documented there); this class only adds verl's `PolicyLossConfig` base so
that Hydra's `_target_` swap and `omega_conf_to_dataclass` accept our keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from verl.workers.config.actor import PolicyLossConfig

from isreshape_verl.reshape import ISReshapeParams


@dataclass
class ISReshapeLossConfig(PolicyLossConfig, ISReshapeParams):
    """verl's PolicyLossConfig plus the IS Reshape fields of `ISReshapeParams` (validated on construction)."""

    loss_mode: str = "is_reshape"

    def __post_init__(self):
        ISReshapeParams.__post_init__(self)

    def reshape_params(self) -> ISReshapeParams:
        """The plain-torch parameters (drops verl's own policy-loss fields)."""
        return ISReshapeParams(**{name: getattr(self, name) for name in ISReshapeParams.__dataclass_fields__})
