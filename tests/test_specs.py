"""The loss-spec parser (isreshape_verl.specs): round trips, verl objects, and every bad spec's message."""

import pytest

from isreshape_verl.specs import LOSS_MODES, allowed_keys, parse_loss_spec, parse_loss_specs


@pytest.mark.parametrize(
    "text",
    [
        "vanilla",
        "sapo",
        "is_reshape",
        "gpg",
        "cispo:clip_ratio_high=4",
        "vanilla:clip_ratio=0.2",
        "vanilla:clip_ratio_low=0.2,clip_ratio_high=0.28,clip_ratio_c=3",
        "sapo:tau_pos=1,tau_neg=1.05",
        "is_reshape:kernel=gaussian,width=0.5,gamma_mode=fixed,gamma=1",
        "is_reshape:width_neg=none,one_sided=true,loss_agg_mode=seq-mean-token-mean",
        "is_reshape:kernel=box,one_sided=true,gamma_mode=fixed,gamma=1,width=0.2,width_neg=0.28",
        "is_reshape:width_mode=adaptive,width_target=0.02,width_min=0.1,width_max=2",
        "dppo_tv",
        "dppo_tv:clip_ratio=0.1,clip_ratio_c=20",
        "kl_cov:kl_cov_ratio=0.001,ppo_kl_coef=0.2",
        "clip_cov:clip_cov_ratio=0.001",
        "gspo:clip_ratio_low=0.0003,clip_ratio_high=0.0004",
    ],
)
def test_round_trip(text):
    spec = parse_loss_spec(text)
    assert parse_loss_spec(str(spec)) == spec
    assert str(parse_loss_spec(str(spec))) == str(spec)
    assert spec.label == str(spec)


def test_canonical_forms():
    assert str(parse_loss_spec(" sapo:tau_pos = 1 , tau_neg=1.05 ")) == "sapo:tau_pos=1,tau_neg=1.05"
    assert str(parse_loss_spec("is_reshape:one_sided=YES")) == "is_reshape:one_sided=true"
    assert str(parse_loss_spec("vanilla:")) == "vanilla"


def test_spec_builds_verl_objects():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    vanilla = parse_loss_spec("vanilla:clip_ratio=0.1")
    cfg = vanilla.actor_config()
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high) == (0.1, 0.1)
    assert vanilla.loss_fn is get_policy_loss_fn("vanilla")
    sapo = parse_loss_spec("sapo:tau_pos=2,loss_agg_mode=token-sum")
    assert sapo.actor_config().tau_pos == 2.0 and sapo.loss_agg_mode == "token-sum"
    reshape = parse_loss_spec("is_reshape:kernel=cauchy,width=0.7")
    params = reshape.actor_config().policy_loss.reshape_params()
    assert (params.kernel, params.width) == ("cauchy", 0.7)
    assert reshape.loss_fn is get_policy_loss_fn("is_reshape")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty loss spec"),
        ("   ", "empty loss spec"),
        ("grpo", "unknown loss 'grpo'"),
        ("ppo:clip_ratio=0.2", "allowed (verl's registry): vanilla, dppo_tv"),
        ("bypass_mode", "cannot be compared: it is verl's rollout-correction dispatcher"),
        ("sapo:tau_pos=-1", "tau_pos=-1 is not allowed in loss spec 'sapo:tau_pos=-1'; it must be > 0"),
        ("vanilla:clip_ratio_c=0.5", "it must be > 1 (dual-clip bound)"),
        ("cispo:clip_ratio_high=0", "clip_ratio_high=0 is not allowed"),
        ("clip_cov:clip_cov_ratio=2", "it must be in (0, 1]"),
        ("clip_cov:clip_cov_lb=6", "clip_cov_lb must be < clip_cov_ub"),
        ("kl_cov:ppo_kl_coef=-0.1", "it must be >= 0"),
        ("dro:dro_beta=0", "dro_beta=0 is not allowed"),
        ("dro", "loss 'dro' needs dro_beta (verl has no default)"),
        ("is_reshape:width_mode=auto", "allowed: fixed, adaptive"),
        ("is_reshape:width_target=0", "width_target=0.0 is not allowed; it must be a finite number > 0"),
        ("is_reshape:width_min=-1", "width_min=-1.0 is not allowed"),
        ("is_reshape:width_min=2", "width_min=2.0 > width_max=0.25 (width_max=None means width)"),
        ("is_reshape:width_min=0.5,width_max=0.2", "width_min must be <= width_max"),
        ("vanilla:tau_pos=1", "unknown key 'tau_pos' for loss 'vanilla'"),
        ("sapo:clip_ratio=0.2", "allowed: tau_pos, tau_neg, loss_agg_mode"),
        ("gpg:clip_ratio=1", "unknown key 'clip_ratio' for loss 'gpg'"),
        ("is_reshape:kernel=triangle", "allowed: gaussian, sech2, cauchy, laplace, epanechnikov, box"),
        ("is_reshape:gamma_mode=adaptive", "allowed: fixed, correctness, magnitude, combined"),
        ("is_reshape:width", "is not KEY=VALUE"),
        ("is_reshape:width=", "is not KEY=VALUE"),
        ("is_reshape:width=wide", "is not a number"),
        ("is_reshape:width=nan", "must be finite"),
        ("is_reshape:width=inf", "must be finite"),
        ("is_reshape:width=0", "width=0.0 is not allowed"),
        ("is_reshape:width=-1", "must be a finite number > 0"),
        ("is_reshape:gamma=1.5", "must be a number in [0, 1]"),
        ("is_reshape:gamma_base=0.9,gamma_max=0.5", "gamma_base must be <= gamma_max"),
        ("is_reshape:one_sided=maybe", "is not a boolean"),
        ("is_reshape:width=1,width=2", "given twice"),
        ("vanilla:loss_agg_mode=mean", "allowed: token-mean, token-sum"),
        ("sapo:tau_pos=abc", "is not a number"),
    ],
)
def test_bad_spec_messages(text, message):
    with pytest.raises(ValueError) as err:
        parse_loss_spec(text)
    assert message in str(err.value)


def test_every_mode_lists_its_keys():
    for mode in set(LOSS_MODES) - {"dro"}:
        keys = allowed_keys(mode)
        assert "loss_agg_mode" in keys
        with pytest.raises(ValueError, match="allowed: "):
            parse_loss_spec(f"{mode}:no_such_key=1")


def test_parse_many_rejects_duplicates():
    specs = parse_loss_specs(["vanilla", "sapo:tau_pos=1", "is_reshape"])
    assert [s.mode for s in specs] == ["vanilla", "sapo", "is_reshape"]
    with pytest.raises(ValueError, match="given twice"):
        parse_loss_specs(["sapo:tau_pos=1", "sapo:tau_pos=1.0"])


def test_spaces_around_the_mode_and_keys_are_ignored():
    assert str(parse_loss_spec(" sapo : tau_pos = 1 ")) == "sapo:tau_pos=1"


def test_every_registered_loss_runs_from_its_spec():
    """Each loss in verl's registry (bypass_mode aside) parses, builds its config, and computes a finite loss."""
    import torch

    from isreshape_verl.specs import registered_losses

    names = registered_losses()
    assert {"vanilla", "sapo", "cispo", "dppo_tv", "gpg", "is_reshape"} <= set(names)
    assert "bypass_mode" not in names
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=gen) - 0.5
    adv = torch.randn(4, 6, generator=gen)
    mask = torch.ones(4, 6)
    for name in names:
        spec = parse_loss_spec(name + (":dro_beta=0.1" if name == "dro" else ""))
        log_prob = (old + 0.1 * torch.randn(4, 6, generator=gen)).requires_grad_(True)
        loss, _ = spec.loss_fn(old_log_prob=old, log_prob=log_prob, advantages=adv, response_mask=mask,
                               loss_agg_mode=spec.loss_agg_mode, config=spec.actor_config())
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(log_prob.grad).all(), name


def test_options_reach_verl_config():
    cfg = parse_loss_spec("kl_cov:kl_cov_ratio=0.001,ppo_kl_coef=0.2").actor_config()
    assert (cfg.policy_loss.kl_cov_ratio, cfg.policy_loss.ppo_kl_coef) == (0.001, 0.2)
    cfg = parse_loss_spec("dppo_tv:clip_ratio=0.1,clip_ratio_c=20").actor_config()
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c) == (0.1, 0.1, 20.0)
    params = parse_loss_spec("is_reshape:width_mode=adaptive,width_target=0.02").actor_config().policy_loss
    assert (params.width_mode, params.width_target, params.widest) == ("adaptive", 0.02, 0.25)  # width_max None = the default width
