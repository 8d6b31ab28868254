"""verl's own actor worker (`ActorRolloutRefWorker`, FSDP engine) updating a tiny Qwen2 with `is_reshape`
on CPU: compute_log_prob then update_actor, as verl's trainer calls them, single rank and 2 gloo ranks.

All cases of one layout run in one subprocess (`isreshape_verl.testing.verl_worker.run_cases`): one
process for the single-rank cases, one pair for the data-parallel ones. Every update is two SGD steps
(two PPO epochs over one mini-batch, the second off-policy through the model's own first step) from
old log-probs shifted off the current policy, fp32 throughout, so comparing weights compares gradients.

Tolerances: two runs of the same math in a different order (micro-batching, sharding, another loss
function with the same gradient) differ by float32 rounding only: measured ≤ 7e-7 relative in grad norm
and ≤ 6e-7 of the largest update entry (2.1e-6 for token-sum on 2 ranks, whose unnormalised sums round
more). Both must agree to RTOL = 1e-5 (headroom for another CPU's rounding); the adaptive-width control
and the two identities' mutual gap show that a real difference in the update is 7e-2 or more, four orders
of magnitude above it.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from isreshape_verl.specs import LOSS_AGG_MODES
from isreshape_verl.testing.verl_worker import (
    ACTOR,
    BatchSpec,
    is_reshape_overrides,
    run_cases,
    save_tiny_model,
    verl_loss_overrides,
)

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5
BATCH = BatchSpec()  # 8 sequences, one mini-batch, 2 epochs

# PPO-clip with clip-higher (DAPO's asymmetric ratios), and SAPO at verl's default temperatures
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
TAU_POS, TAU_NEG = 1.0, 1.05
# the package's default loss with a fixed width: exactly micro-batch invariant
FIXED = is_reshape_overrides(width_mode="fixed")
# every aggregation is_reshape accepts: seq-mean-token-mean is the recipes' (recipes/common.sh LOSS_AGG_MODE),
# token-mean verl's default
DP_AGG_MODES = LOSS_AGG_MODES


def micro(n: int) -> list[str]:
    return [f"{ACTOR}.ppo_micro_batch_size_per_gpu={n}", f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={n}"]


# The sum aggregations scale the gradient by the tokens per sequence (≈ 6) or per batch (≈ 50): a smaller
# learning rate keeps their SGD steps about as large as the mean modes' (lr 0.5, |g| ≈ 1.4), instead of a
# first step so large that the second one starts from a degenerate model.
AGG_LR = {"token-sum": 0.01, "seq-mean-token-sum": 0.1}


def agg(mode: str) -> list[str]:
    return [f"{ACTOR}.loss_agg_mode={mode}", *([f"{ACTOR}.optim.lr={AGG_LR[mode]}"] if mode in AGG_LR else [])]


def recipe_overrides() -> list[str]:
    """The Hydra overrides `recipes/gsm8k/isreshape.sh` emits in sync mode (DRY_RUN=1 RECIPE_CHECK=0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IS_") and k not in {
        "MODEL", "DATA_DIR", "ASYNC", "STALENESS", "NNODES", "GPUS_PER_NODE", "TRAIN_BATCH", "MINI_BATCH",
        "MICRO_BATCH", "ROLLOUT_N", "LOSS_AGG_MODE", "LR", "SEED"}}
    env.update({"DRY_RUN": "1", "RECIPE_CHECK": "0", "ASYNC": "sync", "HOME": "/home/user"})
    proc = subprocess.run(["bash", "recipes/gsm8k/isreshape.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    lines = [line for line in proc.stdout.replace("\\\n", " ").splitlines()
             if line.startswith("python3 -m verl.trainer.main_ppo")]
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0])[3:]


SINGLE_CASES = {
    # the package defaults (adaptive width), micro-batch 2 and 8 (the whole batch)
    "default": is_reshape_overrides(),
    "default_micro8": is_reshape_overrides() + micro(8),
    # identities
    # one micro-batch: verl logs vanilla's clip fraction as the unweighted mean of micro-batch means, ours is
    # token-weighted (isreshape_verl.verl_loss, "Step values"); they agree where there is one micro-batch
    "ppo_as_is_reshape": is_reshape_overrides(kernel="box", one_sided=True, gamma_mode="fixed", gamma=1.0,
                                              width_mode="fixed", localize_sft=False, width=CLIP_HIGH,
                                              width_neg=CLIP_LOW) + micro(8),
    "vanilla": verl_loss_overrides("vanilla", clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH,
                                   clip_ratio_c=1e9) + micro(8),
    "sapo_as_is_reshape": is_reshape_overrides(kernel="sech2", one_sided=False, gamma_mode="fixed", gamma=1.0,
                                               width_mode="fixed", width=2 / TAU_POS, width_neg=2 / TAU_NEG),
    "sapo": verl_loss_overrides("sapo", tau_pos=TAU_POS, tau_neg=TAU_NEG),
    # invariances of the fixed-width default (micro-batch 2, FSDP1, remove-padding on is the reference)
    "fixed": FIXED,
    "fixed_micro1": FIXED + micro(1),
    "fixed_micro4": FIXED + micro(4),
    "fixed_dynamic_bsz": FIXED + [f"{ACTOR}.use_dynamic_bsz=True", f"{ACTOR}.ppo_max_token_len_per_gpu=40",
                                  "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=40"],
    "fixed_fsdp2": FIXED + [f"{ACTOR}.strategy=fsdp2"],
    "fixed_no_rmpad": FIXED + ["actor_rollout_ref.model.use_remove_padding=False"],
    **{f"fixed_{mode}": FIXED + agg(mode) for mode in DP_AGG_MODES if mode != "seq-mean-token-mean"},
}
# an all-masked or all-NaN micro-batch (rows 0-1, micro-batch 2) among others, and the same step without it
# (rows 2-7, a mini-batch of 6); token-mean keeps the updates equal (seq-mean would count the masked rows)
TOKEN_MEAN = agg("token-mean")
WITHOUT_ROWS_0_1 = {"keep_rows": list(range(2, 8)), "overrides": [f"{ACTOR}.ppo_mini_batch_size=6"]}
EMPTY_MICRO_BATCH_CASES = {
    "empty_micro_batch": {"overrides": is_reshape_overrides() + TOKEN_MEAN, "mask_rows": [0, 1]},
    "nonfinite_micro_batch": {"overrides": is_reshape_overrides() + TOKEN_MEAN, "nonfinite_rows": [0, 1]},
    "without_micro_batch": {**WITHOUT_ROWS_0_1, "overrides": is_reshape_overrides() + TOKEN_MEAN
                            + WITHOUT_ROWS_0_1["overrides"]},
    "fixed_without_micro_batch": {**WITHOUT_ROWS_0_1, "overrides": FIXED + TOKEN_MEAN
                                  + WITHOUT_ROWS_0_1["overrides"]},
}

# data parallel: each rank holds 4 of the 8 sequences
DP_CASES = {
    **{f"dp_fixed_{mode}": FIXED + agg(mode) for mode in DP_AGG_MODES},
    "dp_fixed_fsdp2": FIXED + [f"{ACTOR}.strategy=fsdp2"],
    # adaptive width: one micro-batch per rank, so the global micro-batch is the whole batch, as with micro 8
    "dp_default": is_reshape_overrides() + micro(4),
}
DP_REFERENCE = {**{f"dp_fixed_{mode}": f"fixed_{mode}" for mode in DP_AGG_MODES},
                "dp_fixed_seq-mean-token-mean": "fixed", "dp_fixed_fsdp2": "fixed", "dp_default": "default_micro8"}

IS_RESHAPE_METRICS = {
    "weight_mean", "gamma_mean", "ess", "ratio_min", "ratio_p01", "ratio_p50", "ratio_p99", "ratio_max",
    "nonfinite_frac", "width", "width_neg", "width_stat",
    *(f"{q}_{s}" for q in ("neg_down", "neg_up", "pos_down", "pos_up") for s in ("share", "weight")),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="module")
def checkpoint(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def single(model_dir):
    cases = [{"name": n, "overrides": o} for n, o in SINGLE_CASES.items()]
    cases += [{"name": n, **case} for n, case in EMPTY_MICRO_BATCH_CASES.items()]
    # the recipe's exact overrides, with only the batch sizes fitted to the 8-sequence batch (rollout.n = 8)
    cases.append({"name": "recipe", "base": recipe_overrides(),
                  "overrides": [f"{ACTOR}.ppo_mini_batch_size=1", *micro(4)]})
    return run_cases(cases, model_dir=model_dir, world_size=1, batch=BATCH)


@pytest.fixture(scope="module")
def dp(model_dir):
    cases = [{"name": n, "overrides": o} for n, o in DP_CASES.items()]
    # rank 0's first micro-batch is all masked, rank 1's are not; a fixed width (the adaptive one is solved
    # over both ranks' micro-batch i, which pairs other sequences than one rank does)
    cases.append({"name": "dp_empty_micro_batch", "overrides": FIXED + TOKEN_MEAN, "mask_rows": [0, 1]})
    return run_cases(cases, model_dir=model_dir, world_size=2, batch=BATCH)


def update(result) -> dict[str, torch.Tensor]:
    return {k: result["weights"][k] - result["weights_before"][k] for k in result["weights"]}


def max_abs(tensors) -> float:
    return max(t.abs().max().item() for t in tensors.values())


def update_gap(a, b) -> float:
    """max |Δw_a − Δw_b| over all weights, relative to the largest entry of Δw_b."""
    ua, ub = update(a), update(b)
    assert ua.keys() == ub.keys()
    return max((ua[k] - ub[k]).abs().max().item() for k in ua) / max_abs(ub)


def assert_same_update(a, b, rtol=RTOL):
    assert len(a["grad_norm"]) == len(b["grad_norm"]) == 2  # two optimizer steps each
    for ga, gb in zip(a["grad_norm"], b["grad_norm"]):
        assert math.isclose(ga, gb, rel_tol=rtol), (a["grad_norm"], b["grad_norm"])
    gap = update_gap(a, b)
    assert gap <= rtol, f"weight updates differ by {gap:.2e} of the largest update"


def assert_loaded_checkpoint(result, checkpoint):
    """The unsharded weights before the update are the checkpoint's (every rank loaded the real weights)."""
    before = result["weights_before"]
    assert set(checkpoint) <= set(before)
    for name, tensor in checkpoint.items():
        torch.testing.assert_close(before[name], tensor.float(), rtol=0, atol=0)


# --- the worker runs is_reshape -------------------------------------------------------------------------


def test_update_changes_weights_and_logs_every_is_reshape_metric(single, checkpoint):
    result = single["default"]
    assert_loaded_checkpoint(result, checkpoint)
    assert max_abs(update(result)) > 1e-3
    changed = sum(int((d != 0).any()) for d in update(result).values())
    assert changed == len(result["weights"])  # every tensor moved
    metrics = result["metrics"]
    logged = {k.removeprefix("actor/is_reshape/") for k in metrics if k.startswith("actor/is_reshape/")}
    assert logged == IS_RESHAPE_METRICS
    for name in [*(f"actor/is_reshape/{m}" for m in IS_RESHAPE_METRICS), "actor/pg_loss", "actor/ppo_kl",
                 "actor/pg_clipfrac", "grad_norm"]:
        values = metrics[name]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (name, values)
    assert all(g > 0 for g in result["grad_norm"])
    # off-policy from the first step: the behaviour shift moves r away from 1 and the kernel acts
    assert metrics["actor/is_reshape/ratio_max"][0] > 1.2 and metrics["actor/is_reshape/ratio_min"][0] < 0.8
    assert metrics["actor/is_reshape/nonfinite_frac"] == [0.0, 0.0]
    # the adaptive width keeps its budget (width_target = 0.01) and narrows below width_max = width = 0.25 on
    # each step. The logged values are means over the step's micro-batches, each with its own width: one that
    # meets the budget at the widest width keeps it with a statistic below the target, so the mean statistic
    # is at most the target (0.0067 and 0.0097 here, at mean widths 0.245 and 0.181)
    assert all(w < 0.25 for w in metrics["actor/is_reshape/width"])
    assert all(m < 0.01 + 1e-3 for m in metrics["actor/is_reshape/width_stat"])


def test_adaptive_width_in_the_worker_is_the_largest_within_budget(single):
    """With one micro-batch per step the logged width and statistic are those of one solve: the widest width
    when it keeps the statistic within width_target = 0.01, else a narrower one that meets the target."""
    metrics = single["default_micro8"]["metrics"]
    steps = list(zip(metrics["actor/is_reshape/width"], metrics["actor/is_reshape/width_stat"]))
    for width, stat in steps:
        if width == pytest.approx(0.25, rel=1e-12):
            assert stat <= 0.01
        else:
            assert width < 0.25 and abs(stat - 0.01) < 1e-3
    assert any(width < 0.25 for width, _ in steps)  # the solve narrowed at least once (0.185 at step 2 here)


def test_recipe_overrides_build_the_worker_and_update(single, checkpoint):
    result = single["recipe"]  # AdamW at lr 1e-6, one epoch: the recipe's own optimiser settings
    assert_loaded_checkpoint(result, checkpoint)
    assert len(result["grad_norm"]) == 1 and math.isfinite(result["grad_norm"][0])
    assert 0 < max_abs(update(result)) < 1e-5
    assert result["metrics"]["actor/is_reshape/width"][0] > 0


# --- identities through the worker ----------------------------------------------------------------------


def test_is_reshape_box_kernel_is_ppo_clip_through_the_worker(single):
    is_reshape, vanilla = single["ppo_as_is_reshape"], single["vanilla"]
    assert_same_update(is_reshape, vanilla)
    # the clip is active: the box kernel zeroes a share of the tokens, as PPO's clip fraction
    assert is_reshape["metrics"]["actor/pg_clipfrac"][1] > 0.05
    for step in range(2):
        assert math.isclose(is_reshape["metrics"]["actor/pg_clipfrac"][step],
                            vanilla["metrics"]["actor/pg_clipfrac"][step], rel_tol=1e-6)


def test_is_reshape_sech2_is_sapo_through_the_worker(single):
    assert_same_update(single["sapo_as_is_reshape"], single["sapo"])


def test_identities_are_not_trivially_satisfied(single):
    """The two identities differ from each other: the batch is off-policy enough for the kernel to matter."""
    assert update_gap(single["ppo_as_is_reshape"], single["sapo"]) > 1e-2
    assert update_gap(single["fixed"], single["vanilla"]) > 1e-2


# --- invariances ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["fixed_micro1", "fixed_micro4", "fixed_dynamic_bsz"])
def test_fixed_width_update_is_micro_batch_invariant(single, case):
    assert_same_update(single[case], single["fixed"])


def test_fsdp1_equals_fsdp2(single):
    assert_same_update(single["fixed_fsdp2"], single["fixed"])


def test_remove_padding_on_equals_off(single):
    assert_same_update(single["fixed_no_rmpad"], single["fixed"])


def test_adaptive_width_is_per_micro_batch(single):
    """Control: the default adaptive width, solved per micro-batch, moves the update far beyond RTOL."""
    assert update_gap(single["default"], single["default_micro8"]) > 100 * RTOL


# --- data parallel: 2 gloo ranks, each with its half of the batch ----------------------------------------


@pytest.mark.parametrize("case", list(DP_CASES))
def test_two_ranks_equal_one_rank(dp, single, checkpoint, case):
    assert_loaded_checkpoint(dp[case], checkpoint)  # the FSDP shards were built from the real weights
    assert_same_update(dp[case], single[DP_REFERENCE[case]])


def test_two_ranks_adaptive_width_is_the_global_one(dp, single):
    """Both ranks used the width solved on the whole batch (all-reduced), not on their own half."""
    one, two = single["default_micro8"]["metrics"], dp["dp_default"]["metrics"]
    for step in range(2):
        assert math.isclose(two["actor/is_reshape/width"][step], one["actor/is_reshape/width"][step], rel_tol=RTOL)


# --- step metrics with an all-masked or all-NaN micro-batch --------------------------------------------

STEP_METRICS = ["actor/ppo_kl", "actor/pg_clipfrac", *(f"actor/is_reshape/{m}" for m in sorted(IS_RESHAPE_METRICS))]


def assert_same_step_metrics(a, b, steps=(0, 1), scale=1.0):
    for name in STEP_METRICS:
        for step in steps:
            got, want = a["metrics"][name][step], b["metrics"][name][step] * scale
            assert math.isfinite(got), (name, a["metrics"][name])
            assert math.isclose(got, want, rel_tol=RTOL, abs_tol=1e-7), (name, step, got, want)


def harness_batch(model_dir):
    """The batch `run_cases` trains on (the same seed and vocabulary)."""
    from isreshape_verl.testing.verl_worker import make_batch

    return make_batch(BATCH, vocab_size=json.loads((model_dir / "config.json").read_text())["vocab_size"])


def first_step_kl(model_dir, rows) -> float:
    """ppo_kl of the first optimizer step in closed form: there π_θ = π_θ₀, so −log r = log μ − log π_θ₀ is
    the harness's behaviour shift, and its mean over the valid tokens of `rows` is the step's value."""
    batch = harness_batch(model_dir)
    shift, mask = batch["behaviour_shift"][rows], batch["response_mask"][rows].bool()
    return float(shift[mask].mean())


def test_an_empty_micro_batch_leaves_the_step_metrics_unchanged(single, model_dir):
    """One all-masked micro-batch among four logs what the step without it logs (both optimizer steps), and
    ppo_kl is the token mean over the step's valid tokens; the default (adaptive-width) loss."""
    with_empty, without = single["empty_micro_batch"], single["without_micro_batch"]
    assert_same_update(with_empty, without)
    assert_same_step_metrics(with_empty, without)
    kl = first_step_kl(model_dir, slice(2, 8))
    assert math.isclose(with_empty["metrics"]["actor/ppo_kl"][0], kl, rel_tol=1e-4, abs_tol=1e-6), kl


def test_an_empty_micro_batch_on_one_of_two_ranks_leaves_the_step_metrics_unchanged(dp, single):
    """Rank 0's first micro-batch is all masked, rank 1's are full: the step logs what one rank logs for the
    six other sequences (verl averages micro-batches and ranks; each micro-batch counts by its tokens)."""
    assert_same_update(dp["dp_empty_micro_batch"], single["fixed_without_micro_batch"])
    assert_same_step_metrics(dp["dp_empty_micro_batch"], single["fixed_without_micro_batch"])


def test_a_non_finite_micro_batch_logs_finite_values_diluted_by_its_share(single, model_dir):
    """A micro-batch whose behaviour log-probs are NaN: every value finite; on the first step (same weights)
    the token statistics are those without it times N_clean / N, nonfinite_frac = 1 − N_clean / N."""
    bad, without = single["nonfinite_micro_batch"], single["without_micro_batch"]
    for name in STEP_METRICS:
        assert all(math.isfinite(v) for v in bad["metrics"][name]), (name, bad["metrics"][name])
    mask = harness_batch(model_dir)["response_mask"]
    kept = float(mask[2:].sum() / mask.sum())
    assert math.isclose(bad["metrics"]["actor/is_reshape/nonfinite_frac"][0], 1 - kept, rel_tol=1e-6)
    for name in STEP_METRICS:
        if name.endswith(("/width", "/width_neg", "/nonfinite_frac")):
            continue  # the widths are weighted by response tokens, the NaN ones included
        got, want = bad["metrics"][name][0], without["metrics"][name][0] * kept
        assert math.isclose(got, want, rel_tol=RTOL, abs_tol=1e-7), (name, got, want)

