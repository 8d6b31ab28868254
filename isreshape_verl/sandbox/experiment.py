"""Orchestration of a comparison: task, cached warm start, the (loss × lag × seed) runs, the report.

Runs execute in the main process (`--jobs 1`, always with `--async`) or in `--jobs N` spawned worker
processes with cores/N torch threads each (small models use cores better that way). Every run of a
seed sees the same prompts, the same sampling seed and the same warm start.
"""

from __future__ import annotations

import contextlib
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

from isreshape_verl.paths import write_atomic
from isreshape_verl.sandbox.errors import CompareError, RunFileError
from isreshape_verl.sandbox.interrupts import children_ignore_ctrl_c, describe, exit_status, sigterm_interrupts
from isreshape_verl.sandbox.loop import RLArgs, Trainer, load_checkpoint, read_metrics
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
    rows = read_metrics(path, partial_tail=True)
    return bool(rows) and rows[-1]["step"] == steps


def _has_results(run_dir: str) -> bool:
    """Whether a run folder holds results (metrics rows or a checkpoint) that a new comparison would overwrite."""
    return any(os.path.isfile(p) and os.path.getsize(p) > 0
               for p in (os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "checkpoint.pt")))


# Flags that change how a comparison runs, not what it computes: --resume may differ in them. Losses, lags and
# seeds name the runs (a resume may add some); every other flag must match the folder's runs.
RESUME_MAY_CHANGE = frozenset({"losses", "lags", "seeds", "out", "resume", "stop_after", "jobs", "threads",
                               "no_progress", "device"})


def _settings(compare: dict, flags) -> dict:
    """{flag: value} of a comparison's settings (`asdict(CompareArgs)` as config.json stores it)."""
    values = {}
    for flag in flags:
        value = compare
        for key in flag.path:
            if not isinstance(value, dict) or key not in value:
                break  # a setting that did not exist when the run was made: nothing to compare
            value = value[key]
        else:
            values[flag.option] = value
    return values


def check_out_folder(args, specs, flags) -> None:
    """Refuse, before any work, an --out folder this comparison must not write into (CompareError/RunFileError):

    * without --resume, a folder with runs that have results: they would be overwritten silently;
    * with --resume, runs made with other settings (another --lr, another preset...): the report would mix
      them and claim this command made them. The first differing setting is named, with both values;
    * with --resume, a damaged metrics.jsonl or checkpoint.pt of a run to continue: named now, not after the
      warm start.
    """
    runs_dir = os.path.join(args.out, "runs")
    existing = sorted(d for d in os.listdir(runs_dir) if os.path.isdir(os.path.join(runs_dir, d))) \
        if os.path.isdir(runs_dir) else []
    if not args.resume:
        held = [d for d in existing if _has_results(os.path.join(runs_dir, d))]
        if held:
            finished = sum(_is_finished(os.path.join(runs_dir, d), _steps_of(runs_dir, d)) for d in held)
            raise CompareError(f"--out {args.out!r} already holds {len(held)} run(s) ({finished} finished, e.g. "
                               f"runs/{held[0]}) that this command would overwrite; continue them with --resume, "
                               "choose another --out, or delete the folder to start over")
        return
    now = _settings(json.loads(json.dumps(asdict(args), default=str)), flags)
    for d in existing:
        config_path = os.path.join(runs_dir, d, "config.json")
        if not os.path.exists(config_path):
            continue
        try:
            with open(config_path) as f:
                then = _settings(json.load(f)["compare"], flags)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunFileError(f"{config_path} is not a readable run configuration ({err}); delete the run's folder "
                               f"{os.path.join(runs_dir, d)!r} to run it again") from None
        for option, value in now.items():
            if option.lstrip("-").replace("-", "_") in RESUME_MAY_CHANGE or option not in then:
                continue
            if then[option] != value:
                raise CompareError(f"--resume: {option} is {_shown(value)} now but {_shown(then[option])} in the runs "
                                   f"of {args.out!r} (e.g. runs/{d}); resume with the folder's settings, or choose "
                                   "another --out for the new ones")
    planned = {run_name(spec, lag, seed) for spec in specs for seed in args.seeds
               for lag in (["async"] if args.rl.async_mode else args.lags)}
    for d in sorted(planned & set(existing)):
        metrics, checkpoint = os.path.join(runs_dir, d, "metrics.jsonl"), os.path.join(runs_dir, d, "checkpoint.pt")
        if os.path.exists(metrics):
            read_metrics(metrics, partial_tail=True)
        if os.path.exists(checkpoint):
            load_checkpoint(checkpoint)


def _steps_of(runs_dir: str, name: str) -> int:
    """The steps a run was made for (its config.json), -1 when unknown."""
    try:
        with open(os.path.join(runs_dir, name, "config.json")) as f:
            return int(json.load(f)["rl"]["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else repr(value)


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


def estimate_step_seconds(policy, task, spec, rl: RLArgs, warm_state: dict) -> tuple[float, float]:
    """Seconds to generate one rollout batch (with its log-probs) and to train on it, measured on a throwaway
    run of the real thing. Apart: a run at lag K generates K batches more than it trains on."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(policy, task, spec, replace(rl, lag=0, async_mode=False), tmp, warm_state)
        t0 = time.perf_counter()
        batch = trainer.generate(0)
        t1 = time.perf_counter()
        trainer.update(batch)
        return t1 - t0, time.perf_counter() - t1


def run_name(spec, lag, seed) -> str:
    label = re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(spec).replace(":", "__"))
    return f"{label}__lag{lag}__seed{seed}"


def run_comparison(args, specs, command: str) -> int:
    """Run every (loss, lag, seed) and write the report; returns the exit status.

    Ctrl-C or SIGTERM (a scheduler, `kill`) at any point stops the workers too and prints one line saying what
    is kept and how to continue; exit 130 (Ctrl-C) or 143 (SIGTERM). The caller's SIGTERM handler is restored
    afterwards. Bad input found on the way raises CompareError; a file that cannot be written, OSError."""
    phase = ["the setup"]  # what was running when interrupted: the message says what is kept
    with sigterm_interrupts():
        try:
            return _run_comparison(args, specs, command, phase)
        except KeyboardInterrupt as interrupt:
            resume = f"{command} --resume" + ("" if "--out" in command else f" --out {args.out}")
            if phase[0] == "runs":
                what = (f"; finished runs and checkpoints (every {args.rl.ckpt_every} steps) are kept; "
                        f"continue with: {resume}")
            elif phase[0] == "report":
                what = f" while writing the report; every run is finished, so {resume} writes it"
            else:
                what = f" during {phase[0]}; no run had started, so there is nothing to resume"
            print(f"\n{describe(interrupt)}{what}", file=sys.stderr)
            return exit_status(interrupt)


def _run_comparison(args, specs, command: str, phase: list[str]) -> int:
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
        raise CompareError(str(err)) from None
    check_train_pool(task, args)
    print(f"policy: {policy.description}, {policy.num_parameters / 1e6:.2f} M parameters on {device}")
    print(f"task: {task.source}: {len(task.train)} train / {len(task.test)} test problems")
    identity = {"model": model_identity(args), "task": task_identity(args)}
    if device == "cpu":  # one process trains the warm start: give it every core
        torch.set_num_threads(cores)
    phase[0] = "the warm start"
    warm = load_or_train(policy, identity, task.train, task.test, args.warm, args.rl.max_new_tokens,
                         progress=not args.no_progress)
    if threads:
        torch.set_num_threads(threads)
    how = "cached" if warm["cached"] else f"{warm['seconds']:.0f} s"
    print(f"warm start: greedy accuracy {warm['accuracy']:.3f} after {warm['steps']} steps ({how})")
    warm_state = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}

    plan = [(spec, lag, seed) for seed in args.seeds for lag in lags for spec in specs]
    phase[0] = "the timing of one step"
    gen_s, train_s = estimate_step_seconds(policy, task, specs[0], rl_args(args, 0, args.seeds[0]), warm_state)
    evals = args.rl.steps // args.rl.eval_every + 2
    eval_s = _time_eval(policy, task, args)
    # a run at lag K generates K batches before its first update (the FIFO), so K more than it trains on
    batches = sum(args.rl.steps + (0 if lag == "async" else lag) for _, lag, _ in plan)
    estimate = (batches * gen_s + n_runs * (args.rl.steps * train_s + evals * eval_s)) / (jobs if device == "cpu" else 1)
    print(f"plan: {len(specs)} loss(es) × lags {lags} × seeds {args.seeds} = {n_runs} runs of {args.rl.steps} steps; "
          f"{gen_s + train_s:.2f} s/step measured, {jobs} job(s) × {threads or '-'} thread(s); "
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
        config = {"loss": str(spec), "lag": lag, "seed": seed, "rl": asdict(rl), "compare": asdict(args),
                  "warm_start": {k: v for k, v in warm.items() if k != "history"}, "command": command}
        write_atomic(os.path.join(run_dir, "config.json"), lambda f: json.dump(config, f, indent=1, default=str))
        todo.append({"name": name, "args": args, "spec": spec, "rl": rl, "task": task, "dir": run_dir,
                     "warm_path": warm["path"], "device": device, "resume": args.resume,
                     "stop_after": args.stop_after, "threads": threads})
    if done_names:
        print(f"--resume: {len(done_names)} finished run(s) kept")

    phase[0] = "runs"
    results = _run_all(todo, jobs, args)
    if not all(r["finished"] for r in results):
        print(f"stopped after {args.stop_after} steps (--stop-after); continue with --resume")
        return 0

    runs = []
    for spec, lag, seed in plan:
        name = run_name(spec, lag, seed)
        rows = read_metrics(os.path.join(args.out, "runs", name, "metrics.jsonl"))
        runs.append({"name": name, "loss": str(spec), "lag": lag, "seed": seed, "rows": rows,
                     "summary": summarize_run(rows)})
    phase[0] = "report"
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


def check_train_pool(task, args) -> None:
    """The train pool must hold the distinct problems one step samples (`random.sample` without replacement): a
    warm-start batch and a rollout batch. CompareError names the limit and the flag that sets the pool."""
    need = max(args.rl.prompts_per_step, args.warm.batch_size if args.warm.max_steps > 0 else 0)
    if len(task.train) >= need:
        return
    source = f"--data {args.data!r} leaves" if args.data else f"--n-train {args.n_train} gives"
    raise CompareError(f"{source} {len(task.train)} train problem(s); a step samples {need} distinct ones "
                       f"(--warm-batch-size {args.warm.batch_size}, --prompts-per-step {args.rl.prompts_per_step}): "
                       f"at least {need} are needed")


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

        from multiprocessing.managers import SyncManager

        ctx = mp.get_context("spawn")
        with children_ignore_ctrl_c():  # Ctrl-C is the parent's to handle: no traceback from any child
            manager = SyncManager(ctx=ctx)
            manager.start(_ignore_interrupts)
        with manager, ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_ignore_interrupts) as pool:
            try:
                events = manager.Queue()
                with children_ignore_ctrl_c():  # workers start on submit
                    futures = [pool.submit(_execute, job, events) for job in todo]
                while not all(f.done() for f in futures):
                    failed = next((f for f in futures if f.done() and f.exception() is not None), None)
                    if failed is not None:  # a full disk, say: stop the other runs now, keep what is written
                        failed.result()
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
    except BaseException:
        _remove_partial_files(todo)
        raise
    finally:
        for bar in bars.values():
            bar.close()


def _remove_partial_files(todo: list[dict]) -> None:
    """Remove the `*.tmp` files of the runs' folders: a worker stopped mid-write (terminated after another run
    failed, or killed) never ran write_atomic's clean-up. The folders are this comparison's alone (the --out
    lock), so every temporary file in them is a leftover."""
    for job in todo:
        names = os.listdir(job["dir"]) if os.path.isdir(job["dir"]) else []
        for name in (n for n in names if n.endswith(".tmp")):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(job["dir"], name))
