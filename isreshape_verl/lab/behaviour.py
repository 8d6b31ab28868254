"""The target policy π_θ and behaviour policies μ at a controlled distance from it.

π_θ is "mid-training": random logits θ_0 ~ N(0, init_scale²) followed by `train_steps` steps of
Adam on the exact objective J (so π already prefers good sequences but is far from solved).

Two ways to put μ at a distance:

    lag K      μ = θ_{T−K}: the policy K optimizer steps before π (what async / multi-epoch RL sees).
    kl κ       μ = θ_T + s·ε with a fixed random direction ε ~ N(0, 1)^{P×V} and s found by bisection so
               that KL(μ‖π) / L = κ (a per-token KL, the scale of verl's `actor/ppo_kl`).

KL(μ‖π) is over whole sequences, exact by enumeration; reported divided by L.

    isreshape-verl lab --behaviours lag --lags 0 2 4 8 16 24 --out DIR      # only the lagged μ
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from isreshape_verl.lab.policy import SequenceSpace, exact_gradient, objective, sequence_kl

BEHAVIOURS = ("kl", "lag")


@dataclass
class Behaviour:
    """One behaviour policy μ and how far it is from π."""

    kind: str
    """'kl' or 'lag'."""
    distance: float
    """The requested distance: the target per-token KL (kind 'kl') or the lag K in optimizer steps ('lag')."""
    logits: torch.Tensor
    """(P, V) logits of μ."""
    kl_per_token: float
    """KL(μ‖π_θ) / L, exact."""


def train_trajectory(space: SequenceSpace, rewards: torch.Tensor, init_scale: float, steps: int, lr: float,
                     generator: torch.Generator) -> list[torch.Tensor]:
    """[θ_0, θ_1, …, θ_steps]: Adam ascent on the exact J from θ_0 ~ N(0, init_scale²)."""
    theta = (init_scale * torch.randn(space.n_prefixes, space.vocab, generator=generator, dtype=torch.float64))
    theta.requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    trajectory = [theta.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        (-objective(space, theta, rewards)).backward()
        opt.step()
        trajectory.append(theta.detach().clone())
    return trajectory


def lagged_behaviour(space: SequenceSpace, trajectory: list[torch.Tensor], lag: int) -> Behaviour:
    """μ = θ_{T−lag}, π = θ_T."""
    if not 0 <= lag < len(trajectory):
        raise ValueError(f"lag {lag} needs at least {lag} training steps before π (have {len(trajectory) - 1})")
    pi, mu = trajectory[-1], trajectory[-1 - lag]
    return Behaviour("lag", float(lag), mu, sequence_kl(space, mu, pi) / space.length)


def kl_behaviour(space: SequenceSpace, pi_logits: torch.Tensor, target_kl: float, generator: torch.Generator,
                 tol: float = 1e-4) -> Behaviour:
    """μ = θ + s·ε with KL(μ‖π)/L = target_kl (relative tolerance `tol`), by bisection on s ≥ 0."""
    if target_kl <= 0:
        return Behaviour("kl", float(target_kl), pi_logits.clone(), 0.0)
    direction = torch.randn(pi_logits.shape, generator=generator, dtype=pi_logits.dtype)

    def kl(s: float) -> float:
        return sequence_kl(space, pi_logits + s * direction, pi_logits) / space.length

    lo, hi = 0.0, 0.1
    while kl(hi) < target_kl:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"cannot reach a per-token KL of {target_kl}")
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if kl(mid) < target_kl:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol * hi:
            break
    s = 0.5 * (lo + hi)
    return Behaviour("kl", float(target_kl), pi_logits + s * direction, kl(s))


__all__ = ["BEHAVIOURS", "Behaviour", "exact_gradient", "kl_behaviour", "lagged_behaviour", "train_trajectory"]
