"""Batched sampling with a KV cache, and full-forward log-probs, for the sandbox policy.

`sample` runs one forward over the left-padded prompts, then one forward per new position for the
whole batch at once (a loop over positions, never over samples), drawing each token with plain softmax
sampling at temperature 1 (no top-k / top-p), so the recorded log-prob is exactly log μ(token).
`sequence_log_probs` recomputes log-probs with one full forward per micro-batch; the sandbox uses it for
the behaviour log-probs μ (at generation time, with the generating weights) and for π_θ in training, so
that at lag 0 the first mini-batch sees r == 1 exactly. Sampling-time and full-forward log-probs agree
to ~1e-6 in fp32 (reported as `mu_kv_gap`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """A batch of prompts and sampled responses. B = number of samples, P = prompt width, R = response width."""

    input_ids: torch.Tensor  # (B, P + R) left-padded prompt, then the response padded after EOS
    attention_mask: torch.Tensor  # (B, P + R) 1 on real tokens
    response_mask: torch.Tensor  # (B, R) float, 1 on response tokens (EOS included)
    sample_log_probs: torch.Tensor  # (B, R) log μ recorded while sampling (KV cache)
    prompt_width: int

    @property
    def responses(self) -> torch.Tensor:  # (B, R)
        return self.input_ids[:, self.prompt_width :]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
    for i, p in enumerate(prompts):  # building the batch, not a loop over tokens
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)


@torch.no_grad()
def sample(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, eos_id: int,
           generator: torch.Generator | None = None, greedy: bool = False) -> Rollout:
    """Sample (or greedily decode) one response per prompt, batched, with a KV cache."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))  # (B, P)
    batch = ids.shape[0]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1].float()  # (B, V)
    next_pos = mask.sum(-1, keepdim=True)  # (B, 1)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logps, alive = [], [], []
    for step in range(max_new_tokens):
        log_probs = torch.log_softmax(logits, dim=-1)  # (B, V)
        if greedy:
            tok = log_probs.argmax(-1)  # (B,)
        else:
            probs = log_probs.exp().cpu()  # sampled on the CPU with a seeded generator (same draws on CUDA)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(device)  # (B,)
        tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        logps.append(torch.where(finished, 0.0, log_probs.gather(-1, tok[:, None]).squeeze(-1)))
        alive.append(~finished)
        finished = finished | (tok == eos_id)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, alive[-1].long()[:, None]], dim=-1)  # the fed token is real if it was alive
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                    past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
        next_pos = next_pos + 1
    responses = torch.stack(tokens, dim=1)  # (B, R)
    response_mask = torch.stack(alive, dim=1).float()  # (B, R)
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    return Rollout(
        input_ids=torch.cat([prompt_ids, responses], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        sample_log_probs=torch.stack(logps, dim=1),
        prompt_width=prompt_ids.shape[1],
    )


def token_log_probs(model, input_ids, attention_mask, prompt_width: int, with_entropy: bool = False):
    """log π(response token) for one micro-batch, (B, R) in fp32, and optionally the entropy (B, R)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                   use_cache=False).logits  # (B, L, V)
    logits = logits[:, prompt_width - 1 : -1].float()  # (B, R, V): position t predicts token t + 1
    log_probs = torch.log_softmax(logits, dim=-1)
    target = input_ids[:, prompt_width:]  # (B, R)
    picked = log_probs.gather(-1, target[..., None]).squeeze(-1)  # (B, R)
    if not with_entropy:
        return picked, None
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # (B, R)
    return picked, entropy


@torch.no_grad()
def sequence_log_probs(model, rollout: Rollout, micro_batch: int) -> torch.Tensor:
    """Full-forward log-probs of every response token, (B, R), in micro-batches of `micro_batch` rows."""
    chunks = []
    for start in range(0, rollout.input_ids.shape[0], micro_batch):
        sl = slice(start, start + micro_batch)
        lp, _ = token_log_probs(model, rollout.input_ids[sl], rollout.attention_mask[sl], rollout.prompt_width)
        chunks.append(lp)
    return torch.cat(chunks) * rollout.response_mask


def decode(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts (batched decode in the tokenizer's Rust code; special tokens dropped)."""
    ids = rollout.responses.masked_fill(rollout.response_mask == 0, tokenizer.pad_token_id).tolist()
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


@torch.no_grad()
def greedy_accuracy(policy, problems, max_new_tokens: int, batch_size: int = 512) -> float:
    """Share of `problems` answered right by greedy decoding (verl's scorer for each data_source), batched."""
    from isreshape_verl.sandbox.task import score

    was_training = policy.model.training
    policy.model.eval()
    right = 0.0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        rollout = sample(policy.model, [policy.prompt_ids(p.prompt) for p in chunk], max_new_tokens,
                         policy.pad_id, policy.eos_id, greedy=True)
        right += sum(score(decode(policy.tokenizer, rollout), list(chunk)))
    policy.model.train(was_training)
    return right / max(1, len(problems))
