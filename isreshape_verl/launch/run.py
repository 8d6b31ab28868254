"""One recipe run: checks before anything starts, one writer per run folder, no silent resume with changed
settings, verl's output into train.log with a line per step on the console, every process of the run stopped
at the end (or on Ctrl-C / SIGTERM), and one closing line.

The run folder RUN_ROOT/EXP_NAME holds:

    command.sh      the exact command (a record, rerunnable)
    launch.json     the knobs and trailing overrides the checkpoints were made with (compared on a rerun)
    train.log       everything verl printed
    metrics.jsonl   verl's file logger (an earlier one is kept as metrics.<UTC time>.jsonl)
    tensorboard/, checkpoints/
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from isreshape_verl.launch.knobs import KnobError, Knobs

RESUMABLE_KNOBS = ("STEPS", "EPOCHS", "TEST_FREQ", "SAVE_FREQ", "WANDB", "VERBOSE", "DRY_RUN", "RECIPE_CHECK",
                   "PYTHON", "PROJECT", "COMPARE_DIR", "LOSSES", "RUN_ROOT")
"""Knobs that may differ when a run resumes from its checkpoints: the schedule and the logging, not the math."""
RESUMABLE_KEYS = ("trainer.total_training_steps", "trainer.total_epochs", "trainer.test_freq", "trainer.save_freq",
                  "trainer.resume_mode", "trainer.resume_from_path", "trainer.logger", "trainer.val_before_train",
                  "hydra.")
"""The same for trailing Hydra overrides (a key, or a prefix ending in '.')."""
RUN_MARKER = "ISRESHAPE_LAUNCH"
"""Environment variable set in verl's process; every process the run starts inherits it (Ray's daemons and
workers too), which is how the run finds them all at the end."""
STOP_WAIT = 30.0
"""Seconds verl gets to stop after Ctrl-C / SIGTERM before its processes are killed."""
NODE_LOOK = 2.0
"""On a joined Ray cluster (RAY_ADDRESS): seconds between the launcher's looks at whether a node of it died."""
NODE_WAIT = 20.0
"""Seconds verl gets to fail on its own after a node of its cluster died, before it is stopped (a hang)."""


def shell_command(cmd: list[str]) -> str:
    """`PYTHON -m MODULE`, then one argument per line, shell-quoted, ready to copy."""
    quoted = [shlex.quote(arg) for arg in cmd]
    return " \\\n    ".join([" ".join(quoted[:3]), *quoted[3:]]) + "\n"


# ---- before the launch ----
def check_model_dir(model: str) -> None:
    """A local MODEL folder must hold a model; a hub id is checked by `diagnose.model_problem`."""
    if not (model.startswith(("/", ".", "~")) or os.path.exists(model)):
        return
    path = Path(model).expanduser()
    if not path.is_dir():
        raise KnobError(f"MODEL='{model}' is not a folder (a local Hugging Face model folder, or a hub id)")
    if not (path / "config.json").is_file():
        raise KnobError(f"MODEL='{model}' is not a model: it has no config.json")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise KnobError(f"MODEL='{model}' has no weights (*.safetensors or *.bin)")


def lock_run_dir(run_dir: Path) -> int:
    """Hold an exclusive lock on run_dir/.launch.lock for this process's life: one writer per run folder."""
    path = run_dir / ".launch.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise KnobError(f"{run_dir} is in use by another launch (pid {holder}); wait for it to end, "
                        "or set another EXP_NAME") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.rsplit("_", 1)[1]) for p in (run_dir / "checkpoints").glob("global_step_*")
                  if p.name.rsplit("_", 1)[1].isdigit())


def incomplete_steps(run_dir: Path) -> list[Path]:
    """Step folders newer than the last one verl recorded as complete (its tracker file is written after a
    step's checkpoint is whole): a run that died while saving leaves one behind."""
    from isreshape_verl.launch.diagnose import TRACKER

    tracker = run_dir / "checkpoints" / TRACKER
    try:
        last = int(tracker.read_text().strip())
    except (OSError, ValueError):
        last = 0
    return [run_dir / "checkpoints" / f"global_step_{s}" for s in checkpoint_steps(run_dir) if s > last]


def _settings(knobs: Knobs, extra: list[str]) -> dict:
    """What launch.json records: the knobs and trailing overrides that decide what is computed."""
    return {"dataset": knobs.dataset, "loss": knobs.loss,
            "knobs": {k: v for k, v in sorted(knobs.values.items()) if k not in RESUMABLE_KNOBS},
            "overrides": [o for o in extra if not _resumable_override(o)]}


def _resumable_override(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE_KEYS)


def refuse_changed_resume(run_dir: Path, knobs: Knobs, extra: list[str], err: TextIO) -> None:
    """verl resumes a run folder's latest checkpoint on its own (trainer.resume_mode=auto), optimizer state
    included: a setting changed since would be silently ignored. Refuse, naming the first difference."""
    steps = checkpoint_steps(run_dir)
    if not steps or any(o.split("=", 1) == ["trainer.resume_mode", "disable"] for o in extra):
        return
    record = run_dir / "launch.json"
    if not record.is_file():
        print(f"warning: {run_dir} has checkpoints (global_step_{steps[-1]}) but no launch.json; verl resumes "
              "them without a check that the settings are the same", file=err)
        return
    before, now = json.loads(record.read_text()), _settings(knobs, extra)
    where = (f"EXP_NAME='{knobs['EXP_NAME']}' has checkpoints up to global_step_{steps[-1]} in {run_dir}, which "
             "verl resumes (optimizer state included)")
    fix = (f"set another EXP_NAME, or remove {run_dir}/checkpoints to start over (STEPS, EPOCHS, TEST_FREQ, "
           "SAVE_FREQ and the loggers may change on a resume)")
    for name in sorted(set(before["knobs"]) | set(now["knobs"])):
        old, new = before["knobs"].get(name, "(unset)"), now["knobs"].get(name, "(unset)")
        if old != new:
            raise KnobError(f"{where}; they were made with {name}={old}, now {name}={new}: the change would be "
                            f"ignored; {fix}")
    for what in ("dataset", "loss", "overrides"):
        if before[what] != now[what]:
            raise KnobError(f"{where}; they were made with {what} {before[what]}, now {now[what]}: the change "
                            f"would be ignored; {fix}")


def keep_old_metrics(run_dir: Path, out: TextIO) -> None:
    """verl's file logger truncates metrics.jsonl (a resumed run, a rerun): keep the previous one."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        kept = run_dir / f"metrics.{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.jsonl"
        metrics.rename(kept)
        print(f"# the previous metrics.jsonl is kept as {kept}", file=out)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---- the run's processes ----
def processes_of(marker: str, ray_tmp: str | None = None, variable: str = RUN_MARKER) -> list[int]:
    """pids of the processes whose environment has `variable`=`marker` exactly, or whose command line names
    `ray_tmp`."""
    found = []
    needle = f"\0{variable}={marker}\0".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in b"\0" + (entry / "environ").read_bytes() or (
                    ray_tmp and ray_tmp.encode() in (entry / "cmdline").read_bytes()):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            pass
    return found


def stop_processes(marker: str, ray_tmp: str | None = None, grace: float = 3.0, variable: str = RUN_MARKER) -> int:
    """SIGTERM every process `processes_of` finds, SIGKILL what is left after `grace` s, until none is left;
    returns how many there were. Ray's agents can outlive the raylet, so this looks again after each round."""
    seen: set[int] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = processes_of(marker, ray_tmp, variable)
        if not pids:
            break
        seen.update(pids)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + grace
            while time.monotonic() < end and any(_alive(p) for p in pids):
                time.sleep(0.1)
    return len(seen)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


# ---- the console: a line per step ----
STEP_LINE = re.compile(r"step:(\d+) - (.*)")


def step_summary(line: str, total: str) -> str | None:
    """verl's console-logger line `step:N - key:value - ...` as one short line, or None for other lines."""
    match = STEP_LINE.search(line)
    if not match:
        return None
    values = {}
    for item in match.group(2).split(" - "):
        key, _, value = item.rpartition(":")
        values[key] = value
    parts = [f"step {match.group(1)}/{total or '?'}"]
    for label, key in (("time", "timing_s/step"), ("score", "critic/score/mean"), ("ppo_kl", "actor/ppo_kl")):
        if key in values:
            parts.append(f"{label} {_short(values[key])}" + (" s" if label == "time" else ""))
    for key, value in values.items():
        if key.startswith("val-core/") and "/acc/" in key:
            parts.append(f"val acc {_short(value)}")
    return "  ".join(parts)


def _short(value: str) -> str:
    """A logged number, short: '0.125', also from numpy's repr ('np.float64(0.125)')."""
    value = re.sub(r"^np\.\w+\((.*)\)$", r"\1", value)
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def final_validation(run_dir: Path) -> str:
    """'val acc 0.47 at step 60' from metrics.jsonl, or '' when no validation was logged."""
    last = None
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            accs = [v for k, v in row["data"].items() if k.startswith("val-core/") and "/acc/" in k]
            if accs:
                last = (row["step"], accs[0])
    except (OSError, ValueError, KeyError):
        return ""
    return f"; val acc {last[1]:.4g} at step {last[0]}" if last else ""


def child_environment(knobs: Knobs, run_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """verl's environment: `env`, a fresh RUN_MARKER, verl's metrics file and TensorBoard folder in `run_dir`,
    and on CPU the CPU mode (verl's VERL_USE_EXTERNAL_MODULES hook)."""
    child_env = {**env, RUN_MARKER: uuid.uuid4().hex, "VERL_FILE_LOGGER_PATH": f"{run_dir}/metrics.jsonl",
                 "TENSORBOARD_DIR": f"{run_dir}/tensorboard"}
    if knobs.cpu:
        from isreshape_verl.launch.overrides import CPU_MODULE

        old = env.get("VERL_USE_EXTERNAL_MODULES")
        child_env["VERL_USE_EXTERNAL_MODULES"] = CPU_MODULE + (f",{old}" if old else "")
        if knobs["ROLLOUT"] == "vllm":
            child_env["VLLM_TARGET_DEVICE"] = "cpu"
    return child_env


class EarlyStart:
    """verl's process, started before the launcher's config check through `isreshape_verl.launch.early`: it
    imports verl (about 5 s on a CPU) while the launcher checks, then waits. `go()` lets it run `cmd` and returns
    it; `stop()` ends it when it never ran (a failed check, a refused launch, Ctrl-C). The CPU recipes use it,
    where start-up is most of a short run; a GPU launch starts `cmd` itself, as before."""

    def __init__(self, cmd: list[str], child_env: dict[str, str]):
        from isreshape_verl.launch.early import GO

        self.env, self.ran, self._go = child_env, False, GO
        self.proc = subprocess.Popen([cmd[0], "-m", "isreshape_verl.launch.early", *cmd[2:]],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=child_env, text=True, errors="replace", bufsize=1)

    def go(self) -> subprocess.Popen:
        self.ran = True
        try:
            self.proc.stdin.write(self._go + "\n")
            self.proc.stdin.close()
        except BrokenPipeError:  # it failed while importing: its output and exit status say why
            pass
        self.proc.stdin = None  # as a process started without a stdin pipe (communicate() would flush it)
        return self.proc

    def stop(self) -> None:
        if not self.ran:
            self.proc.kill()
            self.proc.communicate()


def launch(knobs: Knobs, cmd: list[str], run_dir: Path, ray_tmp: str | None, extra: list[str],
           env: Mapping[str, str], out: TextIO, err: TextIO, early: EarlyStart | None = None) -> int:
    """Run `cmd` in `run_dir` (already checked), or let `early` run it; returns its exit status (130 / 143
    after a signal)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(run_dir)
    try:
        refuse_changed_resume(run_dir, knobs, extra, err)
        from isreshape_verl.launch.diagnose import checkpoint_problem

        problem = checkpoint_problem(run_dir / "checkpoints")
        if problem:
            raise KnobError(problem)
        keep_old_metrics(run_dir, out)
        write_atomically(run_dir / "command.sh", shell_command(cmd))
        write_atomically(run_dir / "launch.json", json.dumps(_settings(knobs, extra), indent=1) + "\n")
        return _supervise(knobs, cmd, run_dir, ray_tmp, env, out, err, early)
    finally:
        os.close(lock)


def _supervise(knobs: Knobs, cmd: list[str], run_dir: Path, ray_tmp: str | None, env: Mapping[str, str],
               out: TextIO, err: TextIO, early: EarlyStart | None = None) -> int:
    child_env = early.env if early else child_environment(knobs, run_dir, env)
    marker = child_env[RUN_MARKER]
    verbose = knobs["VERBOSE"] == "1"
    print(f"# run dir: {run_dir} (metrics.jsonl, tensorboard/, checkpoints/, train.log)", file=out)
    if knobs.cpu:
        from isreshape_verl.launch.overrides import rollout_name

        print(f"# DEVICE=cpu: rollout {knobs['ROLLOUT']} ({rollout_name(knobs)}), {knobs['GPUS_PER_NODE']} logical "
              f"GPU(s)" + (f", Ray in {ray_tmp}" if ray_tmp else f" per node x {knobs['NNODES']} node(s) of the Ray "
                           f"cluster at {env.get('RAY_ADDRESS')}"), file=out)
    if not verbose:
        print("# starting verl (Ray, workers, validation before training); its whole output goes to train.log, "
              "VERBOSE=1 shows it here", file=out)
    out.flush()
    started = time.monotonic()
    signalled: list[tuple[int, float]] = []  # (signal, when)

    proc: subprocess.Popen | None = None

    def on_signal(signum, frame):  # the terminal's Ctrl-C reaches verl too; a kill of this process alone does not
        if not signalled:
            signalled.append((signum, time.monotonic()))
            try:
                if proc is not None:
                    proc.send_signal(signum)
            except ProcessLookupError:
                pass

    tail: deque[str] = deque(maxlen=2000)
    printed: set[str] = set()
    log_errors: list[OSError] = []

    def pump(log: TextIO) -> None:
        for line in proc.stdout:
            if not log_errors:  # a full disk must not stop the reading: verl would block on a full pipe
                try:
                    log.write(line)
                    log.flush()
                except OSError as exc:
                    log_errors.append(exc)
            tail.append(line)
            shown = line if verbose else step_summary(line, knobs["STEPS"])
            if shown and not verbose:
                if shown in printed:  # a joined Ray cluster can relay a worker's line twice
                    continue
                printed.add(shown)
            if shown:
                out.write(shown if verbose else shown + "\n")
                out.flush()

    watch, dead, dead_at, next_look = None, [], 0.0, 0.0
    if not ray_tmp and env.get("RAY_ADDRESS"):  # a joined cluster: a node of it may die under the run
        from isreshape_verl.launch.cluster import NodeWatch

        try:
            watch = NodeWatch(env["RAY_ADDRESS"])
        except Exception as exc:  # the run itself will say what is wrong with the cluster
            print(f"# not watching the cluster's nodes: {type(exc).__name__}: {exc}", file=out)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc = early.go() if early else subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                         env=child_env, text=True, errors="replace", bufsize=1)
        if signalled:  # a signal while it started
            proc.send_signal(signalled[0][0])
        with open(run_dir / "train.log", "w") as log:
            reader = threading.Thread(target=pump, args=(log,), daemon=True)
            reader.start()
            while True:
                try:
                    status = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if signalled and time.monotonic() > signalled[0][1] + STOP_WAIT:
                        proc.kill()  # verl did not stop on its own
                    if watch and not dead and time.monotonic() > next_look:
                        next_look, dead = time.monotonic() + NODE_LOOK, watch.dead()
                        dead_at = time.monotonic()
                    if dead and time.monotonic() > dead_at + NODE_WAIT:
                        proc.kill()  # verl waits on the dead node
            reader.join(timeout=5)  # Ray's daemons may hold the pipe open until they are stopped below
    finally:
        stopped = stop_processes(marker, ray_tmp)
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        for s, handler in previous.items():
            signal.signal(s, handler)
    minutes = (time.monotonic() - started) / 60
    if signalled:
        name = "Ctrl-C" if signalled[0][0] == signal.SIGINT else "SIGTERM"
        print(f"interrupted ({name}): the run stopped after {minutes:.1f} min, {stopped} of its processes "
              f"stopped; what it wrote is in {run_dir}", file=err)
        return 128 + signalled[0][0]
    if log_errors:
        print(f"warning: train.log is incomplete: writing it failed ({log_errors[0]})", file=err)
    if status != 0 and watch and not dead:
        dead = watch.dead()
    if status != 0 and dead:
        partial = incomplete_steps(run_dir)
        steps = [s for s in checkpoint_steps(run_dir) if run_dir / "checkpoints" / f"global_step_{s}" not in partial]
        print(f"error: node {', '.join(dead)} of the Ray cluster at RAY_ADDRESS='{env['RAY_ADDRESS']}' died during "
              f"the run (its raylet is gone) and the run stopped after {minutes:.1f} min; rerun the same command "
              f"when the cluster has its {knobs['NNODES']} nodes again to resume from "
              f"{f'global_step_{steps[-1]}' if steps else 'step 0 (no checkpoint: SAVE_FREQ)'}; see "
              f"{run_dir / 'train.log'}", file=err)
        return status if status > 0 else 1
    if status != 0:
        from isreshape_verl.launch.diagnose import failure_line

        partial = incomplete_steps(run_dir)
        it = "them" if len(partial) > 1 else "it"
        note = (f"; {', '.join(p.name for p in partial)} in {run_dir}/checkpoints "
                f"{'are' if len(partial) > 1 else 'is'} incomplete (verl will not resume {it}): remove {it}"
                if partial else "")
        print(f"error: {failure_line(''.join(tail), run_dir)}{note}", file=err)
        return status
    steps = checkpoint_steps(run_dir)
    print(f"done: {run_dir} in {minutes:.1f} min{final_validation(run_dir)}"
          + (f"; checkpoints up to global_step_{steps[-1]}" if steps else ""), file=out)
    return 0
