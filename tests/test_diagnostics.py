"""isreshape_verl.diagnostics: ESS, ratio quantiles and the read-off weight g, each against a closed form;
and the callers that must agree with it (verl_loss's metrics, the kernels table)."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from isreshape_verl.diagnostics import (
    RATIO_QUANTILES,
    effective_weights,
    ess_from_sums,
    kish_ess,
    quantiles,
    weights_from_gradients,
)
from isreshape_verl.kernels import KERNEL_NAMES, kernel_value
from isreshape_verl.kernels_cli import DEFAULT_ROWS, format_table, table_rows
from isreshape_verl.reshape import ISReshapeParams, reshape_terms
from isreshape_verl.specs import parse_loss_spec

F64 = torch.float64
RATIOS = torch.tensor([0.5, 0.79, 0.9, 1.0, 1.1, 1.19, 1.5, 2.5], dtype=F64)  # off the box edges 0.8, 1.2


# ---------------------------------------------------------------- ESS = (Σg)² / (N·Σg²)


def test_ess_is_one_for_equal_weights_and_one_over_k_for_one_nonzero_weight():
    # (7·0.3)² / (7·7·0.09) = 1
    assert float(kish_ess(torch.full((7,), 0.3, dtype=F64))) == pytest.approx(1.0, rel=1e-15)
    for k in (1, 2, 5, 8):
        g = torch.zeros(k, dtype=F64)
        g[k // 2] = 3.0
        assert float(kish_ess(g)) == 1.0 / k  # 3² / (k·3²), exact in binary for these k
    assert float(kish_ess(torch.tensor([1.0, 3.0], dtype=F64))) == 16 / 20  # (1 + 3)² / (2·(1 + 9))


def test_ess_along_the_last_dim_ignores_nan_and_is_nan_without_weights():
    w = torch.tensor([[1.0, float("nan"), 3.0], [2.0, 2.0, 2.0], [float("nan")] * 3], dtype=F64)
    ess = kish_ess(w)
    assert ess[0].item() == 16 / 20 and ess[1].item() == 1.0 and math.isnan(ess[2].item())
    assert kish_ess(torch.zeros(4, dtype=F64)).item() == 0.0  # every weight 0: no effective sample


def test_ess_from_masked_sums_equals_ess_of_the_masked_tokens():
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(5, 9, generator=gen, dtype=F64) * 2
    m = (torch.rand(5, 9, generator=gen) > 0.4).to(F64)
    from_sums = ess_from_sums((g * m).sum(), (g * g * m).sum(), m.sum())
    direct = g[m.bool()].sum() ** 2 / (m.sum() * (g[m.bool()] ** 2).sum())
    assert from_sums.item() == pytest.approx(direct.item(), rel=1e-14)
    masked = torch.where(m.bool(), g, float("nan")).reshape(-1)
    assert from_sums.item() == pytest.approx(kish_ess(masked).item(), rel=1e-14)
    zero = torch.zeros((), dtype=F64)
    assert ess_from_sums(zero, zero, zero).item() == 0.0  # N = 0 stays finite (verl averages its metrics)


# ---------------------------------------------------------------- quantiles


def test_quantiles_match_numpy_linear_interpolation():
    x = torch.arange(1, 102, dtype=F64)  # 1 … 101: the q-quantile is 1 + 100·q
    assert quantiles(x).tolist() == [2.0, 51.0, 100.0]
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(1000, generator=gen, dtype=F64).exp()
    np.testing.assert_allclose(quantiles(y).numpy(), np.quantile(y.numpy(), RATIO_QUANTILES), rtol=1e-14)
    np.testing.assert_allclose(quantiles(y, (0.0, 0.25, 1.0)).numpy(), [y.min(), np.quantile(y.numpy(), 0.25), y.max()],
                               rtol=1e-14)
    assert quantiles(y.float()).dtype == torch.float32
    assert all(math.isnan(v) for v in quantiles(torch.empty(0)).tolist())


# ---------------------------------------------------------------- g read off by autograd


def test_weights_from_gradients_divides_on_valid_tokens_only():
    grad = torch.tensor([-2.0, 1.0, 5.0], dtype=F64)
    grad0 = torch.tensor([-4.0, 0.0, 2.0], dtype=F64)
    g = weights_from_gradients(grad, grad0, grad0 != 0)
    assert g.tolist() == [0.5, 0.0, 2.5]
    assert math.isnan(weights_from_gradients(grad, grad0, grad0 != 0, fill=float("nan"))[1].item())


def _read_off(spec_text, sign):
    spec = parse_loss_spec(spec_text)
    log_prob = RATIOS.log()[None, :]  # (1, N), log μ = 0
    old = torch.zeros_like(log_prob)
    adv = torch.full_like(log_prob, sign)
    mask = torch.ones_like(log_prob)
    g, valid = effective_weights(spec.loss_fn, old, log_prob, adv, mask, spec.loss_agg_mode, spec.actor_config())
    assert bool(valid.all())
    return g[0]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_read_off_g_equals_the_closed_form_for_vanilla_ppo_clip(sign):
    # PPO-clip (no dual-clip below r = 3) is one-sided box, γ = 1, widths ε_high = ε_low = 0.2 (docs/math.md):
    #   A > 0: g = r for r ≤ 1.2, 0 above;   A < 0: g = r for r ≥ 0.8, 0 below
    params = ISReshapeParams(kernel="box", width=0.2, one_sided=True, gamma_mode="fixed", gamma=1.0,
                             localize_sft=False, width_mode="fixed")
    expected = reshape_terms(params, RATIOS.log(), torch.full_like(RATIOS, sign)).weight
    assert expected.tolist() == (torch.where(RATIOS > 1.2, 0.0, RATIOS) if sign > 0
                                 else torch.where(RATIOS < 0.8, 0.0, RATIOS)).tolist()
    torch.testing.assert_close(_read_off("vanilla", sign), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_read_off_g_equals_the_closed_form_for_is_reshape(sign):
    expected = reshape_terms(ISReshapeParams(width_mode="fixed"), RATIOS.log(), torch.full_like(RATIOS, sign)).weight
    got = _read_off("is_reshape:width_mode=fixed", sign)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert got[3].item() == pytest.approx(1.0, abs=1e-15)  # g(1) = 1


def test_read_off_g_is_zero_and_invalid_where_a_is_zero_or_masked():
    spec = parse_loss_spec("vanilla")
    log_prob = RATIOS.log()[None, :4]
    adv = torch.tensor([[1.0, 0.0, -1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64)
    g, valid = effective_weights(spec.loss_fn, torch.zeros_like(log_prob), log_prob, adv, mask, "token-mean",
                                 spec.actor_config())
    assert valid.tolist() == [[True, False, True, False]]
    assert g[0, 1].item() == 0.0 and g[0, 3].item() == 0.0
    assert g[0, 0].item() == pytest.approx(0.5, rel=1e-12)  # A > 0, r = 0.5: g = r
    assert g[0, 2].item() == pytest.approx(0.9, rel=1e-12)  # A < 0, r = 0.9 ≥ 1 − 0.2: not clipped, g = r


# ---------------------------------------------------------------- callers agree with the one definition


def test_verl_loss_metrics_are_the_diagnostics_of_its_weights():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    import isreshape_verl.verl_loss  # noqa: F401

    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(6, 10, generator=gen, dtype=F64) * 3
    log_prob = (old + 0.5 * torch.randn(6, 10, generator=gen, dtype=F64)).requires_grad_()
    adv = torch.randn(6, 1, generator=gen, dtype=F64).expand(6, 10).clone()
    mask = torch.arange(10)[None, :] < torch.tensor([10, 3, 7, 1, 10, 5])[:, None]
    spec = parse_loss_spec("is_reshape:width_mode=fixed,one_sided=false")
    _, m = get_policy_loss_fn("is_reshape")(old_log_prob=old, log_prob=log_prob, advantages=adv, response_mask=mask,
                                             loss_agg_mode="token-mean", config=spec.actor_config())
    log_r = (log_prob.detach() - old)[mask]
    g = reshape_terms(spec.reshape_params(), log_r, adv[mask]).weight
    assert m["actor/is_reshape/ess"] == pytest.approx(kish_ess(g).item(), rel=1e-13)
    p01, p50, p99 = quantiles(log_r).exp().tolist()  # ≤ 8,192 tokens: the sample is every valid token
    assert (m["actor/is_reshape/ratio_p01"], m["actor/is_reshape/ratio_p50"], m["actor/is_reshape/ratio_p99"]) == (
        pytest.approx(p01, rel=1e-14), pytest.approx(p50, rel=1e-14), pytest.approx(p99, rel=1e-14))


def test_kernels_table_is_reshape_terms_and_prints_what_the_hand_formula_printed():
    """kernels_cli computes g with reshape_terms; its numbers are bit for bit the hand-written
    g = (1 − γ) + γ·r·K(r − 1) it printed before, box edges (|r − 1| = w) included."""
    ratios = [0.05, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0]
    rows = DEFAULT_ROWS + [(k, w) for k in KERNEL_NAMES for w in (0.01, 0.2, 0.5, 2.0)]
    r = torch.tensor(ratios, dtype=F64)
    for gamma in (0.0, 0.3, 1.0):
        computed = table_rows(rows, ratios, gamma)
        by_hand = []
        for name, width in rows:
            k = kernel_value(name, r - 1.0, width)
            by_hand.append((name, width, list(zip(k.tolist(), ((1.0 - gamma) + gamma * r * k).tolist()))))
        assert computed == by_hand
        assert format_table(computed, ratios, gamma) == format_table(by_hand, ratios, gamma)
    box = dict(((n, w), v) for n, w, v in table_rows([("box", 0.5)], [0.5, 1.5], 0.5))
    assert box[("box", 0.5)] == [(1.0, 0.75), (1.0, 1.25)]  # |r − 1| = w is inside: g = 0.5 + 0.5·r


def test_diagnostics_do_not_import_verl():
    code = "import sys, isreshape_verl.diagnostics; print('verl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
