"""width_mode=adaptive: the solved width meets its target, shrinks with staleness, respects its bounds,
and is the same on 2 data-parallel ranks as on one process holding the whole batch."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from isreshape_verl.kernels import KERNEL_NAMES, kernel_value
from isreshape_verl.reshape import ISReshapeParams, is_reshape_token_loss
from isreshape_verl.specs import parse_loss_spec


@pytest.fixture(params=["cpu", "accelerator"])
def branch(request, monkeypatch):
    """Run the adaptive width down the CPU's branch (host reads, arithmetic binning) or the one it takes on
    accelerators (bucketize, the solve in tensor ops), both on CPU tensors."""
    from isreshape_verl import adaptive_width

    if request.param == "accelerator":
        monkeypatch.setattr(adaptive_width, "reads_are_free", lambda device: False)
    return request.param


def lagged_batch(spread: float, seed: int = 0, B: int = 64, T: int = 48):
    """log r ~ N(0, spread²) per token, random-sign advantages, ragged response mask."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    log_prob = old + spread * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=gen, dtype=torch.float64).expand(B, T).contiguous()
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return log_prob, old, adv, mask


def exact_statistic(params: ISReshapeParams, width: float, width_neg: float, log_prob, old, adv, mask) -> float:
    """M = Σ K(r − 1; w_A)·(log r)² / N over valid tokens the kernel acts on, written out token by token."""
    log_r = (log_prob - old)[mask]
    a = adv[mask]
    w = torch.where(a > 0, torch.tensor(width, dtype=log_r.dtype), torch.tensor(width_neg, dtype=log_r.dtype))
    k = kernel_value(params.kernel, torch.expm1(log_r), w)
    acting = torch.ones_like(log_r, dtype=torch.bool)
    if params.one_sided:
        acting = ((a > 0) & (log_r > 0)) | ((a <= 0) & (log_r < 0))
    return float((k * log_r**2 * acting).sum() / log_r.numel())


def solved(params, log_prob, old, adv, mask):
    """(width, width_neg, width_stat) that the verl loss logs for this batch."""
    spec = parse_loss_spec("is_reshape:" + ",".join(f"{k}={v}" for k, v in params.__dict__.items()))
    _, metrics = spec.loss_fn(old_log_prob=old, log_prob=log_prob, advantages=adv, response_mask=mask,
                              loss_agg_mode="token-mean", config=spec.actor_config())
    return metrics["actor/is_reshape/width"], metrics["actor/is_reshape/width_neg"], metrics["actor/is_reshape/width_stat"]


@pytest.mark.parametrize("kernel", [k for k in KERNEL_NAMES if k != "box"])
@pytest.mark.parametrize("one_sided", [True, False])
@pytest.mark.parametrize("spread", [0.1, 0.3])
def test_achieved_statistic_meets_the_target(kernel, one_sided, spread, branch):
    """Within 3 % of the target, and the target is binding: 3 % more width would exceed it."""
    params = ISReshapeParams(kernel=kernel, width=1.0, one_sided=one_sided, width_mode="adaptive", width_target=0.002,
                             width_min=0.01, width_max=4.0, width_neg=0.5)
    batch = lagged_batch(spread)
    width, width_neg, stat = solved(params, *batch)
    assert 0.01 < width < 4.0
    assert width_neg == pytest.approx(0.5 * width, rel=1e-6)  # one common factor
    exact = exact_statistic(params, width, width_neg, *batch)
    assert stat == pytest.approx(exact, rel=1e-6)  # the logged statistic is the exact one
    assert exact == pytest.approx(0.002, rel=0.03)
    assert exact_statistic(params, 1.03 * width, 1.03 * width_neg, *batch) > 0.002


def test_box_kernel_stays_under_its_target(branch):
    """M(s) is a step function for the box kernel: the solve stays at or under the target."""
    params = ISReshapeParams(kernel="box", width_mode="adaptive", width_target=0.002, width_min=0.01, width_max=4.0)
    batch = lagged_batch(0.2)
    width, width_neg, _ = solved(params, *batch)
    assert exact_statistic(params, width, width_neg, *batch) <= 0.002 * 1.03


@pytest.mark.parametrize("kernel", ["laplace", "sech2", "gaussian"])
def test_width_falls_as_the_spread_of_log_r_grows(kernel):
    """Up to spreads of about the chosen width (see the module docstring of adaptive_width for beyond)."""
    params = ISReshapeParams(kernel=kernel, width_mode="adaptive", width_target=0.002, width_min=0.001,
                             width_max=10.0)
    widths = [solved(params, *lagged_batch(spread, seed=3))[0] for spread in (0.02, 0.05, 0.1, 0.2)]
    assert widths[0] == pytest.approx(10.0)  # under budget: the widest kernel
    assert all(a >= b for a, b in zip(widths, widths[1:])) and widths[2] > widths[3], widths


def test_bounds_hold_and_an_on_policy_batch_gets_the_widest_width(branch):
    log_prob, old, adv, mask = lagged_batch(1.0)
    params = ISReshapeParams(width=1.0, width_mode="adaptive", width_target=1e-6, width_min=0.2, width_max=3.0)
    assert solved(params, log_prob, old, adv, mask)[0] == pytest.approx(0.2)  # even the narrowest exceeds it
    loose = ISReshapeParams(width=1.0, width_mode="adaptive", width_target=100.0, width_min=0.2, width_max=3.0)
    assert solved(loose, log_prob, old, adv, mask)[0] == pytest.approx(3.0)
    on_policy = solved(params, old.clone(), old, adv, mask)
    assert on_policy[0] == pytest.approx(3.0) and on_policy[2] == 0.0
    default_max = ISReshapeParams(width=0.7, width_mode="adaptive")  # width_max None = width
    assert solved(default_max, old.clone(), old, adv, mask)[0] == pytest.approx(0.7)


def test_a_batch_without_valid_tokens_gets_the_widest_width(branch):
    """N = 0: nothing exceeds the budget, on both branches (the accelerators' solve has no N ≥ 1 clamp)."""
    from isreshape_verl import adaptive_width

    log_prob, old, adv, mask = lagged_batch(1.0)
    summary = adaptive_width.staleness_summary((log_prob - old).float(), adv, torch.zeros_like(mask))
    assert not summary.any()
    scale = adaptive_width.solve_scale(summary, "laplace", 1.0, 1.0, True, 0.002, 0.05, 2.0)
    assert float(scale) == pytest.approx(2.0, rel=1e-12)


def test_gradient_is_the_fixed_width_loss_at_the_solved_width():
    """Adaptive = fixed width at s·width, s·width_neg: same loss and same gradient."""
    log_prob, old, adv, mask = lagged_batch(0.2, seed=5)
    adaptive = ISReshapeParams(width=1.0, width_neg=0.6, width_mode="adaptive", width_target=0.003, width_min=0.05)
    width, width_neg, _ = solved(adaptive, log_prob, old, adv, mask)
    fixed = ISReshapeParams(width=width, width_neg=width_neg)
    grads = []
    for params in (adaptive, fixed):
        leaf = log_prob.clone().requires_grad_(True)
        loss = is_reshape_token_loss(leaf, old, adv, params, valid=mask)
        (loss * mask).sum().backward()
        grads.append((loss.detach() * mask, leaf.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_padding_does_not_move_the_width(branch):
    """Tokens outside the mask, however stale, do not enter the summary."""
    log_prob, old, adv, mask = lagged_batch(0.2, seed=6)
    params = ISReshapeParams(width_mode="adaptive", width_target=0.002, width_min=0.01)
    noisy = torch.where(mask, log_prob, old + 5.0)
    assert solved(params, noisy, old, adv, mask)[0] == pytest.approx(solved(params, log_prob, old, adv, mask)[0])


def test_chunking_does_not_change_the_width():
    log_prob, old, adv, mask = lagged_batch(0.2, seed=7)
    params = ISReshapeParams(width_mode="adaptive", width_target=0.002, width_min=0.01)
    losses = [is_reshape_token_loss(log_prob, old, adv, params, valid=mask, chunk_tokens=c) for c in (1 << 16, 100)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


_DP_WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    rank, world, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method="file://" + sys.argv[4])
    from isreshape_verl.specs import parse_loss_spec
    data = torch.load(path)
    rows = slice(rank * data["rows"], (rank + 1) * data["rows"])
    spec = parse_loss_spec(data["spec"])
    config = spec.actor_config()
    mask = data["mask"]
    config.global_batch_info.update(dp_size=world, batch_num_tokens=int(mask.sum()), global_batch_size=mask.shape[0])
    leaf = data["log_prob"][rows].clone().requires_grad_(True)
    loss, metrics = spec.loss_fn(old_log_prob=data["old"][rows], log_prob=leaf, advantages=data["adv"][rows],
                                 response_mask=mask[rows], loss_agg_mode=spec.loss_agg_mode, config=config)
    loss.backward()
    torch.save({"grad": leaf.grad, "width": metrics["actor/is_reshape/width"]}, path + f".rank{rank}")
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_two_gloo_ranks_match_one_process_on_the_concatenated_batch(tmp_path, agg):
    """Each rank sees half of the batch; the all-reduced summary gives both the width of the whole batch,
    and with verl's dp_size normalisation the summed rank gradients equal the one-process gradient."""
    log_prob, old, adv, mask = lagged_batch(0.25, seed=8, B=16, T=20)
    # the halves differ in staleness, so a rank solving alone would choose another width
    log_prob[8:] = old[8:] + 3.0 * (log_prob[8:] - old[8:])
    text = f"is_reshape:width_mode=adaptive,width_target=0.003,width_min=0.01,loss_agg_mode={agg}"
    path = str(tmp_path / "batch.pt")
    torch.save({"log_prob": log_prob, "old": old, "adv": adv, "mask": mask, "rows": 8, "spec": text}, path)
    script = tmp_path / "worker.py"
    script.write_text(_DP_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", path, str(tmp_path / "rendezvous")])
             for r in range(2)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    ranks = [torch.load(path + f".rank{r}") for r in range(2)]

    spec = parse_loss_spec(text)
    leaf = log_prob.clone().requires_grad_(True)
    loss, metrics = spec.loss_fn(old_log_prob=old, log_prob=leaf, advantages=adv, response_mask=mask,
                                 loss_agg_mode=agg, config=spec.actor_config())
    loss.backward()
    assert ranks[0]["width"] == ranks[1]["width"] == pytest.approx(metrics["actor/is_reshape/width"], rel=1e-12)
    alone = solved(ISReshapeParams(width_mode="adaptive", width_target=0.003, width_min=0.01),
                   log_prob[:8], old[:8], adv[:8], mask[:8])[0]
    assert not math.isclose(alone, ranks[0]["width"], rel_tol=1e-3)
    # DDP/FSDP average the ranks' gradients; verl's agg_loss multiplies each rank's loss by dp_size
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]) / 2, leaf.grad, rtol=1e-10, atol=1e-14)


def test_micro_batches_of_a_few_thousand_tokens_get_nearly_the_whole_batch_width():
    """The width is solved per loss call, i.e. per micro-batch in verl: not micro-batch invariant as the
    fixed width is, but close once a micro-batch holds a few thousand tokens (here ≈ 2,400: within 10 %)."""
    params = ISReshapeParams(width_target=0.01)
    log_prob, old, adv, mask = lagged_batch(0.3, seed=9, B=256, T=64)
    whole = solved(params, log_prob, old, adv, mask)[0]
    parts = [solved(params, log_prob[i:i + 64], old[i:i + 64], adv[i:i + 64], mask[i:i + 64])[0]
             for i in range(0, 256, 64)]
    assert 0.1 < whole < 1.0  # the target binds
    assert all(abs(w / whole - 1) < 0.10 for w in parts), [w / whole for w in parts]


def test_megatron_pipeline_parallelism_is_refused_instead_of_hanging():
    from dataclasses import replace

    from verl.workers.config import McoreEngineConfig

    log_prob, old, adv, mask = lagged_batch(0.2)
    config = parse_loss_spec("is_reshape").actor_config()
    megatron = replace(config, strategy="megatron")
    object.__setattr__(megatron, "megatron", McoreEngineConfig(pipeline_model_parallel_size=2))
    fn = parse_loss_spec("is_reshape").loss_fn
    with pytest.raises(ValueError, match="pipeline_model_parallel_size=2.*width_mode=fixed"):
        fn(old_log_prob=old, log_prob=log_prob, advantages=adv, response_mask=mask, config=megatron)
    object.__setattr__(megatron, "megatron", McoreEngineConfig(pipeline_model_parallel_size=1))
    fn(old_log_prob=old, log_prob=log_prob, advantages=adv, response_mask=mask, config=megatron)  # no pipeline: fine


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_summary_is_the_exact_histogram_also_at_bin_edges(mask_dtype, branch):
    """Every valid token's (log r)² lands in bin ⌊(log r + 1)·64⌋ (edge bins beyond ±1), +128 when A > 0.

    The log ratios include the float32 values next to every bin edge: their position in bins (e.g. 51.999996)
    is within one float32 step of an integer, and adding the A > 0 offset of 128.0 before flooring would round
    them into the next bin. On CPU the reference takes the position in float32 as the summary does and floors
    it in Python; on accelerators (bucketize) it compares log r with the exact edges. Both add the offset as an
    integer and sum float32 squares in float64, as the summary does."""
    from isreshape_verl.adaptive_width import BINS, staleness_summary

    gen = torch.Generator().manual_seed(3)
    edges = torch.arange(-BINS // 2, BINS // 2 + 1, dtype=torch.float64) / (BINS // 2)  # every bin edge in log r
    edges = edges.float()
    below = torch.nextafter(edges, torch.full_like(edges, -math.inf))  # the float32 just below each edge
    near_edges = torch.cat([torch.nextafter(below, torch.full_like(edges, -math.inf)), below, edges,
                            torch.nextafter(edges, torch.full_like(edges, math.inf))])
    log_r = torch.cat([near_edges, torch.randn(2000, generator=gen) * 0.7, torch.tensor([-5.0, 5.0, -1.0, 1.0])])
    log_r = log_r.reshape(1, -1).float()  # (1, N)
    adv = torch.randn(log_r.shape, generator=gen)
    adv[0, :50] = 0.0  # A = 0 counts with A ≤ 0
    valid = torch.rand(log_r.shape, generator=gen) > 0.2
    summary = staleness_summary(log_r, adv, valid.to(mask_dtype))

    expected = torch.zeros(2 * BINS + 1, dtype=torch.float64)
    for x, a, v in zip(log_r[0].tolist(), adv[0].tolist(), valid[0].tolist()):
        if v:
            if branch == "cpu":
                position = float((torch.tensor(x) + 1.0) * (BINS / 2))  # float32, as the summary computes it
            else:
                position = (x + 1.0) * (BINS / 2)  # exact in float64 for a float32 x in [−2, 2]
            index = min(max(math.floor(position), 0), BINS - 1) + (BINS if a > 0 else 0)
            expected[index] += float(torch.tensor(x) ** 2)  # float32 square, float64 sum
            expected[-1] += 1
    assert torch.equal(summary, expected)
    if branch == "accelerator":  # the exact reference differs from the float32 one near edges: not vacuous
        rounded = [math.floor(float((torch.tensor(x) + 1.0) * (BINS / 2))) for x in log_r[0].tolist()]
        assert rounded != [math.floor((x + 1.0) * (BINS / 2)) for x in log_r[0].tolist()]


def test_both_ways_of_summing_bins_agree():
    """bin_sums: bincount (CPU) and index_add_ (accelerators, no host sync) give the same float64 sums."""
    from isreshape_verl.adaptive_width import BINS, bin_sums

    gen = torch.Generator().manual_seed(5)
    index = torch.randint(0, 2 * BINS, (10_000,), generator=gen, dtype=torch.int32)
    weights = torch.rand(10_000, generator=gen, dtype=torch.float64)
    by_bincount = bin_sums(index, weights, 2 * BINS, on_cpu=True)
    by_index_add = bin_sums(index, weights, 2 * BINS, on_cpu=False)
    expected = torch.zeros(2 * BINS, dtype=torch.float64)
    for i, w in zip(index.tolist(), weights.tolist()):
        expected[i] += w
    assert torch.equal(by_bincount, expected) and torch.equal(by_index_add, expected)


def test_the_width_solve_reads_nothing_on_the_host(monkeypatch):
    """A CPU stand-in for tests/test_cuda.py's sync check, for the branch taken on accelerators: the summary
    (bucketize, index_add_) and the solve read no value on the host (aten::_local_scalar_dense: on a GPU a
    sync that stalls every loss call; indexing a tensor with a 0-dim tensor index is one)."""
    from torch.profiler import ProfilerActivity, profile

    from isreshape_verl import adaptive_width

    monkeypatch.setattr(adaptive_width, "reads_are_free", lambda device: False)
    log_prob, old, adv, mask = lagged_batch(0.2, seed=11)
    log_ratio = (log_prob - old).float()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        summary = adaptive_width.staleness_summary(log_ratio, adv, mask)
        scale = adaptive_width.solve_scale(summary, "laplace", 1.0, 1.0, True, 0.002, 0.05, 1.0)
    host_reads = [e.name for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense")]
    assert host_reads == [] and isinstance(scale, torch.Tensor)
    monkeypatch.undo()  # the CPU branch: the same s
    on_host = adaptive_width.solve_scale(adaptive_width.staleness_summary(log_ratio, adv, mask), "laplace", 1.0,
                                         1.0, True, 0.002, 0.05, 1.0)
    assert 0.05 < on_host < 1.0 and scale.item() == pytest.approx(on_host, rel=1e-12)


def test_the_device_interpolation_is_linear_between_grid_points():
    from isreshape_verl.adaptive_width import TIE, _interpolate_on_device

    excess = torch.linspace(-3.0, 5.0, 32, dtype=torch.float64)
    log_s = torch.linspace(math.log(0.05), 0.0, 32, dtype=torch.float64)
    scale = _interpolate_on_device(excess - TIE, log_s)
    # e_i = −3 + 8i/31 crosses 0 between i = 11 and 12 at the fraction (3 − 88/31) / (8/31) = 5/8
    assert scale.item() == pytest.approx(math.exp(log_s[11] + 0.625 * (log_s[12] - log_s[11])), rel=1e-12)


def test_the_host_and_device_solves_agree():
    """On CPU solve_scale interpolates in Python floats; accelerators use tensor ops. Same s to ~1 ulp, also when
    no grid point or every grid point meets the target (s_lo, s_hi), and on ties at the target."""
    from isreshape_verl.adaptive_width import GRID, TIE, _interpolate_on_device, _interpolate_on_host

    gen = torch.Generator().manual_seed(12)
    log_s = torch.linspace(math.log(0.05), 0.0, GRID, dtype=torch.float64)
    cases = [torch.sort(torch.randn(GRID, generator=gen, dtype=torch.float64) * 3 + shift).values
             for shift in torch.linspace(-8, 8, 200).tolist()]
    cases += [torch.full((GRID,), 1.0), torch.full((GRID,), -1.0), torch.zeros(GRID),
              torch.cat([torch.full((10,), -1.0), torch.zeros(12), torch.ones(10)]).double()]
    for excess in cases:
        excess = excess.double()
        on_device = _interpolate_on_device(excess - TIE, log_s).item()
        on_host = _interpolate_on_host(excess.tolist(), log_s.tolist())
        assert on_host == pytest.approx(on_device, rel=1e-15, abs=0)
    assert _interpolate_on_host([1.0] * GRID, log_s.tolist()) == pytest.approx(0.05)  # nothing meets it: s_lo
    assert _interpolate_on_host([-1.0] * GRID, log_s.tolist()) == pytest.approx(1.0)  # everything does: s_hi
    assert _interpolate_on_host([0.0] * GRID, log_s.tolist()) == pytest.approx(1.0)  # every point on the target
    assert _interpolate_on_device(torch.full((GRID,), -TIE, dtype=torch.float64), log_s).item() == pytest.approx(1.0)
    # points 10–21 sit exactly on the target: the largest of them, s_21, is the largest s with M(s) ≤ target
    tie = [-1.0] * 10 + [0.0] * 12 + [1.0] * 10
    assert _interpolate_on_host(tie, log_s.tolist()) == pytest.approx(math.exp(log_s[21]), rel=1e-14)
    assert _interpolate_on_device(torch.tensor(tie, dtype=torch.float64) - TIE, log_s).item() == pytest.approx(
        math.exp(log_s[21]), rel=1e-14)


@pytest.mark.parametrize("text", ["is_reshape", "is_reshape:width_neg=0.6,gamma_mode=fixed,gamma=0.7",
                                  "is_reshape:width_mode=fixed,width_neg=0.6"])
def test_the_token_loss_creates_no_tensor_from_host_data(text):
    """Another CPU stand-in for the GPU sync check: a tensor made from Python data inside the loss
    (torch.tensor, new_tensor: aten::lift_fresh) is a host-to-device copy on a GPU, and a blocking one."""
    from torch.profiler import ProfilerActivity, profile

    params = parse_loss_spec(text).reshape_params()
    log_prob, old, adv, mask = lagged_batch(0.2, seed=13)
    is_reshape_token_loss(log_prob, old, adv, params, valid=mask)  # warm-up: cached matrices are built once
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        is_reshape_token_loss(log_prob, old, adv, params, valid=mask)
    assert [e.name for e in prof.events() if e.name == "aten::lift_fresh"] == []
