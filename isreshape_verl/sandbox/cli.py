"""`isreshape-verl compare`: GRPO (vanilla) vs SAPO vs IS Reshape on a small real RLVR task, with real lag.

    isreshape-verl compare                          # default: 3 losses × lags 0, 4; ≈ 8 min on 2 CPU cores
    isreshape-verl compare --preset smoke           # < 1 min, what CI runs
    isreshape-verl compare --preset full            # ≥ 3 seeds, lags 0 2 4 8 16; prints its estimated time
    isreshape-verl compare --losses vanilla "is_reshape:kernel=gaussian,width=0.5" --lags 0 8 --seeds 0 1 2
    python -m isreshape_verl.sandbox --help

Every (loss, lag, seed) run starts from the same cached warm start, sees the same prompts and sampling
seeds, and writes `runs/<name>/metrics.jsonl` and `config.json` under `--out`; then `report.md`,
`accuracy.png`, `ratios.png` and `g_curves.png` are written and a summary table is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field

from isreshape_verl.paths import ensure_writable_dir

PRESETS = {
    # name: (description, overrides of CompareArgs fields)
    "smoke": ("plumbing check, < 1 min on 2 cores with a cold cache (CI runs it)", dict(
        hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, difficulty=1,
        warm_batch_size=64, warm_max_steps=200, warm_eval_every=25, warm_eval_problems=64, warm_target=0.15,
        steps=6, prompts_per_step=8, samples_per_prompt=4, mini_batches=2, eval_every=3, eval_problems=64,
        lags=[0, 2], seeds=[0], max_new_tokens=24, n_train=2000, ckpt_every=3, lr=5e-4,
    )),
    "default": ("3 losses × lags 0, 4, 1 seed: ≈ 8 min on 2 cores with a cold cache (≈ 3 min of it warm start)", {}),
    "full": ("3 seeds × lags 0 2 4 8 16, 150 steps: ≈ 2 h on 2 cores; prints its estimate first", dict(
        seeds=[0, 1, 2], lags=[0, 2, 4, 8, 16], steps=150, eval_problems=1000,
    )),
    # Calibrated so that GRPO's clip (vanilla) degrades at the largest lag: 2 passes × 4 mini-batches per
    # rollout batch (verl's ppo_epochs, ppo_mini_batch_size) make the ratio spread grow with the lag.
    "stress": ("3 seeds × lags 0 4 16 32, 2 epochs × 4 mini-batches per rollout batch: heavy off-policy "
               "staleness, ≈ 3 min per run on one core", dict(
        seeds=[0, 1, 2], lags=[0, 4, 16, 32], epochs=2, mini_batches=4,
    )),
}


@dataclass
class CompareArgs:
    """Everything `isreshape-verl compare` can set (argparse flags are the field names with dashes)."""

    losses: list = field(default_factory=lambda: ["vanilla", "sapo", "is_reshape"])
    """Loss specs MODE[:KEY=VALUE,...] (see isreshape_verl.specs); vanilla = GRPO's PPO-clip."""
    lags: list = field(default_factory=lambda: [0, 4])
    """Deterministic policy lags K: update t trains on rollouts of the policy after update t − K."""
    seeds: list = field(default_factory=lambda: [0])
    """RL seeds (prompt order, sampling, shuffling); the warm start is shared."""
    out: str = "compare_out"
    """Output folder (runs/, report.md, PNGs)."""
    preset: str = "default"
    """smoke | default | full | stress; explicit flags override the preset."""
    resume: bool = False
    """Continue interrupted runs from their last checkpoint; finished runs are kept."""
    async_mode: bool = False
    """Generate in a concurrent process (real asynchronous lag) instead of --lags."""
    max_staleness: int = 4
    """With --async: drop rollouts more than this many versions old (verl's max_off_policy_threshold)."""
    model: str | None = None
    """A local Hugging Face model folder instead of the tiny Qwen2."""
    data: str | None = None
    """verl-format parquet (as written by data_prep) instead of the procedural task."""
    difficulty: int = 2
    """Procedural task difficulty 1–5 (operations and operand range, see task.py)."""
    word_share: float = 0.0
    """Share of word problems in the procedural task."""
    n_train: int = 20000
    """Training problems in the procedural pool."""
    task_seed: int = 0
    """Seed of the procedural train/test split."""
    hidden_size: int = 128
    """Tiny Qwen2: hidden size."""
    num_layers: int = 4
    """Tiny Qwen2: layers."""
    num_heads: int = 4
    """Tiny Qwen2: attention heads (head_dim = hidden/heads ≥ 32)."""
    num_kv_heads: int = 2
    """Tiny Qwen2: key/value heads."""
    intermediate_size: int = 256
    """Tiny Qwen2: MLP width."""
    warm_batch_size: int = 128
    """Warm start: problems per supervised step."""
    warm_lr: float = 3e-3
    """Warm start: learning rate."""
    warm_max_steps: int = 1500
    """Warm start: step limit."""
    warm_eval_every: int = 25
    """Warm start: evaluate every this many steps."""
    warm_eval_problems: int = 256
    """Warm start: test problems per evaluation."""
    warm_target: float = 0.4
    """Warm start: stop at this greedy accuracy."""
    steps: int = 60
    """RL steps per run."""
    prompts_per_step: int = 32
    """Prompts per rollout batch."""
    samples_per_prompt: int = 8
    """Samples per prompt (GRPO group size n)."""
    mini_batches: int = 2
    """Optimizer updates per rollout batch."""
    epochs: int = 1
    """Passes over each rollout batch."""
    lr: float = 1e-4
    """RL learning rate (AdamW). The window is narrow on the tiny model: 1e-4 learns with every loss,
    2e-4 already makes SAPO and IS Reshape lose accuracy at lag 0."""
    max_new_tokens: int = 28
    """Longest response."""
    entropy_coeff: float = 0.0
    """Entropy bonus (off by default)."""
    kl_coef: float = 0.0
    """KL-to-warm-start loss coefficient (off by default)."""
    eval_every: int = 10
    """Greedy test accuracy every this many RL steps."""
    eval_problems: int = 500
    """Test problems per evaluation."""
    micro_batch: int = 256
    """Rows per forward pass (memory only)."""
    ckpt_every: int = 10
    """Checkpoint every this many RL steps (for --resume)."""
    jobs: int = 0
    """Runs in parallel worker processes (0 = one per CPU core, at most one per run)."""
    threads: int = 1
    """torch threads per process on CPU. 1 is fastest for small models, and robust on a busy machine
    (multi-threaded kernels slow down 10× or more when other processes compete for the cores)."""
    stop_after: int | None = None
    """Stop every run after this many steps, checkpointed (to test --resume)."""
    no_progress: bool = False
    """No progress bars."""
    device: str = "auto"
    """auto | cpu | cuda."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isreshape-verl compare",
        description="CPU sandbox: real RLVR with real policy lag; compares verl policy losses "
        "(vanilla = GRPO's PPO-clip, sapo, is_reshape) on a procedurally generated math task.",
        epilog="presets: " + "; ".join(f"{k}: {v[0]}" for k, v in PRESETS.items())
        + ". Loss specs: MODE[:KEY=VALUE,...], e.g. is_reshape:kernel=gaussian,width=0.5 or sapo:tau_pos=1,tau_neg=1.05.",
    )
    docs = _field_docs()
    defaults = asdict(CompareArgs())
    for f in dataclasses.fields(CompareArgs):
        flag = "--async" if f.name == "async_mode" else "--" + f.name.replace("_", "-")
        shown = defaults[f.name]
        shown = " ".join(map(str, shown)) if isinstance(shown, list) else shown
        help_text = docs.get(f.name, "") + ("" if f.type in ("bool", bool) else f" [default: {shown}]")
        for preset, (_, overrides) in PRESETS.items():
            if f.name in overrides:
                value = overrides[f.name]
                help_text += f" [{preset}: {' '.join(map(str, value)) if isinstance(value, list) else value}]"
        kwargs = {"dest": f.name, "help": help_text, "default": None}
        if f.name in ("losses",):
            kwargs.update(nargs="+", metavar="SPEC")
        elif f.name in ("lags", "seeds"):
            kwargs.update(nargs="+", type=int)
        elif f.type in ("bool", bool):
            kwargs.update(action="store_true")
        elif f.name == "preset":
            kwargs.update(choices=list(PRESETS))
        elif f.name == "device":
            kwargs.update(choices=["auto", "cpu", "cuda"])
        elif f.type in ("int", "int | None"):
            kwargs.update(type=int)
        elif f.type == "float":
            kwargs.update(type=float)
        parser.add_argument(flag, **kwargs)
    return parser


def _field_docs() -> dict:
    """Field docstrings of CompareArgs (the string under each field), for --help."""
    import inspect

    source = inspect.getsource(CompareArgs)
    found = re.findall(r"^\s+(\w+): [^\n]*\n\s+\"\"\"(.*?)\"\"\"", source, flags=re.M | re.S)
    return {name: " ".join(doc.split()).replace("%", "%%") for name, doc in found}


def resolve_args(argv: list[str]) -> tuple[CompareArgs, list]:
    """Parse argv, apply the preset under explicit flags and validate everything; raises ValueError."""
    from isreshape_verl.specs import parse_loss_specs

    ns = build_parser().parse_args(argv)
    preset = ns.preset or "default"
    values = asdict(CompareArgs())
    values.update(PRESETS[preset][1])
    values.update({k: v for k, v in vars(ns).items() if v is not None and v is not False})
    values["preset"] = preset
    args = CompareArgs(**values)
    specs = parse_loss_specs(args.losses)
    if any(k < 0 for k in args.lags):
        raise ValueError(f"--lags must be >= 0; got {args.lags}")
    if len(set(args.lags)) != len(args.lags) or len(set(args.seeds)) != len(args.seeds):
        raise ValueError("--lags and --seeds must not repeat a value")
    positive = ("steps", "prompts_per_step", "samples_per_prompt", "mini_batches", "epochs", "max_new_tokens",
                "eval_every", "eval_problems", "micro_batch", "ckpt_every", "warm_batch_size", "warm_eval_every",
                "warm_eval_problems", "n_train", "max_staleness", "threads")
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0; got {getattr(args, name)}")
    if args.warm_max_steps < 0 or args.jobs < 0:
        raise ValueError("--warm-max-steps and --jobs must be >= 0")
    if args.samples_per_prompt < 2:
        raise ValueError("--samples-per-prompt must be >= 2 (GRPO normalises within each group)")
    if args.prompts_per_step % args.mini_batches:
        raise ValueError(f"--prompts-per-step ({args.prompts_per_step}) must be a multiple of --mini-batches ({args.mini_batches})")
    if not 1 <= args.difficulty <= 5:
        raise ValueError(f"--difficulty must be 1..5; got {args.difficulty}")
    if not 0 <= args.word_share <= 1:
        raise ValueError(f"--word-share must be in [0, 1]; got {args.word_share}")
    if args.lr <= 0 or args.warm_lr <= 0:
        raise ValueError("--lr and --warm-lr must be > 0")
    if args.stop_after is not None and args.stop_after <= 0:
        raise ValueError("--stop-after must be > 0")
    if args.model:
        from isreshape_verl.sandbox.model import check_model_dir

        check_model_dir(args.model)
    else:
        if args.hidden_size % args.num_heads or args.hidden_size // args.num_heads < 32:
            raise ValueError("--hidden-size / --num-heads must be an integer head_dim >= 32")
        if args.num_heads % args.num_kv_heads:
            raise ValueError("--num-heads must be a multiple of --num-kv-heads")
    if args.data:
        if not os.path.isfile(args.data):
            raise ValueError(f"--data {args.data!r} is not a file")
        import pyarrow.parquet as pq

        try:
            columns = set(pq.read_schema(args.data).names)
        except Exception as err:  # noqa: BLE001 - any reader error means "not parquet"
            raise ValueError(f"--data {args.data!r} is not a readable parquet file ({err})") from None
        if not {"prompt", "reward_model"} <= columns:
            raise ValueError(f"--data {args.data!r} is not verl-format: it needs columns prompt and reward_model")
    ensure_writable_dir(args.out)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available")
    return args, specs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, specs = resolve_args(argv)
    except ValueError as err:
        print(f"isreshape-verl compare: error: {err}", file=sys.stderr)
        return 2
    try:
        lock = lock_output(args.out)
    except ValueError as err:
        print(f"isreshape-verl compare: error: {err}", file=sys.stderr)
        return 2
    from isreshape_verl.sandbox.experiment import run_comparison

    with lock:
        return run_comparison(args, specs, command="isreshape-verl compare " + shlex.join(argv))


def lock_output(folder: str):
    """An exclusive lock on `folder` for one comparison (an open file; closing it releases the lock).

    Two comparisons writing into one folder would interleave their checkpoints and metrics; the second is
    refused, naming the process that holds the folder.
    """
    import fcntl

    path = os.path.join(folder, ".compare.lock")
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"--out {folder!r} is in use by a running comparison (pid {holder}); wait for it, "
                         "or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
