"""Generation speed of the `isreshape_hf` rollout server against the sandbox's own batched generator.

Same model, same prompts, same lengths, same sampling (temperature 1, at most `--max-tokens` new tokens,
stop at EOS), measured side by side in one process: the repetitions alternate between the two, in a
shuffled order, and the medians are compared. The server is driven as verl's agent loop drives it (every
sequence its own concurrent `generate` request), without Ray. Also times one weight update (the server's
`update_weights` with the model's full state dict), the cost the trainer pays per sync besides transport.

    python benchmarks/verl_cpu_rollout.py --model ~/data/tiny/model --data ~/data/tiny/test.parquet

Run it alone: a second job on a 2-core machine moves both timings.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def load_prompts(tokenizer, data: Path, n: int) -> list[list[int]]:
    import pandas as pd

    rows = pd.read_parquet(data)["prompt"].tolist()[:n]
    return [tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            for messages in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.expanduser("~/data/tiny/model"))
    parser.add_argument("--data", default=os.path.expanduser("~/data/tiny/test.parquet"))
    parser.add_argument("--prompts", type=int, default=32, help="prompts per batch (the tiny recipe's TRAIN_BATCH)")
    parser.add_argument("--samples", type=int, default=8, help="answers per prompt (ROLLOUT_N)")
    parser.add_argument("--max-tokens", type=int, default=28, help="response tokens (MAX_RESPONSE_LEN)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from isreshape_verl.cpu.hf_rollout import HFRolloutServer
    from isreshape_verl.sandbox.rollout import sample

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = load_prompts(tokenizer, Path(args.data), args.prompts)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts for _ in range(args.samples)]
    config = SimpleNamespace(response_length=args.max_tokens, prompt_length=128, max_num_seqs=4096,
                             dtype="float32", seed=0)
    server = HFRolloutServer(config, SimpleNamespace(local_path=args.model, path=args.model))
    model = server.model
    generator = torch.Generator().manual_seed(0)

    def run_sandbox() -> int:
        rollout = sample(model, prompts, args.max_tokens, server.pad_id, min(server.eos_ids), generator)
        return int(rollout.response_mask.sum())

    async def requests():
        params = {"temperature": 1.0, "max_tokens": args.max_tokens}
        return await asyncio.gather(*[server.generate(p, dict(params), f"r{i}") for i, p in enumerate(prompts)])

    def run_server() -> int:
        return sum(len(o.token_ids) for o in asyncio.run(requests()))

    runs = {"sandbox sample()": run_sandbox, "isreshape_hf server": run_server}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    run_server(), run_sandbox()  # warm-up
    order = list(runs)
    rng = random.Random(0)
    for _ in range(args.reps):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            tokens = runs[name]()
            rates[name].append(tokens / (time.perf_counter() - start))

    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    update_seconds = [asyncio.run(server.update_weights(state, global_steps=1)) for _ in range(args.reps)]

    med = {name: statistics.median(r) for name, r in rates.items()}
    lines = [
        f"# isreshape_hf generation vs the sandbox's generator ({platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {sum(p.numel() for p in model.parameters()):,} parameters)",
        f"# batch: {args.prompts} prompts x {args.samples} answers, <= {args.max_tokens} tokens, temperature 1; "
        f"{args.reps} interleaved repetitions, shuffled order",
        f"{'generator':<22} {'median tok/s':>12} {'min':>8} {'max':>8}",
        *(f"{name:<22} {med[name]:>12.0f} {min(r):>8.0f} {max(r):>8.0f}" for name, r in rates.items()),
        f"ratio server / sandbox (medians): {med['isreshape_hf server'] / med['sandbox sample()']:.2f}",
        f"weight update (load_state_dict of {len(state)} tensors): median {statistics.median(update_seconds) * 1e3:.1f} ms",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
