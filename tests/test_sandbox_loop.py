"""The sandbox RL loop: real lag, verl's registry functions, determinism, resume, async.

A tiny Qwen2 (hidden 64, 2 layers) gets a short supervised warm start on the easiest task so that some
samples are right (non-zero GRPO advantages); runs are a few steps of 8 prompts × 4 samples.
"""

import math

import pytest
import torch

from isreshape_verl.sandbox.loop import RLArgs, Trainer, read_metrics, without_timings
from isreshape_verl.sandbox.model import TinyModelArgs, tiny_policy
from isreshape_verl.sandbox.task import procedural_task
from isreshape_verl.sandbox.warmstart import WarmStartArgs, train_warm_start
from isreshape_verl.specs import parse_loss_spec

TINY = TinyModelArgs(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    task = procedural_task(0, 2000, 64, difficulty=1)
    policy = tiny_policy(TINY, 0)
    train_warm_start(policy, task.train, task.test,
                     WarmStartArgs(batch_size=64, max_steps=80, eval_every=40, eval_problems=32, target_accuracy=1.0),
                     max_new_tokens=16, log=lambda *_: None)
    warm = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    return task, warm


def _args(**kw):
    base = dict(steps=4, prompts_per_step=8, samples_per_prompt=4, mini_batches=2, max_new_tokens=16,
                eval_every=2, eval_problems=16, ckpt_every=2, lr=1e-3)
    base.update(kw)
    return RLArgs(**base)


def _run(setup, tmp_path, name, spec="vanilla", resume=False, stop_after=None, **kw):
    task, warm = setup
    trainer = Trainer(tiny_policy(TINY, 0), task, parse_loss_spec(spec), _args(**kw), str(tmp_path / name), warm)
    finished = trainer.run(resume=resume, stop_after=stop_after)
    return finished, read_metrics(str(tmp_path / name / "metrics.jsonl"))


def test_lag_is_real(setup, tmp_path):
    # the entropy bonus guarantees that every update moves the policy, whatever the rewards
    _, rows = _run(setup, tmp_path, "lag4", lag=4, steps=7, entropy_coeff=0.05)
    train = [r for r in rows if r["step"] > 0]
    assert [r["lag"] for r in train] == [0, 1, 2, 3, 4, 4, 4]
    assert [r["behaviour_version"] for r in train] == [0, 0, 0, 0, 0, 1, 2]
    for r in train[4:]:
        assert r["ratio_absdev"] > 1e-3 and (r["ratio_min"] < 1 < r["ratio_max"])
        assert math.isfinite(r["ppo_kl"]) and r["ppo_kl"] != 0


def test_lag_zero_single_minibatch_ratio_is_exactly_one(setup, tmp_path):
    _, rows = _run(setup, tmp_path, "lag0", lag=0, mini_batches=1, steps=3, entropy_coeff=0.05)
    for r in rows[1:]:
        assert r["lag"] == 0
        assert r["ratio_min"] == 1.0 and r["ratio_max"] == 1.0 and r["ppo_kl"] == 0.0
        assert r["mu_kv_gap"] < 1e-4  # KV-cache sampling log-probs vs full forward (fp32)


@pytest.mark.parametrize("mode", ["vanilla", "sapo", "is_reshape"])
def test_update_goes_through_verl_registry(setup, tmp_path, monkeypatch, mode):
    from verl.trainer.ppo import core_algos

    original = core_algos.POLICY_LOSS_REGISTRY[mode]
    expected_module = "isreshape_verl.verl_loss" if mode == "is_reshape" else "verl.trainer.ppo.core_algos"
    assert original.__module__ == expected_module
    calls = []

    def spy(**kwargs):
        out = original(**kwargs)
        calls.append(float(out[0].detach()))
        return out

    monkeypatch.setitem(core_algos.POLICY_LOSS_REGISTRY, mode, spy)
    _, rows = _run(setup, tmp_path, mode, spec=mode, steps=2, entropy_coeff=0.05)
    assert len(calls) >= 2 * 2  # ≥ one call per mini-batch per step (plus the diagnostics' calls)
    assert all(math.isfinite(c) for c in calls)


def test_deterministic_with_lag(setup, tmp_path):
    _, a = _run(setup, tmp_path, "a", spec="is_reshape", lag=2, steps=4)
    _, b = _run(setup, tmp_path, "b", spec="is_reshape", lag=2, steps=4)
    assert without_timings(a) == without_timings(b)


def test_resume_equals_uninterrupted(setup, tmp_path):
    _, full = _run(setup, tmp_path, "full", spec="sapo", lag=2, steps=5, entropy_coeff=0.01)
    finished, part = _run(setup, tmp_path, "cut", spec="sapo", lag=2, steps=5, entropy_coeff=0.01, stop_after=3)
    assert not finished and part[-1]["step"] == 3
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # a row written after the checkpoint, then a crash
        f.write('{"step": 4, "reward": 123.0}\n')
    finished, resumed = _run(setup, tmp_path, "cut", spec="sapo", lag=2, steps=5, entropy_coeff=0.01, resume=True)
    assert finished
    assert without_timings(resumed) == without_timings(full)


def test_async_generator_bounds_staleness(setup, tmp_path):
    from functools import partial

    from isreshape_verl.sandbox.async_gen import AsyncSource
    from isreshape_verl.sandbox.model import build_policy

    task, warm = setup
    args = _args(steps=4, async_mode=True, max_staleness=2, entropy_coeff=0.01)
    build = partial(build_policy, None, TINY, 0)
    trainer = Trainer(tiny_policy(TINY, 0), task, parse_loss_spec("is_reshape"), args, str(tmp_path / "async"), warm,
                      source_factory=lambda t: AsyncSource(t, build, args.max_staleness))
    assert trainer.run()
    rows = read_metrics(str(tmp_path / "async" / "metrics.jsonl"))
    lags = [r["lag"] for r in rows[1:]]
    assert len(lags) == 4 and all(0 <= lag <= 2 for lag in lags)
    assert not trainer.source.proc.is_alive()


def test_decoupled_arm_at_lag_zero_has_pi_old_equal_to_mu_and_weights_one(setup, tmp_path):
    """Lag 0, one mini-batch: π_old, recomputed with the weights that sampled, is μ bit for bit, so verl's TIS
    weights min(π_old/μ, 2) are exactly 1 and the ratio π_θ/π_old is exactly 1 (as in bypass mode)."""
    _, rows = _run(setup, tmp_path, "tis0", spec="vanilla:rollout_correction=decoupled_token_is", lag=0,
                   mini_batches=1, steps=2, entropy_coeff=0.05)
    for r in rows[1:]:
        assert r["rc_is_mean"] == 1.0 and r["abs_log_rho_p99"] == 0.0 and r["rc_kl"] == 0.0
        assert r["ratio_min"] == 1.0 and r["ratio_max"] == 1.0 and r["ppo_kl"] == 0.0
        assert r["abs_log_ratio_p99"] == 0.0


@pytest.mark.parametrize("spec", ["vanilla:rollout_correction=decoupled_token_is",
                                  "is_reshape:rollout_correction=decoupled_token_icepop,rollout_is_threshold=0.9_1.1"])
def test_decoupled_arm_passes_pi_old_and_verls_weights_to_the_loss(setup, tmp_path, monkeypatch, spec):
    """With lag, each update's loss gets old_log_prob = log π_old (the weights at the start of the update, not μ)
    and rollout_is_weights = verl's compute_rollout_correction_weights(log π_old − log μ) on its rows (exact)."""
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    from isreshape_verl.sandbox import loop
    from isreshape_verl.sandbox.rollout import sequence_log_probs

    parsed = parse_loss_spec(spec)
    threshold = parsed.rollout_is_threshold or 2.0  # decoupled_token_is: RolloutCorrectionConfig's C = 2
    seen, calls = [], []
    original_update = loop.Trainer.update

    def update(self, batch):  # π_old as the update starts, and μ
        seen.append((sequence_log_probs(self.policy.model, batch.rollout, 256), batch.old_log_probs.clone(),
                     batch.rollout.response_mask.clone()))
        return original_update(self, batch)

    original = core_algos.POLICY_LOSS_REGISTRY[parsed.mode]

    def spy(**kwargs):
        if kwargs["rollout_is_weights"] is not None and kwargs["log_prob"].requires_grad:
            calls.append((len(seen), kwargs["old_log_prob"].clone(), kwargs["rollout_is_weights"].clone()))
        return original(**kwargs)

    monkeypatch.setattr(loop.Trainer, "update", update)
    monkeypatch.setitem(core_algos.POLICY_LOSS_REGISTRY, parsed.mode, spy)
    _, rows = _run(setup, tmp_path, "dec", spec=spec, lag=2, steps=4, mini_batches=1, entropy_coeff=0.05)
    assert len(calls) == 4 and rows[-1]["abs_log_rho_p99"] > 0  # lag 2: π_old ≠ μ
    for step, old, weights in calls:
        pi_old, mu, mask = seen[step - 1]
        torch.testing.assert_close(old, pi_old, rtol=0, atol=0)
        expected, _ = compute_rollout_correction_weights(pi_old - mu, mask, rollout_is="token",
                                                         rollout_is_threshold=threshold)
        torch.testing.assert_close(weights, expected, rtol=0, atol=0)


def test_bf16_rollout_against_the_fp32_trainer_is_a_mismatch_at_lag_zero(setup, tmp_path):
    """rollout_dtype=bfloat16: μ comes from a bf16 copy of the weights, π_θ from the fp32 trainer, so r ≠ 1 on
    the first update of a lag-0 run (fp32 gives r = 1 exactly, test above); a decoupled arm's π_old is fp32,
    so its |log π_old/μ| is the same mismatch and its ratio π_θ/π_old is exactly 1."""
    _, rows = _run(setup, tmp_path, "bf16", lag=0, mini_batches=1, steps=1, rollout_dtype="bfloat16")
    first = rows[1]
    assert first["abs_log_ratio_p99"] > 1e-3 and first["ppo_kl"] != 0.0 and first["ratio_max"] > 1.0
    _, rows = _run(setup, tmp_path, "bf16_tis", spec="vanilla:rollout_correction=decoupled_token_is", lag=0,
                   mini_batches=1, steps=1, rollout_dtype="bfloat16")
    assert rows[1]["ratio_min"] == 1.0 == rows[1]["ratio_max"] and rows[1]["ppo_kl"] == 0.0
    assert rows[1]["abs_log_rho_p99"] == pytest.approx(first["abs_log_ratio_p99"], rel=1e-6)
    assert rows[1]["rc_is_mean"] != 1.0


def test_rollout_dtype_is_checked():
    with pytest.raises(ValueError, match="rollout_dtype"):
        _args(rollout_dtype="float16")
