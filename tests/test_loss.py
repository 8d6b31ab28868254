"""The `is_reshape` loss through verl's registry: gradient identities, equality with verl's own
losses on the same tensors, aggregation invariances, numerics and metrics."""

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import verl  # noqa: F401  (loads the plugin entry point)
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from isreshape_verl.kernels import KERNEL_NAMES
from isreshape_verl.reshape import GAMMA_MODES, ISReshapeParams, is_reshape_token_loss
from isreshape_verl.specs import LOSS_AGG_MODES, parse_loss_spec

F64 = torch.float64
IS_RESHAPE = get_policy_loss_fn("is_reshape")


# ---------- the math written out again, independently of isreshape_verl.kernels / reshape ----------
def expected_kernel(name, x, w):
    if name == "gaussian":
        return torch.exp(-(x**2) / (2 * w**2))
    if name == "sech2":
        return 1.0 / torch.cosh((x / w).clamp(-300, 300)) ** 2
    if name == "cauchy":
        return w**2 / (w**2 + x**2)
    if name == "laplace":
        return torch.exp(-x.abs() / w)
    if name == "epanechnikov":
        return torch.where(x.abs() < w, 1 - (x / w) ** 2, torch.zeros_like(x))
    if name == "box":
        return torch.where(x.abs() <= w, torch.ones_like(x), torch.zeros_like(x))
    raise AssertionError(name)


def expected_weight(params: ISReshapeParams, log_prob, old_log_prob, adv):
    """g(r, A) = (1 − γ) + γ·r·K(r − 1), with the widths, one-sidedness, γ mode and dual clip of `params`."""
    log_r = (log_prob - old_log_prob).clamp(-params.log_ratio_clamp, params.log_ratio_clamp)
    r = log_r.exp()
    x = r - 1
    w_neg = params.width if params.width_neg is None else params.width_neg
    pushes_away = torch.where(adv > 0, x > 0, x < 0)

    def localized(at):  # K at `at` (r − 1, or log r for the SFT-like term), 1 on the safe side when one-sided
        k = torch.where(adv > 0, expected_kernel(params.kernel, at, params.width),
                        expected_kernel(params.kernel, at, w_neg))
        return torch.where(pushes_away, k, torch.ones_like(k)) if params.one_sided else k
    k = localized(x)
    lo, hi = params.gamma_base, params.gamma_max
    correctness = 1 / (1 + torch.exp(adv * log_r / params.gamma_tau))  # σ(−A·log r/τ)
    magnitude = 2 / (1 + torch.exp(-params.gamma_beta * adv.abs())) - 1  # 2σ(β|A|) − 1
    gamma = {
        "fixed": torch.full_like(r, params.gamma),
        "correctness": lo + (hi - lo) * correctness,
        "magnitude": lo + (hi - lo) * magnitude,
        "combined": lo + (hi - lo) * magnitude * correctness,
    }[params.gamma_mode]
    sft = localized(log_r) if params.localize_sft else 1.0
    weight = (1 - gamma) * sft + gamma * r * k
    if params.dual_clip is not None:  # PPO's dual clip: no gradient where A ≤ 0 and r > c
        weight = torch.where((adv <= 0) & (r > params.dual_clip), torch.zeros_like(weight), weight)
    return weight


def random_batch(seed, B=6, T=9, spread=0.6, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=F64) * 3  # log μ ∈ (−3, 0)
    log_prob = old + spread * torch.randn(B, T, generator=gen, dtype=F64)
    adv = torch.randn(B, 1, generator=gen, dtype=F64).expand(B, T).clone()  # GRPO: one A per sequence
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return old.to(dtype), log_prob.to(dtype), adv.to(dtype), mask


def loss_and_grad(fn, config, old, log_prob, adv, mask, loss_agg_mode="token-mean", rollout_is_weights=None):
    log_prob = log_prob.clone().requires_grad_()
    loss, metrics = fn(old_log_prob=old, log_prob=log_prob, advantages=adv, response_mask=mask,
                       loss_agg_mode=loss_agg_mode, config=config, rollout_is_weights=rollout_is_weights)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss, grad, metrics


def spec_config(text):
    """verl's actor config for a spec, at a fixed kernel width unless the spec says otherwise: these tests
    check the per-token math and its aggregation; the adaptive width has its own tests."""
    if text.startswith("is_reshape") and "width_mode=" not in text:
        text += ("," if ":" in text else ":") + "width_mode=fixed"
    return parse_loss_spec(text).actor_config()


# ------------------------------------------ identities ------------------------------------------
GRID = list(itertools.product(KERNEL_NAMES, (False, True), GAMMA_MODES))


@pytest.mark.parametrize("kernel,one_sided,gamma_mode", GRID)
def test_gradient_is_minus_g_times_advantage_over_token_count(kernel, one_sided, gamma_mode):
    """d loss / d log_prob = −g(r, A)·A·mask / N (token-mean), g from the formulas written out above."""
    spec = (f"is_reshape:kernel={kernel},one_sided={str(one_sided).lower()},gamma_mode={gamma_mode},"
            "width=0.7,width_neg=0.4,gamma=0.8,gamma_base=0.2,gamma_max=0.9,gamma_tau=0.3,gamma_beta=1.5,"
            "localize_sft=false")
    config = spec_config(spec)
    params = config.policy_loss.reshape_params()
    old, log_prob, adv, mask = random_batch(seed=GRID.index((kernel, one_sided, gamma_mode)))
    _, grad, _ = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, mask)
    expected = -expected_weight(params, log_prob, old, adv) * adv * mask / mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kernel,one_sided,gamma_mode", GRID)
def test_localized_sft_gradient_is_minus_g_times_advantage(kernel, one_sided, gamma_mode):
    """localize_sft: g = (1 − γ)·K(log r) + γ·r·K(r − 1), formulas written out above."""
    spec = (f"is_reshape:kernel={kernel},one_sided={str(one_sided).lower()},gamma_mode={gamma_mode},"
            "localize_sft=true,width=0.7,width_neg=0.4,gamma=0.3,gamma_base=0.2,gamma_max=0.9")
    config = spec_config(spec)
    params = config.policy_loss.reshape_params()
    old, log_prob, adv, mask = random_batch(seed=100 + GRID.index((kernel, one_sided, gamma_mode)))
    _, grad, _ = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, mask)
    expected = -expected_weight(params, log_prob, old, adv) * adv * mask / mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("localize_sft", [False, True])
@pytest.mark.parametrize("dual_clip", [None, 1.1])
def test_weight_is_r_times_the_surrogate_derivative(kernel, localize_sft, dual_clip):
    """g = r·f'(r): autograd through reshape_terms' surrogate (γ held fixed) against its weight."""
    from isreshape_verl.reshape import reshape_terms

    params = ISReshapeParams(kernel=kernel, localize_sft=localize_sft, gamma_mode="fixed", gamma=0.4, width=0.6,
                             width_mode="fixed", dual_clip=dual_clip)
    _, log_prob, adv, _ = random_batch(seed=7)
    old, _, _, _ = random_batch(seed=7)
    log_r = (log_prob - old).requires_grad_(True)
    terms = reshape_terms(params, log_r, adv)
    (d_f_d_log_r,) = torch.autograd.grad(terms.surrogate.sum(), log_r)  # = r·f'(r)
    keep = (terms.log_ratio.detach().abs() > 1e-9)
    if kernel in ("box", "epanechnikov"):  # kinks at |u| = 1 have no derivative
        keep &= ((torch.expm1(log_r.detach()).abs() - 0.6).abs() > 1e-6) & ((log_r.detach().abs() - 0.6).abs() > 1e-6)
    torch.testing.assert_close(d_f_d_log_r[keep], terms.weight.detach()[keep], rtol=1e-10, atol=1e-12)
    if dual_clip is not None:  # the cap acts here, and only where A ≤ 0 and r > c
        beyond = (log_r.detach() > math.log(dual_clip)) & (adv <= 0)
        assert beyond.any() and (terms.weight[beyond] == 0).all()


def test_dual_clip_keeps_the_surrogate_at_its_value_at_c_and_changes_nothing_below():
    """f(r) = f(c) for A ≤ 0 and r > c; every term is the uncapped one elsewhere; the terms report the true r."""
    from isreshape_verl.reshape import reshape_terms

    c = 1.5
    old, log_prob, adv, _ = random_batch(seed=8, spread=0.8)
    log_r = log_prob - old
    capped = reshape_terms(ISReshapeParams(dual_clip=c, width_mode="fixed"), log_r, adv)
    free = reshape_terms(ISReshapeParams(width_mode="fixed"), log_r, adv)
    beyond = (log_r > math.log(c)) & (adv <= 0)
    assert beyond.any() and (~beyond).any()
    for name in ("weight", "surrogate", "kernel", "gamma"):
        torch.testing.assert_close(getattr(capped, name)[~beyond], getattr(free, name)[~beyond], rtol=0, atol=0)
    at_c = reshape_terms(ISReshapeParams(width_mode="fixed"), torch.full_like(log_r, math.log(c)), adv)
    # γ is the only term taken at the true r (a per-token factor, as everywhere): hold it equal to compare f
    same_gamma = ISReshapeParams(width_mode="fixed", gamma_mode="fixed", gamma=0.7)
    f_capped = reshape_terms(ISReshapeParams(width_mode="fixed", gamma_mode="fixed", gamma=0.7, dual_clip=c), log_r, adv)
    f_at_c = reshape_terms(same_gamma, torch.full_like(log_r, math.log(c)), adv)
    torch.testing.assert_close(f_capped.surrogate[beyond], f_at_c.surrogate[beyond], rtol=1e-12, atol=1e-14)
    assert (capped.weight[beyond] == 0).all() and (at_c.weight[beyond] > 0).all()
    torch.testing.assert_close(capped.log_ratio, log_r, rtol=0, atol=0)  # metrics see the true ratio


@pytest.mark.parametrize("bad", [1.0, 0.5, -2.0, float("inf"), float("nan"), True, "3"])
def test_dual_clip_must_be_above_one(bad):
    with pytest.raises(ValueError, match=r"dual_clip=.*must be None or a finite number > 1"):
        ISReshapeParams(dual_clip=bad)


def test_localized_sft_changes_nothing_at_gamma_one_and_is_a_trust_region_at_gamma_zero():
    old, log_prob, adv, mask = random_batch(seed=21, spread=1.0)
    grads = [loss_and_grad(IS_RESHAPE, spec_config(f"is_reshape:gamma_mode=fixed,gamma=1,localize_sft={v}"),
                           old, log_prob, adv, mask)[1] for v in ("false", "true")]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    # γ = 0: plain SFT-like weight 1 everywhere, vs. K(log r) on the pushed-away side (1 on the safe side)
    _, grad, _ = loss_and_grad(IS_RESHAPE, spec_config("is_reshape:width=1,gamma_mode=fixed,gamma=0,localize_sft=true,dual_clip=none"),
                               old, log_prob, adv, mask)
    log_r = log_prob - old
    pushes_away = torch.where(adv > 0, log_r > 0, log_r < 0)
    expected_g = torch.where(pushes_away, torch.exp(-log_r.abs()), torch.ones_like(log_r))  # laplace, width 1
    torch.testing.assert_close(grad, -expected_g * adv * mask / mask.sum(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("gamma_mode", GAMMA_MODES)
def test_weight_is_one_on_policy(kernel, gamma_mode):
    """g(1, A) = 1 for every kernel and γ: at r = 1 the loss is the on-policy REINFORCE gradient −A/N."""
    config = spec_config(f"is_reshape:kernel={kernel},gamma_mode={gamma_mode},gamma=0.3,localize_sft=true")
    old, _, adv, mask = random_batch(seed=3)
    _, grad, metrics = loss_and_grad(IS_RESHAPE, config, old, old, adv, mask)
    torch.testing.assert_close(grad, -adv * mask / mask.sum(), rtol=1e-12, atol=0)
    assert metrics["actor/is_reshape/weight_mean"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["actor/is_reshape/ess"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["actor/ppo_kl"] == 0.0 and metrics["actor/pg_clipfrac"] == 0.0


def test_loss_value_is_minus_surrogate_times_advantage():
    """loss = mean over valid tokens of −f(r)·A, f(r) = (1 − γ)·log r + γ·F_K(r); sech2: F = w·tanh((r−1)/w)."""
    config = spec_config("is_reshape:kernel=sech2,width=0.8,one_sided=false,gamma_mode=fixed,gamma=0.6,"
                         "localize_sft=false")
    old, log_prob, adv, mask = random_batch(seed=5)
    loss, _, _ = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, mask)
    log_r = log_prob - old
    f = 0.4 * log_r + 0.6 * 0.8 * torch.tanh((log_r.exp() - 1) / 0.8)
    assert loss.item() == pytest.approx((-(f * adv)[mask]).mean().item(), rel=1e-12)


def test_plain_torch_token_loss_matches_the_verl_loss():
    """The five-line example of the README (no verl) gives the same loss and gradient as the plugin,
    with the package defaults (adaptive width included)."""
    old, log_prob, adv, mask = random_batch(seed=11)
    config = parse_loss_spec("is_reshape").actor_config()
    loss_verl, grad_verl, _ = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, mask)
    from isreshape_verl import ISReshapeParams as TopLevelParams, is_reshape_token_loss as top_level_loss

    lp = log_prob.clone().requires_grad_()
    token_loss = top_level_loss(lp, old, adv, TopLevelParams(), valid=mask)
    loss = (token_loss * mask).sum() / mask.sum()
    loss.backward()
    assert loss.item() == pytest.approx(loss_verl.item(), rel=1e-12)
    torch.testing.assert_close(lp.grad, grad_verl, rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 20, 1 << 20])
def test_chunked_computation_is_exact(chunk_tokens):
    """The weight is computed over row chunks to bound memory; any chunking gives the same numbers
    (up to 1 ulp: vectorised exp/tanh round differently in a SIMD body and its scalar tail)."""
    old, log_prob, adv, mask = random_batch(seed=12, B=7, T=5)
    params = ISReshapeParams(gamma_mode="combined")
    results = []
    for chunk in (chunk_tokens, 1 << 30):
        lp = log_prob.clone().requires_grad_()
        loss = is_reshape_token_loss(lp, old, adv, params, chunk_tokens=chunk)
        loss.backward(torch.ones_like(loss))
        results.append((loss.detach(), lp.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-15, atol=1e-16)


# ------------------------------------- verl's own losses -------------------------------------
def test_gamma_zero_equals_verl_gpg():
    old, log_prob, adv, mask = random_batch(seed=21, spread=2.0)
    for agg in LOSS_AGG_MODES:
        _, ours, _ = loss_and_grad(IS_RESHAPE, spec_config("is_reshape:gamma_mode=fixed,gamma=0,localize_sft=false,dual_clip=none"),
                                   old, log_prob, adv, mask, agg)
        _, theirs, _ = loss_and_grad(get_policy_loss_fn("gpg"), spec_config("gpg"), old, log_prob, adv, mask, agg)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("tau_pos,tau_neg", [(1.0, 1.05), (2.0, 0.5), (0.3, 3.0)])
def test_sech2_with_gamma_one_equals_verl_sapo(tau_pos, tau_neg):
    """SAPO with temperatures τ± is sech2 with w± = 2/τ± and γ = 1 (verl aggregates SAPO seq-mean-token-mean)."""
    old, log_prob, adv, mask = random_batch(seed=22, spread=1.0)
    ours_cfg = spec_config(f"is_reshape:kernel=sech2,width={2 / tau_pos!r},width_neg={2 / tau_neg!r},one_sided=false,"
                           "gamma_mode=fixed,gamma=1,dual_clip=none")
    sapo_cfg = spec_config(f"sapo:tau_pos={tau_pos},tau_neg={tau_neg}")
    _, ours, _ = loss_and_grad(IS_RESHAPE, ours_cfg, old, log_prob, adv, mask, "seq-mean-token-mean")
    _, theirs, _ = loss_and_grad(get_policy_loss_fn("sapo"), sapo_cfg, old, log_prob, adv, mask, "seq-mean-token-mean")
    assert ours.abs().max() > 1e-3  # the comparison is not between two zeros
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.4)])
def test_one_sided_box_with_gamma_one_equals_verl_vanilla_without_dual_clip(eps_low, eps_high):
    """PPO-clip: g = r·1[r ≤ 1 + ε_high] for A > 0 and r·1[r ≥ 1 − ε_low] for A ≤ 0."""
    old, log_prob, adv, mask = random_batch(seed=23, spread=0.4)
    ours_cfg = spec_config(
        f"is_reshape:kernel=box,one_sided=true,width={eps_high},width_neg={eps_low},gamma_mode=fixed,gamma=1,"
        "dual_clip=none")
    # dual-clip only acts where A < 0 and r > clip_ratio_c: make c larger than any ratio here to disable it
    vanilla_cfg = spec_config(f"vanilla:clip_ratio_low={eps_low},clip_ratio_high={eps_high},clip_ratio_c=1e9")
    ratio = (log_prob - old).exp()
    assert ((ratio > 1 + eps_high) & (adv > 0)).any() and ((ratio < 1 - eps_low) & (adv < 0)).any()
    for agg in LOSS_AGG_MODES:
        _, ours, m_ours = loss_and_grad(IS_RESHAPE, ours_cfg, old, log_prob, adv, mask, agg)
        _, theirs, m_theirs = loss_and_grad(get_policy_loss_fn("vanilla"), vanilla_cfg, old, log_prob, adv, mask, agg)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)
        # with a hard kernel, "K < 0.5" is exactly PPO's clipped-token share (verl counts in fp32: 1e-6)
        assert m_ours["actor/pg_clipfrac"] == pytest.approx(m_theirs["actor/pg_clipfrac"], abs=1e-6)


@pytest.mark.parametrize("clip_c", [3.0, 1.8])
def test_one_sided_box_with_gamma_one_and_dual_clip_equals_verl_vanilla(clip_c):
    """PPO's dual clip: g = 0 where A < 0 and r > clip_ratio_c (verl's vanilla, its default setting 3)."""
    old, log_prob, adv, mask = random_batch(seed=24, spread=0.9)
    ours_cfg = spec_config("is_reshape:kernel=box,one_sided=true,width=0.2,width_neg=0.2,gamma_mode=fixed,gamma=1,"
                           f"width_mode=fixed,dual_clip={clip_c}")
    vanilla_cfg = spec_config(f"vanilla:clip_ratio_low=0.2,clip_ratio_high=0.2,clip_ratio_c={clip_c}")
    ratio = (log_prob - old).exp()
    assert ((ratio > clip_c) & (adv < 0) & mask).sum() >= 2  # the dual clip acts on this batch
    for agg in LOSS_AGG_MODES:
        _, ours, _ = loss_and_grad(IS_RESHAPE, ours_cfg, old, log_prob, adv, mask, agg)
        _, theirs, _ = loss_and_grad(get_policy_loss_fn("vanilla"), vanilla_cfg, old, log_prob, adv, mask, agg)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)
    no_cap = spec_config("is_reshape:kernel=box,one_sided=true,width=0.2,width_neg=0.2,gamma_mode=fixed,gamma=1,"
                         "width_mode=fixed")
    _, uncapped, _ = loss_and_grad(IS_RESHAPE, no_cap, old, log_prob, adv, mask)
    assert not torch.allclose(uncapped, ours)  # without it, the same batch gives another gradient


# ----------------------------------------- invariances -----------------------------------------
def _global_info(mask, dp_size=1):
    return {"dp_size": dp_size, "batch_num_tokens": int(mask.sum()), "global_batch_size": int((mask.sum(-1) > 0).sum()),
            "loss_scale_factor": None}


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
def test_gradient_is_invariant_to_micro_batching(loss_agg_mode):
    """Summing micro-batch gradients (verl's gradient accumulation) reproduces the full-batch gradient."""
    old, log_prob, adv, mask = random_batch(seed=31, B=8)
    config = spec_config("is_reshape")
    config.global_batch_info.update(_global_info(mask))
    _, full, _ = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, mask, loss_agg_mode)
    parts = [loss_and_grad(IS_RESHAPE, config, old[s], log_prob[s], adv[s], mask[s], loss_agg_mode)[1]
             for s in (slice(0, 3), slice(3, 4), slice(4, 8))]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("dp_size", [2, 4])
def test_gradient_is_invariant_to_data_parallel_splitting(loss_agg_mode, dp_size):
    """Each rank scales by dp_size with global counts; FSDP's mean over ranks recovers the 1-rank gradient."""
    old, log_prob, adv, mask = random_batch(seed=32, B=8)
    single = spec_config("is_reshape")
    single.global_batch_info.update(_global_info(mask, dp_size=1))
    _, full, _ = loss_and_grad(IS_RESHAPE, single, old, log_prob, adv, mask, loss_agg_mode)
    sharded = spec_config("is_reshape")
    sharded.global_batch_info.update(_global_info(mask, dp_size=dp_size))
    step = 8 // dp_size
    ranks = [loss_and_grad(IS_RESHAPE, sharded, old[i:i + step], log_prob[i:i + step], adv[i:i + step],
                           mask[i:i + step], loss_agg_mode)[1] for i in range(0, 8, step)]
    torch.testing.assert_close(torch.cat(ranks) / dp_size, full, rtol=1e-12, atol=1e-15)


def test_masked_tokens_contribute_nothing():
    old, log_prob, adv, mask = random_batch(seed=33)
    config = spec_config("is_reshape")
    loss, grad, _ = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, mask)
    garbage = torch.where(mask, log_prob, torch.full_like(log_prob, 123.0))
    loss2, grad2, _ = loss_and_grad(IS_RESHAPE, config, old, garbage, adv, mask)
    assert (grad[~mask] == 0).all()
    assert loss.item() == loss2.item()
    torch.testing.assert_close(grad, grad2, rtol=0, atol=0)


def test_rollout_is_weights_multiply_each_token():
    old, log_prob, adv, mask = random_batch(seed=34)
    weights = torch.rand_like(old) + 0.5
    config = spec_config("is_reshape")
    params = config.policy_loss.reshape_params()
    _, grad, _ = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, mask, rollout_is_weights=weights)
    expected = -expected_weight(params, log_prob, old, adv) * adv * weights * mask / mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-15)


def test_float_and_bool_masks_agree():
    old, log_prob, adv, mask = random_batch(seed=35)
    config = spec_config("is_reshape")
    a = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, mask)
    b = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, mask.to(F64))
    assert a[0].item() == b[0].item()
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


# ------------------------------------------- numerics -------------------------------------------
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("log_r", [1e4, -1e4, 700.0, -700.0])
def test_extreme_ratios_give_finite_loss_and_gradient(kernel, log_r):
    old = torch.zeros(2, 3, dtype=torch.float32)
    log_prob = torch.full_like(old, log_r)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3])
    mask = torch.ones(2, 3, dtype=torch.bool)
    for one_sided in ("false", "true"):
        config = spec_config(f"is_reshape:kernel={kernel},one_sided={one_sided}")
        loss, grad, metrics = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, mask)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(math.isfinite(v) for v in metrics.values())


def test_bf16_inputs_are_computed_in_fp32():
    old, log_prob, adv, mask = random_batch(seed=41, dtype=torch.bfloat16)
    config = spec_config("is_reshape")
    loss, grad, _ = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, mask)
    assert loss.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    loss32, grad32, _ = loss_and_grad(IS_RESHAPE, config, old.float(), log_prob.float(), adv.float(), mask)
    # same bf16 inputs computed in fp32: the only differences are the final bf16 roundings (2⁻⁸ relative)
    assert loss.float().item() == pytest.approx(loss32.item(), rel=2**-8)
    torch.testing.assert_close(grad.float(), grad32.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_empty_mask_gives_zero_loss_and_gradient():
    old, log_prob, adv, _ = random_batch(seed=42)
    mask = torch.zeros_like(old, dtype=torch.bool)
    loss, grad, metrics = loss_and_grad(IS_RESHAPE, spec_config("is_reshape"), old, log_prob, adv, mask)
    assert loss.item() == 0.0 and (grad == 0).all()
    assert metrics["actor/ppo_kl"] == 0.0 and metrics["actor/is_reshape/nonfinite_frac"] == 0.0


def test_all_zero_advantages_give_zero_gradient():
    old, log_prob, _, mask = random_batch(seed=43)
    loss, grad, metrics = loss_and_grad(IS_RESHAPE, spec_config("is_reshape"), old, log_prob, torch.zeros_like(old), mask)
    assert loss.item() == 0.0 and (grad == 0).all()
    assert all(math.isfinite(v) for v in metrics.values())


def test_nonfinite_inputs_are_masked_out_and_counted():
    old, log_prob, adv, mask = random_batch(seed=44)
    mask[:] = True
    config = spec_config("is_reshape")
    _, clean_grad, _ = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, mask)
    bad_lp, bad_old, bad_adv = log_prob.clone(), old.clone(), adv.clone()
    bad_lp[0, 0] = float("nan")
    bad_old[1, 2] = float("-inf")
    bad_adv[2, 3] = float("inf")
    loss, grad, metrics = loss_and_grad(IS_RESHAPE, config, bad_old, bad_lp, bad_adv, mask)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert metrics["actor/is_reshape/nonfinite_frac"] == pytest.approx(3 / mask.numel())
    # the other tokens get the gradient of the clean batch with those three tokens masked out
    keep = torch.ones_like(mask)
    keep[0, 0] = keep[1, 2] = keep[2, 3] = False
    _, expected, _ = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, keep)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
    assert not torch.equal(grad, clean_grad)


def test_unknown_aggregation_mode_is_a_clear_error():
    old, log_prob, adv, mask = random_batch(seed=46)
    with pytest.raises(ValueError, match=r"loss_agg_mode='mean' is not known; allowed: token-mean, token-sum"):
        loss_and_grad(IS_RESHAPE, spec_config("is_reshape"), old, log_prob, adv, mask, loss_agg_mode="mean")


def test_mismatched_shapes_are_a_clear_error():
    old, log_prob, adv, mask = random_batch(seed=47)
    with pytest.raises(ValueError, match=r"one shape \(B, T\); got old_log_prob \(6, 9\), log_prob \(6, 9\), "
                                         r"advantages \(6, 1\)"):
        loss_and_grad(IS_RESHAPE, spec_config("is_reshape"), old, log_prob, adv[:, :1], mask)


def test_missing_config_is_a_clear_error():
    old, log_prob, adv, mask = random_batch(seed=45)
    with pytest.raises(ValueError, match="needs verl's actor config"):
        IS_RESHAPE(old_log_prob=old, log_prob=log_prob, advantages=adv, response_mask=mask)


# -------------------------------------------- metrics --------------------------------------------
# (96, 2048) = 196,608 tokens spans 3 chunks of 2¹⁶ and exceeds the 65,536-token metric budget, so the
# metrics cover every ⌈196,608 / 65,536⌉ = 3rd sequence.
@pytest.mark.parametrize("batch,length,row_stride", [(16, 12, 1), (96, 2048, 3)])
def test_metrics_match_their_definitions(batch, length, row_stride):
    old, log_prob, adv, mask = random_batch(seed=51, B=batch, T=length)
    config = spec_config("is_reshape:kernel=gaussian,width=0.5,one_sided=false")
    params = config.policy_loss.reshape_params()
    _, _, m = loss_and_grad(IS_RESHAPE, config, old, log_prob, adv, mask)
    old, log_prob, adv, mask = old[::row_stride], log_prob[::row_stride], adv[::row_stride], mask[::row_stride]
    g = expected_weight(params, log_prob, old, adv)[mask]
    log_r, a = (log_prob - old)[mask], adv[mask]
    k = expected_kernel("gaussian", log_r.exp() - 1, 0.5)
    assert m["actor/ppo_kl"] == pytest.approx((-log_r).mean().item(), rel=1e-12)
    assert m["actor/pg_clipfrac"] == pytest.approx((k < 0.5).double().mean().item(), abs=1e-15)
    assert m["actor/is_reshape/weight_mean"] == pytest.approx(g.mean().item(), rel=1e-12)
    assert m["actor/is_reshape/ess"] == pytest.approx((g.sum() ** 2 / (g.numel() * (g**2).sum())).item(), rel=1e-12)
    assert m["actor/is_reshape/ratio_p50"] == pytest.approx(log_r.exp().median().item(), rel=0.05)
    assert m["actor/is_reshape/ratio_max"] == pytest.approx(log_r.exp().max().item(), rel=1e-12)
    shares = 0.0
    for name, sel in {"pos_up": (a > 0) & (log_r > 0), "pos_down": (a > 0) & (log_r <= 0),
                      "neg_up": (a <= 0) & (log_r > 0), "neg_down": (a <= 0) & (log_r <= 0)}.items():
        assert sel.any()
        assert m[f"actor/is_reshape/{name}_share"] == pytest.approx(sel.double().mean().item(), abs=1e-15)
        assert m[f"actor/is_reshape/{name}_weight"] == pytest.approx(g[sel].mean().item(), rel=1e-12)
        shares += m[f"actor/is_reshape/{name}_share"]
    assert shares == pytest.approx(1.0, abs=1e-12)
    assert all(isinstance(v, float) for v in m.values())


def test_correctness_gamma_follows_the_four_quadrants():
    """'Right' tokens (A·log r > 0) get γ → gamma_base (g → 1); 'wrong' ones γ → gamma_max (g → r·K)."""
    config = spec_config("is_reshape:kernel=sech2,width=1,one_sided=false,gamma_mode=correctness,gamma_base=0,gamma_max=1,"
                         "gamma_tau=0.01,localize_sft=false")
    log_r = torch.tensor([[0.5, 0.5, -0.5, -0.5]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=F64)
    mask = torch.ones_like(adv, dtype=torch.bool)
    _, grad, _ = loss_and_grad(IS_RESHAPE, config, torch.zeros_like(log_r), log_r, adv, mask)
    g = -grad * 4 / adv
    r = log_r.exp()
    rk = r * expected_kernel("sech2", r - 1, 1.0)
    torch.testing.assert_close(g, torch.stack([torch.ones(1, dtype=F64)[0], rk[0, 1], rk[0, 2], torch.ones(1, dtype=F64)[0]])[None],
                               rtol=1e-9, atol=1e-9)


# ---------------------------------------- bounded weight ----------------------------------------
@settings(max_examples=150, deadline=None)
@given(
    kernel=st.sampled_from(KERNEL_NAMES),
    one_sided=st.booleans(),
    gamma_mode=st.sampled_from(GAMMA_MODES),
    log_r=st.floats(-20.0, 20.0),
    adv=st.floats(-5.0, 5.0).filter(lambda a: abs(a) > 1e-3),
    width=st.floats(0.05, 5.0),
    width_neg=st.floats(0.05, 5.0),
    gammas=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
)
def test_gradient_weight_is_bounded(kernel, one_sided, gamma_mode, log_r, adv, width, width_neg, gammas):
    """g read off verl's gradient obeys 0 ≤ g ≤ 1 + c_K·w (kernels.weight_bound) for r ∈ [e⁻²⁰, e²⁰];
    one-sided kernels leave K = 1 on the safe side, where g ≤ max(1, r) (r > 1 only when A ≤ 0)."""
    base, top = sorted(gammas[:2])
    params = ISReshapeParams(kernel=kernel, width=width, width_neg=width_neg, one_sided=one_sided,
                             gamma_mode=gamma_mode, gamma=gammas[2], gamma_base=base, gamma_max=top)
    from isreshape_verl.config import ISReshapeLossConfig
    from isreshape_verl.kernels import weight_bound

    config = spec_config("is_reshape")
    config = type(config)(**{**{f: getattr(config, f) for f in ("strategy", "rollout_n", "ppo_mini_batch_size",
                                                                 "ppo_micro_batch_size_per_gpu")},
                             "policy_loss": ISReshapeLossConfig(**vars(params))})
    old = torch.zeros(1, 1, dtype=F64)
    _, grad, _ = loss_and_grad(IS_RESHAPE, config, old, torch.full_like(old, log_r), torch.full_like(old, adv),
                               torch.ones(1, 1, dtype=torch.bool))
    g = (-grad / adv).item()
    w = width if adv > 0 else width_neg
    bound = weight_bound(kernel, w)
    if one_sided and adv <= 0:
        bound = max(bound, math.exp(log_r))
    assert -1e-12 <= g <= bound * (1 + 1e-12)


# ------------------------------- step metrics, aggregated by verl's own code -------------------------------
def verl_step_metrics(config, batch, ranks: int, rows: int) -> dict[str, float]:
    """The step values verl's engine logs for one mini-batch `batch` = (old, log_prob, adv, mask), split into
    `ranks` contiguous shares and micro-batches of `rows` sequences: global_batch_info as
    `verl/workers/utils/losses.py` sets it, each micro-batch's metrics wrapped as `Metric(MEAN)` and
    collected per rank (`postprocess_batch_func`), then `Metric.aggregate_dp` over ranks (engine_workers)."""
    from verl.utils.metric import AggregationType, Metric
    from verl.utils.py_functional import append_to_dict

    old, log_prob, adv, mask = batch
    config.ppo_micro_batch_size_per_gpu = rows
    config.global_batch_info.update(dp_size=ranks, batch_num_tokens=int(mask.sum()), global_batch_size=mask.shape[0],
                                    loss_scale_factor=None)
    per_rank = mask.shape[0] // ranks
    collected = []
    for rank in range(ranks):
        rank_metrics = {}
        for start in range(rank * per_rank, (rank + 1) * per_rank, rows):
            s = slice(start, start + rows)
            _, _, metrics = loss_and_grad(IS_RESHAPE, config, old[s], log_prob[s], adv[s], mask[s])
            append_to_dict(rank_metrics, Metric.from_dict(metrics, aggregation=AggregationType.MEAN))
        collected.append(rank_metrics)
    return {key: float(Metric.aggregate_dp([c[key] for c in collected])) for key in collected[0]}


def _with_empty_rows(batch, empty: int):
    """The batch with `empty` all-masked sequences in front (their tokens exist, their response_mask is 0)."""
    old, log_prob, adv, mask = (t.clone() for t in batch)
    extra = random_batch(seed=99, B=empty, T=old.shape[1])
    return (*(torch.cat([e, t]) for e, t in zip(extra[:3], (old, log_prob, adv))),
            torch.cat([torch.zeros_like(extra[3]), mask]))


@pytest.mark.parametrize("ranks", [1, 2])
def test_step_token_means_are_over_all_tokens_of_the_step(ranks):
    """ppo_kl, weight_mean and the quadrant shares verl logs are the token means over the whole mini-batch
    (not the unweighted mean of micro-batch means), for any split into micro-batches and ranks."""
    batch = random_batch(seed=61, B=8)
    config = spec_config("is_reshape")
    logged = verl_step_metrics(config, batch, ranks=ranks, rows=2)
    old, log_prob, adv, mask = batch
    log_r = (log_prob - old)[mask]
    assert logged["actor/ppo_kl"] == pytest.approx(float(-log_r.mean()), rel=1e-12)
    g = expected_weight(config.policy_loss.reshape_params(), log_prob, old, adv)[mask]
    assert logged["actor/is_reshape/weight_mean"] == pytest.approx(float(g.mean()), rel=1e-12)
    up_share = float((log_r > 0).double().mean())
    assert logged["actor/is_reshape/pos_up_share"] + logged["actor/is_reshape/neg_up_share"] == pytest.approx(up_share)
    # a fixed width logs itself; verl's unweighted mean of micro-batch means differs for this batch
    assert logged["actor/is_reshape/width"] == pytest.approx(config.policy_loss.width, rel=1e-12)
    micro_means = [float(-(log_prob - old)[s][mask[s]].mean()) for s in (slice(i, i + 2) for i in range(0, 8, 2))]
    assert abs(sum(micro_means) / 4 - logged["actor/ppo_kl"]) > 1e-3


@pytest.mark.parametrize("ranks, empty", [(1, 2), (2, 2), (2, 4)])
@pytest.mark.parametrize("spec", ["is_reshape", "is_reshape:width_mode=adaptive", "is_reshape:kernel=box,one_sided=true"])
def test_an_empty_micro_batch_does_not_move_the_step_metrics(ranks, empty, spec):
    """An all-masked micro-batch (on one rank only, when `empty` < rows per rank) leaves every logged value
    as it is without it, and none is inf/NaN; verl requires the same keys from every micro-batch."""
    batch = random_batch(seed=62, B=8)
    if ranks == 2 and empty == 2:  # rank 0: [empty, 2 rows]... needs equal shares: 2 + 6 = 8 = 2 × 4 rows
        batch = tuple(t[:6] for t in batch)
    config = spec_config(spec)
    padded = _with_empty_rows(batch, empty)
    with_empty = verl_step_metrics(config, padded, ranks=ranks, rows=2)
    reference = verl_step_metrics(config, batch, ranks=1, rows=2)
    assert with_empty.keys() == reference.keys()
    assert all(math.isfinite(v) for v in with_empty.values()), with_empty
    for key, value in reference.items():
        assert with_empty[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_non_finite_micro_batch_dilutes_the_step_metrics_by_its_token_share(ranks):
    """A micro-batch whose every token is NaN: nothing logged is inf/NaN, nonfinite_frac is its share of the
    step's tokens, the widths are unchanged and every token statistic is the clean step's times
    N_clean / N (the dropped tokens stay in verl's count N, which the loss cannot see past)."""
    from isreshape_verl.verl_loss import TOKEN_METRICS, WIDTH_METRICS

    clean = tuple(t[:6] for t in random_batch(seed=63, B=8))
    old, log_prob, adv, mask = _with_empty_rows(clean, 2)
    mask[:2] = torch.ones_like(mask[:2])
    old[:2] = float("nan")
    config = spec_config("is_reshape")
    logged = verl_step_metrics(config, (old, log_prob, adv, mask), ranks=ranks, rows=2)
    reference = verl_step_metrics(config, clean, ranks=1, rows=2)
    assert all(math.isfinite(v) for v in logged.values()), logged
    n_clean, n_all = int(clean[3].sum()), int(mask.sum())
    assert logged["actor/is_reshape/nonfinite_frac"] == pytest.approx((n_all - n_clean) / n_all, rel=1e-12)
    for key in WIDTH_METRICS:
        assert logged[key] == pytest.approx(reference[key], rel=1e-12)
    for key in TOKEN_METRICS:
        assert logged[key] == pytest.approx(reference[key] * n_clean / n_all, rel=1e-12, abs=1e-15), key
