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
evaluated at each bin's centre, on 32 log-spaced values of s (a matrix built once per loss setting, so a
call pays one matrix-vector product) with s* interpolated between two of them: on accelerators all on
the device and without a host sync, on CPU (where reading costs nothing) in Python after one read. With
torch.distributed initialised, the summary
is all-reduced (one collective per call) before solving, so every data-parallel rank gets the same width,
the one a single process would get on the concatenated batch. verl's engines keep the number of
micro-batches equal across data-parallel ranks (`same_micro_num_in_dp=True`, also with `use_dynamic_bsz`),
so every rank reaches the collective; with Ulysses sequence parallelism the sum covers each sequence's
shards once. Not with Megatron pipeline parallelism: only the last stage calls the loss, and the
collective over every rank would wait forever, so the verl loss refuses that configuration (use
`width_mode=fixed` there).

The width is solved per loss call, that is per micro-batch in verl: unlike the fixed width, the update is
not exactly invariant to the micro-batch size. Micro-batches of a few thousand tokens get nearly the width
of their whole mini-batch (within 10 % at ≈ 2,400 tokens in the tests; ± 15–35 % at 250–500 tokens).
"""

from __future__ import annotations

import math

import torch

from isreshape_verl.kernels import kernel_value

BINS = 128  # per sign of A
LOG_R_EDGE = 1.0  # bins cover log r ∈ [−1, 1] (r ∈ [0.37, 2.72]), bin width 2/128 ≈ 0.016
GRID = 32  # log-spaced points over [s_lo, s_hi]
_BINS_PER_UNIT = BINS / (2.0 * LOG_R_EDGE)  # 64.0, a power of two


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs nothing: on CPU, where there is no device to wait for.
    Elsewhere the summary and the solve take paths that never read a value on the host (a sync per loss call)."""
    return device.type == "cpu"


def staleness_summary(log_ratio: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(2·BINS + 1,) float64: Σ(log r)² per log-r bin for A ≤ 0, then for A > 0, then the valid-token count.

    `valid` is a 0/1 mask of any dtype (bool or float, as verl's response_mask). Sums of several chunks (or of
    several ranks) add up to the summary of the whole batch. This runs on every loss call, so it is written as
    few tensor ops, none of which reads a value on the host or copies one to the device. The bin of log r is
    ⌊(log r + LOG_R_EDGE)·BINS / (2·LOG_R_EDGE)⌋, clamped to the edge bins: on CPU computed so in float32 (a value
    within one float32 step of a bin edge may round to either side of it), on accelerators by torch.bucketize
    against the exact edges (one kernel instead of four; there the edge's upper side). The bin index is an
    integer before the A > 0 offset of BINS is added (adding 128 to a float32 such as 51.999996 would round it
    up into the next bin), and the square is written straight into float64.
    """
    if reads_are_free(log_ratio.device):  # bucketize is the slowest way on CPU (38–78× the arithmetic)
        position = torch.mul(log_ratio, _BINS_PER_UNIT).add_(LOG_R_EDGE * _BINS_PER_UNIT)  # in bins from −EDGE
        index = position.int().clamp_(0, BINS - 1)  # int() truncates toward 0 (floor on [0, BINS)); beyond: edges
        positive = torch.gt(advantages, 0.0, out=torch.empty_like(index))  # bool arithmetic is slow on CPU
    else:
        index = torch.bucketize(log_ratio, _inner_edges(log_ratio.dtype, log_ratio.device), out_int32=True,
                                right=True)  # edges[i − 1] ≤ log r < edges[i]: bin i, 0 and BINS − 1 beyond
        positive = torch.gt(advantages, 0.0)  # bool: one kernel (an int32 `out` costs a copy more)
    index.add_(positive, alpha=BINS)  # A > 0 → the second half
    mask = valid.view(torch.uint8) if valid.dtype == torch.bool else valid  # bool arithmetic is slow on CPU
    masked = torch.mul(log_ratio, mask)
    squares = torch.mul(masked, masked, out=torch.empty(masked.shape, dtype=torch.float64, device=masked.device))
    summary = bin_sums(index.reshape(-1), squares.reshape(-1), 2 * BINS + 1, on_cpu=reads_are_free(log_ratio.device))
    torch.sum(valid, dim=tuple(range(valid.dim())), dtype=torch.float64, out=summary[-1])  # N, in the last bin
    return summary


_EDGES_CACHE: dict = {}


def _inner_edges(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The BINS − 1 bin edges inside (−LOG_R_EDGE, LOG_R_EDGE), exact in every float dtype (multiples of 1/64)."""
    key = (dtype, device)
    if key not in _EDGES_CACHE:
        steps = torch.arange(1, BINS, dtype=torch.float64) / _BINS_PER_UNIT - LOG_R_EDGE
        _EDGES_CACHE[key] = steps.to(dtype=dtype, device=device)
    return _EDGES_CACHE[key]


def bin_sums(index: torch.Tensor, weights: torch.Tensor, size: int, on_cpu: bool) -> torch.Tensor:
    """(size,) Σ weights per bin index (index < size). On CPU torch.bincount (the fastest there); elsewhere
    index_add_, because CUDA's bincount reads max(index) on the host, a sync that would stall every loss call."""
    if on_cpu:
        return torch.bincount(index, weights=weights, minlength=size)
    return torch.zeros(size, dtype=weights.dtype, device=weights.device).index_add_(0, index, weights)


def reduce_summary(summary: torch.Tensor) -> torch.Tensor:
    """Sum the summary over the default process group when torch.distributed runs with > 1 rank."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(summary)
    return summary


_MATRIX_CACHE: dict = {}


def _grid_and_matrix(kernel: str, width: float, width_neg: float, one_sided: bool, s_lo: float, s_hi: float,
                     device) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(log s on the GRID (GRID,), the matrix (GRID, 2·BINS) with M(s_i) = matrix[i] · sums / N), float64,
    and log s as Python floats (for the CPU's interpolation).

    Row i holds K at every bin centre for s_i — A ≤ 0 bins at width s_i·width_neg, A > 0 bins at s_i·width —
    times 0 on the bins the kernel does not act on (one_sided: r ≥ 1 for A ≤ 0, r ≤ 1 for A > 0). It depends
    only on the loss's settings, so it is built once per setting and device: a loss call then pays one
    matrix-vector product for all GRID values of M, not GRID × BINS kernel evaluations.
    """
    key = (kernel, width, width_neg, one_sided, s_lo, s_hi, str(device))
    if key not in _MATRIX_CACHE:
        edges = torch.linspace(-LOG_R_EDGE, LOG_R_EDGE, BINS + 1, dtype=torch.float64, device=device)
        centres = 0.5 * (edges[1:] + edges[:-1])  # in log r; none is 0 (BINS is even)
        x = torch.expm1(centres)  # r − 1 at the bin centres
        log_s = torch.linspace(math.log(s_lo), math.log(s_hi), GRID, dtype=torch.float64, device=device)
        scales = torch.exp(log_s)[:, None]
        k_neg = kernel_value(kernel, x[None, :], scales * width_neg)  # (GRID, BINS)
        k_pos = kernel_value(kernel, x[None, :], scales * width)
        if one_sided:  # only the side that pushes away from μ is tuned: r < 1 for A ≤ 0, r > 1 for A > 0
            k_neg, k_pos = k_neg * (centres < 0), k_pos * (centres > 0)
        _MATRIX_CACHE[key] = (log_s, torch.cat([k_neg, k_pos], dim=1), log_s.tolist())
    return _MATRIX_CACHE[key]


def solve_scale(summary: torch.Tensor, kernel: str, width: float, width_neg: float, one_sided: bool,
                target: float, width_min: float, width_max: float) -> torch.Tensor | float:
    """s*: a 0-dim float64 tensor on the summary's device, computed without a host sync (a float on CPU, where
    reading a value costs nothing); see the module docstring.

    M is evaluated on GRID log-spaced points over [s_lo, s_hi] as the excess e_i = N·(M(s_i) − target), one
    matrix-vector product. M grows with s, so e_0 ≤ e_1 ≤ … and s* sits where e crosses 0. Each of the
    GRID − 1 segments contributes the share of it that lies at or below the target,

        φ_i = clamp((e_i − ε) / min(e_i − ε − e_{i+1}, −ε), 0, 1)        (ε = TIE)

    which is 1 for a segment wholly below (e_{i+1} ≤ 0, ties at the target included: (−ε)/(−ε) = 1), 0 for
    one wholly above (e_i > ε), and the linear zero crossing (−e_i + ε)/(e_{i+1} − e_i + ε) for the one in
    between; then log s* = log s_lo + (Σφ / (GRID − 1))·(log s_hi − log s_lo). Both ends come out of the same
    formula: every φ = 0 gives s_lo, every φ = 1 gives s_hi. On accelerators that is eight tensor ops and no
    host read (see _interpolate_on_device); on CPU the GRID excesses are read and the same sums done in Python
    (12 µs against the tensor ops' 19 µs on one core of the benchmark machine), and s* comes back as a Python
    float, so that the kernels run exactly the fixed-width loss's ops.
    """
    s_lo, s_hi = width_min / width, width_max / width
    if not reads_are_free(summary.device):
        system, shift, log_s = _device_system(kernel, width, width_neg, one_sided, s_lo, s_hi, target, summary.device)
        return _interpolate_on_device(torch.addmv(shift, system, summary), log_s)  # addmv: (e_i − ε) for all i
    _, matrix, log_s_on_host = _grid_and_matrix(kernel, width, width_neg, one_sided, s_lo, s_hi, summary.device)
    n_valid = summary[-1].clamp(min=1.0)
    excess = torch.addmv(n_valid, matrix, summary[: 2 * BINS], beta=-target)  # (GRID,) N·(M(s_i) − target)
    return _interpolate_on_host(excess.tolist(), log_s_on_host)


TIE = 1e-300  # excesses within this of 0 count as on the target, so a tie at the target gives the larger s
_SYSTEM_CACHE: dict = {}


def _device_system(kernel: str, width: float, width_neg: float, one_sided: bool, s_lo: float, s_hi: float,
                   target: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(system (GRID, 2·BINS + 1), shift (GRID,), log s (GRID,)), float64, with system · summary + shift =
    e − ε: the matrix of _grid_and_matrix with a last column −target, which multiplies N (the summary's last
    entry), and shift = −ε. One addmv then gives what the solve needs (N = 0 gives −ε everywhere: s_hi, as
    an empty batch should). Built once per loss setting and device."""
    key = (kernel, width, width_neg, one_sided, s_lo, s_hi, target, str(device))
    if key not in _SYSTEM_CACHE:
        log_s, matrix, _ = _grid_and_matrix(kernel, width, width_neg, one_sided, s_lo, s_hi, device)
        system = torch.cat([matrix, matrix.new_full((GRID, 1), -target)], dim=1)
        _SYSTEM_CACHE[key] = (system, matrix.new_full((GRID,), -TIE), log_s)
    return _SYSTEM_CACHE[key]


def _interpolate_on_device(below: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """exp of log s interpolated at the zero crossing (see solve_scale), from below = e − ε, in tensor ops only:
    φ_i's denominator is below_i − below_{i+1} = e_i − e_{i+1}, which differs from e_i − ε − e_{i+1} only
    where e_{i+1} is within ε of 0 (and then both are clamped to −ε or give the same φ)."""
    shares = torch.sub(below[:-1], below[1:]).clamp_(max=-TIE)
    shares = torch.div(below[:-1], shares, out=shares).clamp_(0.0, 1.0)  # φ_i
    return torch.lerp(log_s[0], log_s[-1], shares.mean()).exp_()  # mean: Σφ / (GRID − 1)


def _interpolate_on_host(excess: list[float], log_s: list[float]) -> float:
    """_interpolate_on_device with Python floats, from the excesses e: the same steps, torch.lerp's formula
    included."""
    total = 0.0
    for e0, e1 in zip(excess, excess[1:]):
        below = e0 - TIE
        total += min(max(below / min(below - e1, -TIE), 0.0), 1.0)
    weight, low, high = total / (GRID - 1), log_s[0], log_s[-1]
    log_scale = low + weight * (high - low) if weight < 0.5 else high - (high - low) * (1.0 - weight)
    return math.exp(log_scale)
