"""verl-facing hyperparameters of the `is_reshape` policy loss.

Select them in verl's Hydra config with

    actor_rollout_ref.actor.policy_loss._target_=isreshape_verl.config.ISReshapeLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=is_reshape
    +actor_rollout_ref.actor.policy_loss.kernel=laplace ...

The fields, their meaning and ranges are those of `isreshape_verl.reshape.ISReshapeParams` (the
plain-torch definition, documented there); this class only adds verl's `PolicyLossConfig` base so
that Hydra's `_target_` swap and `omega_conf_to_dataclass` accept our keys.

`loss_mode` must stay "is_reshape": with another mode verl would run that loss and silently ignore
every IS Reshape key. verl 0.9.1 builds this class only through `omega_conf_to_dataclass` (Hydra
`instantiate` with the composed keys, loss_mode among them, as constructor arguments) and never
assigns loss_mode on the built dataclass (its configs are frozen). The one place verl rewrites
loss_mode, `rollout_corr_helper.apply_bypass_mode` ("bypass_mode"), edits the driver's DictConfig in
the v0 trainer (`ray_trainer.py`) and the experimental separation trainer, not the v1 trainers the
recipes use (their bypass mode only copies rollout_log_probs to old_log_probs).
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
        if self.loss_mode != "is_reshape":
            raise ValueError(
                f"loss_mode={self.loss_mode!r} is not allowed for ISReshapeLossConfig; it must be 'is_reshape' "
                "(another loss_mode would train that loss and ignore every IS Reshape key)"
            )
        ISReshapeParams.__post_init__(self)

    def reshape_params(self) -> ISReshapeParams:
        """The plain-torch parameters (drops verl's own policy-loss fields)."""
        return ISReshapeParams(**{name: getattr(self, name) for name in ISReshapeParams.__dataclass_fields__})
