"""One line saying what went wrong with a verl run, and the checks that catch two causes before it starts.

A verl run that fails prints thousands of lines and ends in a Ray/Hydra traceback; the launcher prints
`error: <failure_line(...)>` instead, and calls the two checks before it starts verl:

    failure_line(log_text, run_dir)     after a non-zero exit: disk full, a damaged checkpoint, a Ray worker
                                        killed (by Ray's memory monitor or the OS), a Ray node gone (its raylet
                                        killed), MODEL not downloadable; otherwise the last exception line; each
                                        names train.log
    model_problem(model, env)           a hub id MODEL that is neither cached nor reachable (verl needs ~80 s
                                        to fail on it; this takes seconds)
    checkpoint_problem(checkpoints_dir) the step verl would resume from has a damaged or missing file

Each pattern of `failure_line` was read off a real train.log of verl 0.9.1 on CPU (Ray 2.x, torch 2.13);
excerpts are kept in tests/fixtures/verl_logs/. Pure functions: nothing here starts, stops or changes anything.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
"""The file verl writes after a step's checkpoint is complete; its number is the step verl resumes from
(verl/utils/checkpoint/checkpoint_manager.py, `find_latest_ckpt_path`)."""
HUB_TIMEOUT = 5.0
"""Seconds `model_problem` waits for the Hugging Face hub before it calls it unreachable."""
MAX_LINE = 400
"""Characters a diagnosis keeps of a quoted message."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^\((?P<actor>[\w.:]+) pid=(?P<pid>\d+)(?:, ip=[\d.]+)?\) ")
_EXCEPTION = re.compile(r"^(?P<name>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)"
                        r"(?:\([\w.]+\))?): (?P<message>.*\S)")


# ---- after a failed run ----
def failure_line(log_text: str, run_dir: Path) -> str:
    """One line (no newline) saying what went wrong and where to look, from the output of a verl run that exited
    non-zero (its train.log, or the last part of it).

    The specific causes come first, in the order one can cause the next (a full disk kills a worker, not the other
    way round); then the last exception the log shows, Ray's wrappers (`RayTaskError(...)`) skipped for the
    exception they wrap.
    """
    lines = [_ANSI.sub("", line).rstrip() for line in log_text.splitlines()]
    see = f"see {Path(run_dir) / 'train.log'}"
    for diagnose in (_disk_full, _damaged_checkpoint, _model_download, _ray_oom, _node_died, _worker_died):
        found = diagnose(lines)
        if found:
            return _one_line(f"{found}; {see}")
    last = _last_exception(lines)
    if last:
        return _one_line(f"{last}; {see}")
    return f"verl exited without an exception in its output; {see}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _short(text: str) -> str:
    text = _one_line(text)
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"


def _bare(line: str) -> str:
    """A log line without Ray's `(Actor pid=N)` prefix."""
    return _RAY_PREFIX.sub("", line)


def _last_exception(lines: list[str]) -> str | None:
    """`Name: message` of the last exception raised in the log, Ray's wrappers skipped when a cause follows."""
    found = None
    for line in lines:
        m = _EXCEPTION.match(_bare(line))
        if m:
            found = m
    if found is None:
        return None
    name = found["name"]
    if name.startswith("ray.exceptions.RayTaskError("):  # a wrapper whose cause was not in the log
        name = name[len("ray.exceptions.RayTaskError("):-1]
    return f"{name}: {_short(found['message'])}"


_NO_SPACE = re.compile(r"No space left on device|\[Errno 28\]|ENOSPC|unexpected pos \d+ vs \d+")
_SAVING = re.compile(r"(?:Saving checkpoint to|local_global_step_folder:) (?P<step_dir>/\S+?/global_step_\d+)\b")
_RESUMING = re.compile(r"Resuming from (?P<step_dir>/\S+?/global_step_\d+)\b")
_STATE_FILES = {"model": "model_world_size_*_rank_*.pt", "optimizer": "optim_world_size_*_rank_*.pt",
                "extra": "extra_state_world_size_*_rank_*.pt", "dataloader": "data.pt"}
"""The state a traceback's torch.save / torch.load line handles (`torch.save(optimizer_state_dict, optim_path)`,
`dataloader_state_dict = torch.load(dataloader_local_path, ...)`) -> its file in a step folder, as verl 0.9.1
names them (verl/utils/checkpoint/fsdp_checkpoint_manager.py, the trainer's `_save_checkpoint`)."""


def _disk_full(lines: list[str]) -> str | None:
    """A write into a full file system. torch.save fails with `RuntimeError: [enforce fail at
    inline_container.cc:672] . unexpected pos 510976 vs 510868` (after `basic_ios::clear: iostream error`), other
    writers with `OSError: [Errno 28] No space left on device: '<path>'`, the recipe's tee with
    `tee: <path>: No space left on device`. The file: the one the error names, else the one the traceback's
    torch.save call writes in the step folder of the last `Saving checkpoint to <folder>` line."""
    hits = [i for i, line in enumerate(lines) if _NO_SPACE.search(line)]
    if not hits:
        return None
    raised = [i for i in hits if _EXCEPTION.match(_bare(lines[i]))]
    hit = raised[-1] if raised else hits[0]
    line = _bare(lines[hit]).strip()
    m = re.search(r"\[Errno 28\][^:]*: '(?P<path>[^']+)'", line) or re.match(r"tee: (?P<path>.+?): No space", line)
    path = m["path"] if m else None
    if path is None:
        saving = [m["step_dir"] for text in lines[:hit] if (m := _SAVING.search(text))]
        if saving:
            path = str(_state_file(lines, hit, Path(saving[-1]), "save"))
    where = f"cannot write {path}" if path else "cannot write to the run's file system"
    return f"disk full: {where} ({_short(line)}): free space there, or set RUN_ROOT to a file system with room"


def _state_file(lines: list[str], hit: int, step_dir: Path, verb: str) -> Path:
    """The checkpoint file in step_dir that the traceback ending at line `hit` was saving or loading (verb)."""
    for text in reversed(lines[max(0, hit - 60):hit]):
        if f"torch.{verb}(" in text:
            state = next((s for s in _STATE_FILES if f"{s}_" in text), None)
            if state == "dataloader":
                return step_dir / _STATE_FILES[state]
            if state:
                role = "critic" if any(f"critic_{verb}_checkpoint" in t for t in lines[:hit]) else "actor"
                return step_dir / role / _STATE_FILES[state]
    return step_dir


_STREAM_READER = re.compile(r"PytorchStreamReader failed (?P<what>[^.]*)")


def _damaged_checkpoint(lines: list[str]) -> str | None:
    """verl resumed a step whose torch file does not open: `RuntimeError: PytorchStreamReader failed reading zip
    archive: failed finding central directory`. The log names the step folder (`Resuming from <folder>`), not the
    file: the file is found on disk when the folder is still there, else named by the traceback's torch.load line."""
    hit = next((i for i, line in enumerate(lines) if _STREAM_READER.search(line)), None)
    if hit is None:
        return None
    why = f"PytorchStreamReader failed {_STREAM_READER.search(lines[hit])['what'].strip()}"
    resumed = [m["step_dir"] for line in lines[:hit] if (m := _RESUMING.search(line))]
    if not resumed:
        return f"a checkpoint file is damaged ({why}): remove the step folder verl resumed, or start a new EXP_NAME"
    step_dir = Path(resumed[-1])
    if step_dir.is_dir():
        problem = _step_problem(step_dir)
        if problem:
            return problem
    return f"checkpoint {_state_file(lines, hit, step_dir, 'load')} is damaged ({why}): {_resume_advice(step_dir)}"


_DOWNLOAD = (  # the line to quote, best first
    re.compile(r"We couldn't connect to '[^']+' to load the files"),
    re.compile(r"is not a local folder and is not a valid model identifier|gated repo|RepositoryNotFoundError: .*"),
    re.compile(r"LocalEntryNotFoundError: .*|OfflineModeIsEnabled: .*"),
)
_MODEL_ID = (
    re.compile(r"'actor_rollout_ref\.model\.path=(?P<model>[^']+)'"),
    re.compile(r"requesting \w+ https?://[^/\s]+/(?P<model>[^/\s]+/[^/\s]+)/resolve/"),
    re.compile(r"'path': '(?P<model>[^'/~.][^']*)'"),
)


def _model_download(lines: list[str]) -> str | None:
    """MODEL is a hub id the workers could neither find in the Hugging Face cache nor download: transformers'
    `OSError: We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the
    cached files.` (after huggingface_hub's `LocalEntryNotFoundError` and ~80 s of retries), or `... is not a local
    folder and is not a valid model identifier ...` for an id the hub does not have. MODEL is read from Hydra's
    `Error executing job with overrides: [...]` line, else from the URL the retries requested."""
    hit = next((line for pattern in _DOWNLOAD for line in lines if pattern.search(line)), None)
    if hit is None:
        return None
    model = next((m["model"] for pattern in _MODEL_ID for line in lines if (m := pattern.search(line))), "?")
    return (f"cannot download MODEL={model} ({_short(_bare(hit).strip())}): download it first "
            f"(`hf download {model}`) or point MODEL at a local folder")


def _ray_oom(lines: list[str]) -> str | None:
    """Ray's memory monitor killed a worker: `ray.exceptions.OutOfMemoryError: 1 worker(s) were killed due to the
    node running low on memory. Memory on the node (...) was 1.90GB used / 23.54GB limit (0.080907)`, then
    `OOM kill reason: ... (2.0% of 25276182528B limit)` and `Selected to kill: (Task: ..., task name=X, ..., pid=N`.
    Older Ray says `... where the lease (lease ID: ..., name=<id>WorkerDict_0:0:WorkerDict.__init__, pid=N, ...) was
    running was 59.84GB / 62.51GB (0.957347), which exceeds the memory usage threshold of 0.95`, also as an
    ActorDiedError's `Worker exit detail` or a raylet line."""
    hit = next((i for i in range(len(lines) - 1, -1, -1) if "killed due to the node running low on memory"
                in lines[i]), None)
    if hit is None:
        return None
    text = "\n".join(lines[hit:hit + 80])
    usage = re.search(r"was ([\d.]+ ?GB(?: used)? / [\d.]+ ?GB(?: limit)?) \(([\d.]+)\)", text)
    threshold = re.search(r"exceeded threshold of \d+B \(([\d.]+%)|memory usage threshold of ([\d.]*\d)", text)
    task = re.search(r"\b(?:task name|name)=([^,\s]+),.*?\bpid=(\d+)", text)
    who = f"{task[1].rsplit(':', 1)[-1]} (pid {task[2]})" if task else "a worker"
    detail = f"node memory {usage[1]}" if usage else "node memory"
    if threshold:
        detail += f" over its threshold {threshold[1] or threshold[2]}"
    return f"out of memory: Ray's memory monitor killed {who}, {detail}; free memory there, or use smaller batches"


def _node_died(lines: list[str]) -> str | None:
    """A node of the Ray cluster went away under the run: its raylet ended (kill -9 of the node's Ray processes,
    the OS's OOM killer, the machine down). The driver's log says `(raylet) Raylet is terminated. Termination is
    unexpected. Possible reasons include: (1) SIGKILL by the user or system OOM killer, ...` (without the node's
    address), and verl then stops on whatever call reached that node first, e.g. `ray.exceptions.
    ActorUnavailableError: The actor ... is unavailable: ... Socket closed` or gloo's `Connection closed by peer`.
    On a joined cluster the launcher names the node itself (cluster.NodeWatch)."""
    if not any("Raylet is terminated. Termination is unexpected" in line for line in lines):
        return None
    last = _last_exception(lines)
    stopped = f": verl stopped with {last.split(':', 1)[0]}" if last else ""
    return (f"a node of the Ray cluster died under the run (a raylet was terminated unexpectedly: kill -9, the OS's "
            f"OOM killer, or the machine went down){stopped}; rerun the same command to resume from the last "
            "checkpoint once the cluster has its nodes again")


def _worker_died(lines: list[str]) -> str | None:
    """A Ray worker process ended without raising (kill -9, the OS's OOM killer, a segfault): the driver's
    `ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.` lists its
    `class_name: create_colocated_worker_cls.<locals>.WorkerDict` and `pid: N`, then Ray's `Worker exit detail: ...`;
    the raylet's `A worker died or was killed while executing a task ...` line (`Worker PID: N`) stands in for it
    when the driver's part is missing."""
    # only a death without an error: an actor whose creation task raised is told by the last exception
    died = [i for i, line in enumerate(lines) if "ActorDiedError" in line and "died unexpectedly" in line]
    block = lines[died[-1]:died[-1] + 12] if died else [
        line for line in lines if "A worker died or was killed" in line][-1:]
    if not block:
        return None
    text = "\n".join(block)
    actor = re.search(r"class_name: (?:[\w<>]+\.)*(\w+)", text)
    pid = re.search(r"(?:\tpid: |Worker PID: )(\d+)", text)
    detail = re.search(r"Worker exit detail: (.*?)(?:\. Some common causes|\. There are some potential|$)", text, re.M)
    who = ", ".join(x for x in (actor and actor[1], pid and f"pid {pid[1]}") if x) or "?"
    cause = _short(detail[1]) if detail else "it ended without raising an error"
    return (f"a Ray worker died ({who}): {cause}; it was killed (kill -9, or the OS's OOM killer: see dmesg) "
            "or it crashed")


# ---- before a resume ----
_RANK_FILE = re.compile(r"^(?P<kind>model|optim|extra_state)_world_size_(?P<world>\d+)_rank_(?P<rank>\d+)\.pt$")


def checkpoint_problem(checkpoints_dir: Path) -> str | None:
    """What would stop verl resuming from `checkpoints_dir` (trainer.default_local_dir), or None.

    verl 0.9.1 resumes (trainer.resume_mode=auto) from exactly the step its tracker file names: it reads
    `latest_checkpointed_iteration.txt` with `int(...)` and loads `global_step_<N>/` (actor/, critic/, data.pt);
    with no tracker it trains from scratch, and when the tracker's folder is missing it trains from scratch too,
    silently (verl/utils/checkpoint/checkpoint_manager.py `find_latest_ckpt_path`, verl/trainer/ppo/v1/
    trainer_base.py `_load_checkpoint`). The tracker is written after a step's files, so a `global_step_M` folder
    newer than the tracker (a crash while saving) is never read; verl overwrites it when it saves step M again.

    So only the tracker's step is checked, cheaply (no tensor is read): the tracker parses; its folder exists and
    has every rank's model/optim/extra_state file and the files the previous step has; each torch file's zip central
    directory opens; each safetensors header parses and covers the file; each JSON file parses.
    """
    checkpoints_dir = Path(checkpoints_dir)
    tracker = checkpoints_dir / TRACKER
    if not tracker.is_file():
        return None
    raw = tracker.read_bytes()
    try:
        step = int(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return (f"checkpoint tracker {tracker} reads {raw[:40]!r}, not a step number, so verl cannot resume: write "
                f"the last complete step into it, or start a new EXP_NAME")
    step_dir = checkpoints_dir / f"global_step_{step}"
    if not step_dir.is_dir():
        return (f"checkpoint tracker {tracker} names global_step_{step}, which is missing, so verl would silently "
                f"train from step 0: {_resume_advice(step_dir, missing=True)}")
    return _step_problem(step_dir)


def _step_problem(step_dir: Path) -> str | None:
    """The first damaged or missing file of one `global_step_N` folder, as a line with what to do, or None."""
    found = _damage(step_dir)
    if found is None:
        return None
    file, why = found
    return f"checkpoint {file} is {why}: {_resume_advice(step_dir)}"


def _damage(step_dir: Path) -> tuple[Path, str] | None:
    """(file, 'damaged (reason)' or 'missing (reason)') for the first problem in step_dir, or None."""
    if not (step_dir / "actor").is_dir():
        return step_dir / "actor", "missing (verl loads the actor from it)"
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    ranks: dict[tuple[str, str, int], set[int]] = {}
    for p in files:
        m = _RANK_FILE.match(p.name)
        if m:
            ranks.setdefault((str(p.parent), m["kind"], int(m["world"])), set()).add(int(m["rank"]))
    for (folder, kind, world), have in sorted(ranks.items()):
        lacking = sorted(set(range(world)) - have)
        if lacking:
            return (Path(folder) / f"{kind}_world_size_{world}_rank_{lacking[0]}.pt",
                    f"missing ({len(have)} of {world} ranks saved)")
    previous = _earlier_steps(step_dir)
    if previous:
        earlier = previous[0]
        have = {_kind(p.relative_to(step_dir)) for p in files}
        lacking = sorted(rel for p in earlier.rglob("*") if p.is_file()
                         and _kind(rel := p.relative_to(earlier)) not in have)
        if lacking:
            return step_dir / lacking[0], f"missing ({earlier.name} has it)"
    for p in files:
        why = file_damage(p)
        if why:
            return p, f"damaged ({why})"
    return None


def _kind(relative: Path) -> Path:
    """A file's place in a step folder, its world size and rank left out (`actor/model`, `data.pt`)."""
    m = _RANK_FILE.match(relative.name)
    return relative.parent / m["kind"] if m else relative


def file_damage(path: Path) -> str | None:
    """Why a checkpoint file cannot be loaded, from its framing only (no tensor is read), or None.

    torch.save writes a zip archive whose central directory is at the end, so a truncated file loses it first;
    safetensors starts with an 8-byte header length and a JSON header whose offsets must end at the file's end.
    """
    size = path.stat().st_size
    suffix = path.suffix
    if suffix in (".pt", ".pth", ".bin") or path.name.endswith(".distcp"):
        if size == 0:
            return "empty file"
        try:
            with zipfile.ZipFile(path) as archive:
                end = max((i.header_offset + i.compress_size for i in archive.infolist()), default=0)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            return f"{size} bytes, its zip directory does not open: {e}"
        if end > size:
            return f"{size} bytes, its zip directory lists data up to byte {end}"
        return None
    if suffix == ".safetensors":
        return _safetensors_damage(path, size)
    if suffix == ".json":
        try:
            json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            return f"not valid JSON: {e}"
    return None


def _safetensors_damage(path: Path, size: int) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return f"{size} bytes, its header alone says {8 + length}"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as e:
            return f"its safetensors header is not JSON: {e}"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"{size} bytes, its header says {8 + length + end}"
    return None


def _earlier_steps(step_dir: Path) -> list[Path]:
    """The `global_step_M` folders beside step_dir with M < N, newest first."""
    n = _step_number(step_dir)
    steps = [p for p in step_dir.parent.glob("global_step_*") if p.is_dir() and (m := _step_number(p)) is not None
             and m < n]
    return sorted(steps, key=_step_number, reverse=True)


def _step_number(path: Path) -> int | None:
    tail = path.name.rsplit("_", 1)[-1]
    return int(tail) if path.name.startswith("global_step_") and tail.isdigit() else None


def _resume_advice(step_dir: Path, missing: bool = False) -> str:
    """What to do when step_dir cannot be resumed: go back to the newest earlier step that is whole, or start over."""
    tracker = step_dir.parent / TRACKER
    remove = "" if missing else f"remove {step_dir} and "
    if not step_dir.parent.is_dir():  # named by a log, not on this machine
        return f"{remove}write an earlier step into {tracker} to resume from it, or start a new EXP_NAME"
    whole = next((p for p in _earlier_steps(step_dir) if _damage(p) is None), None)
    if whole is not None:
        return (f"{remove}write {_step_number(whole)} into {tracker} to resume from {whole.name}, "
                f"or start a new EXP_NAME")
    return f"remove {step_dir.parent} to start over, or start a new EXP_NAME"


# ---- before the launch ----
def model_problem(model: str, env: Mapping[str, str] = os.environ) -> str | None:
    """Why verl could not get MODEL, or None; takes seconds (verl itself needs ~80 s to fail on it).

    A local folder, or an `hdfs://` path, is not looked at here (the launcher checks local folders). A hub id is
    fine when the Hugging Face cache has its config.json at the `main` revision (HF_HUB_CACHE, HF_HOME, the
    default ~/.cache/huggingface/hub, read from `env`, as verl's workers will); otherwise it is a problem when the
    hub is off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), cannot be reached within HUB_TIMEOUT seconds (HF_ENDPOINT),
    or does not know the id.
    """
    if model.startswith(("/", ".", "~", "hdfs://")) or os.path.exists(model):
        return None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    cache = hub_cache(env)
    fix = f"download it first (`hf download {model}`, which fills {cache}) or point MODEL at a local folder"
    try:
        cached = try_to_load_from_cache(model, "config.json", cache_dir=cache)
    except ValueError as e:  # huggingface_hub's repo id validation
        return f"MODEL={model} is neither a local folder nor a Hugging Face model id ({_short(str(e))})"
    if isinstance(cached, str):
        return None
    offline = next((k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                    if env.get(k, "").upper() in ENV_VARS_TRUE_VALUES), None)
    if offline:
        return f"MODEL={model} is not in the Hugging Face cache {cache} and {offline}={env[offline]}: {fix}"
    endpoint = (env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    why = _hub_lookup(model, endpoint, env.get("HF_TOKEN") or None)
    if why is None:
        return None
    return f"MODEL={model} is not in the Hugging Face cache {cache} and {why}: {fix}"


def hub_cache(env: Mapping[str, str]) -> str:
    """The Hugging Face hub cache folder that `env` gives verl's workers (huggingface_hub.constants' rules)."""
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    home = os.path.expandvars(os.path.expanduser(home))
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(cache))


def _hub_lookup(model: str, endpoint: str, token: str | None) -> str | None:
    """Why the hub at `endpoint` does not give `model`, or None when it does. Runs in a thread so that a slow DNS
    lookup, which no HTTP timeout covers, cannot hold the launch much longer than HUB_TIMEOUT."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    result: list[str | None] = []

    def ask() -> None:
        try:
            HfApi(endpoint=endpoint, token=token).model_info(model, timeout=HUB_TIMEOUT)
            result.append(None)
        except GatedRepoError:
            result.append(f"{endpoint} says it is gated (accept its licence there and set HF_TOKEN)")
        except RepositoryNotFoundError:
            result.append(f"{endpoint} has no such model (or it is private: set HF_TOKEN)")
        except Exception as e:  # noqa: BLE001 - any failure to reach the hub is the answer
            result.append(f"{endpoint} cannot be reached ({type(e).__name__}: {_short(str(e))})")

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT + 1)
    if not result:
        return f"{endpoint} did not answer within {HUB_TIMEOUT + 1:.0f} s"
    return result[0]
