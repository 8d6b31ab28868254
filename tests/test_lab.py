"""Tests of the estimator lab (isreshape_verl.lab): exact gradient, unbiasedness, identities, CLI.

Tiny configs (V = 3, L = 3: 27 sequences, 13 prefixes) so the whole file runs in well under a minute.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
import torch

from isreshape_verl.diagnostics import kish_ess
from isreshape_verl.lab import cli
from isreshape_verl.lab.behaviour import kl_behaviour, lagged_behaviour, train_trajectory
from isreshape_verl.lab.estimators import (
    Estimator,
    advantages,
    build_estimators,
    conditional_reward_variance,
    estimate,
    estimator_from_label,
    summarise,
    weight_curve,
)
from isreshape_verl.lab.experiment import Args, run
from isreshape_verl.lab.policy import (
    exact_gradient,
    make_rewards,
    objective,
    sample_sequences,
    sequence_kl,
    sequence_log_probs,
    sequence_space,
    token_log_probs,
)
from isreshape_verl.reshape import ISReshapeParams, reshape_terms
from isreshape_verl.specs import parse_loss_spec

torch.set_num_threads(1)


def _setup(family="dense", vocab=3, length=3, seed=0, steps=5):
    space = sequence_space(vocab, length)
    gen = torch.Generator().manual_seed(seed)
    rewards = make_rewards(space, family, gen)
    pi = train_trajectory(space, rewards, 1.0, steps, 0.1, gen)[-1]
    return space, rewards, pi, gen


def _one(label):
    return build_estimators([label], [])[0] if not label.startswith("ref:") else build_estimators([], [label])[0]


# ---------------------------------------------------------------- policy: exact J and ∇J


def test_sequence_space_is_a_distribution_and_prefixes_are_consistent():
    space = sequence_space(3, 3)
    theta = torch.randn(space.n_prefixes, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert space.n_sequences == 27 and space.n_prefixes == 13
    assert math.isclose(float(sequence_log_probs(space, theta).exp().sum()), 1.0, abs_tol=1e-12)
    # two sequences share the prefix index at position t iff they share their first t tokens
    for t in range(3):
        same_prefix = space.prefix[:, t, None] == space.prefix[None, :, t]
        same_tokens = (space.tokens[:, None, :t] == space.tokens[None, :, :t]).all(-1)
        assert torch.equal(same_prefix, same_tokens)


@pytest.mark.parametrize("family", ["sparse", "dense", "random"])
def test_exact_gradient_matches_central_finite_differences(family):
    """Every coordinate of ∇J (autograd through the full sum) agrees with (J(θ+h) − J(θ−h)) / 2h, h = 1e-5.

    Float64: the truncation error is O(h²·|J'''|) ≈ 1e-10 and round-off ≈ 1e-16/h = 1e-11, so 1e-8 is a safe bound.
    """
    space, rewards, _, gen = _setup(family)
    theta = torch.randn(space.n_prefixes, space.vocab, dtype=torch.float64, generator=gen)
    grad = exact_gradient(space, theta, rewards)
    h = 1e-5
    fd = torch.empty_like(theta)
    for i in range(theta.shape[0]):
        for j in range(theta.shape[1]):
            plus, minus = theta.clone(), theta.clone()
            plus[i, j] += h
            minus[i, j] -= h
            fd[i, j] = (objective(space, plus, rewards) - objective(space, minus, rewards)) / (2 * h)
    assert float(grad.norm()) > 1e-3
    assert torch.allclose(grad, fd, atol=1e-8, rtol=0)


def test_conditional_reward_variance_matches_brute_force():
    space, rewards, pi, _ = _setup("random")
    logp = token_log_probs(space, pi)
    got = conditional_reward_variance(space, logp, rewards)
    seq_p = sequence_log_probs(space, pi).exp()
    for n in (0, 5, 13, 26):
        for t in range(space.length):
            same = (space.tokens[:, : t + 1] == space.tokens[n, : t + 1]).all(-1)
            p = seq_p[same] / seq_p[same].sum()
            r = rewards[same]
            want = float((p * r * r).sum() - (p * r).sum() ** 2)
            assert math.isclose(float(got[n, t]), want, rel_tol=1e-9, abs_tol=1e-12)


def test_behaviours_hit_their_distance():
    space, rewards, _, gen = _setup("dense")
    trajectory = train_trajectory(space, rewards, 1.0, 6, 0.1, gen)
    assert lagged_behaviour(space, trajectory, 0).kl_per_token == 0.0
    lag3 = lagged_behaviour(space, trajectory, 3)
    assert torch.equal(lag3.logits, trajectory[-4])
    assert math.isclose(lag3.kl_per_token, sequence_kl(space, trajectory[-4], trajectory[-1]) / 3, rel_tol=1e-12)
    for target in (0.01, 0.2):
        mu = kl_behaviour(space, trajectory[-1], target, gen)
        assert abs(mu.kl_per_token - target) <= 1e-3 * target
    with pytest.raises(ValueError, match="lag 9"):
        lagged_behaviour(space, trajectory, 9)


# ---------------------------------------------------------------- advantages


def test_grpo_advantages_equal_verls():
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    ours = advantages(rewards, 4, "grpo")
    theirs, _ = compute_grpo_outcome_advantage(rewards.T.float(), torch.ones(8, 1), np.array([0] * 4 + [1] * 4))
    assert torch.allclose(ours.float(), theirs[:, 0][None], atol=1e-6)
    loo = advantages(rewards, 4, "baseline")
    assert math.isclose(float(loo[0, 0]), 1.0 - 1.0 / 3.0, rel_tol=1e-12)
    with pytest.raises(ValueError, match="group size"):
        advantages(rewards, 3, "grpo")


# ---------------------------------------------------------------- estimators


def _batches(space, rewards, logits, reps, batch, gen, mode="baseline", group=4):
    seq = sample_sequences(space, logits, (reps, batch), gen)
    return seq, advantages(rewards[seq], group, mode)


def _reinforce(space, pi, seq, adv):
    """(1/B) Σ_b A_b ∇_θ log π(y_b) per replicate, by autograd through the sequence log-probs."""
    reps, batch = seq.shape
    theta = pi.expand(reps, *pi.shape).clone().requires_grad_(True)
    logp = sequence_log_probs(space, theta)  # (R, N)
    (grad,) = torch.autograd.grad((logp.gather(1, seq) * adv).sum() / batch, theta)
    return grad.reshape(reps, -1)


@pytest.mark.parametrize("label", ["is_reshape:gamma_mode=fixed,gamma=0", "gpg", "is_reshape", "vanilla", "sapo", "cispo"])
def test_on_policy_every_loss_equals_reinforce(label):
    """At μ = π every r = 1 and every loss's weight is g(1) = 1: the gradient is on-policy REINFORCE."""
    space, rewards, pi, gen = _setup("dense")
    seq, adv = _batches(space, rewards, pi, 20, 8, gen)
    out = estimate(_one(label), space, pi, token_log_probs(space, pi), seq, adv)
    torch.testing.assert_close(out.grads, _reinforce(space, pi, seq, adv), rtol=1e-12, atol=1e-14)


def test_gamma0_off_policy_is_reinforce_on_mus_samples():
    space, rewards, pi, gen = _setup("sparse")
    mu = kl_behaviour(space, pi, 0.1, gen).logits
    seq, adv = _batches(space, rewards, mu, 20, 8, gen, mode="grpo")
    for label in ("is_reshape:gamma_mode=fixed,gamma=0", "gpg"):
        out = estimate(_one(label), space, pi, token_log_probs(space, mu), seq, adv)
        torch.testing.assert_close(out.grads, _reinforce(space, pi, seq, adv), rtol=1e-12, atol=1e-14)


def _bias_z(est, true_grad):
    """z = ‖m − ∇J‖² / (tr S / R): its expectation is exactly 1 for an unbiased estimator."""
    g = est.grads
    reps = g.shape[0]
    mean = g.mean(0)
    var = ((g - mean) ** 2).sum(-1).sum() / (reps - 1)
    return float(((mean - true_grad.reshape(-1)) ** 2).sum() / (var / reps))


def _max_coordinate_z(est, true_grad):
    g = est.grads
    sd = g.std(0)
    keep = sd > 0
    z = (g.mean(0) - true_grad.reshape(-1))[keep] / (sd[keep] / g.shape[0] ** 0.5)
    return float(z.abs().max()), int(keep.sum())


@pytest.mark.parametrize("kl", [0.0, 0.1])
def test_plain_is_is_unbiased_and_its_bias_shrinks_with_replicates(kl):
    """Sequence-level IS with a leave-one-out baseline is unbiased for every μ (μ = π: plain REINFORCE).

    Tolerances from the standard error: (1) every coordinate's mean is within the Bonferroni bound
    Φ⁻¹(1 − 0.001/(2d)) standard errors of ∇J (family-wise level 0.1%); (2) z = ‖m − ∇J‖²/(tr S/R),
    whose mean is 1 when unbiased, stays below 3 at R = 500 and at R = 8000, so the raw bias² falls
    with R as tr S/R does (16× fewer).
    """
    space, rewards, pi, gen = _setup("dense")
    true_grad = exact_gradient(space, pi, rewards)
    mu = kl_behaviour(space, pi, kl, gen).logits
    raw = {}
    for reps in (500, 8000):
        seq, adv = _batches(space, rewards, mu, reps, 8, gen)
        est = estimate(_one("ref:is_seq"), space, pi, token_log_probs(space, mu), seq, adv)
        z = _bias_z(est, true_grad)
        zmax, d = _max_coordinate_z(est, true_grad)
        assert z < 3.0, (reps, z)
        assert zmax < NormalDist().inv_cdf(1 - 0.001 / (2 * d)), (reps, zmax)
        raw[reps] = float(((est.grads.mean(0) - true_grad.reshape(-1)) ** 2).sum())
    assert raw[8000] < raw[500] / 3


def test_token_level_is_is_biased_off_policy():
    """The negative control: token-level r (what verl's losses reshape) is biased when μ ≠ π, and the same
    z statistic that passes for sequence-level IS fails for it."""
    space, rewards, pi, gen = _setup("dense")
    true_grad = exact_gradient(space, pi, rewards)
    mu = kl_behaviour(space, pi, 0.3, gen).logits
    seq, adv = _batches(space, rewards, mu, 8000, 8, gen)
    est = estimate(_one("ref:is_token"), space, pi, token_log_probs(space, mu), seq, adv)
    assert _bias_z(est, true_grad) > 30


def test_ess_is_one_when_every_ratio_is_one():
    assert float(kish_ess(torch.ones(1, 7, dtype=torch.float64))) == 1.0
    assert math.isclose(float(kish_ess(torch.tensor([[1.0, 3.0]], dtype=torch.float64))), 16 / 20, rel_tol=1e-15)
    assert math.isnan(float(kish_ess(torch.full((1, 3), float("nan")))))  # no token with A ≠ 0
    space, rewards, pi, gen = _setup("dense")
    seq, adv = _batches(space, rewards, pi, 30, 8, gen)
    for label in ("vanilla", "is_reshape", "sapo"):
        out = estimate(_one(label), space, pi, token_log_probs(space, pi), seq, adv)
        stats = summarise(out, exact_gradient(space, pi, rewards))
        assert abs(stats["ess"] - 1.0) < 1e-12 and stats["zero_share"] == 0.0 and stats["cut_share"] == 0.0
    mu = kl_behaviour(space, pi, 0.2, gen).logits
    out = estimate(_one("ref:is_token"), space, pi, token_log_probs(space, mu), seq, adv)
    assert summarise(out, exact_gradient(space, pi, rewards))["ess"] < 0.99


def test_read_off_weights_match_the_formulas():
    """The loss-agnostic read-off (autograd ÷ (−A·a)) recovers each loss's known weight."""
    r = torch.tensor([0.3, 0.79, 0.9, 1.0, 1.1, 1.21, 2.5, 3.5], dtype=torch.float64)
    for sign in (1.0, -1.0):
        adv = torch.full_like(r, sign)
        params = ISReshapeParams()
        torch.testing.assert_close(weight_curve(_one("is_reshape"), r, sign), reshape_terms(params, r.log(), adv).weight)
        clipped = (r < 0.8) if sign < 0 else (r > 1.2)
        vanilla = torch.where(clipped, 0.0, r)
        if sign < 0:
            vanilla = torch.where(r > 3.0, 0.0, vanilla)  # dual clip (clip_ratio_c = 3)
        torch.testing.assert_close(weight_curve(_one("vanilla"), r, sign), vanilla)
        torch.testing.assert_close(weight_curve(_one("cispo"), r, sign), r.clamp(0.8, 1.2))
        torch.testing.assert_close(weight_curve(_one("gpg"), r, sign), torch.ones_like(r))
        torch.testing.assert_close(weight_curve(_one("ref:is_token"), r, sign), r)
    # SAPO: r·sech²(τ(r − 1)/2), τ = 1 for A > 0
    sapo = r * (1 - torch.tanh(0.5 * (r - 1)) ** 2)
    torch.testing.assert_close(weight_curve(_one("sapo"), r, 1.0), sapo)


def test_losses_use_the_shared_spec_parser():
    (est,) = build_estimators(["is_reshape:kernel=cauchy,width=2"], [])
    assert est.spec == parse_loss_spec("is_reshape:kernel=cauchy,width=2") and est.label == "is_reshape:kernel=cauchy,width=2"


def test_plot_style_follows_the_spec_not_the_label_text():
    """The package default is drawn as the default's line however its spec is spelled (the lab's own list
    spells every setting out); a baseline gets its own colour; other variants are grey."""
    from dataclasses import asdict

    from isreshape_verl.lab import report
    from isreshape_verl.lab.experiment import DEFAULT_LOSSES
    from isreshape_verl.specs import _format_value

    default = report._style("is_reshape", [])
    spelled = "is_reshape:" + ",".join(f"{k}={_format_value(v)}" for k, v in asdict(ISReshapeParams()).items())
    in_lab_list = [text for text in DEFAULT_LOSSES if parse_loss_spec(text).is_package_default]
    assert len(in_lab_list) == 1  # the lab compares the package default, once
    for text in (spelled, in_lab_list[0]):
        assert report.highlighted_line(str(parse_loss_spec(text))) == report.DEFAULT_LINE
        assert report._style(str(parse_loss_spec(text)), []) == default
    assert default["color"] != "grey"
    vanilla, sapo = report._style("vanilla", []), report._style("sapo", [])
    assert vanilla["color"] not in ("grey", default["color"], sapo["color"])
    for variant in ("is_reshape:kernel=cauchy,width=2", "is_reshape:gamma_mode=fixed", "vanilla:clip_ratio=0.1",
                    "ref:oracle:lambda=4"):
        assert report._style(variant, [])["color"] == "grey"


def test_references_behave_by_their_typed_field():
    assert [e.reference for e in build_estimators([], ["ref:is_seq", "ref:oracle"])] == ["ref:is_seq"] + ["ref:oracle"] * 4
    r = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    renamed = Estimator("any name", reference="ref:is_token")
    torch.testing.assert_close(weight_curve(renamed, r, 1.0), r, rtol=1e-14, atol=0)  # token IS: g = r
    with pytest.raises(ValueError, match="exactly one"):
        Estimator("ref:is_token")  # no spec and no reference: nothing to compute
    assert estimator_from_label("ref:oracle:lambda=4").oracle_lambda == 4.0


# ---------------------------------------------------------------- experiment and CLI

TINY = ["--vocab", "3", "--length", "3", "--replicates", "20", "--batch-size", "8", "--group-size", "4",
        "--train-steps", "4", "--kls", "0", "0.05", "--lags", "0", "2", "--no-progress"]
REQUIRED_COLUMNS = {"reward", "behaviour", "distance", "kl_per_token", "advantage", "loss", "rel_bias2", "rel_var",
                    "rel_mse", "rel_mse_se", "rel_mse_best", "cosine", "ess", "zero_share", "cut_share", "d_rel_mse",
                    "d_rel_mse_se", "d_cosine", "d_cosine_se", "ratio_p01", "ratio_p50", "ratio_p99", "ratio_max"}


def test_cli_writes_csv_markdown_and_plots(tmp_path, capsys):
    out = tmp_path / "lab"
    assert cli.main(TINY + ["--losses", "is_reshape", "vanilla", "sapo:tau_pos=2", "--out", str(out)]) == 0
    df = pd.read_csv(out / "lab.csv")
    assert REQUIRED_COLUMNS <= set(df.columns)
    # 3 rewards × (2 kl + 2 lag) × 2 advantage modes × (3 losses + is_seq + is_token + 4 oracle λ)
    assert len(df) == 3 * 4 * 2 * 9
    assert set(df["loss"]) >= {"is_reshape", "vanilla", "sapo:tau_pos=2", "ref:is_seq", "ref:is_token"}
    on_policy = df[df["distance"] == 0]
    assert (on_policy["kl_per_token"] == 0).all()
    # rel_mse = bias² + variance by construction (up to the CSV's 5 significant digits)
    assert np.allclose(df["rel_mse"], df["rel_bias2"] + df["rel_var"], rtol=2e-3, atol=1e-5)
    assert (df[df["loss"] == "is_reshape"]["d_rel_mse"] == 0).all()  # the anchor
    md = (out / "lab.md").read_text()
    assert "Reproduce: `isreshape-verl lab" in md and "## Summary over all off-policy cells" in md
    for png in ("lab_mse_vs_kl.png", "lab_bias_variance.png", "lab_weights.png"):
        assert (out / png).stat().st_size > 10_000
    assert "rows in" in capsys.readouterr().out


def test_on_policy_only_run_still_reports(tmp_path):
    out = tmp_path / "lab"
    argv = TINY[:TINY.index("--kls")] + ["--kls", "0", "--lags", "0", "--no-progress", "--losses", "sapo", "--out", str(out)]
    assert cli.main(argv) == 0
    df = pd.read_csv(out / "lab.csv")
    assert (df["kl_per_token"] == 0).all()
    not_oracle = ~df["loss"].str.startswith("ref:oracle")  # the oracle's weights r/(1 + λ·Var) differ even at r = 1
    assert np.allclose(df.loc[not_oracle, "ess"], 1.0, rtol=0, atol=1e-12) and df.loc[~not_oracle, "ess"].min() < 0.99
    assert "No off-policy cells" in (out / "lab.md").read_text() and (out / "lab_weights.png").exists()


def test_runs_are_deterministic():
    args = Args(losses=["is_reshape", "cispo"], references=["ref:is_seq"], rewards=["sparse"], kls=[0.05], lags=[2],
                vocab=3, length=3, replicates=10, batch_size=8, group_size=4, train_steps=3)
    assert pd.DataFrame(run(args, progress=False)).equals(pd.DataFrame(run(args, progress=False)))


def test_adding_a_loss_does_not_change_another_loss_numbers():
    base = dict(references=[], rewards=["dense"], kls=[0.05], lags=[2], vocab=3, length=3, replicates=10,
                batch_size=8, group_size=4, train_steps=3)
    one = pd.DataFrame(run(Args(losses=["sapo"], **base), progress=False))
    two = pd.DataFrame(run(Args(losses=["vanilla", "sapo"], **base), progress=False))
    cols = ["rel_mse", "rel_bias2", "cosine", "ess"]
    assert np.array_equal(one[cols].values, two[two["loss"] == "sapo"][cols].values)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--losses", "foo"], "unknown loss 'foo'"),
        (["--losses", "is_reshape:width=-1"], "width"),
        (["--losses", "vanilla", "vanilla"], "given twice"),
        (["--kls", "-0.1"], "--kls"),
        (["--lags", "30"], "--lags"),
        (["--batch-size", "10", "--group-size", "4"], "--batch-size"),
        (["--rewards", "bogus"], "--rewards"),
        (["--advantages", "ppo"], "--advantages"),
        (["--references", "ref:nope"], "--references"),
        (["--replicates", "1"], "--replicates"),
        (["--vocab", "20", "--length", "6"], "too many"),
        (["--lr", "0"], "--lr"),
        (["--kls", "nan"], "--kls"),
        (["--losses", "vanilla:rollout_correction=decoupled_token_is"], "rollout_correction is an arm of the sandbox"),
    ],
)
def test_bad_arguments_fail_early_with_clear_messages(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--out", str(out), "--no-progress"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_out_fails_before_the_experiment(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--out", str(blocker / "sub"), "--no-progress"])
    assert exc.value.code == 2
    assert "is not writable" in capsys.readouterr().err


def test_out_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--no-progress"])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


def test_dispatch_through_the_package_cli(tmp_path):
    from isreshape_verl.cli import main as top

    out = tmp_path / "lab"
    assert top(["lab", *TINY, "--losses", "gpg", "--references", "--rewards", "sparse", "--no-plots", "--out", str(out)]) == 0
    assert (out / "lab.csv").exists() and not (out / "lab_weights.png").exists()


@pytest.mark.parametrize("replicates", [2, 3])
def test_standard_errors_need_three_replicates(tmp_path, replicates):
    """The rule of compare's intervals (MIN_SEEDS = 3, sandbox/stats.py): with 2 replicates lab.md shows no ± column
    and says why; with 3 the paired standard errors are there."""
    from isreshape_verl.lab.report import write_markdown

    args = Args(losses=["is_reshape", "vanilla"], references=[], rewards=["sparse"], kls=[0.05], lags=[2], vocab=3,
                length=3, replicates=replicates, batch_size=8, group_size=4, train_steps=3)
    write_markdown(pd.DataFrame(run(args, progress=False)), tmp_path / "lab.md", "lab", 1.0,
                   {"replicates": replicates})
    md = (tmp_path / "lab.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| loss | rel_mse |"))
    regime = next(line for line in md.splitlines()
                  if line.startswith(("| loss | near: rel_mse |", "| loss | far: rel_mse |")))
    if replicates == 2:
        assert "d_rel_mse_se" not in header and "±se" not in regime
        assert ("± paired standard\nerrors, left out here: a standard error needs at least 3 replicates and this run "
                "has 2, so no difference below comes with a ±.\n") in md
    else:
        assert "d_rel_mse_se" in header and "±se" in regime
        assert "errors (the ± of a mean over cells combines the cells' SEs as independent)." in md
