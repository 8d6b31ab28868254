"""verl integration: plugin discovery, Hydra composition of verl's own config, the CPU loss seam
`verl.workers.utils.losses.ppo_loss`, and config validation."""

import os
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.utils.losses import ppo_loss

from isreshape_verl.config import ISReshapeLossConfig
from isreshape_verl.recipe_check import compose
from isreshape_verl.reshape import ISReshapeParams, is_reshape_token_loss

REGISTRY_CHECK = "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; print('is_reshape' in R)"


def run_python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_import_verl_registers_is_reshape_in_a_fresh_process():
    assert run_python("import verl; " + REGISTRY_CHECK) == "True"


def test_external_lib_registers_it_when_plugin_discovery_is_off():
    code = ("import verl; " + REGISTRY_CHECK.replace("print(", "before = (") + "; "
            "from verl.utils.import_utils import import_external_libs; import_external_libs('isreshape_verl'); "
            "print(before, 'is_reshape' in R)")
    assert run_python(code, VERL_USE_EXTERNAL_PLUGINS="none") == "False True"


def test_plain_torch_modules_do_not_import_verl():
    code = "import sys, isreshape_verl.reshape, isreshape_verl.kernels; print('verl' in sys.modules)"
    assert run_python(code) == "False"


def compose_actor(*policy_loss_overrides):
    overrides = [
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.policy_loss._target_=isreshape_verl.config.ISReshapeLossConfig",
        "actor_rollout_ref.actor.policy_loss.loss_mode=is_reshape",
        *(f"+actor_rollout_ref.actor.policy_loss.{o}" for o in policy_loss_overrides),
    ]
    return omega_conf_to_dataclass(compose(overrides).actor_rollout_ref.actor)


def test_verl_hydra_config_composes_and_converts_with_our_keys():
    actor = compose_actor("kernel=cauchy", "width=1.5", "width_neg=0.5", "one_sided=true", "gamma_mode=combined",
                          "gamma_base=0.1", "gamma_max=0.7", "gamma_tau=0.2", "gamma_beta=3.0", "log_ratio_clamp=10")
    pl = actor.policy_loss
    assert type(pl) is ISReshapeLossConfig and pl.loss_mode == "is_reshape"
    assert pl.reshape_params() == ISReshapeParams(kernel="cauchy", width=1.5, width_neg=0.5, one_sided=True,
                                                  gamma_mode="combined", gamma_base=0.1, gamma_max=0.7,
                                                  gamma_tau=0.2, gamma_beta=3.0, log_ratio_clamp=10.0)
    assert pl.rollout_correction is not None  # verl's own fields keep their defaults


def test_bad_value_in_hydra_config_fails_at_conversion_naming_the_key():
    with pytest.raises(Exception, match=r"kernel='triangle' is not a known kernel"):
        compose_actor("kernel=triangle")


LOSS_MODE_REFUSED = r"loss_mode='vanilla' is not allowed for ISReshapeLossConfig; it must be 'is_reshape'"


def test_another_loss_mode_is_refused_in_python():
    """With loss_mode=vanilla verl would train GRPO and ignore every IS Reshape key: refused, naming both."""
    with pytest.raises(ValueError, match=LOSS_MODE_REFUSED):
        ISReshapeLossConfig(loss_mode="vanilla")
    with pytest.raises(ValueError, match=r"loss_mode='bypass_mode' is not allowed"):
        ISReshapeLossConfig(loss_mode="bypass_mode", width=0.5)


def test_another_loss_mode_is_refused_when_verl_builds_the_config():
    overrides = ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                 "actor_rollout_ref.actor.policy_loss._target_=isreshape_verl.config.ISReshapeLossConfig",
                 "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
                 "+actor_rollout_ref.actor.policy_loss.width=0.5"]
    cfg = compose(overrides)
    with pytest.raises(Exception, match=LOSS_MODE_REFUSED):
        omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def test_the_ways_verl_builds_and_copies_the_config_keep_is_reshape():
    """verl 0.9.1 builds the policy-loss config with omega_conf_to_dataclass (by _target_, or by type from a
    config without loss_mode: the dataclass default), and Ray pickles it to the workers: none of them trips
    the loss_mode refusal."""
    import pickle

    from omegaconf import OmegaConf

    built = omega_conf_to_dataclass(OmegaConf.create({"width": 0.5}), dataclass_type=ISReshapeLossConfig)
    assert built.loss_mode == "is_reshape" and built.width == 0.5
    by_target = omega_conf_to_dataclass(OmegaConf.create(
        {"_target_": "isreshape_verl.config.ISReshapeLossConfig", "loss_mode": "is_reshape", "kernel": "cauchy"}))
    assert type(by_target) is ISReshapeLossConfig and by_target.kernel == "cauchy"
    assert pickle.loads(pickle.dumps(by_target)) == by_target
    assert OmegaConf.to_object(OmegaConf.structured(by_target)) == by_target
    assert compose_actor("width=0.5").policy_loss.loss_mode == "is_reshape"


# One non-default value per key: each must change the gradient that verl's ppo_loss produces.
KNOB_VALUES = {"kernel": "gaussian", "width": 0.3, "width_neg": 0.2, "one_sided": False, "gamma_mode": "fixed",
               "gamma": 0.4, "gamma_base": 0.1, "gamma_max": 0.8, "gamma_tau": 1.0, "gamma_beta": 4.0,
               "log_ratio_clamp": 0.05, "localize_sft": False, "width_mode": "fixed", "width_target": 0.001, "width_min": 0.2,
               "width_max": 3.0}
# keys that only act under another setting get it alongside
KNOB_CONTEXT = {"gamma": {"gamma_mode": "fixed"}, "gamma_beta": {"gamma_mode": "magnitude"},
                "width_target": {"width_mode": "adaptive"}, "width_min": {"width_mode": "adaptive", "width_target": 1e-4},
                "width_max": {"width_mode": "adaptive", "width_target": 1.0}}


def make_batch(seed=0, B=4, P=3, R=6):
    """A padded verl batch: left-padded prompts, right-padded responses, flat (nnz,) model log-probs."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, P + 1, (B,), generator=gen)
    resp_lens = torch.randint(1, R + 1, (B,), generator=gen)
    attention = torch.zeros(B, P + R, dtype=torch.long)
    for i in range(B):
        attention[i, P - prompt_lens[i]:P] = 1
        attention[i, P:P + resp_lens[i]] = 1
    old = -torch.rand(B, R, generator=gen, dtype=torch.float64) * 2
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(B)[:B, None]  # both signs of A present
    adv = (signs * (0.2 + torch.rand(B, 1, generator=gen, dtype=torch.float64))).expand(B, R).clone()
    data = TensorDict({"prompts": torch.zeros(B, P, dtype=torch.long), "responses": torch.zeros(B, R, dtype=torch.long),
                       "attention_mask": attention, "response_mask": attention[:, P:].clone(),
                       "old_log_probs": old, "advantages": adv}, batch_size=[B])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    # model output: one log-prob per sequence token; response token t's log-prob sits at position t − 1
    flat = torch.randn(int(attention.sum()), generator=gen, dtype=torch.float64) * 0.5 - 1.0
    return data, flat


def padded_log_probs(flat, data):
    """Response log-probs (B, R) gathered from the flat model output, independently of verl's helper."""
    attention, R = data["attention_mask"], data["responses"].shape[1]
    P = attention.shape[1] - R
    out = torch.zeros(attention.shape[0], R, dtype=flat.dtype)
    offset = 0
    for i in range(attention.shape[0]):
        n_prompt, n_resp = int(attention[i, :P].sum()), int(attention[i, P:].sum())
        out[i, :n_resp] = flat[offset + n_prompt - 1: offset + n_prompt - 1 + n_resp]
        offset += n_prompt + n_resp
    return out


def ppo_loss_grad(actor, data, flat):
    flat = flat.clone().requires_grad_()
    loss, metrics = ppo_loss(actor, {"log_probs": flat}, data)
    loss.backward()
    return loss, flat.grad, metrics


def expected_flat_grad(params, data, flat):
    """Our plain-torch token loss, token-mean over the response mask, differentiated w.r.t. the flat input."""
    flat = flat.clone().requires_grad_()
    lp = padded_log_probs(flat, data)
    mask = data["response_mask"].bool()
    token_loss = is_reshape_token_loss(lp, data["old_log_probs"], data["advantages"], params, valid=mask)
    ((token_loss * mask).sum() / mask.sum()).backward()
    return flat.grad


def test_end_to_end_through_verl_ppo_loss():
    data, flat = make_batch(seed=1)
    actor = compose_actor()
    loss, grad, metrics = ppo_loss_grad(actor, data, flat)
    torch.testing.assert_close(grad, expected_flat_grad(actor.policy_loss.reshape_params(), data, flat),
                               rtol=1e-12, atol=1e-15)
    assert grad.abs().sum() > 0
    assert "actor/is_reshape/ess" in metrics and "actor/pg_loss" in metrics


@pytest.mark.parametrize("key", list(KNOB_VALUES))
def test_each_knob_reaches_the_math(key):
    data, flat = make_batch(seed=2)
    settings = {**KNOB_CONTEXT.get(key, {})}
    base = compose_actor(*(f"{k}={v}" for k, v in settings.items()))
    settings[key] = KNOB_VALUES[key]
    changed = compose_actor(*(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()))
    assert getattr(changed.policy_loss, key) == KNOB_VALUES[key]
    _, grad_base, _ = ppo_loss_grad(base, data, flat)
    _, grad_changed, _ = ppo_loss_grad(changed, data, flat)
    assert not torch.allclose(grad_base, grad_changed, rtol=1e-6, atol=0), f"{key} did not change the gradient"
    torch.testing.assert_close(grad_changed, expected_flat_grad(changed.policy_loss.reshape_params(), data, flat),
                               rtol=1e-12, atol=1e-15)


BAD_CONFIGS = [
    ({"kernel": "triangle"}, r"kernel='triangle' is not a known kernel; allowed: gaussian, sech2"),
    ({"gamma_mode": "auto"}, r"gamma_mode='auto' is not known; allowed: fixed, correctness, magnitude, combined"),
    ({"width": 0.0}, r"width=0.0 is not allowed; it must be a finite number > 0"),
    ({"width": -1.0}, r"width=-1.0 is not allowed"),
    ({"width_neg": -0.5}, r"width_neg=-0.5 is not allowed"),
    ({"width": float("inf")}, r"width=inf is not allowed"),
    ({"gamma": 1.5}, r"gamma=1.5 is not allowed; it must be a number in \[0, 1\]"),
    ({"gamma_base": -0.1}, r"gamma_base=-0.1 is not allowed"),
    ({"gamma_max": 2.0}, r"gamma_max=2.0 is not allowed"),
    ({"gamma_base": 0.9, "gamma_max": 0.5}, r"gamma_base=0.9 > gamma_max=0.5; gamma_base must be <= gamma_max"),
    ({"gamma_tau": 0.0}, r"gamma_tau=0.0 is not allowed; it must be a finite number > 0"),
    ({"gamma_beta": -2.0}, r"gamma_beta=-2.0 is not allowed"),
    ({"log_ratio_clamp": 0.0}, r"log_ratio_clamp=0.0 is not allowed"),
    ({"one_sided": "yes"}, r"one_sided='yes' is not allowed; it must be true or false"),
    ({"localize_sft": 1}, r"localize_sft=1 is not allowed; it must be true or false"),
    ({"width_mode": "auto"}, r"width_mode='auto' is not known; allowed: fixed, adaptive"),
    ({"width_target": 0.0}, r"width_target=0.0 is not allowed; it must be a finite number > 0"),
    ({"width_min": -0.1}, r"width_min=-0.1 is not allowed"),
    ({"width_max": float("nan")}, r"width_max=nan is not allowed"),
    ({"width_min": 0.5, "width_max": 0.2}, r"width_min=0.5 > width_max=0.2; width_min must be <= width_max"),
    ({"width_min": 1.5}, r"width_min=1.5 > width_max=0.25 \(width_max=None means width\)"),
    ({"dual_clip": 0.9}, r"dual_clip=0.9 is not allowed; it must be None or a finite number > 1"),
]


@pytest.mark.parametrize("settings,message", BAD_CONFIGS)
def test_bad_config_values_are_rejected_by_both_config_classes(settings, message):
    with pytest.raises(ValueError, match=message):
        ISReshapeLossConfig(**settings)
    with pytest.raises(ValueError, match=message):
        ISReshapeParams(**settings)


def test_config_fields_are_the_documented_user_facing_names():
    ours = {f.name for f in fields(ISReshapeParams)}
    assert ours == {"kernel", "width", "width_neg", "one_sided", "gamma_mode", "gamma", "gamma_base", "gamma_max",
                    "gamma_tau", "gamma_beta", "log_ratio_clamp", "localize_sft", "width_mode", "width_target", "width_min",
                    "width_max", "dual_clip"}
    assert ours <= {f.name for f in fields(ISReshapeLossConfig)}
    assert ISReshapeLossConfig().loss_mode == "is_reshape"
