"""IS Reshape in plain torch: the weight g(r, A), the surrogate f(r) and a per-token loss.

For a token with ratio r = π_θ/μ (μ the behaviour policy that sampled it) and advantage A,

    surrogate      f(r) = (1 − γ)·log r + γ·F_K(r),      F_K(r) = ∫₁ʳ K(t − 1) dt
    token loss     ℓ = −f(r)·A
    gradient       ∂ℓ/∂log π_θ = −g(r, A)·A,             g(r, A) = r·f'(r) = (1 − γ) + γ·r·K(r − 1)

With `localize_sft` the SFT-like term gets the same kernel, evaluated at log r:

    f(r) = (1 − γ)·F_K(log r) + γ·F_K(r),      g(r, A) = (1 − γ)·K(log r) + γ·r·K(r − 1)

(F_K(log r) means ∫₀^{log r} K(v) dv, the same closed forms with x = log r.)
γ = γ(r, A) ∈ [0, 1] is treated as a constant (never back-propagated). γ = 0 gives the SFT-like
weight 1 (REINFORCE on μ's samples), γ = 1 with K ≡ 1 gives plain importance sampling (weight r),
and g(1, A) = 1 for every kernel and every γ.

This module never imports verl, so any trainer can use it:

    params = ISReshapeParams(kernel="laplace", width=1.0)
    token_loss = is_reshape_token_loss(log_prob, old_log_prob, advantages, params)  # (B, T)
    loss = (token_loss * mask).sum() / mask.sum()
    loss.backward()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from isreshape_verl import adaptive_width
from isreshape_verl.kernels import KERNEL_NAMES, check_kernel_name, kernel_and_integral

GAMMA_MODES = ("fixed", "correctness", "magnitude", "combined")
CPU_CHUNK_TOKENS = 1 << 16
ACCELERATOR_CHUNK_TOKENS = 1 << 24
WIDTH_MODES = ("fixed", "adaptive")
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
"""How a token loss such as `is_reshape_token_loss`'s becomes one number: verl's `agg_loss` modes (the
`loss_agg_mode` of verl's actor config and of a loss spec)."""


@dataclass
class ISReshapeParams:
    """Hyperparameters of the IS Reshape weight. Ranges are checked on construction."""

    kernel: str = "laplace"
    """Localization kernel K: gaussian | sech2 | cauchy | laplace | epanechnikov | box.
    laplace had the lowest gradient MSE of all kernels at equal width in the estimator lab
    (benchmarks/results/lab_default); sech2 is SAPO's kernel; box is PPO-clip's."""

    width: float = 0.25
    """Kernel width w > 0 for tokens with A > 0; larger = wider trust region, more RL-like (with
    width_mode=adaptive: the widest width the rule may choose, unless width_max says otherwise). SAPO's τ_pos
    corresponds to sech2 with w = 2/τ. Default 0.25, chosen by the sandbox: in the knob study and its
    width check (benchmarks/results/knob_study, width_check; lag study settings, 5 seeds) the default at width
    0.25 instead of 1 was level with GRPO's clip in AUC at lag 0 (−0.8 points [−2.5, +1.4]; width 1: −5.7
    [−6.5, −4.9], and one of its 5 runs ended ≥ 10 points below the start) and at lags 16 and 32, and as far
    behind as width 1 at lag 4 (−2.5); in the estimator lab its gradient MSE equals width 1's far from μ and is
    higher near μ (0.604 against 0.531)."""

    width_neg: float | None = None
    """Kernel width for tokens with A ≤ 0 (None = same as `width`). SAPO's τ_neg ↔ w = 2/τ_neg."""

    one_sided: bool = True
    """Apply K only on the side the update pushes away from μ (r > 1 when A > 0, r < 1 when A ≤ 0);
    K = 1 on the other side, so tokens that moved the wrong way keep their full corrective weight.
    box + one_sided + γ = 1 with widths (ε_high, ε_low) is PPO-clip. Default True: in the sandbox's knob study
    (benchmarks/results/knob_study) the default made two-sided collapsed in 10 of 12 runs and two-sided sech2
    in 9 of 12, even with localize_sft and the adaptive width, while no one-sided variant ever did."""

    dual_clip: float | None = 3.0
    """PPO's dual clip for IS Reshape (verl's `clip_ratio_c`, 3 there): where A ≤ 0 and r > dual_clip, the
    weight is 0 and the surrogate keeps its value at r = dual_clip. The side of A ≤ 0 tokens with r > 1 is the
    safe one (a one-sided kernel leaves it at K = 1), where the IS term's weight γ·r grows without bound: a
    token the policy has raised far above μ despite a negative advantage pulls with weight up to r. None (no
    bound) or a number > 1. With box, one_sided, γ = 1 and widths (ε_high, ε_low) the loss is verl's
    `vanilla` with clip_ratio_c = dual_clip. Default 3: in the sandbox's clip check (benchmarks/results/
    clip_check, 5 seeds) it made the default level with GRPO's clip in AUC at lags 0, 4, 16 and 32 (without it
    2.5 points behind at lag 4), brought its gradient norm from 0.30 to 0.20–0.22 (GRPO's 0.22–0.24), and GRPO
    without its own dual clip lost 2.8 AUC points at lag 4."""

    gamma_mode: str = "correctness"
    """How γ (SFT-like ↔ kernelized IS) is chosen per token: fixed | correctness | magnitude | combined.
    fixed: γ = gamma. correctness: γ = γ_b + (γ_m − γ_b)·σ(−A·log r/τ). magnitude:
    γ = γ_b + (γ_m − γ_b)·(2σ(β|A|) − 1). combined: the product of both factors."""

    gamma: float = 1.0
    """γ for gamma_mode=fixed, in [0, 1]. 0 = SFT-like weight 1, 1 = pure kernelized IS."""

    gamma_base: float = 0.5
    """Lower end γ_b of adaptive γ, in [0, 1]; reached on 'right' tokens (A·log r ≫ 0) and weak |A|."""

    gamma_max: float = 1.0
    """Upper end γ_m of adaptive γ, in [γ_b, 1]; reached on 'wrong' tokens (A·log r ≪ 0) and strong |A|."""

    gamma_tau: float = 0.1
    """Temperature τ_c > 0 of the correctness sigmoid σ(−A·log r/τ_c); smaller = sharper switch."""

    gamma_beta: float = 1.0
    """Slope β > 0 of the magnitude factor 2σ(β|A|) − 1."""

    log_ratio_clamp: float = 20.0
    """|log r| is clamped to this before exp (overflow guard, as verl's losses do with 20). > 0."""

    localize_sft: bool = True
    """Also give the SFT-like term a trust region: its weight (1 − γ) becomes (1 − γ)·K(log r), the same
    kernel, width and sidedness evaluated at log r (≈ r − 1 near μ), so that its surrogate has the closed
    form F_K(log r). Without it, 'right' tokens keep a weight of at least 1 − γ however far r has moved:
    in the sandbox's stress preset (lag 16, 2 epochs × 4 mini-batches) that unbounded push-down of
    negative-advantage tokens drove ppo_kl from 0.03 to 6.6 and accuracy to 0 within 10 steps."""

    width_mode: str = "adaptive"
    """fixed | adaptive. adaptive: each loss call scales `width` and `width_neg` by one factor s, chosen
    without gradient so that the batch's kernel-weighted second moment of log r,
    M(s) = Σ K_s(r − 1)·(log r)² / N over the tokens the kernel acts on, is at most `width_target`
    (the largest such s within the bounds): the staler the batch, the narrower the kernel.
    See isreshape_verl.adaptive_width."""

    width_target: float = 0.01
    """Budget for M(s) with width_mode=adaptive, > 0 (M2PO's hard budget on E[(log r)²] is 0.04)."""

    width_min: float = 0.05
    """Narrowest `width` that width_mode=adaptive may choose, > 0 (reached when even it exceeds the target)."""

    width_max: float | None = None
    """Widest `width` that width_mode=adaptive may choose (None = `width`: adaptive only narrows), > 0;
    an on-policy batch gets it. width_neg is scaled by the same factor."""

    def __post_init__(self):
        check_kernel_name(self.kernel)
        if self.gamma_mode not in GAMMA_MODES:
            raise ValueError(f"gamma_mode={self.gamma_mode!r} is not known; allowed: {', '.join(GAMMA_MODES)}")
        if self.width_mode not in WIDTH_MODES:
            raise ValueError(f"width_mode={self.width_mode!r} is not known; allowed: {', '.join(WIDTH_MODES)}")
        for key in ("width", "width_neg", "gamma_tau", "gamma_beta", "log_ratio_clamp", "width_target", "width_min",
                    "width_max"):
            value = getattr(self, key)
            if value is None and key in ("width_neg", "width_max"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{key}={value!r} is not allowed; it must be a finite number > 0")
        if self.dual_clip is not None and (not isinstance(self.dual_clip, (int, float)) or isinstance(self.dual_clip, bool)
                                           or not math.isfinite(self.dual_clip) or self.dual_clip <= 1):
            raise ValueError(f"dual_clip={self.dual_clip!r} is not allowed; it must be None or a finite number > 1")
        for key in ("gamma", "gamma_base", "gamma_max"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}={value!r} is not allowed; it must be a number in [0, 1]")
        if self.gamma_base > self.gamma_max:
            raise ValueError(
                f"gamma_base={self.gamma_base!r} > gamma_max={self.gamma_max!r}; gamma_base must be <= gamma_max"
            )
        if self.width_min > self.widest:
            raise ValueError(
                f"width_min={self.width_min!r} > width_max={self.widest!r}"
                + ("" if self.width_max is not None else " (width_max=None means width)")
                + "; width_min must be <= width_max"
            )
        for key in ("one_sided", "localize_sft"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}={getattr(self, key)!r} is not allowed; it must be true or false")


    @property
    def widest(self) -> float:
        """The widest `width` allowed with width_mode=adaptive (width_max, or width when it is None)."""
        return self.width if self.width_max is None else self.width_max


class ReshapeTerms(NamedTuple):
    """Per-token quantities of IS Reshape, (B, T) each (γ 0-dim when fixed); detached when
    `is_reshape_token_loss` hands them, one chunk of rows at a time, to its `on_chunk` hook."""

    log_ratio: torch.Tensor  # clamp(log π_θ − log μ, ±log_ratio_clamp)
    ratio: torch.Tensor  # r = exp(log_ratio)
    kernel: torch.Tensor  # K(r − 1), 1 on the safe side when one_sided
    gamma: torch.Tensor  # γ(r, A); 0-dim (broadcastable) when gamma_mode is fixed
    weight: torch.Tensor  # g(r, A) = (1 − γ) + γ·r·K
    surrogate: torch.Tensor  # f(r) = (1 − γ)·log r + γ·F_K(r)
    width_scale: torch.Tensor | float  # s: the kernel widths used are s·width and s·width_neg (1 when fixed)


def mixing_gamma(params: ISReshapeParams, log_ratio: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """γ(r, A) ∈ [gamma_base, gamma_max] (or `gamma` when fixed), elementwise.

    correctness factor  c = σ(−A·log r / τ_c):  → 1 on 'wrong' tokens (r > 1, A < 0 or r < 1, A > 0),
                                                 → 0 on 'right' tokens (r > 1, A > 0 or r < 1, A < 0).
    magnitude factor    m = 2σ(β·|A|) − 1 ∈ [0, 1): → 1 when the reward signal is strong.
    """
    mode = params.gamma_mode
    if mode == "fixed":  # a 0-dim tensor: broadcasts, and saves a (B, T) allocation
        return log_ratio.new_full((), params.gamma)  # new_full, not new_tensor: no host-to-device copy (a sync)
    span = params.gamma_max - params.gamma_base
    if mode == "correctness":
        factor = torch.sigmoid(-advantages * log_ratio / params.gamma_tau)
    elif mode == "magnitude":
        factor = 2.0 * torch.sigmoid(params.gamma_beta * advantages.abs()) - 1.0
    else:  # combined
        factor = (2.0 * torch.sigmoid(params.gamma_beta * advantages.abs()) - 1.0) * torch.sigmoid(
            -advantages * log_ratio / params.gamma_tau
        )
    return params.gamma_base + span * factor


def reshape_terms(params: ISReshapeParams, log_ratio: torch.Tensor, advantages: torch.Tensor,
                  width_scale: torch.Tensor | float = 1.0, ratio: torch.Tensor | None = None) -> ReshapeTerms:
    """All IS Reshape quantities from an (already clamped) log ratio; differentiable in `log_ratio`.

    The kernel widths are width_scale·width (A > 0) and width_scale·width_neg (A ≤ 0); `width_scale` is
    the factor s chosen by width_mode=adaptive (a 0-dim tensor) and 1 otherwise. `ratio` = exp(log_ratio)
    when the caller holds r exactly (a table at chosen ratios: r − 1 is then not rounded through log and
    exp, which can move a box kernel's edge); None computes it.

    One-sided kernels act on x_eff, which equals x = r − 1 on the side the update pushes away from μ
    and 0 on the other side, so K(x_eff) = 1 there and F = F_K(x_eff) + (x − x_eff) (∫ 1 dt).
    With `dual_clip` = c, tokens with A ≤ 0 and r > c are evaluated at r = c and their weight is 0, so that
    f stays at f(c); γ, and the log ratio and ratio the terms report, are the uncapped ones.
    """
    ratio = torch.exp(log_ratio) if ratio is None else ratio
    positive = advantages > 0
    log_ratio_in, ratio_in = log_ratio, ratio  # what the terms report; the weight may see them capped
    beyond = None
    if params.dual_clip is not None:  # A ≤ 0 and r > c: f stays at f(c), g = 0
        log_cap = math.log(params.dual_clip)
        beyond = (log_ratio > log_cap) & ~positive
        ratio = torch.where(beyond, params.dual_clip, ratio)  # a Python scalar: no tensor to fill, no copy
        log_ratio = torch.where(beyond, log_cap, log_ratio)
    x = ratio - 1.0
    width = params.width * width_scale
    if params.width_neg is not None and params.width_neg != params.width:
        # new_full, not new_tensor: a host-to-device copy would sync; the scalar takes x's dtype from the 0-dim tensor
        width = torch.where(positive, x.new_full((), params.width), params.width_neg) * width_scale
    kernel, integral = _localized(params, x, positive, width)
    del x  # free before the next allocations: this runs on (B, T) tensors inside the loss
    gamma = mixing_gamma(params, log_ratio_in, advantages)
    one_minus_gamma = 1.0 - gamma
    if params.localize_sft:
        sft_kernel, sft_integral = _localized(params, log_ratio, positive, width)
        surrogate = one_minus_gamma * sft_integral + gamma * integral
        weight = one_minus_gamma * sft_kernel + gamma * ratio * kernel
    else:
        surrogate = one_minus_gamma * log_ratio + gamma * integral
        weight = one_minus_gamma + gamma * ratio * kernel
    del integral
    if beyond is not None:
        weight = weight.masked_fill(beyond, 0.0)
    return ReshapeTerms(log_ratio_in, ratio_in, kernel, gamma, weight, surrogate, width_scale)


def _localized(params: ISReshapeParams, x: torch.Tensor, positive: torch.Tensor, width):
    """(K(x), ∫₀ˣ K), with K = 1 on the safe side when one_sided (the side x·A < 0: toward μ)."""
    if not params.one_sided:
        return kernel_and_integral(params.kernel, x, width)
    x_eff = torch.where(positive, x.clamp(min=0.0), x.clamp(max=0.0))
    kernel, integral = kernel_and_integral(params.kernel, x_eff, width)
    return kernel, integral + (x - x_eff)


class _SurrogateWithWeight(torch.autograd.Function):
    """Returns the token loss −f(r)·A and back-propagates ∂ℓ/∂log π_θ = −g(r, A)·A.

    The weight is computed once, under no_grad, so backward is a single multiply and saves a single
    (B, T) tensor; autograd through the kernel formulas would save several.
    """

    @staticmethod
    def forward(ctx, log_prob, token_loss, grad_factor):  # all (B, T)
        ctx.save_for_backward(grad_factor)
        ctx.input_dtype = log_prob.dtype
        return token_loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad_factor,) = ctx.saved_tensors
        return (grad_output * grad_factor).to(ctx.input_dtype), None, None


def is_reshape_token_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    params: ISReshapeParams,
    on_chunk: Callable[[slice, ReshapeTerms, torch.Tensor], None] | None = None,
    chunk_tokens: int | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token IS Reshape loss ℓ = −f(r)·A, (B, T), whose gradient w.r.t. log_prob is −g(r, A)·A.

    Computed in float32 at least (bf16/fp16 inputs are upcast); gradients flow back in log_prob's dtype.
    r = exp(clamp(log_prob − old_log_prob, ±log_ratio_clamp)); the clamp bounds r inside the weight but
    does not cut the gradient (−g(r_clamped)·A still reaches every token). γ is detached.

    The weight is computed under no_grad over chunks of rows of about `chunk_tokens` tokens, so the
    peak memory is the two (B, T) outputs plus one chunk's temporaries, whatever the batch size. The
    default is 2¹⁶ tokens on CPU (a chunk's temporaries stay in cache) and 2²⁴ on other devices, where
    every chunk costs a few dozen kernel launches and memory is no concern at that size.
    `on_chunk(rows, terms, advantages[rows])` sees each chunk's detached `ReshapeTerms` (for metrics); they
    are valid during the call only (with the adaptive width `terms.log_ratio` is a view of the loss buffer).
    Aggregate the returned (B, T) loss (mask, mean) as you like.

    With width_mode=adaptive a first pass over the chunks sums the staleness summary of log r over the
    `valid` tokens (a (B, T) 0/1 mask, bool or float; None = every token), all-reduced
    over torch.distributed's default group when it runs; the width factor is solved from it (see
    `isreshape_verl.adaptive_width`) and the second pass computes the weights as above, reading log r where
    the first pass left it (in the loss buffer, which it then overwrites).
    """
    compute_dtype = torch.promote_types(log_prob.dtype, torch.float32)
    if chunk_tokens is None:
        chunk_tokens = CPU_CHUNK_TOKENS if log_prob.device.type == "cpu" else ACCELERATOR_CHUNK_TOKENS
    batch = log_prob.shape[0]
    tokens_per_row = max(1, log_prob.numel() // max(1, batch))
    rows_per_chunk = max(1, chunk_tokens // tokens_per_row)
    chunks = [slice(start, start + rows_per_chunk) for start in range(0, batch, rows_per_chunk)]
    adaptive = params.width_mode == "adaptive"
    with torch.no_grad():
        token_loss = torch.empty(log_prob.shape, dtype=compute_dtype, device=log_prob.device)  # (B, T)
        grad_factor = torch.empty_like(token_loss)  # (B, T), −g·A, saved for backward

        def clamped_log_ratio(rows, out=None):
            return torch.sub(log_prob[rows].to(compute_dtype), old_log_prob[rows].to(compute_dtype), out=out).clamp_(
                -params.log_ratio_clamp, params.log_ratio_clamp
            )

        width_scale: torch.Tensor | float = 1.0
        if adaptive:
            summary = None
            for rows in chunks:  # log r is parked in the loss buffer until the second pass overwrites it
                log_ratio = clamped_log_ratio(rows, out=token_loss[rows])
                chunk_valid = torch.ones_like(log_ratio) if valid is None else valid[rows]
                part = adaptive_width.staleness_summary(log_ratio, advantages[rows], chunk_valid)
                summary = part if summary is None else summary.add_(part)
            adaptive_width.reduce_summary(summary)
            width_neg = params.width if params.width_neg is None else params.width_neg
            # a float on CPU; elsewhere a 0-dim float64 tensor, which does not promote the (B, T) float32 math
            width_scale = adaptive_width.solve_scale(summary, params.kernel, params.width, width_neg,
                                                     params.one_sided, params.width_target, params.width_min,
                                                     params.widest)
        for rows in chunks:
            adv = advantages[rows].to(compute_dtype)
            log_ratio = token_loss[rows] if adaptive else clamped_log_ratio(rows)
            terms = reshape_terms(params, log_ratio, adv, width_scale)
            if on_chunk is not None:  # before the writes below: terms.log_ratio may be a view of token_loss
                on_chunk(rows, terms, adv)
            torch.mul(terms.surrogate, adv, out=token_loss[rows]).neg_()
            torch.mul(terms.weight, adv, out=grad_factor[rows]).neg_()
    return _SurrogateWithWeight.apply(log_prob, token_loss, grad_factor)


__all__ = [
    "GAMMA_MODES",
    "WIDTH_MODES",
    "KERNEL_NAMES",
    "ISReshapeParams",
    "ReshapeTerms",
    "is_reshape_token_loss",
    "mixing_gamma",
    "reshape_terms",
]
