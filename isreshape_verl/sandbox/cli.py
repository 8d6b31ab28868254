"""`isreshape-verl compare`: GRPO (vanilla) vs SAPO vs IS Reshape on a small real RLVR task, with real lag.

    isreshape-verl compare                          # default: 3 losses × lags 0, 4; 5.8–9.4 min on 2 CPU cores
    isreshape-verl compare --preset smoke           # < 1 min, what CI runs
    isreshape-verl compare --preset full            # ≥ 3 seeds, lags 0 2 4 8 16; prints its estimated time
    isreshape-verl compare --losses vanilla "is_reshape:kernel=gaussian,width=0.5" --lags 0 8 --seeds 0 1 2
    python -m isreshape_verl.sandbox --help

Every (loss, lag, seed) run starts from the same cached warm start, sees the same prompts and sampling
seeds, and writes `runs/<name>/metrics.jsonl` and `config.json` under `--out`; then `report.md`,
`accuracy.png`, `ratios.png` and `g_curves.png` are written and a summary table is printed.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from dataclasses import dataclass, field

from isreshape_verl.cli_args import ArgumentParser, add_flags, build, check, fail
from isreshape_verl.paths import (
    DISK_FULL,
    ensure_writable_dir,
    naming,
    os_error_behind,
    os_error_line,
    remove_created,
)
from isreshape_verl.sandbox.loop import RLArgs
from isreshape_verl.sandbox.model import TinyModelArgs
from isreshape_verl.sandbox.warmstart import WarmStartArgs

PRESETS = {
    # name: (description, {flag dest: value}); explicit flags override these
    "smoke": ("plumbing check, < 1 min on 2 cores with a cold cache (CI runs it)", dict(
        hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, difficulty=1,
        warm_batch_size=64, warm_max_steps=200, warm_eval_every=25, warm_eval_problems=64, warm_target=0.15,
        steps=6, prompts_per_step=8, samples_per_prompt=4, mini_batches=2, eval_every=3, eval_problems=64,
        lags=[0, 2], seeds=[0], max_new_tokens=24, n_train=2000, ckpt_every=3, lr=5e-4,
    )),
    "default": (("3 losses × lags 0, 4, 1 seed: 5.8 to 9.4 min on 2 cores with the warm start cached (Intel Xeon "
                 "to AMD EPYC), 2 to 3.5 min more the first time"), {}),
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
    """Everything `isreshape-verl compare` can set. The run, model and warm-start settings are owned by
    RLArgs, TinyModelArgs and WarmStartArgs (their fields are flags too); each class checks its own ranges."""

    losses: list[str] = field(default_factory=lambda: ["vanilla", "sapo", "is_reshape"], metadata={"metavar": "SPEC"})
    """Loss specs MODE[:KEY=VALUE,...] (see isreshape_verl.specs); vanilla = GRPO's PPO-clip."""
    lags: list[int] = field(default_factory=lambda: [0, 4])
    """Deterministic policy lags K: update t trains on rollouts of the policy after update t − K (at most
    steps − 1: from there on every update trains on the initial policy's rollouts, so a larger K is the same run)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """RL seeds (prompt order, sampling, shuffling); the warm start is shared."""
    out: str = "compare_out"
    """Output folder (runs/, report.md, PNGs)."""
    preset: str = field(default="default", metadata={"choices": tuple(PRESETS)})
    """smoke | default | full | stress; explicit flags override the preset."""
    resume: bool = False
    """Continue interrupted runs from their last checkpoint; finished runs are kept."""
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
    rl: RLArgs = field(default_factory=RLArgs)
    tiny: TinyModelArgs = field(default_factory=TinyModelArgs)
    warm: WarmStartArgs = field(default_factory=WarmStartArgs, metadata={"prefix": "warm"})
    jobs: int = 0
    """Runs in parallel worker processes (0 = one per CPU core, at most one per run)."""
    threads: int = 1
    """torch threads per process on CPU. 1 is fastest for small models, and robust on a busy machine
    (multi-threaded kernels slow down 10× or more when other processes compete for the cores)."""
    stop_after: int | None = None
    """Stop every run after this many steps, checkpointed (to test --resume)."""
    no_progress: bool = False
    """No progress bars."""
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    """auto | cpu | cuda."""

    def __post_init__(self):
        check("lags", self.lags, all(k >= 0 for k in self.lags), "a list of lags >= 0")
        check("lags", self.lags, len(set(self.lags)) == len(self.lags), "a list without repeats")
        check("seeds", self.seeds, len(set(self.seeds)) == len(self.seeds), "a list without repeats")
        check("difficulty", self.difficulty, 1 <= self.difficulty <= 5, "1..5")
        check("word_share", self.word_share, 0 <= self.word_share <= 1, "in [0, 1]")
        check("n_train", self.n_train, self.n_train > 0, "> 0")
        check("jobs", self.jobs, self.jobs >= 0, ">= 0 (0 = one per core)")
        check("threads", self.threads, self.threads > 0, "> 0")
        check("stop_after", self.stop_after, self.stop_after is None or self.stop_after > 0, "> 0")
        # Lag K: update t trains on the batch made after update max(0, t − K). With K ≥ steps − 1 every update
        # gets a batch of the initial policy, so larger lags only generate batches that are never used.
        longest = self.rl.steps - 1
        check("lags", [k for k in self.lags if k > longest] or self.lags, self.rl.async_mode or max(self.lags) <= longest,
              f"at most --steps − 1 = {longest} (a larger lag trains on the same initial-policy rollouts as "
              f"{longest}, only slower)")


def _preset_notes() -> dict[str, str]:
    """' [stress: 2]'-style notes for --help: what each preset sets."""
    notes: dict[str, str] = {}
    for preset, (_, overrides) in PRESETS.items():
        for dest, value in overrides.items():
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            notes[dest] = notes.get(dest, "") + f" [{preset}: {shown}]"
    return notes


def build_parser() -> tuple[ArgumentParser, list]:
    parser = ArgumentParser(
        prog="isreshape-verl compare",
        description="CPU sandbox: real RLVR with real policy lag; compares verl policy losses "
        "(vanilla = GRPO's PPO-clip, sapo, is_reshape) on a procedurally generated math task.",
        epilog="presets: " + "; ".join(f"{k}: {v[0]}" for k, v in PRESETS.items())
        + ". Loss specs: MODE[:KEY=VALUE,...], e.g. is_reshape:kernel=gaussian,width=0.5 or sapo:tau_pos=1,tau_neg=1.05.",
    )
    flags = add_flags(parser, CompareArgs, notes=_preset_notes())
    return parser, flags


def resolve_args(argv: list[str]) -> tuple[CompareArgs, list]:
    """Parse argv, apply the preset under explicit flags and validate everything; raises ValueError. Writes
    nothing: `main` creates --out."""
    from isreshape_verl.specs import parse_loss_specs

    parser, flags = build_parser()
    ns = parser.parse_args(argv)
    preset = ns.preset or "default"
    values = dict(PRESETS[preset][1])
    values.update({k: v for k, v in vars(ns).items() if v is not None and v is not False})
    values["preset"] = preset
    args = build(CompareArgs, values, flags)
    specs = parse_loss_specs(args.losses)
    if ns.max_staleness is not None and not args.rl.async_mode:
        raise ValueError(f"--max-staleness {ns.max_staleness} applies only with --async (a fixed --lags K needs no "
                         "bound: its lag is K); add --async or drop --max-staleness")
    if ns.lags is not None and args.rl.async_mode:
        raise ValueError(f"--lags {' '.join(map(str, ns.lags))} does not apply with --async (the generator's speed "
                         "sets the lag, --max-staleness bounds it); drop one of them")
    need = max(args.rl.prompts_per_step, args.warm.batch_size if args.warm.max_steps > 0 else 0)
    if not args.data and args.n_train < need:  # random.sample of a batch from a smaller pool fails mid-run
        raise ValueError(f"--n-train must be at least {need} (a step samples that many distinct problems: "
                         f"--warm-batch-size {args.warm.batch_size}, --prompts-per-step {args.rl.prompts_per_step}); "
                         f"got {args.n_train}")
    if args.model:
        from isreshape_verl.sandbox.model import check_model_dir

        check_model_dir(args.model)
    if args.data:
        if not os.path.isfile(args.data):
            raise ValueError(f"--data {args.data!r} is not a file")
        from isreshape_verl.sandbox.task import check_verl_parquet

        check_verl_parquet(args.data)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available")
    return args, specs


PROG = "isreshape-verl compare"


def main(argv: list[str] | None = None) -> int:
    """The command; returns its exit status. Every refusal and every failure of the environment (a full disk, a
    damaged run file, a folder of another comparison) is one line and status 2; Ctrl-C 130, SIGTERM 143. A failed
    command removes the --out folder when it created it and no run result is in it: nothing half-made is left."""
    argv = sys.argv[1:] if argv is None else list(argv)
    created: list[str | None] = [None]  # the outermost folder this command created, set once --out exists
    try:
        code = _compare(argv, created)
    except KeyboardInterrupt as interrupt:  # before the comparison began (run_comparison handles its own)
        from isreshape_verl.sandbox.interrupts import describe, exit_status

        print(f"\n{describe(interrupt)} before the comparison began; no run was changed", file=sys.stderr)
        code = exit_status(interrupt)
    if code != 0:
        remove_created(created[0], keep=_is_run_result)
    return code


def _compare(argv: list[str], created: list) -> int:
    """`main` without its clean-up: checks, the folder lock, the comparison; errors become one line."""
    try:
        args, specs = resolve_args(argv)
        created[0] = ensure_writable_dir(args.out)
        lock = lock_output(args.out)
    except ValueError as err:
        return fail(PROG, str(err))
    except OSError as err:  # the lock file cannot be written: a full disk, say
        return fail(PROG, os_error_line(err))
    from isreshape_verl.sandbox.errors import CompareError
    from isreshape_verl.sandbox.experiment import check_out_folder, run_comparison

    with lock:
        try:
            check_out_folder(args, specs, build_parser()[1])
            return run_comparison(args, specs, command=f"{PROG} " + shlex.join(argv))
        except CompareError as err:  # bad input found while working (a damaged run file, data that does not fit)
            return fail(PROG, str(err))
        except Exception as err:  # a full disk, mostly, whichever library wrote; else a bug
            cause = os_error_behind(err)
            if cause is None or (cause is not err and cause.errno not in DISK_FULL):
                raise  # a bug that met an OSError on its way keeps its traceback
            kept = any(_is_run_result(os.path.join(root, name))
                       for root, _, names in os.walk(os.path.join(args.out, "runs")) for name in names)
            return fail(PROG, os_error_line(cause, "; finished runs and checkpoints are kept, --resume continues"
                                            if kept else ""))


def _is_run_result(path: str) -> bool:
    """A file a failed command must not delete: a run's metrics or checkpoint (`--resume` continues from them)."""
    return os.path.basename(path) in ("metrics.jsonl", "checkpoint.pt") and os.path.getsize(path) > 0


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
    try:
        with naming(path):  # a full disk fails here, before any work
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
    except BaseException:
        with contextlib.suppress(OSError):  # closing flushes again, and fails again
            handle.close()
        raise
    return handle
