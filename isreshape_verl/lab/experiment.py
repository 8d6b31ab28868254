"""The lab's experiment: every estimator × reward family × behaviour distance × advantage mode.

    for reward family:                       R(y) over the V^L sequences
        π_θ = θ_T after T Adam steps on J;   ∇J(θ_T) exact
        for behaviour μ (lag K or target KL): draw R replicates × B sequences from μ once
            for advantage mode (grpo, baseline):
                for estimator: ĝ_1..ĝ_R  →  bias², variance, MSE, cosine, ESS, zero / cut shares

All estimators of one (reward, μ, advantage) cell see the same sampled batches (common random
numbers), so their differences are not sampling noise between rows; `d_rel_mse` is each row's
MSE minus the anchor's (the first of `--losses`, by default IS Reshape's default) with the paired
standard error `d_rel_mse_se` = std_k(e_k − e_k^anchor)/√R; `d_cosine` likewise for cos(ĝ_k, ∇J). Seeds are derived from
`seed` and the cell's name only, so adding a loss never changes another loss's numbers.

    from isreshape_verl.lab.experiment import Args, run
    rows = run(Args(losses=["is_reshape", "sapo"], rewards=["sparse"]))   # list of dicts, one per row
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field

import torch

from isreshape_verl.lab.behaviour import BEHAVIOURS, kl_behaviour, lagged_behaviour, train_trajectory
from isreshape_verl.lab.estimators import (
    ADVANTAGE_MODES,
    REFERENCES,
    advantages,
    build_estimators,
    conditional_reward_variance,
    estimate,
    cosines,
    squared_errors,
    summarise,
)
from isreshape_verl.lab.policy import (
    REWARD_FAMILIES,
    exact_gradient,
    make_rewards,
    objective,
    sample_sequences,
    sequence_log_probs,
    sequence_space,
    token_log_probs,
)

# Every spec names its kernel, width, sidedness, SFT localization and width mode, so that the table means the
# same thing whatever the package's defaults are. The anchor of the paired differences is the design notes'
# choice: sech2 at width 1, two-sided, with correctness γ.
_BEFORE_LOCALIZATION = "localize_sft=false,width_mode=fixed"  # the settings of every loss before both existed
ANCHOR_LOSS = f"is_reshape:kernel=sech2,width=1,one_sided=false,{_BEFORE_LOCALIZATION}"
_DEFAULT_SHAPE = "is_reshape:kernel=laplace,width=1,one_sided=true,localize_sft=true"  # the package default's
DEFAULT_LOSSES = (
    ANCHOR_LOSS,  # first: the anchor of the paired differences
    "vanilla",
    "sapo",
    "cispo",
    "gpg",
    *(f"is_reshape:kernel={k},width={w},one_sided=false,{_BEFORE_LOCALIZATION}"
      for k in ("sech2", "gaussian", "cauchy", "laplace", "epanechnikov", "box")
      for w in ("0.5", "1", "2") if not (k == "sech2" and w == "1")),
    f"is_reshape:kernel=sech2,width=1,one_sided=false,gamma_mode=fixed,gamma=1,{_BEFORE_LOCALIZATION}",
    f"is_reshape:kernel=sech2,width=1,one_sided=false,gamma_mode=fixed,gamma=0.5,{_BEFORE_LOCALIZATION}",
    f"is_reshape:kernel=sech2,width=1,one_sided=false,gamma_mode=fixed,gamma=0,{_BEFORE_LOCALIZATION}",
    f"is_reshape:kernel=box,width=0.2,one_sided=true,gamma_mode=fixed,gamma=1,{_BEFORE_LOCALIZATION}",
    f"is_reshape:kernel=laplace,width=1,one_sided=true,{_BEFORE_LOCALIZATION}",
    f"is_reshape:kernel=laplace,width=1,one_sided=true,gamma_mode=fixed,gamma=1,{_BEFORE_LOCALIZATION}",
    f"{_DEFAULT_SHAPE},width_mode=fixed",
    *(f"{_DEFAULT_SHAPE},width_mode=adaptive,width_target={t}" for t in ("0.003", "0.01", "0.03")),
)


@dataclass
class Args:
    """Everything the lab's run depends on (the CLI's flags, one to one)."""

    losses: list[str] = field(default_factory=lambda: list(DEFAULT_LOSSES))
    """Loss specs, the syntax of `isreshape-verl compare` (isreshape_verl.specs)."""
    references: list[str] = field(default_factory=lambda: list(REFERENCES))
    """Reference estimators: ref:is_seq (sequence IS, unbiased), ref:is_token (token IS), ref:oracle."""
    rewards: list[str] = field(default_factory=lambda: list(REWARD_FAMILIES))
    """Reward families: sparse (5% correct answers), dense (matches to a target), random (N(0, 1))."""
    advantages: list[str] = field(default_factory=lambda: list(ADVANTAGE_MODES))
    """Advantage modes: grpo (group-normalised), baseline (leave-one-out group mean subtracted)."""
    behaviours: list[str] = field(default_factory=lambda: list(BEHAVIOURS))
    """How μ is put at a distance: kl (random perturbation at a target KL), lag (K Adam steps earlier)."""
    kls: list[float] = field(default_factory=lambda: [0.0, 0.003, 0.01, 0.03, 0.1, 0.3])
    """Target per-token KL(μ‖π) for behaviour 'kl'. 0 is on-policy."""
    lags: list[int] = field(default_factory=lambda: [0, 2, 4, 8, 16, 24])
    """Lags K (optimizer steps) for behaviour 'lag'; each must be <= train_steps."""
    vocab: int = 4
    """V, vocabulary size (N = V^L sequences are enumerated)."""
    length: int = 4
    """L, tokens per sequence."""
    replicates: int = 200
    """Independent batches per cell; bias², variance and MSE are estimated over them."""
    batch_size: int = 64
    """B, sequences per batch (per gradient estimate)."""
    group_size: int = 8
    """G, sequences per group (GRPO groups / leave-one-out baselines); must divide B."""
    train_steps: int = 24
    """T, Adam steps on the exact J from random logits to π_θ (π is mid-training)."""
    lr: float = 0.05
    """Adam learning rate of those steps (also sets how far one lag step moves)."""
    init_scale: float = 1.0
    """Std of the random initial logits θ_0."""
    sparse_share: float = 0.05
    """Share of sequences that are 'correct' in the sparse reward family."""
    seed: int = 0
    """Seed of everything (rewards, θ_0, perturbation directions, batches)."""

    def validate(self) -> None:
        """Fail early, with the flag's name, on anything that cannot run."""
        def bad(flag, msg):
            raise ValueError(f"--{flag.replace('_', '-')}: {msg}")

        for name, allowed in (("rewards", REWARD_FAMILIES), ("advantages", ADVANTAGE_MODES), ("behaviours", BEHAVIOURS)):
            values = getattr(self, name)
            if not values:
                bad(name, "needs at least one value")
            for v in values:
                if v not in allowed:
                    bad(name, f"{v!r} is not allowed; allowed: {', '.join(allowed)}")
        for ref in self.references:
            if ref not in REFERENCES:
                bad("references", f"{ref!r} is not allowed; allowed: {', '.join(REFERENCES)}")
        if self.vocab < 2:
            bad("vocab", f"must be >= 2, got {self.vocab}")
        if self.length < 1:
            bad("length", f"must be >= 1, got {self.length}")
        if self.vocab**self.length > 200_000:
            bad("vocab", f"V^L = {self.vocab}^{self.length} sequences is too many to enumerate (max 200000)")
        if self.replicates < 2:
            bad("replicates", f"must be >= 2 (variance needs two), got {self.replicates}")
        if self.group_size < 2:
            bad("group_size", f"must be >= 2, got {self.group_size}")
        if self.batch_size < self.group_size or self.batch_size % self.group_size:
            bad("batch_size", f"{self.batch_size} must be a positive multiple of --group-size {self.group_size}")
        if any(not (math.isfinite(k) and 0 <= k <= 5) for k in self.kls):
            bad("kls", f"per-token KL targets must be finite numbers in [0, 5], got {self.kls}")
        if any(k < 0 or k > self.train_steps for k in self.lags):
            bad("lags", f"lags must be in [0, --train-steps={self.train_steps}], got {self.lags}")
        if self.train_steps < 0:
            bad("train_steps", f"must be >= 0, got {self.train_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", f"must be a finite number > 0, got {self.lr}")
        if not (self.init_scale >= 0 and math.isfinite(self.init_scale)):
            bad("init_scale", f"must be a finite number >= 0, got {self.init_scale}")
        if not 0 < self.sparse_share <= 1:
            bad("sparse_share", f"must be in (0, 1], got {self.sparse_share}")
        if not self.losses and not self.references:
            bad("losses", "nothing to measure: give --losses and/or --references")


def _generator(seed: int, *names) -> torch.Generator:
    key = zlib.crc32("/".join(map(str, (seed, *names))).encode())
    return torch.Generator().manual_seed(key)


def run(args: Args, progress: bool = True) -> list[dict]:
    """All rows of the lab (one dict per estimator × cell), in a fixed order."""
    args.validate()
    estimators = build_estimators(args.losses, args.references)
    space = sequence_space(args.vocab, args.length)
    distances = {"kl": list(args.kls), "lag": list(args.lags)}
    cells = sum(len(distances[b]) for b in args.behaviours) * len(args.rewards) * len(args.advantages)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cells * len(estimators), desc="lab", unit="est", dynamic_ncols=True)
    rows = []
    for family in args.rewards:
        rewards = make_rewards(space, family, _generator(args.seed, "rewards", family), args.sparse_share)
        trajectory = train_trajectory(space, rewards, args.init_scale, args.train_steps, args.lr,
                                      _generator(args.seed, "init", family))
        pi = trajectory[-1]
        true_grad = exact_gradient(space, pi, rewards)
        if float(true_grad.norm()) < 1e-12:
            raise ValueError(f"∇J = 0 for reward family {family!r} (constant reward under π?): nothing to estimate")
        p_pi = sequence_log_probs(space, pi).exp()
        sigma_pi = float(((p_pi * rewards**2).sum() - (p_pi * rewards).sum() ** 2).clamp(min=0).sqrt())
        j_pi = float(objective(space, pi, rewards))
        for kind in args.behaviours:
            for distance in distances[kind]:
                if kind == "kl":
                    mu = kl_behaviour(space, pi, distance, _generator(args.seed, "direction", family, distance))
                else:
                    mu = lagged_behaviour(space, trajectory, int(distance))
                mu_logp = token_log_probs(space, mu.logits)
                p_mu = sequence_log_probs(space, mu.logits).exp()
                reward_var = float((p_mu * rewards**2).sum() - (p_mu * rewards).sum() ** 2)
                cond_var = conditional_reward_variance(space, mu_logp, rewards)
                seq = sample_sequences(space, mu.logits, (args.replicates, args.batch_size),
                                       _generator(args.seed, "batches", family, kind, distance))
                log_ratio = (token_log_probs(space, pi) - mu_logp)[seq].reshape(-1)
                q = torch.quantile(log_ratio.exp(), torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64))
                cell = {
                    "reward": family, "behaviour": kind, "distance": distance, "kl_per_token": mu.kl_per_token,
                    "ratio_p01": float(q[0]), "ratio_p50": float(q[1]), "ratio_p99": float(q[2]),
                    "ratio_max": float(log_ratio.exp().max()), "j_pi": j_pi, "grad_norm": float(true_grad.norm()),
                }
                for mode in args.advantages:
                    adv = advantages(rewards[seq], args.group_size, mode)
                    scale = sigma_pi if mode == "grpo" else 1.0
                    anchor = None
                    for est in estimators:
                        out = estimate(est, space, pi, mu_logp, seq, adv, scale=scale, cond_var=cond_var,
                                       reward_var=reward_var)
                        paired = torch.stack([squared_errors(out, true_grad), cosines(out, true_grad)])
                        anchor = paired if anchor is None else anchor
                        diff = paired - anchor
                        se = diff.std(-1) / diff.shape[-1] ** 0.5
                        rows.append({**cell, "advantage": mode, "loss": est.label, **summarise(out, true_grad),
                                     "d_rel_mse": float(diff[0].mean()), "d_rel_mse_se": float(se[0]),
                                     "d_cosine": float(diff[1].mean()), "d_cosine_se": float(se[1])})
                        if bar is not None:
                            bar.update(1)
    if bar is not None:
        bar.close()
    settings = {k: v for k, v in asdict(args).items() if k in ("vocab", "length", "replicates", "batch_size", "group_size", "seed")}
    return [{**row, **settings} for row in rows]
