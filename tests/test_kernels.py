"""Closed-form properties of every localization kernel K and its integral F_K."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from isreshape_verl.kernels import KERNEL_NAMES, kernel_integral, kernel_value, weight_bound

WIDTHS = (0.25, 1.0, 2.0)


@pytest.mark.parametrize("name", KERNEL_NAMES)
@pytest.mark.parametrize("width", WIDTHS)
def test_kernel_is_one_at_zero_nonnegative_and_decays(name, width):
    x = torch.linspace(-0.999, 50.0, 20001, dtype=torch.float64)
    k = kernel_value(name, x, width)
    assert kernel_value(name, torch.zeros(1, dtype=torch.float64), width).item() == 1.0
    assert (k >= 0).all() and (k <= 1).all()
    far = kernel_value(name, torch.tensor([50.0 * width, -50.0 * width], dtype=torch.float64), width)
    # slowest tail is Cauchy: 1/(1 + 50²) ≈ 4.0e-4
    assert far.max().item() < 4.1e-4


@pytest.mark.parametrize("name", KERNEL_NAMES)
@pytest.mark.parametrize("width", WIDTHS)
def test_integral_vanishes_at_one_and_differentiates_to_the_kernel(name, width):
    assert kernel_integral(name, torch.zeros(1, dtype=torch.float64), width).item() == 0.0
    # avoid the kinks |x| = w of box/epanechnikov and x = 0 of laplace, where dF/dx is one-sided
    x = torch.linspace(-0.99, 6.0, 1001, dtype=torch.float64)
    x = x[((x.abs() - width).abs() > 1e-6) & (x.abs() > 1e-6)].requires_grad_()
    (dF,) = torch.autograd.grad(kernel_integral(name, x, width).sum(), x)
    torch.testing.assert_close(dF, kernel_value(name, x.detach(), width), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_integral_matches_trapezoid_quadrature(name):
    """F_K(r) = ∫₁ʳ K(t − 1) dt against an independent numerical integral at a few r."""
    for r in (0.2, 0.7, 1.5, 3.0):
        t = torch.linspace(1.0, r, 200001, dtype=torch.float64)
        numeric = torch.trapezoid(kernel_value(name, t - 1.0, 0.8), t).item()
        closed = kernel_integral(name, torch.tensor(r - 1.0, dtype=torch.float64), 0.8).item()
        assert closed == pytest.approx(numeric, abs=2e-5)  # box's jump costs one grid step, 3.5e-5·(w)


# The design notes' table at r = 3 (x = 2), with sech² at width 2 (SAPO's τ = 1 ⇔ w = 2/τ = 2):
#   gaussian w=1: K = e^{-2} = 0.135, g = 3K = 0.41;   sech2 w=2: K = sech²(1) = 0.420, g = 1.26
#   cauchy   w=1: K = 1/(1+4) = 0.200, g = 0.60;       laplace w=1: K = e^{-2} = 0.135, g = 0.41
DESIGN_TABLE_R3 = [("gaussian", 1.0, 0.135, 0.41), ("sech2", 2.0, 0.420, 1.26), ("cauchy", 1.0, 0.200, 0.60),
                   ("laplace", 1.0, 0.135, 0.41)]


@pytest.mark.parametrize("name,width,k_expected,g_expected", DESIGN_TABLE_R3)
def test_design_notes_table_at_r_equals_3(name, width, k_expected, g_expected):
    k = kernel_value(name, torch.tensor(2.0, dtype=torch.float64), width).item()
    assert round(k, 3) == k_expected
    assert round(3.0 * k, 2) == g_expected


def test_sech2_at_width_one_is_not_the_tolerant_kernel_of_the_table():
    """At the notes' own definition sech²((r−1)/w) with w = 1, r = 3 gives K = sech²(2) = 0.0707, g = 0.21."""
    k = kernel_value("sech2", torch.tensor(2.0, dtype=torch.float64), 1.0).item()
    assert k == pytest.approx(1.0 / math.cosh(2.0) ** 2, rel=1e-12)
    assert round(k, 3) == 0.071 and round(3 * k, 2) == 0.21


@pytest.mark.parametrize("name", KERNEL_NAMES)
@settings(max_examples=60, deadline=None)
@given(log_r=st.floats(-20.0, 20.0), width=st.floats(0.05, 10.0))
def test_kernelized_weight_is_bounded(name, log_r, width):
    """r·K(r − 1) ≤ 1 + c_K·w over r ∈ [e⁻²⁰, e²⁰] (the bound stated in kernels.weight_bound)."""
    r = torch.tensor(math.exp(log_r), dtype=torch.float64)
    g = (r * kernel_value(name, r - 1.0, width)).item()
    assert 0.0 <= g <= weight_bound(name, width) + 1e-12


@pytest.mark.parametrize("width", WIDTHS)
def test_gaussian_weight_peak_matches_its_closed_form(width):
    """d/dr [r·exp(−(r−1)²/2w²)] = 0 ⇔ r² − r − w² = 0 ⇔ r* = (1 + √(1 + 4w²))/2; the grid maximum agrees."""
    r = torch.linspace(1e-6, 1.0 + 30 * width, 400001, dtype=torch.float64)
    peak = (r * kernel_value("gaussian", r - 1.0, width)).max().item()
    r_star = (1.0 + math.sqrt(1.0 + 4.0 * width**2)) / 2.0
    assert peak == pytest.approx(r_star * math.exp(-((r_star - 1.0) ** 2) / (2 * width**2)), rel=1e-9)
    assert 1.0 < peak <= weight_bound("gaussian", width)


def test_unknown_kernel_is_rejected_with_the_allowed_list():
    with pytest.raises(ValueError, match=r"kernel='tri'.*gaussian, sech2, cauchy, laplace, epanechnikov, box"):
        kernel_value("tri", torch.zeros(1), 1.0)
