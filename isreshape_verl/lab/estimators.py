"""Gradient estimators: every verl policy loss (through verl's registry) and three references.

A batch is B sequences from μ in groups of G (B = n_groups·G), each with an advantage A_b:

    grpo       A_b = (R_b − mean_group R) / (std_group R + 1e-6)   (verl's GRPO, unbiased std)
    baseline   A_b = R_b − mean of the other G − 1 rewards of its group   (leave-one-out: independent
               of y_b, so on-policy REINFORCE with it is exactly unbiased)

Every loss ℓ(log π, log μ, A) that verl aggregates over tokens has, per token, a gradient weight w:

    ∂loss/∂log π_θ(y_bt) = −A_b · a · w_bt,          a = ∂agg/∂loss_mat (1/(B·L) for token-mean),

which we read off by autograd (loss-agnostic: no formula per loss). The gradient estimate of ∇J is

    ĝ = −∇_θ loss / (a·B) = (1/B) Σ_b A_b Σ_t w_bt ∇_θ log π_θ(y_bt | y_b,<t),

so w ≡ 1 is REINFORCE on μ's samples (verl `gpg`, IS Reshape γ = 0), w = r_t = π/μ per token is
token-level IS. For `grpo`, ĝ is multiplied by σ_π(R), the exact reward std under π, to undo the
std normalisation (so on-policy GRPO lands on ∇J's scale; its remaining bias is GRPO's own).

Replicates are vectorised: the R replicates' batches form one (R·B, L) verl batch; θ is repeated
R times, (R, P, V), so a single autograd call returns each replicate's gradient.

References (not verl losses, computed with the same machinery, weights detached):

    ref:is_seq     w_bt = ρ_b = Π_t r_bt          sequence-level IS: unbiased for every μ ("baseline")
    ref:is_token   w_bt = r_bt                     token-level IS, no clip: the γ = 1, width → ∞ limit
    ref:oracle     w_bt = r_bt / (1 + λ·Var_μ(R | y_b,≤t) / Var_μ(R))   the design notes' g* ∝ r/(1 + λ·Var(A|r)),
                   with the conditional reward variance known exactly; λ from a grid, the best per setting

    isreshape-verl lab --losses vanilla "is_reshape:kernel=laplace,width=1" --references ref:is_seq --out DIR
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from isreshape_verl.diagnostics import kish_ess, weights_from_gradients
from isreshape_verl.lab.policy import SequenceSpace
from isreshape_verl.specs import LossSpec, parse_loss_spec, parse_loss_specs

ADVANTAGE_MODES = ("baseline", "grpo")
REFERENCES = ("ref:is_seq", "ref:is_token", "ref:oracle")
ORACLE_LAMBDAS = (0.25, 1.0, 4.0, 16.0)
GRPO_EPS = 1e-6
ZERO_TOL = 1e-12
# verl's sapo ignores loss_agg_mode and always aggregates with seq-mean-token-mean.
_AGG_USED = {"sapo": "seq-mean-token-mean"}


def advantages(rewards: torch.Tensor, group_size: int, mode: str) -> torch.Tensor:
    """Advantages (R, B) from rewards (R, B); groups are consecutive runs of `group_size`."""
    r, b = rewards.shape
    if group_size < 2 or b % group_size:
        raise ValueError(f"group size {group_size} must be >= 2 and divide the batch size {b}")
    grouped = rewards.view(r, b // group_size, group_size)
    if mode == "grpo":
        adv = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + GRPO_EPS)
    elif mode == "baseline":
        others = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
        adv = grouped - others
    else:
        raise ValueError(f"unknown advantage mode {mode!r}; allowed: {', '.join(ADVANTAGE_MODES)}")
    return adv.reshape(r, b)


def conditional_reward_variance(space: SequenceSpace, mu_token_logp: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Var_μ(R | y_≤t) for every sequence and position, (N, L), exact.

    Sequences sharing y_≤t are contiguous (base-V order), so the conditional moments are sums over
    blocks of V^(L−1−t) sequences weighted by μ(completion | y_≤t) = Π_{s>t} μ(y_s | y_<s).
    """
    n, length = mu_token_logp.shape
    out = torch.empty_like(mu_token_logp)
    for t in range(length):
        block = space.vocab ** (length - 1 - t)
        completion = mu_token_logp[:, t + 1:].sum(-1).exp().view(-1, block)
        r = rewards.view(-1, block)
        m1 = (completion * r).sum(-1, keepdim=True)
        m2 = (completion * r * r).sum(-1, keepdim=True)
        out[:, t] = (m2 - m1 * m1).clamp(min=0.0).expand(-1, block).reshape(n)
    return out


@dataclass
class Estimator:
    """A gradient estimator: a verl loss (from a LossSpec) or one of the references."""

    label: str
    """Row name in tables and plots: the canonical loss spec, or `ref:...`."""
    spec: LossSpec | None = None
    """The parsed loss spec (None for references)."""
    oracle_lambda: float | None = None
    """λ of `ref:oracle` (in units of 1/Var_μ(R))."""
    reference: str | None = None
    """Which reference (one of REFERENCES) for a reference, None for a verl loss: behaviour follows this
    field and `spec`, never the label."""
    _config: object = field(default=None, repr=False)

    def __post_init__(self):
        if (self.spec is None) == (self.reference is None):
            raise ValueError(f"estimator {self.label!r} needs exactly one of a loss spec and a reference")
        if self.reference is not None and self.reference not in REFERENCES:
            raise ValueError(f"unknown reference {self.reference!r}; allowed: {', '.join(REFERENCES)}")
        if self.reference == "ref:oracle" and self.oracle_lambda is None:
            raise ValueError(f"estimator {self.label!r}: ref:oracle needs oracle_lambda")

    @property
    def agg_mode(self) -> str:
        if self.spec is None:
            return "token-mean"
        return _AGG_USED.get(self.spec.mode, self.spec.loss_agg_mode)

    def loss(self, old_log_prob, log_prob, adv, mask, cond_var=None, reward_var=1.0):
        """The scalar loss whose gradient the lab measures (verl's function for verl losses)."""
        if self.spec is not None:
            if self._config is None:
                self._config = self.spec.actor_config()
            loss, _ = self.spec.loss_fn(old_log_prob=old_log_prob, log_prob=log_prob, advantages=adv,
                                        response_mask=mask, loss_agg_mode=self.spec.loss_agg_mode,
                                        config=self._config, rollout_is_weights=None)
            return loss
        from verl.trainer.ppo.core_algos import agg_loss

        with torch.no_grad():
            log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
            if self.reference == "ref:is_seq":
                weight = log_ratio.sum(-1, keepdim=True).exp().expand_as(log_ratio)
            elif self.reference == "ref:is_token":
                weight = log_ratio.exp()
            else:  # ref:oracle
                weight = log_ratio.exp() / (1.0 + self.oracle_lambda * cond_var / max(reward_var, 1e-300))
        return agg_loss(loss_mat=-adv * weight * log_prob, loss_mask=mask, loss_agg_mode="token-mean")


def build_estimators(loss_texts: list[str], references: list[str]) -> list[Estimator]:
    """Parse `--losses` with the shared spec parser (errors name the bad spec) and add references."""
    out = [Estimator(spec.label, spec) for spec in parse_loss_specs(loss_texts)]
    for est in out:
        if est.spec.rollout_correction != "bypass":  # the lab has μ and π_θ, no π_old to recompute
            raise ValueError(f"loss spec {est.label!r}: rollout_correction is an arm of the sandbox "
                             "(isreshape-verl compare), not of the lab, whose ratio is π_θ/μ")
    for ref in references:
        if ref not in REFERENCES:
            raise ValueError(f"unknown reference {ref!r}; allowed: {', '.join(REFERENCES)}")
        if ref == "ref:oracle":
            out += [Estimator(f"{ref}:lambda={lam:g}", oracle_lambda=lam, reference=ref) for lam in ORACLE_LAMBDAS]
        else:
            out.append(Estimator(ref, reference=ref))
    return out


def estimator_from_label(label: str) -> Estimator:
    """The estimator a table row names: the inverse of `build_estimators` (a row's label is the canonical
    spec text, a reference, or `ref:oracle:lambda=λ`). Raises ValueError for anything else."""
    if label in REFERENCES and label != "ref:oracle":
        return Estimator(label, reference=label)
    head, sep, lam = label.partition(":lambda=")
    if head == "ref:oracle" and sep:
        return Estimator(label, oracle_lambda=float(lam), reference=head)
    spec = parse_loss_spec(label)
    return Estimator(spec.label, spec)


@dataclass
class Estimates:
    """What one estimator produced on R replicate batches."""

    grads: torch.Tensor
    """(R, P·V): ĝ for each replicate, on ∇J's scale."""
    weights: torch.Tensor
    """(R, B·L): per-token gradient weight w (NaN where A = 0: no gradient, no weight to read)."""
    ratios: torch.Tensor
    """(R, B·L): r = π/μ per token."""


def agg_weight(agg_mode: str, rows: int, length: int) -> float:
    """a = ∂agg/∂loss_mat for an all-ones mask, from verl's own `agg_loss` (it is the same for every token)."""
    from verl.trainer.ppo.core_algos import agg_loss

    mat = torch.zeros(rows, length, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(agg_loss(loss_mat=mat, loss_mask=torch.ones(rows, length, dtype=torch.float64), loss_agg_mode=agg_mode), mat)
    if not torch.allclose(grad, grad[0, 0].expand_as(grad)):
        raise AssertionError("aggregation weights differ between tokens")
    return float(grad[0, 0])


def estimate(estimator: Estimator, space: SequenceSpace, pi_logits: torch.Tensor, mu_token_logp: torch.Tensor,
             seq: torch.Tensor, adv: torch.Tensor, scale: float = 1.0, cond_var: torch.Tensor | None = None,
             reward_var: float = 1.0) -> Estimates:
    """Run the estimator on R replicate batches of sequence indices `seq` (R, B) with advantages (R, B)."""
    r, b = seq.shape
    length = space.length
    p, v = pi_logits.shape
    theta = pi_logits.detach().expand(r, p, v).clone().requires_grad_(True)
    table = torch.log_softmax(theta, dim=-1).reshape(r, p * v)
    log_prob = table.gather(1, space.flat_index[seq].reshape(r, b * length)).reshape(r * b, length)
    old_log_prob = mu_token_logp[seq].reshape(r * b, length)
    adv_tok = adv.reshape(r * b, 1).expand(r * b, length).contiguous()
    mask = torch.ones(r * b, length, dtype=torch.float64)
    cv = None if cond_var is None else cond_var[seq].reshape(r * b, length)
    loss = estimator.loss(old_log_prob, log_prob, adv_tok, mask, cond_var=cv, reward_var=reward_var)
    grad_theta, grad_lp = torch.autograd.grad(loss, [theta, log_prob])
    a = agg_weight(estimator.agg_mode, r * b, length)
    grads = -grad_theta.reshape(r, p * v) / (a * b) * scale
    with torch.no_grad():
        weights = weights_from_gradients(grad_lp, -adv_tok * a, adv_tok != 0, fill=float("nan"))
        ratios = (log_prob - old_log_prob).clamp(-20, 20).exp()
    return Estimates(grads.detach(), weights.reshape(r, b * length), ratios.detach().reshape(r, b * length))


def squared_errors(est: Estimates, true_grad: torch.Tensor) -> torch.Tensor:
    """‖ĝ_k − ∇J‖² / ‖∇J‖² per replicate, (R,): paired across estimators that share the batches."""
    target = true_grad.reshape(-1)
    return ((est.grads - target) ** 2).sum(-1) / float(target @ target)


def cosines(est: Estimates, true_grad: torch.Tensor) -> torch.Tensor:
    """cos(ĝ_k, ∇J) per replicate, (R,) (0 for an all-zero estimate)."""
    target = true_grad.reshape(-1)
    return (est.grads @ target) / (est.grads.norm(dim=-1) * target.norm()).clamp(min=1e-300)


def summarise(est: Estimates, true_grad: torch.Tensor) -> dict:
    """Bias², variance, MSE (all ÷ ‖∇J‖²), cosine, ESS and shares of zero / cut weights over R replicates.

    With m = mean_k ĝ_k and S the unbiased sample covariance of the ĝ_k:
        variance  = tr S                                  (of one batch's estimate)
        bias²     = ‖m − ∇J‖² − tr S / R                  (unbiased; can dip below 0 by noise)
        mse       = mean_k ‖ĝ_k − ∇J‖²  ( = bias² + variance)
        mse_best  = min_c mean_k ‖c·ĝ_k − ∇J‖² = ‖∇J‖² − (m·∇J)² / mean_k ‖ĝ_k‖²  at c* = m·∇J / mean_k ‖ĝ_k‖²
                    (the MSE after the best learning-rate multiplier: shrinking an estimator lowers its
                    MSE whenever variance is large, so `mse` alone rewards small weights; `mse_best` does not)
        cosine    = mean_k cos(ĝ_k, ∇J)
        ess       = mean_k Kish ESS of the token weights with A ≠ 0
        zero      = share of those tokens with w = 0;  cut = share with w < r/2 (weight cut by > half vs IS)
    """
    g = est.grads
    reps = g.shape[0]
    target = true_grad.reshape(-1)
    norm2 = float(target @ target)
    mean = g.mean(0)
    var = float(((g - mean) ** 2).sum(-1).sum() / (reps - 1))
    sq_err = squared_errors(est, true_grad)
    second = float((g * g).sum(-1).mean())
    cos = cosines(est, true_grad)
    valid = ~torch.isnan(est.weights)
    w = est.weights[valid]
    rr = est.ratios[valid]
    return {
        "rel_bias2": (float(((mean - target) ** 2).sum()) - var / reps) / norm2,
        "rel_var": var / norm2,
        "rel_mse": float(sq_err.mean()),
        "rel_mse_se": float(sq_err.std() / reps**0.5),
        "rel_mse_best": 1.0 - float(mean @ target) ** 2 / (norm2 * second) if second > 0 else 1.0,
        "best_scale": float(mean @ target) / second if second > 0 else 0.0,
        "cosine": float(cos.mean()),
        "ess": float(kish_ess(est.weights).nanmean()),
        "weight_mean": float(w.mean()) if w.numel() else float("nan"),
        "zero_share": float((w.abs() <= ZERO_TOL).double().mean()) if w.numel() else float("nan"),
        "cut_share": float((w < 0.5 * rr).double().mean()) if w.numel() else float("nan"),
    }


def weight_curve(estimator: Estimator, ratios: torch.Tensor, sign: float) -> torch.Tensor:
    """g(r) of one token with advantage A = sign, read off by autograd exactly as in `estimate`
    (an adaptive-width loss at its widest width: see LossSpec.drawn_at_fixed_width)."""
    if estimator.spec is not None and estimator.spec.drawn_at_fixed_width() != estimator.spec:
        estimator = Estimator(estimator.label, estimator.spec.drawn_at_fixed_width())
    n = ratios.numel()
    log_prob = ratios.double().log().reshape(n, 1).clone().requires_grad_(True)
    old = torch.zeros(n, 1, dtype=torch.float64)
    adv = torch.full((n, 1), float(sign), dtype=torch.float64)
    mask = torch.ones(n, 1, dtype=torch.float64)
    cond_var = torch.zeros(n, 1, dtype=torch.float64)
    loss = estimator.loss(old, log_prob, adv, mask, cond_var=cond_var, reward_var=1.0)
    (grad,) = torch.autograd.grad(loss, log_prob)
    g = weights_from_gradients(grad, -adv * agg_weight(estimator.agg_mode, n, 1), adv != 0, fill=float("nan"))
    return g.reshape(-1).detach()
