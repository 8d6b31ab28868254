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

from isreshape_verl.cli_args import check
from isreshape_verl.diagnostics import quantiles
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
_BEFORE_LOCALIZATION = "localize_sft=false,width_mode=fixed,dual_clip=none"  # every loss before these existed
ANCHOR_LOSS = f"is_reshape:kernel=sech2,width=1,one_sided=false,{_BEFORE_LOCALIZATION}"
_DEFAULT_SHAPE = "is_reshape:kernel=laplace,width=1,one_sided=true,localize_sft=true,dual_clip=none"  # an old default's
_WIDTH_025 = "is_reshape:kernel=laplace,width=0.25,one_sided=true,localize_sft=true,width_mode=adaptive,width_target=0.01"
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
    *(f"{_WIDTH_025},dual_clip={c}" for c in ("none", "3")),  # the default before and since the clip check
)


@dataclass
class Args:
    """Everything the lab's run depends on (the CLI's flags, one to one)."""

    losses: list[str] = field(default_factory=lambda: list(DEFAULT_LOSSES), metadata={"metavar": "SPEC"})
    """Loss specs, the syntax of `isreshape-verl compare` (isreshape_verl.specs)."""
    references: list[str] = field(default_factory=lambda: list(REFERENCES), metadata={"nargs": "*", "metavar": "REF"})
    """Reference estimators: ref:is_seq (sequence IS, unbiased), ref:is_token (token IS), ref:oracle."""
    rewards: list[str] = field(default_factory=lambda: list(REWARD_FAMILIES), metadata={"metavar": "FAMILY"})
    """Reward families: sparse (5% correct answers), dense (matches to a target), random (N(0, 1))."""
    advantages: list[str] = field(default_factory=lambda: list(ADVANTAGE_MODES), metadata={"metavar": "MODE"})
    """Advantage modes: grpo (group-normalised), baseline (leave-one-out group mean subtracted)."""
    behaviours: list[str] = field(default_factory=lambda: list(BEHAVIOURS), metadata={"metavar": "KIND"})
    """How μ is put at a distance: kl (random perturbation at a target KL), lag (K Adam steps earlier)."""
    kls: list[float] = field(default_factory=lambda: [0.0, 0.003, 0.01, 0.03, 0.1, 0.3], metadata={"metavar": "KL"})
    """Target per-token KL(μ‖π) for behaviour 'kl'. 0 is on-policy."""
    lags: list[int] = field(default_factory=lambda: [0, 2, 4, 8, 16, 24], metadata={"metavar": "K"})
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

    def __post_init__(self):
        """Fail early, naming the field (the CLI names its flag), on anything that cannot run."""
        for name, allowed in (("rewards", REWARD_FAMILIES), ("advantages", ADVANTAGE_MODES), ("behaviours", BEHAVIOURS)):
            values = getattr(self, name)
            check(name, values, bool(values) and all(v in allowed for v in values),
                  f"one or more of {', '.join(allowed)}")
        check("references", self.references, all(r in REFERENCES for r in self.references),
              f"zero or more of {', '.join(REFERENCES)}")
        check("vocab", self.vocab, self.vocab >= 2, ">= 2")
        check("length", self.length, self.length >= 1, ">= 1")
        check("vocab", self.vocab, self.vocab**self.length <= 200_000,
              f"small enough to enumerate V^L <= 200000 sequences (V^L = {self.vocab}^{self.length} is too many)")
        check("replicates", self.replicates, self.replicates >= 2, ">= 2 (variance needs two)")
        check("group_size", self.group_size, self.group_size >= 2, ">= 2")
        check("batch_size", self.batch_size, self.batch_size >= self.group_size and self.batch_size % self.group_size == 0,
              f"a positive multiple of --group-size ({self.group_size})")
        check("kls", self.kls, all(math.isfinite(k) and 0 <= k <= 5 for k in self.kls),
              "per-token KL targets, finite numbers in [0, 5]")
        check("train_steps", self.train_steps, self.train_steps >= 0, ">= 0")
        check("lags", self.lags, all(0 <= k <= self.train_steps for k in self.lags),
              f"lags in [0, --train-steps ({self.train_steps})]")
        check("lr", self.lr, math.isfinite(self.lr) and self.lr > 0, "a finite number > 0")
        check("init_scale", self.init_scale, math.isfinite(self.init_scale) and self.init_scale >= 0,
              "a finite number >= 0")
        check("sparse_share", self.sparse_share, 0 < self.sparse_share <= 1, "in (0, 1]")
        check("losses", self.losses, bool(self.losses or self.references),
              "non-empty when --references is empty (nothing to measure)")


def _generator(seed: int, *names) -> torch.Generator:
    key = zlib.crc32("/".join(map(str, (seed, *names))).encode())
    return torch.Generator().manual_seed(key)


def run(args: Args, progress: bool = True) -> list[dict]:
    """All rows of the lab (one dict per estimator × cell), in a fixed order."""
    estimators = build_estimators(args.losses, args.references)
    space = sequence_space(args.vocab, args.length)
    distances = {"kl": list(args.kls), "lag": list(args.lags)}
    cells = sum(len(distances[b]) for b in args.behaviours) * len(args.rewards) * len(args.advantages)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cells * len(estimators), desc="lab", unit="est", dynamic_ncols=True)
    try:
        rows = _rows(args, estimators, space, distances, bar)
    finally:  # Ctrl-C too: the bar ends its line before the caller's message
        if bar is not None:
            bar.close()
    settings = {k: v for k, v in asdict(args).items() if k in ("vocab", "length", "replicates", "batch_size", "group_size", "seed")}
    return [{**row, **settings} for row in rows]


def _rows(args: Args, estimators, space, distances, bar) -> list[dict]:
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
                q = quantiles(log_ratio.exp())  # RATIO_QUANTILES: 1 %, 50 %, 99 %
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
    return rows
