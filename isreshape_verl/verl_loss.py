"""The `is_reshape` policy loss, registered in verl's policy-loss registry.

This is the only module that imports verl's loss API. `import verl` loads it through the
`verl.plugins` entry point (in every Ray worker too); `actor_rollout_ref.model.external_lib=isreshape_verl`
loads it through the package's `__init__` when plugin discovery is off.

Per valid token (see `isreshape_verl.reshape` for the math):

    pg_losses = −f(r)·A  [· rollout_is_weights]        ∂/∂log_prob = −g(r, A)·A  [· rollout_is_weights]
    pg_loss   = agg_loss(pg_losses, mask, loss_agg_mode, **config.global_batch_info)

Tokens whose log-probs or advantage are NaN/±Inf are dropped from the mask (loss and gradient 0)
and counted in `actor/is_reshape/nonfinite_frac`, so one bad token cannot poison a whole step.

Metrics (floats, over valid tokens; quadrant "pos" = A > 0, "neg" = A ≤ 0, "up" = r > 1, "down" = r ≤ 1):
    actor/ppo_kl                        mean of −log r (verl's k1 estimate of KL(μ‖π_θ))
    actor/pg_clipfrac                   share of tokens whose kernel factor K(r − 1) < 0.5 (softly clipped)
    actor/is_reshape/weight_mean        mean g
    actor/is_reshape/gamma_mean         mean γ
    actor/is_reshape/ess                (Σg)² / (N·Σg²) ∈ (0, 1]; 1 when every g is equal
    actor/is_reshape/ratio_{min,p01,p50,p99,max}  ratio quantiles (from ≤ 65,536 evenly strided tokens)
    actor/is_reshape/{pos,neg}_{up,down}_{share,weight}  token share and mean g of each quadrant
    actor/is_reshape/nonfinite_frac     share of response tokens dropped for non-finite inputs
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss

from isreshape_verl.reshape import ISReshapeParams, is_reshape_token_loss

LOSS_NAME = "is_reshape"
SOFT_CLIP_THRESHOLD = 0.5  # K below this counts toward pg_clipfrac
_QUANTILE_SAMPLE = 65_536
_QUADRANTS = ("neg_down", "neg_up", "pos_down", "pos_up")  # index = 2·[A > 0] + [r > 1]


def params_from_actor_config(config) -> ISReshapeParams:
    """Read our hyperparameters from `config.policy_loss` (an ISReshapeLossConfig, a dict or a DictConfig)."""
    policy_loss = config.policy_loss
    if hasattr(policy_loss, "reshape_params"):
        return policy_loss.reshape_params()
    names = ISReshapeParams.__dataclass_fields__
    return ISReshapeParams(**{k: policy_loss[k] for k in names if k in policy_loss})


def _reshape_metrics(terms, advantages: torch.Tensor, valid: torch.Tensor, n_response: torch.Tensor) -> dict:
    """All metrics from one boolean gather of the valid tokens and a single host sync."""
    g = terms.weight[valid]
    n = g.numel()
    if n == 0:
        nonfinite = 1.0 if int(n_response) > 0 else 0.0  # every response token was dropped, or there were none
        return {"actor/ppo_kl": 0.0, "actor/pg_clipfrac": 0.0, "actor/is_reshape/nonfinite_frac": nonfinite}
    lr = terms.log_ratio[valid]
    ratio = terms.ratio[valid]
    quadrant = 2 * (advantages[valid] > 0).long() + (lr > 0).long()
    counts = torch.bincount(quadrant, minlength=4).to(g.dtype)
    weight_sums = torch.bincount(quadrant, weights=g, minlength=4)
    stride = max(1, n // _QUANTILE_SAMPLE)
    q = torch.quantile(ratio[::stride], torch.tensor([0.01, 0.5, 0.99], dtype=ratio.dtype, device=ratio.device))
    g_sum = g.sum()
    scalars = torch.stack(
        [
            -lr.mean(),
            (terms.kernel[valid] < SOFT_CLIP_THRESHOLD).to(g.dtype).mean(),
            g_sum / n,
            terms.gamma[valid].mean(),
            g_sum * g_sum / (n * (g * g).sum()).clamp(min=torch.finfo(g.dtype).tiny),
            ratio.min(),
            *q,
            ratio.max(),
            1.0 - n / n_response.to(g.dtype),
        ]
    )
    shares = counts / n
    means = weight_sums / counts.clamp(min=1)
    values = torch.cat([scalars, shares, means]).tolist()  # the one host sync
    names = [
        "actor/ppo_kl",
        "actor/pg_clipfrac",
        "actor/is_reshape/weight_mean",
        "actor/is_reshape/gamma_mean",
        "actor/is_reshape/ess",
        "actor/is_reshape/ratio_min",
        "actor/is_reshape/ratio_p01",
        "actor/is_reshape/ratio_p50",
        "actor/is_reshape/ratio_p99",
        "actor/is_reshape/ratio_max",
        "actor/is_reshape/nonfinite_frac",
        *(f"actor/is_reshape/{q}_share" for q in _QUADRANTS),
        *(f"actor/is_reshape/{q}_weight" for q in _QUADRANTS),
    ]
    return dict(zip(names, values))


@register_policy_loss(LOSS_NAME)
def compute_policy_loss_is_reshape(
    old_log_prob: torch.Tensor,  # (B, T) log μ, from the behaviour policy
    log_prob: torch.Tensor,  # (B, T) log π_θ, requires grad
    advantages: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T) bool or float
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: torch.Tensor | None = None,  # (B, T) or None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """IS Reshape policy loss with verl's signature: weight each token's −A·∇log π_θ by g(r, A)."""
    if config is None:
        raise ValueError("is_reshape needs verl's actor config (config=...); got None")
    params = params_from_actor_config(config)

    response_mask = response_mask.bool()
    with torch.no_grad():
        finite = torch.isfinite(log_prob.detach() - old_log_prob) & torch.isfinite(advantages)
        valid = response_mask & finite
        all_finite, any_valid = torch.stack([finite.all(), valid.any()]).tolist()
    if not all_finite:
        # Replace bad positions (log r = 0, A = 0) so that NaN never reaches the loss or gradient (0·NaN = NaN).
        clean = log_prob.detach().nan_to_num(0.0, 0.0, 0.0)
        log_prob = torch.where(finite, log_prob, clean)
        old_log_prob = torch.where(finite, old_log_prob, clean)
        advantages = torch.where(finite, advantages, torch.zeros_like(advantages))

    token_loss, terms = is_reshape_token_loss(log_prob, old_log_prob, advantages, params, return_terms=True)
    if rollout_is_weights is not None:
        token_loss = token_loss * rollout_is_weights

    if any_valid:
        pg_loss = agg_loss(
            loss_mat=token_loss, loss_mask=valid, loss_agg_mode=loss_agg_mode, **config.global_batch_info
        ).to(log_prob.dtype)
    else:  # nothing to learn from; agg_loss's local means would divide 0 by 0
        pg_loss = (token_loss * valid).sum().to(log_prob.dtype)

    with torch.no_grad():
        metrics = _reshape_metrics(terms, advantages, valid, response_mask.sum())
    return pg_loss, metrics
