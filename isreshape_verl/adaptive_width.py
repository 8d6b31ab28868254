"""Self-tuning kernel width (`width_mode=adaptive`): narrow the kernel as the batch grows staler.

Each loss call scales `width` and `width_neg` by one common factor s ∈ [s_lo, s_hi] =
[width_min / width, width_max / width], chosen without gradient so that the batch's kernel-weighted
second moment of log r meets `width_target`:

    M(s) = (1/N) · Σ_{valid tokens the kernel acts on} K(x / (s·w_A)) · (log r)²,     x = r − 1
    s*   = the largest s in [s_lo, s_hi] with M(s) ≤ width_target   (s_lo when none qualifies)

N counts every valid token, w_A is `width` where A > 0 and `width_neg` where A ≤ 0, and "the tokens the
kernel acts on" are all valid tokens for a two-sided kernel and, with `one_sided`, those on the side the
update pushes away from μ (r > 1 where A > 0, r < 1 where A ≤ 0): on the other side K = 1 whatever the
width, so there is nothing to tune. Every kernel here decays in |x| / w, so M grows with s: an on-policy
batch (log r ≡ 0, M ≡ 0) keeps the widest kernel, and a staler batch gets a narrower one. This is M2PO's
second-moment budget on log r (0.04 there, enforced by a hard token mask) turned into a soft one, met by
the kernel's width instead of by dropping tokens.

How s* moves with staleness (log r of spread σ): while the acting tokens' plain second moment is under the
target, the widest kernel is kept; once it exceeds the target, s* drops to where the kernel takes off
the excess, and falls further as σ grows as long as σ is below about the chosen width. Beyond that the
kernel already cuts most tokens, M(s) falls as σ grows at fixed s (≈ (s·w)³/σ), and s* levels off
(asymptotically it rises like σ^(1/3)): a very stale batch gets a narrow, not an ever narrower, kernel.

The solve never passes over the (B, T) tensors more than once. It reads a summary of the batch: Σ(log r)²
in `BINS` uniform bins of log r ∈ [−LOG_R_EDGE, LOG_R_EDGE] for each sign of A (tokens beyond the edge are
counted in the edge bin, which overstates their K and so errs towards a narrower kernel), and N. K is
evaluated at each bin's centre, on a coarse grid of s and then on a fine grid inside the chosen coarse
step, all on the summary's device and without a host sync. With torch.distributed initialised, the summary
is all-reduced (one collective per call) before solving, so every data-parallel rank gets the same width,
the one a single process would get on the concatenated batch. verl keeps the number of micro-batches equal
across data-parallel ranks (also with `use_dynamic_bsz`), so every rank reaches the collective.

The width is solved per loss call, that is per micro-batch in verl: unlike the fixed width, the update is
not exactly invariant to the micro-batch size. Micro-batches of a few thousand tokens get nearly the width
of their whole mini-batch (within 10 % at ≈ 2,400 tokens in the tests; ± 15–35 % at 250–500 tokens).
"""

from __future__ import annotations

import math

import torch

from isreshape_verl.kernels import kernel_value

BINS = 256  # per sign of A
LOG_R_EDGE = 1.0  # bins cover log r ∈ [−1, 1] (r ∈ [0.37, 2.72]), bin width 2/256 ≈ 0.0078
GRID = 48  # points of each of the two grids over s


def summary_size() -> int:
    return 2 * BINS + 1


def staleness_summary(log_ratio: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(2·BINS + 1,) float64: Σ(log r)² per log-r bin for A ≤ 0, then for A > 0, then the valid-token count.

    Sums of several chunks (or of several ranks) add up to the summary of the whole batch.
    """
    scale = BINS / (2.0 * LOG_R_EDGE)
    index = ((log_ratio.clamp(-LOG_R_EDGE, LOG_R_EDGE) + LOG_R_EDGE) * scale).long().clamp_(max=BINS - 1)
    index += (advantages > 0).long() * BINS
    weights = torch.where(valid, log_ratio * log_ratio, 0.0)
    sums = torch.bincount(index.reshape(-1), weights=weights.reshape(-1).double(), minlength=2 * BINS)
    return torch.cat([sums, valid.sum().double()[None]])


def reduce_summary(summary: torch.Tensor) -> torch.Tensor:
    """Sum the summary over the default process group when torch.distributed runs with > 1 rank."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(summary)
    return summary


def _bin_centres(device) -> torch.Tensor:
    edges = torch.linspace(-LOG_R_EDGE, LOG_R_EDGE, BINS + 1, dtype=torch.float64, device=device)
    return 0.5 * (edges[1:] + edges[:-1])  # (BINS,) centres in log r; none is 0 (BINS is even)


def second_moment(summary: torch.Tensor, scales: torch.Tensor, kernel: str, width: float, width_neg: float,
                  one_sided: bool) -> torch.Tensor:
    """M(s) for each s in `scales` (S,), from a summary; (S,) float64."""
    centres = _bin_centres(summary.device)  # (BINS,)
    x = torch.expm1(centres)  # r − 1 at the centres
    sums = summary[: 2 * BINS].view(2, BINS)  # row 0: A ≤ 0, row 1: A > 0
    if one_sided:  # only the side that pushes away from μ is tuned: r < 1 for A ≤ 0, r > 1 for A > 0
        sums = sums * torch.stack([centres < 0, centres > 0]).to(sums.dtype)
    widths = torch.tensor([width_neg, width], dtype=torch.float64, device=summary.device)  # (2,)
    k = kernel_value(kernel, x[None, None, :], (scales[:, None, None] * widths[None, :, None]))  # (S, 2, BINS)
    total = (k * sums[None]).sum(dim=(1, 2))  # (S,)
    return total / summary[-1].clamp(min=1.0)


def solve_scale(summary: torch.Tensor, kernel: str, width: float, width_neg: float, one_sided: bool,
                target: float, width_min: float, width_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s*, M(s*)) as 0-dim float64 tensors on the summary's device; see the module docstring.

    Two log-spaced grids: GRID points over [s_lo, s_hi], then GRID points inside the coarse step above the
    chosen point, so s* is within a factor (s_hi / s_lo)^(1 / (GRID − 1)²) of the exact largest feasible s.
    """
    s_lo, s_hi = width_min / width, width_max / width
    device = summary.device
    step = math.log(s_hi / s_lo) / (GRID - 1)
    coarse = torch.exp(torch.linspace(math.log(s_lo), math.log(s_hi), GRID, dtype=torch.float64, device=device))
    best = _largest_feasible(coarse, second_moment(summary, coarse, kernel, width, width_neg, one_sided), target, s_lo)
    fine = best * torch.exp(torch.linspace(0.0, step, GRID, dtype=torch.float64, device=device)).clamp(max=s_hi / best)
    moments = second_moment(summary, fine, kernel, width, width_neg, one_sided)
    best = _largest_feasible(fine, moments, target, s_lo)
    achieved = second_moment(summary, best[None], kernel, width, width_neg, one_sided)[0]
    return best, achieved


def _largest_feasible(scales: torch.Tensor, moments: torch.Tensor, target: float, s_lo: float) -> torch.Tensor:
    return torch.where(moments <= target, scales, torch.full_like(scales, s_lo)).max()
