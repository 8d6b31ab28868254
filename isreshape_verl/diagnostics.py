"""Diagnostics of a policy-loss step, each written once: ESS, ratio quantiles, and the weight g read off a loss.

    ESS        (Σg)² / (N·Σg²) ∈ [0, 1]        Kish's effective sample size as a share of the N tokens:
                                              1 when every g is equal, 1/k when one of k weights is non-zero
    quantiles  torch.quantile of r = π_θ/μ     linear interpolation, at RATIO_QUANTILES (1 %, 50 %, 99 %)
    g          ∂loss/∂log π_θ ÷ its value on-policy (r ≡ 1), token by token: the weight a loss puts on
               −A·∇log π_θ relative to REINFORCE, read off any loss function by autograd (loss-agnostic)

Users: `verl_loss` (the `actor/is_reshape/*` metrics, from masked sums over chunks, one host sync), the
sandbox (`sandbox/loop.py`, `sandbox/report.py`) and the lab (`lab/estimators.py`, `lab/experiment.py`).

Plain torch; never imports verl (a loss function is passed in by the caller).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

RATIO_QUANTILES = (0.01, 0.5, 0.99)


def ess_from_sums(weight_sum: torch.Tensor, weight_sq_sum: torch.Tensor, count) -> torch.Tensor:
    """ESS = (Σg)² / (N·Σg²) from the sums Σg, Σg² and the count N (tensors of any one shape, or N an int).

    For masked tensors pass masked sums (Σ g·m, Σ g²·m, Σ m), as `verl_loss` accumulates them over chunks.
    The denominator N·Σg² is clamped to its dtype's smallest normal number, so the result is always finite:
    0 when Σg² = 0 (every weight 0, or N = 0), which keeps verl's averaged metrics free of NaN.
    """
    denominator = count * weight_sq_sum
    return weight_sum**2 / denominator.clamp(min=torch.finfo(denominator.dtype).tiny)


def kish_ess(weights: torch.Tensor) -> torch.Tensor:
    """ESS = (Σg)² / (N·Σg²) along the last dim over the non-NaN weights (NaN marks a token without a
    weight, e.g. A = 0); NaN where no weight is left (the statistic is undefined), 0 where all are 0."""
    valid = ~torch.isnan(weights)
    w = torch.where(valid, weights, torch.zeros_like(weights))
    n = valid.sum(-1)
    ess = ess_from_sums(w.sum(-1), (w * w).sum(-1), n)
    return torch.where(n > 0, ess, torch.full_like(ess, float("nan")))


def quantiles(x: torch.Tensor, qs: Sequence[float] = RATIO_QUANTILES) -> torch.Tensor:
    """Quantiles (len(qs),) of all entries of x, in x's dtype: torch.quantile with linear interpolation
    (numpy's default method). NaN each when x is empty. Apply to r, or to log r and map through exp."""
    if x.numel() == 0:
        return torch.full((len(qs),), float("nan"), dtype=x.dtype, device=x.device)
    return torch.quantile(x, torch.tensor(qs, dtype=x.dtype, device=x.device))


def weights_from_gradients(grad: torch.Tensor, grad_on_policy: torch.Tensor, valid: torch.Tensor,
                           fill: float = 0.0) -> torch.Tensor:
    """g = grad / grad_on_policy on `valid` tokens, `fill` elsewhere (invalid denominators are never divided by).

    grad = ∂loss/∂log π_θ at the current ratios; grad_on_policy = the same at r ≡ 1, by autograd
    (`effective_weights`) or in closed form −A·a when the aggregation weight a = ∂agg/∂loss_mat is known
    (the lab: every loss has g(1) = 1, so its on-policy gradient is REINFORCE's −A·a).
    """
    safe = torch.where(valid, grad_on_policy, torch.ones_like(grad_on_policy))
    return torch.where(valid, grad / safe, torch.full_like(grad, fill))


def effective_weights(loss_fn: Callable, old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                      advantages: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str,
                      config) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weight g that a verl-signature policy loss puts on −A·∇log π_θ, relative to on-policy.

        g = (∂loss/∂log π_θ at log π_θ = log_prob) / (∂loss/∂log π_θ at log π_θ = old_log_prob, r ≡ 1)

    Two autograd calls of `loss_fn` (called with verl's keyword names, rollout_is_weights=None); the inputs
    are detached, nothing flows back to the caller's graph. Returns (g, valid), both (B, T): valid = response
    tokens where the on-policy gradient is non-zero (A ≠ 0); g = 0 elsewhere.
    """
    grads = []
    with torch.enable_grad():
        for at in (log_prob, old_log_prob):
            leaf = at.detach().clone().requires_grad_(True)
            loss, _ = loss_fn(old_log_prob=old_log_prob, log_prob=leaf, advantages=advantages,
                              response_mask=response_mask, loss_agg_mode=loss_agg_mode, config=config,
                              rollout_is_weights=None)
            grads.append(torch.autograd.grad(loss, leaf)[0])
    grad, grad0 = grads
    valid = response_mask.bool() & (grad0 != 0)
    return weights_from_gradients(grad, grad0, valid), valid
