"""Orchestration of a comparison: task, cached warm start, the (loss × lag × seed) runs, the report.

Runs execute in the main process (`--jobs 1`, always with `--async`) or in `--jobs N` spawned worker
processes with cores/N torch threads each (small models use cores better that way). Every run of a
seed sees the same prompts, the same sampling seed and the same warm start.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import re
import signal
import sys
import time
from dataclasses import asdict, replace

import torch

from isreshape_verl.sandbox.loop import RLArgs, Trainer, read_metrics
from isreshape_verl.sandbox.model import build_policy
from isreshape_verl.sandbox.report import summarize_run, terminal_table, table_rows, write_report
from isreshape_verl.sandbox.task import fit_task, parquet_task, procedural_task
from isreshape_verl.sandbox.warmstart import load_or_train


def rl_args(args, lag: int, seed: int) -> RLArgs:
    """The comparison's run settings for one (lag, seed)."""
    return replace(args.rl, lag=lag, seed=seed)


def build_task(args):
    n_test = max(args.rl.eval_problems, args.warm.eval_problems)
    if args.data:
        return parquet_task(args.data, n_test, args.task_seed)
    return procedural_task(args.task_seed, args.n_train, n_test, args.difficulty, args.word_share)


def device_of(args) -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def model_identity(args) -> dict:
    if args.model:
        stamp = os.path.getmtime(os.path.join(args.model, "config.json"))
        return {"model": os.path.abspath(args.model), "mtime": stamp}
    return {"tiny": asdict(args.tiny), "tokenizer": "char-v1"}


def task_identity(args) -> dict:
    if args.data:
        return {"data": os.path.abspath(args.data), "mtime": os.path.getmtime(args.data), "seed": args.task_seed,
                "n_test": max(args.rl.eval_problems, args.warm.eval_problems),
                "fit": "prompt+max_new_tokens<=max_positions"}  # fit_task's filter changes the problems
    # the test split's size matters: test prompts are excluded from the train pool
    return {"difficulty": args.difficulty, "word_share": args.word_share, "n_train": args.n_train,
            "n_test": max(args.rl.eval_problems, args.warm.eval_problems), "seed": args.task_seed, "task": "arith-v1"}


def _execute(job: dict, events=None) -> dict:
    """One run (in this process or a worker). `job` is plain data so it crosses process boundaries."""
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    args = job["args"]
    policy = build_policy(args.model, args.tiny, 0)
    policy.model.to(job["device"])
    warm = torch.load(job["warm_path"], map_location=job["device"], weights_only=True)

    def progress(**kw):
        if events is not None:
            events.put((job["name"], kw))
        elif job.get("on_progress"):
            job["on_progress"](job["name"], kw)

    source_factory = None
    rl = job["rl"]
    if rl.async_mode:
        from functools import partial

        from isreshape_verl.sandbox.async_gen import AsyncSource

        build = partial(build_policy, args.model, args.tiny, 0)
        source_factory = lambda trainer: AsyncSource(trainer, build, rl.max_staleness)  # noqa: E731
    trainer = Trainer(policy, job["task"], job["spec"], rl, job["dir"], warm, source_factory, progress)
    finished = trainer.run(resume=job["resume"], stop_after=job["stop_after"])
    if finished and os.path.exists(trainer.ckpt_path):
        os.remove(trainer.ckpt_path)  # a finished run needs no checkpoint; its metrics are complete
    return {"name": job["name"], "finished": finished}


def _is_finished(run_dir: str, steps: int) -> bool:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path) or os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        return False
    rows = read_metrics(path)
    return bool(rows) and rows[-1]["step"] == steps


def machine_description() -> str:
    cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {cores} cores{gpu}, torch {torch.__version__}, {platform.system()}"


def estimate_step_seconds(policy, task, spec, rl: RLArgs, warm_state: dict) -> float:
    """Seconds of one RL step (generate + log-probs + update), measured on a throwaway run of the real thing."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(policy, task, spec, replace(rl, lag=0, async_mode=False), tmp, warm_state)
        t0 = time.perf_counter()
        trainer.update(trainer.generate(0))
        return time.perf_counter() - t0


def run_name(spec, lag, seed) -> str:
    label = re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(spec).replace(":", "__"))
    return f"{label}__lag{lag}__seed{seed}"


def run_comparison(args, specs, command: str) -> int:
    """Run every (loss, lag, seed) and write the report. SIGTERM (a scheduler, `kill`) stops it like Ctrl-C,
    so that its workers stop too; the caller's SIGTERM handler is restored afterwards."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        return _run_comparison(args, specs, command)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return _run_comparison(args, specs, command)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_comparison(args, specs, command: str) -> int:
    wall0 = time.perf_counter()
    device = device_of(args)
    cores = os.cpu_count() or 1
    lags = ["async"] if args.rl.async_mode else list(args.lags)
    n_runs = len(specs) * len(lags) * len(args.seeds)
    jobs = args.jobs or min(cores, n_runs)
    if args.rl.async_mode or device != "cpu":
        jobs = 1
    threads = args.threads if device == "cpu" else None
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)

    policy = build_policy(args.model, args.tiny, 0)
    policy.model.to(device)
    try:  # a data source verl cannot score, or no problem that fits the model: refused before any work
        task = fit_task(build_task(args), policy, args.rl.max_new_tokens)
    except ValueError as err:
        print(f"isreshape-verl compare: error: {err}", file=sys.stderr)
        return 2
    print(f"policy: {policy.description}, {policy.num_parameters / 1e6:.2f} M parameters on {device}")
    print(f"task: {task.source}: {len(task.train)} train / {len(task.test)} test problems")
    identity = {"model": model_identity(args), "task": task_identity(args)}
    if device == "cpu":  # one process trains the warm start: give it every core
        torch.set_num_threads(cores)
    warm = load_or_train(policy, identity, task.train, task.test, args.warm, args.rl.max_new_tokens,
                         progress=not args.no_progress)
    if threads:
        torch.set_num_threads(threads)
    how = "cached" if warm["cached"] else f"{warm['seconds']:.0f} s"
    print(f"warm start: greedy accuracy {warm['accuracy']:.3f} after {warm['steps']} steps ({how})")
    warm_state = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}

    plan = [(spec, lag, seed) for seed in args.seeds for lag in lags for spec in specs]
    step_s = estimate_step_seconds(policy, task, specs[0], rl_args(args, 0, args.seeds[0]), warm_state)
    evals = args.rl.steps // args.rl.eval_every + 2
    eval_s = _time_eval(policy, task, args)
    estimate = n_runs * (args.rl.steps * step_s + evals * eval_s) / (jobs if device == "cpu" else 1)
    print(f"plan: {len(specs)} loss(es) × lags {lags} × seeds {args.seeds} = {n_runs} runs of {args.rl.steps} steps; "
          f"{step_s:.2f} s/step measured, {jobs} job(s) × {threads or '-'} thread(s); "
          f"estimated time {estimate / 60:.1f} min")

    todo, done_names = [], []
    for spec, lag, seed in plan:
        name = run_name(spec, lag, seed)
        run_dir = os.path.join(args.out, "runs", name)
        os.makedirs(run_dir, exist_ok=True)
        if args.resume and _is_finished(run_dir, args.rl.steps):
            done_names.append(name)
            continue
        rl = rl_args(args, 0 if lag == "async" else lag, seed)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"loss": str(spec), "lag": lag, "seed": seed, "rl": asdict(rl), "compare": asdict(args),
                       "warm_start": {k: v for k, v in warm.items() if k != "history"}, "command": command},
                      f, indent=1, default=str)
        todo.append({"name": name, "args": args, "spec": spec, "rl": rl, "task": task, "dir": run_dir,
                     "warm_path": warm["path"], "device": device, "resume": args.resume,
                     "stop_after": args.stop_after, "threads": threads})
    if done_names:
        print(f"--resume: {len(done_names)} finished run(s) kept")

    try:
        results = _run_all(todo, jobs, args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished runs and checkpoints (every {args.rl.ckpt_every} steps) are kept. Continue with:"
              f"\n  {command} --resume" + ("" if "--out" in command else f" --out {args.out}"), file=sys.stderr)
        return 130
    if not all(r["finished"] for r in results):
        print(f"stopped after {args.stop_after} steps (--stop-after); continue with --resume")
        return 0

    runs = []
    for spec, lag, seed in plan:
        name = run_name(spec, lag, seed)
        rows = read_metrics(os.path.join(args.out, "runs", name, "metrics.jsonl"))
        runs.append({"name": name, "loss": str(spec), "lag": lag, "seed": seed, "rows": rows,
                     "summary": summarize_run(rows)})
    rl0 = rl_args(args, 0, 0)
    context = {
        "command": command,
        "machine": machine_description(),
        "wall_seconds": time.perf_counter() - wall0,
        "warm_start": warm,
        "policy": policy.description,
        "parameters": policy.num_parameters,
        "task": task.source,
        "rl": (f"{rl0.steps} steps × {rl0.prompts_per_step} prompts × {rl0.samples_per_prompt} samples, "
               f"{rl0.mini_batches} mini-batch update(s) per step, AdamW lr {rl0.lr}, max {rl0.max_new_tokens} "
               f"new tokens, entropy {rl0.entropy_coeff}, KL {rl0.kl_coef}, test on {rl0.eval_problems} problems "
               f"every {rl0.eval_every} steps" + (f", async (max staleness {args.rl.max_staleness})" if args.rl.async_mode else "")),
    }
    report = write_report(args.out, runs, specs, context)
    print()
    print(terminal_table(table_rows(runs), out_dir=args.out))
    print(f"\nreport: {report} ({(time.perf_counter() - wall0) / 60:.1f} min)")
    return 0


def _time_eval(policy, task, args) -> float:
    from isreshape_verl.sandbox.rollout import greedy_accuracy

    t0 = time.perf_counter()
    greedy_accuracy(policy, task.test[: min(64, args.rl.eval_problems)], args.rl.max_new_tokens)
    return (time.perf_counter() - t0) * args.rl.eval_problems / min(64, args.rl.eval_problems)


def _ignore_interrupts() -> None:
    """Workers leave Ctrl-C to the parent, which stops them: one message instead of one traceback each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_all(todo: list[dict], jobs: int, args) -> list[dict]:
    from tqdm import tqdm

    bars = {}

    def on_progress(name, kw):
        if args.no_progress:
            return
        if name not in bars:
            position = len(bars) if jobs > 1 else 0
            bars[name] = tqdm(total=args.rl.steps, desc=name[:48], position=position, leave=True, dynamic_ncols=True)
        bar = bars[name]
        bar.n = kw.get("step", bar.n)
        post = {}
        if kw.get("acc") is not None:
            post["test_acc"] = f"{kw['acc']:.3f}"
            bar.last_acc = post["test_acc"]
        elif getattr(bar, "last_acc", None):
            post["test_acc"] = bar.last_acc
        if kw.get("reward") is not None:
            post["reward"] = f"{kw['reward']:.3f}"
        if kw.get("lag") is not None:
            post["lag"] = kw["lag"]
        bar.set_postfix(post, refresh=False)
        bar.refresh()
        if jobs <= 1 and bar.n >= args.rl.steps:
            bar.close()

    results = []
    try:
        if jobs <= 1:
            for job in todo:
                job["on_progress"] = on_progress
                results.append(_execute(job))
            return results
        import queue as queue_lib
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                                           initializer=_ignore_interrupts) as pool:
            try:
                events = manager.Queue()
                futures = [pool.submit(_execute, job, events) for job in todo]
                while not all(f.done() for f in futures):
                    try:
                        name, kw = events.get(timeout=0.5)
                        on_progress(name, kw)
                    except queue_lib.Empty:
                        pass
                while True:
                    try:
                        on_progress(*events.get_nowait())
                    except queue_lib.Empty:
                        break
                results = [f.result() for f in futures]
            except BaseException:  # Ctrl-C, SIGTERM or a failed run: stop the workers now, not after their runs
                pool.shutdown(wait=False, cancel_futures=True)
                for child in mp.active_children():
                    child.terminate()
                raise
        return results
    finally:
        for bar in bars.values():
            bar.close()
