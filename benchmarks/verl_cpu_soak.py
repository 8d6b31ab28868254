"""A soak of verl's trainer on CPU: many steps of the tiny recipe, the memory of every process of the run sampled
over time, and the two things a leak or a stall shows first:

* memory growth: each process's resident memory (RSS, /proc/<pid>/statm) after the first steps against its last
  tenth; a growth beyond `--growth` MiB is flagged;
* slow steps: any step (verl's `timing_s/step`) slower than 2x the median; steps that validate are left out of
  this check and drawn apart (in the async modes verl's step time holds only part of the validation).

Processes are those born after the launch (run it on an otherwise idle machine), grouped by their command line
(Ray names actors `ray::<Class>`). Writes into --out: `rss.csv` (seconds, pid, process, RSS MiB), `steps.csv`,
`soak.png` (RSS per process and step time against time) and `soak.md` (the verdict, the CPU named).

    python benchmarks/verl_cpu_soak.py --steps 300 --mode separate --out runs/soak
    python benchmarks/verl_cpu_soak.py --steps 20 --out runs/soak_short        # a quick look

Exit 1 when a process grew or a step was slow, 0 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verl_cpu_speed import REPO, cpu_name  # noqa: E402

from isreshape_verl.testing.recipe_runs import metrics_by_step  # noqa: E402

PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def process_name(pid: int) -> str:
    """Ray's actor name (`ray::TaskRunnerV1`), a `-m` module, a script's name, or the program's."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [w.decode(errors="replace") for w in command if w]
    if not words:
        return "?"
    if len(words) == 1:  # a process that rewrote its title, e.g. "ray-dashboard-MetricsHead-0 (python3 -B -c ...)"
        words = words[0].split()
    if words[0].startswith("ray::"):
        return words[0].split(".")[0]  # ray::TaskRunnerV1.run -> ray::TaskRunnerV1
    module = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "-m"), None)
    script = next((Path(w).name for w in words[1:] if w.endswith(".py")), None)
    return module or script or Path(words[0]).name


def sample(since: float, me: int) -> list[tuple[int, str, float]]:
    """(pid, name, RSS MiB) of every live process born after `since` (seconds since the epoch)."""
    tick = os.sysconf("SC_CLK_TCK")
    boot = float(next(line.split()[1] for line in Path("/proc/stat").read_text().splitlines()
                      if line.startswith("btime")))
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if boot + int(fields[19]) / tick < since - 1:
                continue
            rss = int((entry / "statm").read_text().split()[1]) * PAGE_MIB
            found.append((int(entry.name), process_name(int(entry.name)), rss))
        except (OSError, IndexError, ValueError):
            continue
    return found


def growth_table(samples: list[tuple[float, int, str, float]], start: float, end: float, limit: float):
    """Per process: RSS at its first sample after `start` s and the median of its samples after `end` s."""
    by_pid: dict[int, list[tuple[float, float]]] = {}
    names = {}
    for t, pid, name, rss in samples:
        by_pid.setdefault(pid, []).append((t, rss))
        names[pid] = name  # the last: an idle Ray worker becomes its actor
    rows, grown = [], []
    for pid, series in by_pid.items():
        early = [rss for t, rss in series if t >= start]
        late = [rss for t, rss in series if t >= end]
        if not early or not late or max(rss for _, rss in series) < 50:
            continue  # gone before the end, or too small to matter
        first, last = early[0], statistics.median(late)
        rows.append((names[pid], pid, first, last, last - first))
        if last - first > limit:
            grown.append(names[pid])
    return sorted(rows, key=lambda r: -r[3]), grown


def plot(samples, steps: dict[int, tuple[float, float]], validating: set[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    by_pid: dict[int, list] = {}
    for t, pid, name, rss in samples:
        by_pid.setdefault(pid, []).append((t, rss, name))
    for series in sorted(by_pid.values(), key=lambda s: -max(r for _, r, _ in s))[:12]:
        top.plot([t for t, _, _ in series], [r for _, r, _ in series], lw=1.2, label=series[-1][2])
    top.set_ylabel("RSS, MiB")
    top.legend(fontsize=7, ncol=2)
    top.grid(alpha=0.3)
    for marker, label, chosen in ((".", "step", lambda s: s not in validating),
                                  ("x", "step with validation", lambda s: s in validating)):
        points = [steps[s] for s in steps if chosen(s)]
        bottom.plot([t for t, _ in points], [d for _, d in points], marker, ms=4, ls="none", label=label)
    bottom.legend(fontsize=7)
    bottom.set_ylabel("verl's step time, s")
    bottom.set_xlabel("seconds since the launch")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mode", default="separate", choices=("sync", "colocate", "separate"))
    parser.add_argument("--out", type=Path, default=Path("runs/verl_cpu_soak"))
    parser.add_argument("--every", type=float, default=2.0, help="seconds between memory samples")
    parser.add_argument("--growth", type=float, default=100.0, help="MiB of RSS growth flagged as a leak")
    parser.add_argument("--test-freq", type=int, default=50, help="validation every N steps")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 10:
        parser.error(f"--steps {args.steps}: need >= 10 (the first tenth is the baseline)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "soak"
    if run_dir.exists():
        sys.exit(f"error: {run_dir} exists: choose another --out, or remove it (a rerun would resume)")
    env = {**os.environ, "DEVICE": "cpu", "ASYNC": args.mode, "STEPS": str(args.steps),
           "TEST_FREQ": str(args.test_freq), "SAVE_FREQ": "-1", "RUN_ROOT": str(out), "EXP_NAME": "soak"}
    since, started = time.time(), time.monotonic()
    samples: list[tuple[float, int, str, float]] = []
    arrived: dict[int, float] = {}
    with open(out / "console.txt", "w") as console:
        proc = subprocess.Popen(["bash", str(REPO / "recipes/tiny/isreshape.sh"), *overrides], cwd=REPO, env=env,
                                stdout=console, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                now = time.monotonic() - started
                samples += [(now, pid, name, rss) for pid, name, rss in sample(since, os.getpid())]
                if (run_dir / "metrics.jsonl").exists():
                    for step in metrics_by_step(run_dir):
                        arrived.setdefault(step, now)
                print(f"\r{args.mode}: {len(arrived)}/{args.steps} steps, {now:.0f} s", end="", file=sys.stderr,
                      flush=True)
                time.sleep(args.every)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    print(file=sys.stderr)
    if proc.returncode != 0:
        sys.exit(f"error: the run failed (exit {proc.returncode}); see {out / 'console.txt'}")
    rows = metrics_by_step(run_dir)
    trained = [s for s in sorted(rows) if "timing_s/step" in rows[s]]
    validating = {s for s in trained if "timing_s/testing" in rows[s]}
    steps = {s: (arrived.get(s, float("nan")), rows[s]["timing_s/step"]) for s in trained}
    with open(out / "rss.csv", "w", newline="") as f:
        csv.writer(f).writerows([("seconds", "pid", "process", "rss_mib"),
                                 *((f"{t:.1f}", pid, name, f"{rss:.1f}") for t, pid, name, rss in samples)])
    with open(out / "steps.csv", "w", newline="") as f:
        csv.writer(f).writerows([("step", "seconds", "step_s", "validated"),
                                 *((s, f"{t:.1f}", f"{d:.3f}", int(s in validating)) for s, (t, d) in steps.items())])
    plain = {s: d for s, (_, d) in steps.items() if s != trained[0] and s not in validating}  # step 1: one-off costs
    median = statistics.median(plain.values())
    slow = [(s, d) for s, d in plain.items() if d > 2 * median]
    tenth = max(1, args.steps // 10)
    start, end = arrived.get(tenth, 0.0), arrived.get(args.steps - tenth, 0.0)
    table, grown = growth_table(samples, start, end, args.growth)
    plot(samples, steps, validating, out / "soak.png")
    lines = [f"# Soak: {args.steps} steps of the tiny recipe, ASYNC={args.mode}", "",
             f"{cpu_name()}; {time.monotonic() - started:.0f} s; RSS sampled every {args.every} s.", "",
             f"Step time (`timing_s/step`) of the {len(plain)} steps after step 1 that did not validate: median "
             f"{median:.2f} s, max {max(plain.values()):.2f} s; "
             f"slower than 2x the median: {len(slow)} ({', '.join(f'step {s} {d:.1f} s' for s, d in slow[:10])})",
             "", f"RSS per process (>= 50 MiB), at step {tenth} and the median after step {args.steps - tenth}; "
             f"growth over {args.growth:.0f} MiB flagged: {', '.join(grown) or 'none'}", "",
             "| process | pid | MiB at the start | MiB at the end | growth |", "|---|---|---|---|---|"]
    lines += [f"| `{n}` | {p} | {a:.0f} | {b:.0f} | {g:+.0f} |" for n, p, a, b, g in table]
    lines += ["", "![RSS and step time](soak.png)", ""]
    (out / "soak.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 1 if slow or grown else 0


if __name__ == "__main__":
    sys.exit(main())
