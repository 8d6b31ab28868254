"""Where a step of verl's trainer on CPU goes, side by side with the sandbox's step at the same sizes.

Runs the tiny recipe (`recipes/tiny/isreshape.sh`, DEVICE=cpu, `hf` rollout unless ROLLOUT is set) for
`--steps` steps in each `--modes` (sync, colocate, separate), then the sandbox (`isreshape-verl compare`,
is_reshape, lag 0) for as many steps with as many torch threads as the machine has cores, and prints one table:

    stage              verl's metric                     sandbox's metric
    generation         timing_s/gen                      time_gen
    old log-probs      timing_s/old_log_prob             time_logprob (the behaviour log-probs)
    advantages         timing_s/adv                      -
    update             timing_s/update_actor             time_train
    weight sync        timing_s/update_weights           -
    trainer overhead   step minus the parts above        -
    whole step         timing_s/step                     time_step
    start-up           launch to step 1's start          -
    validation         timing_s/testing (500 problems)   time_eval (500 problems)

Each figure is the median over steps 2..N (step 1 carries one-off costs; it is shown apart); the mean step is
shown too, because `colocate` alternates long steps (generating two batches) and short ones (training on the
batch already there), where the median alone flatters. Start-up is
wall time from the launch to the moment step 1's metrics row appeared, minus step 1's own time. Validation
runs once, after the last step (`TEST_FREQ=steps`, no validation before training). The ratio column is
each mode's step over the sandbox's. The CPU model and its bf16 support are printed with the table: a
timing without its machine means nothing. Do not run it beside the test suite.

    python benchmarks/verl_cpu_speed.py --out runs/verl_cpu_speed
    python benchmarks/verl_cpu_speed.py --modes sync --steps 6 -- actor_rollout_ref.model.use_remove_padding=True
    ROLLOUT=vllm python benchmarks/verl_cpu_speed.py --modes sync --out runs/speed_vllm

Anything after `--` is passed to every recipe run as a trailing Hydra override (to measure a setting).

Start-up is also taken apart per process: every process that appears after the launch is sampled from /proc
every 0.1 s until step 1's metrics row appears, and `startup-<mode>.txt` lists each one (its last command line: Ray names
actors `ray::<Class>`) with the second it appeared, the second its CPU time stopped growing, and the CPU seconds
it used, and sums them against the wall time: a sum near the wall time means one process after another, each
on one core. Processes that were already running are left out, so run it on an otherwise idle machine.

`--profile SECONDS` samples every process of each run with py-spy (`pip install py-spy`) for that long from
step 2 on, and writes `profile-<mode>.txt`: per process (Ray names them after their actor), the share of the
window it was on a CPU and its hottest frames (a Ray worker waiting for work sits in `Worker.main_loop`,
which py-spy cannot tell from work: those samples are left out), next to the raw stacks (`profile-<mode>.raw`).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from isreshape_verl.testing.recipe_runs import metrics_by_step

REPO = Path(__file__).resolve().parent.parent
MODES = ("sync", "colocate", "separate")
PARTS = {  # stage -> verl's timing key; "overhead" is the step minus these
    "generation": "timing_s/gen",
    "old log-probs": "timing_s/old_log_prob",
    "advantages": "timing_s/adv",
    "update": "timing_s/update_actor",
    "weight sync": "timing_s/update_weights",
}
SANDBOX_PARTS = {"generation": "time_gen", "old log-probs": "time_logprob", "update": "time_train",
                 "whole step": "time_step"}


def cpu_name() -> str:
    """The CPU model and whether it computes bf16 natively (AVX512-BF16), as lscpu reports them."""
    model, flags = platform.processor() or "unknown CPU", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown CPU", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    bf16 = "AVX512-BF16" if "avx512_bf16" in flags else "no AVX512-BF16"
    return f"{model}, {os.cpu_count()} cores, {bf16}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


IDLE_FRAME = "Worker.main_loop"
"""A Ray worker's main thread waiting in native code for its next call: not CPU time."""


class StartupSampler:
    """CPU seconds of every process born after `since` (time.time()), polled from /proc: pid -> first seen,
    last time its CPU time grew, CPU seconds (utime + stime, counted from the process's start) and last command."""

    def __init__(self, since: float):
        self.since, self.tick, self.procs = since, os.sysconf("SC_CLK_TCK"), {}
        self.boot = float(next(line.split()[1] for line in Path("/proc/stat").read_text().splitlines()
                               if line.startswith("btime")))
        self.me = os.getpid()

    def poll(self) -> None:
        now = time.time() - self.since
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.me:
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                born = self.boot + int(fields[19]) / self.tick - self.since  # starttime, clock ticks after boot
                if born < -1:
                    continue  # running before the launch
                cpu = (int(fields[11]) + int(fields[12])) / self.tick
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, IndexError, ValueError):
                continue
            seen = self.procs.setdefault(int(entry.name), {"born": born, "busy_until": born, "cpu": 0.0})
            if cpu > seen["cpu"]:
                seen["busy_until"] = now
            seen["cpu"], seen["command"] = cpu, command[:110] or seen.get("command", "?")

    def report(self, wall: float, startup: float) -> str:
        """`wall`: seconds from the launch to step 1's metrics row, the sampled window (start-up, then step 1)."""
        rows = sorted(self.procs.values(), key=lambda p: p["born"])
        busy = [p for p in rows if p["cpu"] >= 0.05]
        lines = [f"{wall:.1f} s from the launch to step 1's metrics row (start-up {startup:.1f} s, then step 1); "
                 f"processes born after the launch that used >= 0.05 CPU s ({len(busy)} of {len(rows)}), in order "
                 "of birth:", "",
                 "| born, s | CPU until, s | CPU s | process |", "|---|---|---|---|"]
        for p in busy:
            lines.append(f"| {p['born']:.1f} | {p['busy_until']:.1f} | {p['cpu']:.1f} | `{p['command']}` |")
        total = sum(p["cpu"] for p in rows)
        lines += ["", f"CPU seconds of all of them: {total:.1f}, i.e. {total / wall:.2f} cores busy on average "
                      f"over the {wall:.1f} s (the machine has {os.cpu_count()})"]
        return "\n".join(lines) + "\n"


def profile_summary(raw: Path, seconds: float, rate: int) -> str:
    """Per process: on-CPU share of the window and the hottest frames, from py-spy's raw (collapsed) stacks."""
    per_process: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        processes = [f for f in frames if f.startswith("process ")]
        code = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not processes or not code or code[-1].startswith(IDLE_FRAME):
            continue
        name = processes[-1].split(":", 1)[1].strip('"')[:60]
        leaf = code[-1].split(" (")[0] + " " + code[-1].rsplit("/", 1)[-1].rstrip(")")
        per_process[name][leaf] += int(count)
    window = seconds * rate
    lines = [f"py-spy, {rate} samples/s for {seconds:.0f} s; share = on-CPU samples / window (threads add up)", ""]
    for name, frames in sorted(per_process.items(), key=lambda item: -sum(item[1].values())):
        total = sum(frames.values())
        if total < 0.01 * window:
            continue
        lines.append(f"{name}: {100 * total / window:.0f} % of a core")
        lines += [f"    {100 * n / window:5.1f} %  {frame[:150]}" for frame, n in frames.most_common(8)]
    return "\n".join(lines) + "\n"


def record_profile(pid: int, seconds: float, out: Path, mode: str, rate: int = 50) -> None:
    raw = out / f"profile-{mode}.raw"
    subprocess.run(["py-spy", "record", "--subprocesses", "--nonblocking", "--pid", str(pid), "--rate", str(rate),
                    "--duration", str(int(seconds)), "--format", "raw", "--output", str(raw)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if raw.exists():
        (out / f"profile-{mode}.txt").write_text(profile_summary(raw, seconds, rate))


def run_recipe(mode: str, steps: int, out: Path, overrides: list[str], profile: float = 0) -> dict:
    """One tiny-recipe run; returns its per-stage medians, step 1, start-up and validation (seconds)."""
    name = f"speed-{mode}"
    env = {**os.environ, "DEVICE": "cpu", "ASYNC": mode, "STEPS": str(steps), "TEST_FREQ": str(steps),
           "SAVE_FREQ": "-1", "RUN_ROOT": str(out), "EXP_NAME": name}
    run_dir = out / name
    if run_dir.exists():
        sys.exit(f"error: {run_dir} exists: choose another --out, or remove it (a rerun would resume)")
    metrics = run_dir / "metrics.jsonl"
    command = ["bash", str(REPO / "recipes/tiny/isreshape.sh"), "trainer.val_before_train=False", *overrides]
    started = time.monotonic()
    sampler = StartupSampler(time.time())
    arrived: dict[int, float] = {}  # step -> seconds after launch its row appeared
    with open(out / f"{name}.console.txt", "w") as console:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(0.1)
                if not arrived:
                    sampler.poll()
                if metrics.exists():
                    for line in metrics.read_text().splitlines():
                        step = json.loads(line)["step"]
                        arrived.setdefault(step, time.monotonic() - started)
                if profile and 2 in arrived:
                    record_profile(proc.pid, profile, out, mode)
                    profile = 0
                print(f"\r{mode}: {len(arrived)}/{steps} steps logged, {time.monotonic() - started:.0f} s",
                          end="", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    wall = time.monotonic() - started
    print(file=sys.stderr)
    if proc.returncode != 0:
        sys.exit(f"error: the {mode} run failed (exit {proc.returncode}); see {out / (name + '.console.txt')} "
                 f"and {run_dir / 'train.log'}")
    rows = metrics_by_step(run_dir)
    later = [rows[s] for s in range(2, steps + 1)]
    result = {stage: median([r.get(key, 0.0) for r in later]) for stage, key in PARTS.items()}
    result["whole step"] = median([r["timing_s/step"] for r in later])
    result["trainer overhead"] = median(
        [r["timing_s/step"] - sum(r.get(key, 0.0) for key in PARTS.values()) for r in later])
    result["whole step, mean"] = statistics.mean(r["timing_s/step"] for r in later)  # colocate alternates
    result["step 1"] = rows[1]["timing_s/step"]
    result["start-up"] = arrived[1] - rows[1]["timing_s/step"]
    (out / f"startup-{mode}.txt").write_text(sampler.report(arrived[1], result["start-up"]))
    result["validation"] = rows[steps].get("timing_s/testing", float("nan"))
    result["wall"] = wall
    result["steps"] = [rows[s]["timing_s/step"] for s in range(1, steps + 1)]
    return result


def run_sandbox(steps: int, out: Path) -> dict:
    """The sandbox at the tiny recipe's sizes (32 prompts x 8, 28 new tokens, 2 mini-batches), one seed."""
    folder = out / "sandbox"
    command = [sys.executable, "-m", "isreshape_verl.cli", "compare", "--losses", "is_reshape", "--lags", "0",
               "--seeds", "0", "--steps", str(steps), "--eval-every", str(steps), "--jobs", "1",
               "--threads", str(os.cpu_count()), "--no-progress", "--out", str(folder)]
    with open(out / "sandbox.console.txt", "w") as console:
        proc = subprocess.run(command, cwd=REPO, stdout=console, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        sys.exit(f"error: the sandbox run failed (exit {proc.returncode}); see {out / 'sandbox.console.txt'}")
    (metrics,) = folder.glob("runs/*/metrics.jsonl")
    rows = {r["step"]: r for r in map(json.loads, metrics.read_text().splitlines())}
    later = [rows[s] for s in range(2, steps + 1)]
    result = {stage: median([r[key] for r in later]) for stage, key in SANDBOX_PARTS.items()}
    result["whole step, mean"] = statistics.mean(r["time_step"] for r in later)
    result["step 1"] = rows[1]["time_step"]
    result["validation"] = rows[steps].get("time_eval", float("nan"))
    return result


def table(results: dict[str, dict]) -> str:
    stages = [*PARTS, "trainer overhead", "whole step", "whole step, mean", "step 1", "start-up", "validation"]
    columns = list(results)
    lines = ["| stage | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for stage in stages:
        cells = []
        for column in columns:
            value = results[column].get(stage)
            cells.append("–" if value is None or math.isnan(value) else f"{value:.2f}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    if "sandbox" in results:
        base = results["sandbox"]["whole step"]
        lines.append("| step / sandbox's step | " + " | ".join(
            f"{results[c]['whole step'] / base:.1f}x" for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/verl_cpu_speed"))
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES,
                        help="verl modes to run (none: the sandbox alone)")
    parser.add_argument("--steps", type=int, default=8, help="steps per run, >= 3 (medians skip step 1)")
    parser.add_argument("--no-sandbox", action="store_true", help="skip the sandbox's run")
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS",
                        help="py-spy every process of each run for this long from step 2 on")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error(f"--steps {args.steps}: need >= 3 (step 1 is left out of the medians)")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    if not args.no_sandbox:
        results["sandbox"] = run_sandbox(args.steps, args.out)
    for mode in args.modes:
        results[mode] = run_recipe(mode, args.steps, args.out, overrides, args.profile)
    rollout = os.environ.get("ROLLOUT", "hf")
    head = (f"# verl's trainer on CPU, step by step (tiny recipe, ROLLOUT={rollout}, {args.steps} steps, "
            f"medians of steps 2..{args.steps}, seconds)\n\n{cpu_name()}; torch threads: {os.cpu_count()}"
            + (f"; overrides: {' '.join(overrides)}" if overrides else "") + "\n")
    report = head + "\n" + table(results) + "\n"
    (args.out / "report.md").write_text(report)
    (args.out / "speed.json").write_text(json.dumps({"cpu": cpu_name(), "overrides": overrides,
                                                     "results": results}, indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
