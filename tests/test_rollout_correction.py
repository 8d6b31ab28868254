"""ROLLOUT_CORRECTION: `bypass` (r = π_θ/μ) or one of verl 0.9.1's decoupled presets (r = π_θ/π_old, verl's
weights on π_old/μ), from the knob to the composed config, the loss, and the sandbox's weights.

1. The preset list is verl's: the classmethods of RolloutCorrectionConfig whose names start with `decoupled_`.
2. Each preset's DRY_RUN command sets every field verl's classmethod sets, composes, and passes
   `recipe_check.check_overrides` (comparison invariants included); a bare decoupled mode is refused, naming
   ROLLOUT_CORRECTION; a bad value is one line, exit 2, listing the allowed names.
3. `is_reshape` with `rollout_is_weights=w` is the loss without them times w, per token (exact: w in powers of 2).
4. The sandbox's weights (`isreshape_verl.rollout_correction.correction_weights`) equal verl's
   `compute_rollout_correction_weights` on the same tensors, for token TIS and token IcePop at several thresholds.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
import torch

from isreshape_verl.rollout_correction import CORRECTIONS, PRESETS

REPO = Path(__file__).resolve().parents[1]


def dry_run(loss: str, env: dict, dataset: str = "tiny") -> tuple[int, str, str]:
    """`DRY_RUN=1 RECIPE_CHECK=0 bash recipes/<dataset>/<loss>.sh`, in-process (what the script execs)."""
    from isreshape_verl.launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    full = {"PATH": "/usr/bin", "HOME": "/home/user", "DRY_RUN": "1", "RECIPE_CHECK": "0", "TMPDIR": "/tmp", **env}
    status = main(["recipe", dataset, loss], env=full, out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def overrides_of(stdout: str) -> list[str]:
    import shlex

    text = stdout.replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if " -m verl.trainer.main_ppo" in ln and not ln.startswith("#")]
    return shlex.split(line)[3:]


# ---- 1. the names are verl's ----
def test_the_presets_are_verls_decoupled_classmethods():
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    verls = {name for name in vars(RolloutCorrectionConfig) if name.startswith("decoupled_")}
    assert set(PRESETS) == verls and len(PRESETS) == len(verls) == 10
    assert CORRECTIONS == ("bypass", *PRESETS)
    for name in PRESETS:
        preset = getattr(RolloutCorrectionConfig, name)()
        assert preset.bypass_mode is False and (preset.rollout_is or preset.rollout_rs), name


# ---- 2. the recipes ----
def test_unset_and_bypass_keep_todays_command():
    status, unset, _ = dry_run("isreshape", {})
    assert status == 0 and "algorithm.rollout_correction.bypass_mode=True" in overrides_of(unset)
    status, bypass, _ = dry_run("isreshape", {"ROLLOUT_CORRECTION": "bypass"})
    assert status == 0 and overrides_of(bypass) == overrides_of(unset)
    assert not [o for o in overrides_of(unset) if o.startswith("algorithm.rollout_correction.")
                and o != "algorithm.rollout_correction.bypass_mode=True"]


@pytest.fixture(scope="module")
def recipe_check():
    from isreshape_verl import recipe_check

    return recipe_check


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_composes_to_verls_values_and_passes_the_check(recipe_check, preset):
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    status, stdout, stderr = dry_run("isreshape", {"ROLLOUT_CORRECTION": preset})
    assert status == 0, stderr
    overrides = overrides_of(stdout)
    assert f"trainer.experiment_name=tiny-isreshape-sync-{preset}" in overrides
    result = recipe_check.check_overrides(overrides)
    assert any("rollout correction" in c for c in result.checked)
    composed = result.config.algorithm.rollout_correction
    expected = getattr(RolloutCorrectionConfig, preset)()
    for key in ("rollout_is", "rollout_is_threshold", "rollout_is_batch_normalize", "rollout_rs",
                "rollout_rs_threshold", "bypass_mode", "loss_type"):
        assert composed[key] == getattr(expected, key), (preset, key)


def test_grpo_with_token_tis_passes_the_check(recipe_check):
    status, stdout, stderr = dry_run("grpo", {"ROLLOUT_CORRECTION": "decoupled_token_is"}, dataset="gsm8k")
    assert status == 0, stderr
    cfg = recipe_check.check_overrides(overrides_of(stdout)).config
    assert cfg.algorithm.rollout_correction.rollout_is == "token"
    assert cfg.algorithm.rollout_correction.rollout_is_threshold == 2.0  # RolloutCorrectionConfig.decoupled_token_is
    assert cfg.actor_rollout_ref.rollout.calculate_log_probs is True


def test_a_bare_decoupled_mode_is_refused_naming_the_knob(recipe_check):
    _, stdout, _ = dry_run("isreshape", {})
    with pytest.raises(recipe_check.RecipeCheckError) as info:
        recipe_check.check_overrides([*overrides_of(stdout), "algorithm.rollout_correction.bypass_mode=False"])
    (problem,) = [p for p in info.value.problems if "comparison recipes need" in p]
    assert "ROLLOUT_CORRECTION" in problem and "bypass_mode=True" in problem
    # the same with the comparison invariants off: verl itself runs it
    recipe_check.check_overrides([*overrides_of(stdout), "algorithm.rollout_correction.bypass_mode=False"],
                                 comparison_invariants=False)


def test_a_bad_value_is_one_line_exit_2_listing_the_names():
    status, stdout, stderr = dry_run("isreshape", {"ROLLOUT_CORRECTION": "tis"})
    assert status == 2 and stdout == ""
    assert stderr == f"error: ROLLOUT_CORRECTION='tis' is not allowed ({', '.join(CORRECTIONS)})\n"
    # through the script, as a user runs it
    from isreshape_verl.testing.recipe_runs import recipe_env

    proc = subprocess.run(["bash", "recipes/tiny/grpo.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False,
                          env=recipe_env(DRY_RUN="1", RECIPE_CHECK="0", HOME="/home/user",
                                         ROLLOUT_CORRECTION="decoupled_token_tis"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"error: ROLLOUT_CORRECTION='decoupled_token_tis' is not allowed ({', '.join(CORRECTIONS)})"]


# ---- 3. the loss multiplies each token by verl's weights ----
def test_is_reshape_with_weights_is_the_loss_without_times_the_weights_per_token():
    """w ∈ {0, ½, 1, 2, 4}: multiplying by a power of two is exact, so the identity holds bitwise whatever the
    order of the products; the adaptive width (the default) sees the mask, not w."""
    import verl  # noqa: F401  (loads the plugin entry point)
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from isreshape_verl.specs import parse_loss_spec

    gen = torch.Generator().manual_seed(7)
    B, T = 6, 9
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    log_prob = old + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=gen, dtype=torch.float64).expand(B, T).clone()
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=gen)[:, None]
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)[torch.randint(0, 5, (B, T), generator=gen)]
    fn = get_policy_loss_fn("is_reshape")
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        config = parse_loss_spec("is_reshape").actor_config()

        def loss_and_grad(weights, agg=agg, config=config):
            lp = log_prob.clone().requires_grad_()
            loss, _ = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode=agg,
                         config=config, rollout_is_weights=weights)
            return loss, torch.autograd.grad(loss, lp)[0]

        loss, grad = loss_and_grad(None)
        _, grad_w = loss_and_grad(w)
        torch.testing.assert_close(grad_w, grad * w, rtol=0, atol=0)
        loss_2, _ = loss_and_grad(torch.full_like(w, 2.0))
        assert loss_2.item() == 2 * loss.item()


# ---- 4. the sandbox's weights are verl's ----
def _log_probs(seed: int, B: int = 8, T: int = 12, spread: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    rollout = -torch.rand(B, T, generator=gen) * 4  # log μ
    old = rollout + spread * torch.randn(B, T, generator=gen)  # log π_old
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=gen)[:, None]).float()
    return old, rollout, mask


@pytest.mark.parametrize("threshold", [1.5, 2.0, 5.0, "0.5_5.0", "0.8_1.25", "0.9_2.0"])
@pytest.mark.parametrize("seed", [0, 1])
def test_token_tis_and_icepop_weights_equal_verls(seed, threshold):
    """verl's own function, called directly, against the sandbox's path through `correction_weights` (a preset
    with its threshold replaced) and against the closed forms min(ρ, C) and ρ·1[lo ≤ ρ ≤ hi], ρ = π_old/μ."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    from isreshape_verl import rollout_correction

    old, rollout, mask = _log_probs(seed)
    verls, _ = compute_rollout_correction_weights(old - rollout, mask, rollout_is="token",
                                                  rollout_is_threshold=threshold)
    preset = "decoupled_token_is" if isinstance(threshold, float) else "decoupled_token_icepop"
    settings = rollout_correction.preset_settings(preset)
    ours, new_mask, metrics = rollout_correction.correction_weights(preset, old, rollout, mask,
                                                                    rollout_is_threshold=threshold)
    assert settings["rollout_is"] == "token"
    torch.testing.assert_close(ours, verls, rtol=0, atol=0)
    torch.testing.assert_close(new_mask, mask, rtol=0, atol=0)  # no rejection in these presets
    rho = torch.exp(old - rollout) * mask
    if isinstance(threshold, float):
        closed = rho.clamp(max=threshold)
    else:
        lo, hi = map(float, threshold.split("_"))
        closed = torch.where((rho >= lo) & (rho <= hi), rho, torch.zeros_like(rho))
    torch.testing.assert_close(ours, closed, rtol=0, atol=0)
    assert "rollout_corr/rollout_is_mean" in metrics


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_through_verls_helper_with_its_own_values(preset):
    """The presets' own thresholds, rejection included: our call is verl's unified function with the fields of
    verl's classmethod, nothing re-typed."""
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.trainer.ppo.rollout_corr_helper import (
        compute_rollout_correction_and_rejection_mask,
    )

    from isreshape_verl.rollout_correction import correction_weights

    old, rollout, mask = _log_probs(3, spread=0.05)
    p = getattr(RolloutCorrectionConfig, preset)()
    verls, verl_mask, _ = compute_rollout_correction_and_rejection_mask(
        old, rollout, mask, rollout_is=p.rollout_is, rollout_is_threshold=p.rollout_is_threshold,
        rollout_is_batch_normalize=p.rollout_is_batch_normalize, rollout_rs=p.rollout_rs,
        rollout_rs_threshold=p.rollout_rs_threshold)
    ours, our_mask, _ = correction_weights(preset, old, rollout, mask)
    torch.testing.assert_close(our_mask, verl_mask, rtol=0, atol=0)
    if verls is None:
        assert ours is None
    else:
        torch.testing.assert_close(ours, verls.batch["rollout_is_weights"], rtol=0, atol=0)


# ---- 5. the sandbox arm, end to end ----
def test_compare_runs_a_grpo_tis_decoupled_arm_on_the_smoke_preset(tmp_path):
    """`isreshape-verl compare --preset smoke --losses vanilla vanilla:rollout_correction=decoupled_token_is`,
    2 steps at lag 1: both arms finish, the decoupled one logs verl's weights."""
    import json

    from isreshape_verl.sandbox.cli import main

    out = tmp_path / "cmp"
    arm = "vanilla:rollout_correction=decoupled_token_is"
    assert main(["--preset", "smoke", "--losses", "vanilla", arm, "--lags", "1", "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["vanilla__lag1__seed0", "vanilla__rollout_correction=decoupled_token_is__lag1__seed0"]
    rows = [json.loads(line) for line in (out / "runs" / runs[1] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert 0 < row["rc_is_mean"] <= 2 and row["rc_is_ess"] > 0 and row["abs_log_rho_p50"] >= 0
    bypass = [json.loads(line) for line in (out / "runs" / runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert "rc_is_mean" not in bypass[1]
    assert f"`{arm}`" in (out / "report.md").read_text()


def test_rollout_dtype_sets_the_rollouts_dtype_and_unset_keeps_todays_command():
    """ROLLOUT_DTYPE: unset keeps float32 on CPU (no new override on GPUs); bfloat16 reaches rollout.dtype once."""
    status, cpu_unset, _ = dry_run("isreshape", {})
    assert status == 0 and overrides_of(cpu_unset).count("actor_rollout_ref.rollout.dtype=float32") == 1
    status, cpu_bf16, _ = dry_run("isreshape", {"ROLLOUT_DTYPE": "bfloat16"})
    assert status == 0
    assert [o for o in overrides_of(cpu_bf16) if o not in overrides_of(cpu_unset)] == [
        "actor_rollout_ref.rollout.dtype=bfloat16"]
    status, gpu_unset, _ = dry_run("grpo", {}, dataset="gsm8k")
    assert status == 0 and not [o for o in overrides_of(gpu_unset) if o.startswith("actor_rollout_ref.rollout.dtype")]
    status, gpu_bf16, _ = dry_run("grpo", {"ROLLOUT_DTYPE": "bfloat16"}, dataset="gsm8k")
    assert status == 0
    assert [o for o in overrides_of(gpu_bf16) if o not in overrides_of(gpu_unset)] == [
        "actor_rollout_ref.rollout.dtype=bfloat16"]
    status, _, stderr = dry_run("isreshape", {"ROLLOUT_DTYPE": "fp16"})
    assert (status, stderr.strip()) == (2, "error: ROLLOUT_DTYPE='fp16' is not allowed (float32, bfloat16)")
