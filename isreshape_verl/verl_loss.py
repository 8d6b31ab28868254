"""The `is_reshape` policy loss, registered in verl's policy-loss registry.

This is the only module that imports verl's loss API. `import verl` loads it through the
`verl.plugins` entry point (in every Ray worker too); `actor_rollout_ref.model.external_lib=isreshape_verl`
loads it through the package's `__init__` when plugin discovery is off.

Per valid token (see `isreshape_verl.reshape` for the math):

    pg_losses = −f(r)·A  [· rollout_is_weights]        ∂/∂log_prob = −g(r, A)·A  [· rollout_is_weights]
    pg_loss   = agg_loss(pg_losses, mask, loss_agg_mode, **config.global_batch_info)

Tokens whose log-probs or advantage are NaN/±Inf are dropped from the mask (loss and gradient 0)
and counted in `actor/is_reshape/nonfinite_frac`, so one bad token cannot poison a whole step. The
check costs nothing on clean batches: the one host sync that reads the metrics also reads whether the
loss and Σ log r over valid tokens are finite, and only then is the batch cleaned and recomputed.

Metrics (floats, over valid tokens of the micro-batch, or of every s-th sequence, s = ⌈B·T / 65,536⌉,
when it is larger; quadrant "pos" = A > 0, "neg" = A ≤ 0, "up" = r > 1, "down" = r ≤ 1):
    actor/ppo_kl                        mean of −log r (verl's k1 estimate of KL(μ‖π_θ))
    actor/pg_clipfrac                   share of tokens whose kernel factor K(r − 1) < 0.5 (softly clipped)
    actor/is_reshape/weight_mean        mean g
    actor/is_reshape/gamma_mean         mean γ
    actor/is_reshape/ess                (Σg)² / (N·Σg²) ∈ (0, 1]; 1 when every g is equal
    actor/is_reshape/ratio_{min,p01,p50,p99,max}  ratio quantiles (from ≤ ~8,192 evenly strided tokens)
    actor/is_reshape/{pos,neg}_{up,down}_{share,weight}  token share and mean g of each quadrant
    actor/is_reshape/nonfinite_frac     share of response tokens dropped for non-finite inputs
    actor/is_reshape/width, width_neg   kernel widths used (the adaptive ones with width_mode=adaptive)
    actor/is_reshape/width_stat         Σ K(r − 1)·(log r)² / N over the tokens the kernel acts on: the
                                        statistic width_mode=adaptive holds at width_target

Step values (verl's engine workers). verl logs the unweighted mean of every micro-batch's value over
micro-batches and data-parallel ranks (`Metric(MEAN)`, `verl/workers/utils/losses.py`; `aggregate_dp`,
`verl/utils/metric/utils.py`). So that a micro-batch counts by its tokens, and one without valid tokens
(rejection sampling, overlong filtering, dynamic batching's padding) counts for nothing instead of
logging inf/NaN or dragging the means toward 0, each micro-batch i returns its statistic m_i times

    share_i = n_i · k·D / N        n_i its valid tokens, k micro-batches per rank, D ranks,
                                   N = batch_num_tokens, the mini-batch's valid tokens on all ranks

and verl's mean (1/kD)·Σ share_i·m_i = Σ n_i·m_i / N is the token-weighted mean over the mini-batch,
whatever its split into micro-batches and ranks. For the token means (ppo_kl, pg_clipfrac, weight_mean,
gamma_mean, the quadrant shares, width_stat, nonfinite_frac) that is the mean over all of the step's
tokens; ess, the ratio quantiles and extremes and the quadrant weights become the token-weighted mean of
their micro-batch values. The widths are weighted by response tokens, so a fixed width logs itself.
k = global_batch_size / (D · rows) is known only for fixed-size micro-batches; with
`use_dynamic_bsz=True`, or outside verl's engine, values are the micro-batch's own, as verl's losses log
them, and a micro-batch without valid tokens logs 0 for its token statistics. Tokens dropped as
non-finite are in N but not in n_i: the token means are then per response token of the step, diluted by
(1 − nonfinite_frac).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss

from isreshape_verl.diagnostics import ess_from_sums, quantiles
from isreshape_verl.reshape import LOSS_AGG_MODES, ISReshapeParams, is_reshape_token_loss

LOSS_NAME = "is_reshape"
SOFT_CLIP_THRESHOLD = 0.5  # K below this counts toward pg_clipfrac
_METRIC_TOKENS = 1 << 16  # metrics cover every sequence up to this many tokens, then every s-th sequence
_QUANTILE_SAMPLE = 8_192
_QUADRANTS = ("neg_down", "neg_up", "pos_down", "pos_up")
WIDTH_METRICS = ("actor/is_reshape/width", "actor/is_reshape/width_neg")
# every metric of a token statistic (`_MetricSums.sync` builds them); the keys never vary, as
# verl's aggregation over ranks needs the same keys from every micro-batch
TOKEN_METRICS = (
    "actor/ppo_kl", "actor/pg_clipfrac",
    *(f"actor/is_reshape/{name}" for name in ("weight_mean", "gamma_mean", "ess", "ratio_min", "ratio_p01",
                                              "ratio_p50", "ratio_p99", "ratio_max", "width_stat")),
    *(f"actor/is_reshape/{q}_share" for q in _QUADRANTS),
    *(f"actor/is_reshape/{q}_weight" for q in _QUADRANTS),
)


def params_from_actor_config(config) -> ISReshapeParams:
    """Read our hyperparameters from `config.policy_loss` (an ISReshapeLossConfig, a dict or a DictConfig)."""
    policy_loss = config.policy_loss
    if hasattr(policy_loss, "reshape_params"):
        return policy_loss.reshape_params()
    names = ISReshapeParams.__dataclass_fields__
    return ISReshapeParams(**{k: policy_loss[k] for k in names if k in policy_loss})


class _MetricSums:
    """Per-chunk reductions, combined into the metrics with a single host sync.

    Over all valid tokens: their count and Σ(log π_θ − log μ) before clamping, a probe for NaN/±Inf
    inputs (a NaN at a padded position trips it too; the clean-up path then gives the same result). The
    metrics themselves are taken over the valid tokens of every `row_stride`-th sequence (every sequence
    when the micro-batch has ≤ 65,536 tokens, as verl's micro-batches usually do) and masked sums are dot
    products with a 0/1 mask, so the metrics cost a fraction of the loss. Ratio quantiles are those of
    log r mapped through exp (monotone), from ≤ ~8,192 of those tokens. Each chunk adds a dict of named
    0-dim sums; `sync` turns their totals into named metrics, stacked into one tensor read once.
    """

    def __init__(self, log_prob, old_log_prob, valid: torch.Tensor, params: ISReshapeParams):
        self.log_prob, self.old_log_prob, self.valid, self.params = log_prob, old_log_prob, valid, params
        tokens_per_row = max(1, valid[0].numel()) if valid.shape[0] else 1
        self.row_stride = max(1, -(-valid.numel() // _METRIC_TOKENS))
        sampled_tokens = -(-valid.shape[0] // self.row_stride) * tokens_per_row
        self.token_stride = max(1, sampled_tokens // _QUANTILE_SAMPLE)
        self.probes: list[torch.Tensor] = []  # (n_valid, Σ unclamped log r) per chunk
        self.sums: dict[str, torch.Tensor] = {}  # name → running 0-dim sum over chunks
        self.extremes: list[torch.Tensor] = []  # (min log r, max log r) per chunk
        self.samples: list[torch.Tensor] = []
        self.width_scale: torch.Tensor | float = 1.0

    def _add(self, **sums: torch.Tensor) -> None:
        for name, value in sums.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def __call__(self, rows: slice, terms, advantages: torch.Tensor) -> None:
        valid = self.valid[rows]
        mask = valid.to(terms.weight.dtype)
        raw_log_ratio = self.log_prob[rows].detach().to(mask.dtype) - self.old_log_prob[rows].to(mask.dtype)
        self.probes.append(torch.stack([mask.sum(), (raw_log_ratio * mask).sum()]))
        self.width_scale = terms.width_scale

        first = (-rows.start) % self.row_stride  # keep rows whose global index is a multiple of row_stride
        pick = slice(first, None, self.row_stride)
        mask = mask[pick].reshape(-1)  # (n,)
        if mask.numel() == 0:
            return
        g = terms.weight[pick].reshape(-1)  # (n,)
        log_r = terms.log_ratio[pick].reshape(-1)  # (n,)
        shape = terms.weight[pick].shape
        g_masked = g * mask
        positive = (advantages[pick] > 0).expand(shape).reshape(-1).to(g.dtype)
        up = (log_r > 0).to(g.dtype)
        both = positive * up
        n, n_pos, n_up, n_both = mask.sum(), *(torch.dot(side, mask) for side in (positive, up, both))
        g_sum, g_pos, g_up, g_both = g_masked.sum(), *(torch.dot(side, g_masked) for side in (positive, up, both))
        if terms.gamma.dim():
            gamma_sum = torch.dot(terms.gamma[pick].expand(shape).reshape(-1), mask)
        else:  # fixed γ is a 0-dim tensor
            gamma_sum = terms.gamma * n
        kernel = terms.kernel[pick].expand(shape).reshape(-1)
        soft = (kernel < SOFT_CLIP_THRESHOLD).to(g.dtype)
        # tokens the kernel acts on: all, or (one-sided) those pushed away from μ: r > 1 if A > 0, r < 1 if A ≤ 0
        acting = mask if not self.params.one_sided else mask * (1.0 - positive - up + 2.0 * both)
        self._add(
            n=n, g_sum=g_sum, g_sq=torch.dot(g_masked, g), neg_log_r=-torch.dot(log_r, mask),
            soft_clipped=torch.dot(soft, mask), gamma=gamma_sum, kernel_moment=torch.dot(kernel * log_r * log_r, acting),
            # quadrant counts and weight sums by inclusion–exclusion
            n_neg_down=n - n_pos - n_up + n_both, n_neg_up=n_up - n_both, n_pos_down=n_pos - n_both, n_pos_up=n_both,
            g_neg_down=g_sum - g_pos - g_up + g_both, g_neg_up=g_up - g_both, g_pos_down=g_pos - g_both,
            g_pos_up=g_both,
        )
        valid_flat = mask > 0
        lowest = torch.where(valid_flat, log_r, math.inf).min()  # a Python scalar: no tensor copied to the device
        highest = torch.where(valid_flat, log_r, -math.inf).max()
        self.extremes.append(torch.stack([lowest, highest]))
        self.samples.append(log_r[:: self.token_stride][valid_flat[:: self.token_stride]])

    @staticmethod
    def _as_metric(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        """A float (the solved width factor on CPU) or 0-dim tensor as a 0-dim tensor of `like`'s dtype, the one
        the metrics are read in. new_full, not as_tensor: a float copied to a GPU would be a host sync."""
        if isinstance(value, torch.Tensor):
            return value.to(like.dtype)
        return like.new_full((), value)

    def sync(self, pg_loss: torch.Tensor) -> tuple[bool, float, dict[str, float] | None]:
        """(inputs and loss finite?, number of valid tokens, named metric values) in one host sync."""
        n_valid, raw_sum = torch.stack(self.probes).sum(0).unbind()
        head = {"finite": torch.isfinite(pg_loss.detach()) & torch.isfinite(raw_sum), "n_valid": n_valid}
        metrics = {}
        if self.sums:
            s = self.sums
            n_safe = s["n"].clamp(min=1)
            extremes = torch.stack(self.extremes)
            sample = torch.cat(self.samples)
            if sample.numel() == 0:  # no valid token in the sampled rows
                sample = extremes[:, 0]
            p01, p50, p99 = quantiles(sample).exp().unbind()  # of log r: exp is monotone
            p = self.params
            width_neg = p.width if p.width_neg is None else p.width_neg
            scale = self._as_metric(self.width_scale, n_valid)  # one conversion for both widths
            metrics = {
                "sampled": s["n"],
                "actor/ppo_kl": s["neg_log_r"] / n_safe,
                "actor/pg_clipfrac": s["soft_clipped"] / n_safe,
                "actor/is_reshape/weight_mean": s["g_sum"] / n_safe,
                "actor/is_reshape/gamma_mean": s["gamma"] / n_safe,
                "actor/is_reshape/ess": ess_from_sums(s["g_sum"], s["g_sq"], n_safe),
                "actor/is_reshape/ratio_min": extremes[:, 0].min().exp(),
                "actor/is_reshape/ratio_p01": p01,
                "actor/is_reshape/ratio_p50": p50,
                "actor/is_reshape/ratio_p99": p99,
                "actor/is_reshape/ratio_max": extremes[:, 1].max().exp(),
                "actor/is_reshape/width": scale,  # s until the read below turns it into s·width
                "actor/is_reshape/width_neg": scale,
                "actor/is_reshape/width_stat": s["kernel_moment"] / n_safe,
            }
            for q in _QUADRANTS:
                metrics[f"actor/is_reshape/{q}_share"] = s[f"n_{q}"] / n_safe
            for q in _QUADRANTS:
                metrics[f"actor/is_reshape/{q}_weight"] = s[f"g_{q}"] / s[f"n_{q}"].clamp(min=1)
        names = list(head) + list(metrics)
        values = torch.stack([v.to(n_valid.dtype) for v in (*head.values(), *metrics.values())]).tolist()  # one sync
        out = dict(zip(names, values))
        finite, n_valid = bool(out.pop("finite")), out.pop("n_valid")
        if metrics and out.pop("sampled") == 0:  # the sampled rows hold no valid token: nothing was measured
            return finite, n_valid, None
        if metrics:  # the widths are multiplied here, after the read: two fewer ops on the device per call
            out["actor/is_reshape/width"] *= self.params.width
            out["actor/is_reshape/width_neg"] *= width_neg
        return finite, n_valid, (out or None)


def _loss_and_sums(old_log_prob, log_prob, advantages, valid, loss_agg_mode, config, rollout_is_weights, params):
    sums = _MetricSums(log_prob, old_log_prob, valid, params)
    token_loss = is_reshape_token_loss(log_prob, old_log_prob, advantages, params, on_chunk=sums, valid=valid)  # (B, T)
    if rollout_is_weights is not None:
        token_loss = token_loss * rollout_is_weights
    pg_loss = agg_loss(loss_mat=token_loss, loss_mask=valid, loss_agg_mode=loss_agg_mode, **config.global_batch_info)
    finite, n_valid, metrics = sums.sync(pg_loss)
    if n_valid == 0:  # nothing to learn from; agg_loss's local means would divide 0 by 0
        pg_loss = (token_loss * valid).sum()
    return pg_loss.to(log_prob.dtype), finite, n_valid, metrics


def _check_adaptive_width_is_safe(params: ISReshapeParams, config) -> None:
    """The adaptive width all-reduces over every rank; with Megatron pipeline parallelism only the last stage
    calls the loss, so that collective would hang the job instead of failing it."""
    if params.width_mode != "adaptive" or getattr(config, "strategy", None) != "megatron":
        return
    stages = getattr(getattr(config, "megatron", None), "pipeline_model_parallel_size", 1) or 1
    if stages > 1:
        raise ValueError(f"width_mode=adaptive cannot run with Megatron pipeline parallelism "
                         f"(pipeline_model_parallel_size={stages}): only the last stage computes the loss; "
                         "set actor_rollout_ref.actor.policy_loss.width_mode=fixed")


@register_policy_loss(LOSS_NAME)
def compute_policy_loss_is_reshape(
    old_log_prob: torch.Tensor,  # (B, T) log μ, from the behaviour policy
    log_prob: torch.Tensor,  # (B, T) log π_θ, requires grad
    advantages: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T) bool or float
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: torch.Tensor | None = None,  # (B, T) or None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """IS Reshape policy loss with verl's signature: weight each token's −A·∇log π_θ by g(r, A)."""
    if config is None:
        raise ValueError("is_reshape needs verl's actor config (config=...); got None")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not known; allowed: {', '.join(LOSS_AGG_MODES)}")
    shapes = {"old_log_prob": old_log_prob.shape, "log_prob": log_prob.shape, "advantages": advantages.shape,
              "response_mask": response_mask.shape}
    if len(set(shapes.values())) > 1:
        raise ValueError("is_reshape needs inputs of one shape (B, T); got " +
                         ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items()))
    params = params_from_actor_config(config)
    _check_adaptive_width_is_safe(params, config)
    response_mask = response_mask.bool()
    args = (loss_agg_mode, config, rollout_is_weights, params)

    pg_loss, finite, n_valid, metrics = _loss_and_sums(old_log_prob, log_prob, advantages, response_mask, *args)
    n_response = n_valid
    if not finite:
        # Rare path: drop tokens with NaN/±Inf inputs (log r = 0, A = 0 there, outside the mask) and redo.
        with torch.no_grad():
            ok = torch.isfinite(log_prob.detach() - old_log_prob + advantages)  # NaN/Inf in any of the three
        clean = log_prob.detach().nan_to_num(0.0, 0.0, 0.0)
        log_prob = torch.where(ok, log_prob, clean)
        old_log_prob = torch.where(ok, old_log_prob, clean)
        advantages = torch.where(ok, advantages, torch.zeros_like(advantages))
        pg_loss, finite, n_valid, metrics = _loss_and_sums(old_log_prob, log_prob, advantages, response_mask & ok, *args)

    return pg_loss, step_metrics(metrics, n_valid, n_response, params, step_share(config, log_prob.shape[0]))


def step_share(config, rows: int) -> float | None:
    """k·D/N, the factor that turns a micro-batch's token count into its share of verl's step mean (module
    docstring); None where it is unknown: dynamic batch sizes, or a caller that is not verl's engine.

    verl's engine splits each rank's mini-batch of global_batch_size / D sequences into k equal micro-batches
    of ppo_micro_batch_size_per_gpu rows (`prepare_micro_batches`, verl/workers/engine/utils.py), and sets
    dp_size, batch_num_tokens and global_batch_size in `config.global_batch_info` before every call.
    """
    info = getattr(config, "global_batch_info", None) or {}
    ranks, tokens, sequences = info.get("dp_size"), info.get("batch_num_tokens"), info.get("global_batch_size")
    micro = getattr(config, "ppo_micro_batch_size_per_gpu", None)
    if getattr(config, "use_dynamic_bsz", True) or micro != rows or not (ranks and tokens and sequences):
        return None
    if sequences % (ranks * rows):
        return None
    return sequences // (ranks * rows) * ranks / tokens


def step_metrics(metrics: dict[str, float] | None, n_valid: float, n_response: float, params: ISReshapeParams,
                 share: float | None) -> dict[str, float]:
    """The metrics one micro-batch hands to verl: always the same keys, never inf/NaN, each weighted by
    the micro-batch's share of the step's tokens when `share` (= k·D/N, see `step_share`) is known."""
    if n_valid == 0 or metrics is None:  # no token measured: the extremes would be ±inf, the means 0/0
        out = dict.fromkeys(TOKEN_METRICS, 0.0)
        width_neg = params.width if params.width_neg is None else params.width_neg
        out.update(zip(WIDTH_METRICS, (params.width, width_neg)))
    else:
        out = dict(metrics)
    if share is None:
        out["actor/is_reshape/nonfinite_frac"] = 1.0 - n_valid / n_response if n_response else 0.0
        return out
    for name in TOKEN_METRICS:
        out[name] *= n_valid * share
    for name in WIDTH_METRICS:
        out[name] *= n_response * share
    out["actor/is_reshape/nonfinite_frac"] = (n_response - n_valid) * share
    return out
