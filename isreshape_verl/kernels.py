"""Localization kernels K(x), x = r − 1, and their integrals F_K.

Every kernel has K(0) = 1, K ≥ 0 and a width w > 0 (larger w = wider trust region):

    name           K(x), u = x / w          F_K(r) = ∫₁ʳ K(t − 1) dt, u = (r − 1) / w
    gaussian       exp(−u²/2)               w·√(π/2)·erf(u/√2)
    sech2          sech²(u)                 w·tanh(u)
    cauchy         1 / (1 + u²)             w·arctan(u)
    laplace        exp(−|u|)                w·sign(u)·(1 − exp(−|u|))
    epanechnikov   (1 − u²)₊                w·(ū − ū³/3),  ū = clamp(u, −1, 1)
    box            1[|u| ≤ 1]               w·clamp(u, −1, 1)

SAPO's gate with temperature τ has weight r·sech²(τ(r − 1)/2), i.e. `sech2` with w = 2/τ.
PPO-clip is `box` applied on one side only (see `reshape.py`).

Plain torch; never imports verl.
"""

from __future__ import annotations

import math

import torch

KERNEL_NAMES = ("gaussian", "sech2", "cauchy", "laplace", "epanechnikov", "box")

# sup_x x·K(x) / w for each kernel, so that the weight r·K(r − 1) = K(x) + x·K(x) ≤ 1 + c·w.
#   gaussian      max u·exp(−u²/2) at u = 1:                e^{−1/2}     = 0.6065
#   sech2         max u·sech²(u) at 2u·tanh(u) = 1, u≈0.772: 0.4477 (rounded up to 0.448)
#   cauchy        max u/(1 + u²) at u = 1:                   1/2
#   laplace       max u·exp(−u) at u = 1:                    1/e          = 0.3679
#   epanechnikov  max u·(1 − u²) at u = 1/√3:                2/(3√3)      = 0.3849
#   box           max u on |u| ≤ 1:                          1
_SUP_X_K_OVER_W = {
    "gaussian": math.exp(-0.5),
    "sech2": 0.448,
    "cauchy": 0.5,
    "laplace": math.exp(-1.0),
    "epanechnikov": 2.0 / (3.0 * math.sqrt(3.0)),
    "box": 1.0,
}


def check_kernel_name(name: str) -> None:
    if name not in KERNEL_NAMES:
        raise ValueError(f"kernel={name!r} is not a known kernel; allowed: {', '.join(KERNEL_NAMES)}")


def kernel_and_integral(name: str, x: torch.Tensor, width: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(K(x), F_K(r)) for x = r − 1, elementwise; `width` broadcasts against x. F_K(1) = 0, dF/dx = K.

    Both come from one pass over u = x / w, sharing what they can (tanh for sech2, exp for laplace):
    this runs on every token of every micro-batch.
    """
    u = x / width
    if name == "gaussian":
        return torch.exp(-0.5 * u * u), width * math.sqrt(math.pi / 2.0) * torch.erf(u / math.sqrt(2.0))
    if name == "sech2":
        t = torch.tanh(u)
        return 1.0 - t * t, width * t  # sech² = 1 − tanh²; cosh² would overflow for |u| > ~355
    if name == "cauchy":
        return 1.0 / (1.0 + u * u), width * torch.atan(u)
    if name == "laplace":
        decay = torch.exp(-u.abs())
        return decay, width * torch.sign(u) * (1.0 - decay)
    if name == "epanechnikov":
        uc = u.clamp(-1.0, 1.0)
        return 1.0 - uc * uc, width * (uc - uc * uc * uc / 3.0)  # 1 − ū² = (1 − u²)₊
    if name == "box":
        uc = u.clamp(-1.0, 1.0)
        return (u.abs() <= 1.0).to(x.dtype), width * uc
    check_kernel_name(name)
    raise AssertionError("unreachable")


def kernel_value(name: str, x: torch.Tensor, width: torch.Tensor | float) -> torch.Tensor:
    """K(x) for x = r − 1."""
    return kernel_and_integral(name, x, width)[0]


def kernel_integral(name: str, x: torch.Tensor, width: torch.Tensor | float) -> torch.Tensor:
    """F_K(r) = ∫₁ʳ K(t − 1) dt as a function of x = r − 1."""
    return kernel_and_integral(name, x, width)[1]


def weight_bound(name: str, width: float) -> float:
    """An upper bound on the kernelized IS weight r·K(r − 1) over all r > 0: 1 + c_K·w.

    Since γ ∈ [0, 1] mixes this weight with 1, the same bound holds for g(r, A) = (1 − γ) + γ·r·K(r − 1)
    for two-sided kernels. (One-sided kernels leave K = 1 on the safe side, where g = (1 − γ) + γ·r is
    bounded by 1 when r < 1 but grows like r when r > 1 and A ≤ 0, exactly as PPO-clip without dual-clip;
    `dual_clip=c` bounds it by c, as verl's clip_ratio_c does for PPO-clip.)
    """
    check_kernel_name(name)
    return 1.0 + _SUP_X_K_OVER_W[name] * width
