"""The loss on CUDA gives the CPU's numbers (skipped where no GPU is present, as in CI)."""

import pytest
import torch

from isreshape_verl.specs import parse_loss_spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batch(device, dtype, B=16, T=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen) * 3
    log_prob = old + 0.3 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, 1, generator=gen).expand(B, T).contiguous()
    mask = torch.arange(T)[None, :] < torch.randint(T // 4, T + 1, (B,), generator=gen)[:, None]
    return [t.to(device=device, dtype=dtype) for t in (log_prob, old, adv)] + [mask.to(device)]


def _loss_grad_metrics(text, device, dtype):
    spec = parse_loss_spec(text)
    log_prob, old, adv, mask = _batch(device, dtype)
    log_prob.requires_grad_(True)
    loss, metrics = spec.loss_fn(old_log_prob=old, log_prob=log_prob, advantages=adv, response_mask=mask,
                                 loss_agg_mode="token-mean", config=spec.actor_config())
    loss.backward()
    return loss.detach().cpu().double(), log_prob.grad.cpu().double(), metrics


@pytest.mark.parametrize("text", ["is_reshape", "is_reshape:width_mode=fixed",
                                  "is_reshape:kernel=sech2,one_sided=false,width_target=0.002"])
def test_cuda_matches_cpu(text):
    cpu = _loss_grad_metrics(text, "cpu", torch.float32)
    gpu = _loss_grad_metrics(text, "cuda", torch.float32)
    torch.testing.assert_close(gpu[0], cpu[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gpu[1], cpu[1], rtol=1e-4, atol=1e-8)
    for key in ("actor/is_reshape/width", "actor/is_reshape/width_stat", "actor/is_reshape/ess"):
        assert gpu[2][key] == pytest.approx(cpu[2][key], rel=1e-4, abs=1e-7), key


def test_cuda_bf16_is_finite_and_close_to_fp32():
    fp32 = _loss_grad_metrics("is_reshape", "cuda", torch.float32)
    bf16 = _loss_grad_metrics("is_reshape", "cuda", torch.bfloat16)
    assert torch.isfinite(bf16[1]).all()
    assert bf16[2]["actor/is_reshape/width"] == pytest.approx(fp32[2]["actor/is_reshape/width"], rel=0.05)


@pytest.mark.parametrize("text", ["is_reshape", "is_reshape:width_mode=fixed"])
def test_the_token_loss_makes_no_host_sync(text):
    """The weight and the adaptive width run without a single host sync (only the metrics' one, outside)."""
    from isreshape_verl.reshape import is_reshape_token_loss
    from isreshape_verl.specs import parse_loss_spec

    params = parse_loss_spec(text).reshape_params()
    log_prob, old, adv, mask = _batch("cuda", torch.float32)
    is_reshape_token_loss(log_prob, old, adv, params, valid=mask)  # warm-up: the cached kernel matrix is built
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        is_reshape_token_loss(log_prob, old, adv, params, valid=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
