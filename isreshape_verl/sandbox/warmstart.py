"""Warm start: a short supervised phase so the RL runs start from a partially correct policy.

The policy is trained with next-token cross-entropy on the reference solutions of training problems,
and greedy test accuracy is measured every `eval_every` steps; the first checkpoint whose accuracy
reaches `target_accuracy` is kept (or the best one when `max_steps` is hit first). The result is cached
on disk under `$ISRESHAPE_CACHE` (default `~/.cache/isreshape-verl/`), keyed by a hash of everything
that determines it (model, task, warm-start settings), and reused by every run with the same key.
A file lock serialises concurrent builders and the weights are written with an atomic rename, so
parallel runs never see a half-written file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch

from isreshape_verl.cli_args import check
from isreshape_verl.sandbox.rollout import greedy_accuracy, left_pad, token_log_probs


@dataclass
class WarmStartArgs:
    """Supervised warm start (flags --warm-…). Every field is part of the cache key."""

    batch_size: int = 128
    """Warm start: problems per supervised step."""
    lr: float = 3e-3
    """Warm start: AdamW learning rate (linear warm-up over the first 20 steps)."""
    max_steps: int = 1500
    """Warm start: step limit; when it is hit first, the best checkpoint seen is kept."""
    eval_every: int = 25
    """Warm start: measure greedy test accuracy every this many steps."""
    eval_problems: int = 256
    """Warm start: test problems per evaluation (they select the checkpoint)."""
    target_accuracy: float = field(default=0.4, metadata={"flag": "warm-target"})
    """Warm start: stop at the first checkpoint whose greedy accuracy reaches this (RL then has room to improve)."""
    seed: int = field(default=0, metadata={"cli": False})
    """Seed of the initialisation and of the supervised batches."""

    def __post_init__(self):
        for name in ("batch_size", "eval_every", "eval_problems"):
            check(name, getattr(self, name), getattr(self, name) > 0, "> 0")
        check("max_steps", self.max_steps, self.max_steps >= 0, ">= 0")
        check("lr", self.lr, math.isfinite(self.lr) and self.lr > 0, "a finite number > 0")
        check("target_accuracy", self.target_accuracy, 0 <= self.target_accuracy <= 1, "in [0, 1]")


def cache_root() -> str:
    return os.environ.get("ISRESHAPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "isreshape-verl")


def cache_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _supervised_batch(policy, problems):
    prompts = [policy.prompt_ids(p.prompt) for p in problems]
    responses = [policy.response_ids(p.solution) for p in problems]
    prompt_ids, prompt_mask = left_pad(prompts, policy.pad_id)  # (B, P)
    width = max(map(len, responses))
    resp = torch.full((len(responses), width), policy.pad_id, dtype=torch.long)  # (B, R)
    resp_mask = torch.zeros((len(responses), width))  # (B, R)
    for i, r in enumerate(responses):
        resp[i, : len(r)] = torch.tensor(r)
        resp_mask[i, : len(r)] = 1.0
    input_ids = torch.cat([prompt_ids, resp], dim=1)  # (B, P + R)
    attention_mask = torch.cat([prompt_mask, resp_mask.long()], dim=1)
    device = next(policy.model.parameters()).device
    return input_ids.to(device), attention_mask.to(device), resp_mask.to(device), prompt_ids.shape[1]


def train_warm_start(policy, train, test, args: WarmStartArgs, max_new_tokens: int, log=print,
                     progress: bool = False) -> dict:
    """Supervised training until greedy accuracy ≥ target; leaves the selected weights in `policy.model`.

    `progress`: a progress bar up to the step limit (the target usually stops it earlier)."""
    from tqdm import tqdm

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    model = policy.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    eval_set = test[: args.eval_problems]
    best = (-1.0, 0, None)
    history = []
    start = time.perf_counter()
    acc = greedy_accuracy(policy, eval_set, max_new_tokens)
    history.append((0, acc))
    step = 0
    bar = tqdm(total=args.max_steps, desc="warm start (stops at the target accuracy)", disable=not progress,
               dynamic_ncols=True)
    for step in range(1, args.max_steps + 1):
        bar.update(1)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 20)
        input_ids, attention_mask, resp_mask, width = _supervised_batch(policy, rng.sample(train, args.batch_size))
        log_probs, _ = token_log_probs(model, input_ids, attention_mask, width)  # (B, R)
        loss = -(log_probs * resp_mask).sum() / resp_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0:
            acc = greedy_accuracy(policy, eval_set, max_new_tokens)
            history.append((step, acc))
            bar.set_postfix(acc=f"{acc:.3f}", target=args.target_accuracy)
            if not progress:
                log(f"warm start step {step}: loss {loss.item():.3f}, greedy accuracy {acc:.3f}")
            if acc > best[0]:
                best = (acc, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            if acc >= args.target_accuracy:
                break
    bar.close()
    if best[2] is not None:
        model.load_state_dict(best[2])
    return {"accuracy": best[0], "steps": best[1], "seconds": time.perf_counter() - start, "history": history}


def load_or_train(policy, identity: dict, train, test, args: WarmStartArgs, max_new_tokens: int, log=print,
                  progress: bool = False) -> dict:
    """Load the cached warm start for `identity`, or train and cache it (safe with concurrent callers)."""
    key = cache_key({"identity": identity, "warm_start": asdict(args), "max_new_tokens": max_new_tokens})
    folder = os.path.join(cache_root(), "warmstart")
    os.makedirs(folder, exist_ok=True)
    weights, meta_path = os.path.join(folder, f"{key}.pt"), os.path.join(folder, f"{key}.json")
    with open(os.path.join(folder, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then loads the first one's result
        if os.path.exists(weights) and os.path.exists(meta_path):
            policy.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            with open(meta_path) as f:
                meta = json.load(f)
            meta.update(cached=True, path=weights)
            log(f"warm start: loaded from cache {weights} (accuracy {meta['accuracy']:.3f})")
            return meta
        log(f"warm start: training (cache key {key}); this happens once per model/task config")
        meta = train_warm_start(policy, train, test, args, max_new_tokens, log, progress)
        meta.update(key=key, identity=identity)
        state = {k: v.cpu() for k, v in policy.model.state_dict().items()}
        _write_cached(weights, lambda f: torch.save(state, f), "wb")  # a file object: ENOSPC is an OSError
        _write_cached(meta_path, lambda f: json.dump(meta, f, default=str), "w")
        meta.update(cached=False, path=weights)
        return meta


def _write_cached(path: str, write, mode: str) -> None:
    """Write a cache file through a per-process temporary file and an atomic rename; a failure (full disk,
    Ctrl-C) removes the temporary file, so the cache never holds a partial entry or leftovers."""
    from isreshape_verl.paths import naming

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with naming(path), open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
