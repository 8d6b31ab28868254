"""`isreshape-verl compare` on bad input, as a user finds it from a fresh clone: every case is one error line that
names the bad value and what is allowed, exit status 2 (130 Ctrl-C, 143 SIGTERM), nothing half-written, finished
runs intact, and no folder left behind that the failed command created.

One tiny comparison (smoke preset, 1 loss × lags 0 and 2, a 25-step warm start shared through a module-wide cache)
is made once and copied into the tests that need a folder of finished or interrupted runs."""

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from isreshape_verl.testing.files import small_disk as small_disk_fixture

from isreshape_verl.sandbox.cli import main

TINY = ["--preset", "smoke", "--losses", "vanilla", "--no-progress", "--warm-max-steps", "25"]
BASE = TINY + ["--jobs", "1", "--lags", "0", "2"]
RUNS = ("vanilla__lag0__seed0", "vanilla__lag2__seed0")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _shared_cache(cache, monkeypatch):
    monkeypatch.setenv("ISRESHAPE_CACHE", str(cache))


@pytest.fixture(scope="module")
def made(tmp_path_factory, cache):
    """{'finished': a folder of 2 finished runs, 'stopped': the same comparison stopped at step 3 (checkpointed)}."""
    root = tmp_path_factory.mktemp("made")
    old = os.environ.get("ISRESHAPE_CACHE")
    os.environ["ISRESHAPE_CACHE"] = str(cache)
    try:
        assert main(BASE + ["--out", str(root / "finished")]) == 0
        assert main(BASE + ["--out", str(root / "stopped"), "--stop-after", "3"]) == 0
    finally:
        os.environ.pop("ISRESHAPE_CACHE") if old is None else os.environ.__setitem__("ISRESHAPE_CACHE", old)
    return {name: root / name for name in ("finished", "stopped")}


def _copy(made, which, tmp_path):
    out = tmp_path / which
    shutil.copytree(made[which], out)
    return out


def _snapshot(out):
    """Every run file's bytes: what a refused command must leave exactly as it was."""
    return {p.relative_to(out): p.read_bytes() for p in sorted((out / "runs").rglob("*")) if p.is_file()}


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("isreshape-verl compare: error: "), lines[0]
    return lines[0]


# ---- refused before any work: flags and input files ------------------------------------------------------------
def _parquet(path, **columns):
    import pandas as pd

    good = {"data_source": ["openai/gsm8k"] * 20,
            "prompt": [[{"role": "user", "content": f"{i}+1=?"}] for i in range(20)],
            "reward_model": [{"style": "rule", "ground_truth": str(i + 1)} for i in range(20)]}
    pd.DataFrame({**good, **columns}).to_parquet(path)
    return str(path)


@pytest.mark.parametrize("case", ["n_train", "lags", "max_staleness", "lags_async", "prompt_type", "reward_type",
                                  "model_without_weights"])
def test_bad_input_is_refused_before_any_work(case, tmp_path, capsys):
    """Rows 8-11 and --max-staleness without --async: one line naming the value and what is allowed; --out and
    the warm-start cache are never created."""
    data = {}
    if case == "prompt_type":
        data = {"--data": _parquet(tmp_path / "p.parquet", prompt=[f"{i}+1=?" for i in range(20)])}
    if case == "reward_type":
        data = {"--data": _parquet(tmp_path / "r.parquet", reward_model=[str(i + 1) for i in range(20)])}
    model = tmp_path / "model"
    if case == "model_without_weights":  # config and tokenizer saved, the weights never were
        from isreshape_verl.sandbox.model import TinyModelArgs, tiny_policy

        policy = tiny_policy(TinyModelArgs(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1), 0)
        policy.model.config.save_pretrained(model)
        policy.tokenizer.save_pretrained(model)
    argv, expected = {
        "n_train": (["--n-train", "1"], "--n-train must be at least 64 (a step samples that many distinct problems: "
                                        "--warm-batch-size 64, --prompts-per-step 8); got 1"),
        "lags": (["--lags", "1000"], "--lags must be at most --steps − 1 = 5 (a larger lag trains on the same "
                                     "initial-policy rollouts as 5, only slower); got 1000"),
        "max_staleness": (["--max-staleness", "2"], "--max-staleness 2 applies only with --async"),
        "lags_async": (["--async", "--lags", "0", "4"], "--lags 0 4 does not apply with --async"),
        "prompt_type": ([], f"--data {data.get('--data')!r}: column prompt is large_string; expected a list of "
                            "chat messages, list<struct<role: string, content: string>>"),
        "reward_type": ([], f"--data {data.get('--data')!r}: column reward_model is large_string; expected "
                            "struct<ground_truth: ...>"),
        "model_without_weights": (["--model", str(model)], f"--model {str(model)!r} has no weights (model.safetensors, "
                                                           "pytorch_model.bin or a sharded *.index.json)"),
    }[case]
    for flag, value in data.items():
        argv += [flag, value]
    out = tmp_path / "new" / "out"
    cache_before = sorted(os.listdir(os.environ["ISRESHAPE_CACHE"]))
    assert main(TINY + argv + ["--out", str(out)]) == 2
    assert expected.replace("large_string", "string") in _one_error_line(capsys).replace("large_string", "string")
    assert not (tmp_path / "new").exists()  # not even the empty folder
    assert sorted(os.listdir(os.environ["ISRESHAPE_CACHE"])) == cache_before


def test_a_small_parquet_says_how_few_test_problems_it_holds_out(tmp_path):
    """GSM8K data of 20 rows holds out 4 test problems, not the 64 asked for: a warning says so, with the count."""
    from isreshape_verl.sandbox.task import parquet_task

    said = []
    task = parquet_task(_parquet(tmp_path / "small.parquet"), 64, 0, log=said.append)
    assert len(task.test) == 4 and len(said) == 1
    assert "4 test problems instead of the 64 asked for" in said[0] and "25.0 accuracy points" in said[0]


# ---- the output folder: overwrite, resume with other settings, damaged run files ----------------------------------
@pytest.mark.parametrize("extra, expected", [
    ([], "already holds 2 run(s) (2 finished, e.g. runs/vanilla__lag0__seed0) that this command would overwrite; "
         "continue them with --resume, choose another --out, or delete the folder to start over"),
    (["--resume", "--lr", "0.001"], "--resume: --lr is 0.001 now but 0.0005 in the runs of"),
    (["--resume", "--preset", "default"], "--resume: --preset is 'default' now but 'smoke' in the runs of"),
], ids=["row4_overwrite", "row2_other_lr", "row3_other_preset"])
def test_a_folder_of_runs_is_neither_overwritten_nor_mixed(extra, expected, made, tmp_path, capsys):
    out = _copy(made, "finished", tmp_path)
    before = _snapshot(out)
    assert main(BASE + extra + ["--out", str(out)]) == 2
    assert expected in _one_error_line(capsys)
    assert _snapshot(out) == before


@pytest.mark.parametrize("which, damage, expected", [
    ("stopped", "checkpoint", "runs/vanilla__lag0__seed0/checkpoint.pt is not a readable checkpoint ("),
    ("finished", "metrics", "runs/vanilla__lag2__seed0/metrics.jsonl, line 3: not a JSON metrics row ("),
], ids=["row5_checkpoint", "row6_metrics"])
def test_resume_names_a_damaged_run_file(which, damage, expected, made, tmp_path, capsys):
    out = _copy(made, which, tmp_path)
    if damage == "checkpoint":
        (out / "runs" / RUNS[0] / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a zip archive")
    else:
        path = out / "runs" / RUNS[1] / "metrics.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:2] + ['{"step": 2, "loss": 0.1\n'] + lines[3:]))
    before = _snapshot(out)
    assert main(BASE + ["--resume", "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert expected in line and "delete" in line, line
    assert _snapshot(out) == before


# ---- a full disk (row 1): /dev/full answers every write with ENOSPC, as a full tmpfs does -------------------------
FULL = "(No space left on device)"
KEPT = "; finished runs and checkpoints are kept, --resume continues"


def _disk_full_line(capsys, named) -> str:
    line = _one_error_line(capsys)
    assert f"error: disk full: cannot write {str(named)!r} {FULL}; free space or choose another folder" in line, line
    return line


def _no_partial_files(out):
    left = [p for p in out.rglob("*") if p.name.endswith(".tmp") or (p.suffix == ".png" and p.stat().st_size == 0)]
    assert not left, left
    assert not (out / "report.md").exists()  # written last: its presence would claim a complete report


def _finished(out, run) -> bool:
    rows = [json.loads(row) for row in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["step"] == 6 and not (out / "runs" / run / "checkpoint.pt").exists()


@pytest.mark.parametrize("site, jobs", [("checkpoint", 1), ("metrics", 1), ("config", 1), ("checkpoint", 2)],
                         ids=["checkpoint", "metrics", "config", "checkpoint_jobs2"])
def test_a_full_disk_during_the_runs_is_one_line_and_keeps_finished_runs(site, jobs, tmp_path, capfd):
    """A write of the second run fails with ENOSPC: its checkpoint or metrics (the first run has finished), or its
    config.json (written before any run starts). One line names the file, from the parent alone (capfd: a worker
    of --jobs 2 writes to the same stderr); finished runs are intact; no temporary or 0-byte file stays."""
    out = tmp_path / "out"
    run2 = out / "runs" / RUNS[1]
    run2.mkdir(parents=True)
    name = {"checkpoint": "checkpoint.pt", "metrics": "metrics.jsonl", "config": "config.json"}[site]
    (run2 / (name if site == "metrics" else name + ".tmp")).symlink_to("/dev/full")
    assert main(BASE + ["--jobs", str(jobs), "--out", str(out)]) == 2
    line = _disk_full_line(capfd, run2 / name)
    if jobs == 1 and site != "config":
        assert line.endswith(KEPT) and _finished(out, RUNS[0])
    if site == "config":  # refused before any run: nothing to keep, nothing to resume
        assert not line.endswith(KEPT) and not list(out.rglob("metrics.jsonl"))
    _no_partial_files(out)


@pytest.mark.parametrize("name", ["accuracy.png", "ratios.png", "g_curves.png", "summary.json", "report.md"])
def test_a_full_disk_while_writing_the_report(name, made, tmp_path, capsys):
    """Every run is finished (`--resume` goes straight to the report); each file of the report meets a full disk in
    turn: one line naming it, the runs untouched, no report.md, and `--resume` writes the report once there is room."""
    out = _copy(made, "finished", tmp_path)
    for written in ("accuracy.png", "ratios.png", "g_curves.png", "summary.json", "report.md"):
        (out / written).unlink()  # as if the comparison had stopped before its report
    before = _snapshot(out)
    (out / f"{name}.tmp").symlink_to("/dev/full")
    assert main(BASE + ["--resume", "--out", str(out)]) == 2
    assert _disk_full_line(capsys, out / name).endswith(KEPT)
    assert _snapshot(out) == before
    _no_partial_files(out)
    assert main(BASE + ["--resume", "--out", str(out)]) == 0 and (out / "report.md").exists()


def test_a_full_disk_when_resume_rewrites_the_metrics(made, tmp_path, capsys):
    """--resume rewrites a stopped run's metrics.jsonl without the rows after its checkpoint; a full disk there
    leaves the run's files as they were."""
    out = _copy(made, "stopped", tmp_path)
    def results():  # config.json records each command that continued the run
        return {k: v for k, v in _snapshot(out).items() if k.name != "config.json"}

    before = results()
    (out / "runs" / RUNS[0] / "metrics.jsonl.tmp").symlink_to("/dev/full")
    assert main(BASE + ["--resume", "--out", str(out)]) == 2
    assert _disk_full_line(capsys, out / "runs" / RUNS[0] / "metrics.jsonl").endswith(KEPT)
    assert results() == before and len(before) == 4  # 2 runs × metrics.jsonl, checkpoint.pt
    _no_partial_files(out)


class _FillsUp(io.RawIOBase):
    """A file on a disk that fills up after `room` bytes: the write that crosses it stores what fits, the next one
    fails with ENOSPC, as on a real full file system (where torch.save then raises RuntimeError 'unexpected pos',
    the ENOSPC only its context; /dev/full refuses the very first byte, which torch reports as the OSError)."""

    def __init__(self, path, room: int):
        self.file, self.room = open(path, "wb", buffering=0), room  # noqa: SIM115 - closed by close()

    def writable(self):
        return True

    def write(self, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        kept = bytes(data[: self.room])
        self.file.write(kept)
        self.room -= len(kept)
        return len(kept)

    def close(self):
        self.file.close()
        super().close()


def _fills_up_at(module, suffix: str, monkeypatch):
    """Make `open` in `module` give a _FillsUp file (4 kB of room) for the path ending in `suffix`."""
    import builtins

    def opener(file, mode="r", *args, **kwargs):
        if str(file).endswith(suffix) and "w" in mode:
            return io.BufferedWriter(_FillsUp(file, 4096))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(module, "open", opener, raising=False)


@pytest.mark.parametrize("where", ["checkpoint", "warm_start"])
def test_a_disk_that_fills_up_inside_torch_save_is_one_line(where, tmp_path, monkeypatch, capsys):
    """torch.save into a file that runs out of room mid-write raises RuntimeError('[enforce fail at
    inline_container.cc] unexpected pos …'): the run's checkpoint and the warm-start cache (a cold one here) name
    the file and the full disk all the same, and leave no partial file."""
    import re

    from isreshape_verl import paths
    from isreshape_verl.sandbox import warmstart

    out = tmp_path / "new" / "out"
    if where == "checkpoint":
        _fills_up_at(paths, f"{RUNS[1]}/checkpoint.pt.tmp", monkeypatch)
        assert main(BASE + ["--out", str(out)]) == 2
        assert _disk_full_line(capsys, out / "runs" / RUNS[1] / "checkpoint.pt").endswith(KEPT)
        assert _finished(out, RUNS[0])
        _no_partial_files(out)
        return
    cold = tmp_path / "cold"
    monkeypatch.setenv("ISRESHAPE_CACHE", str(cold))
    _fills_up_at(warmstart, f".pt.tmp{os.getpid()}", monkeypatch)
    assert main(BASE + ["--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert re.search(rf"disk full: cannot write '{re.escape(str(cold))}/warmstart/[0-9a-f]{{16}}\.pt' "
                     rf"\(No space left on device\); free space or choose another folder$", line), line
    assert sorted(p.suffix for p in (cold / "warmstart").iterdir()) == [".lock"]  # no weights, no .tmp
    assert not (tmp_path / "new").exists()  # no run had started: the --out it created is gone


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs: room for one checkpoint of the smoke model (1.0 MB with its AdamW state), not two."""
    yield from small_disk_fixture(tmp_path / "small")


def test_a_real_full_disk_with_two_workers_is_one_line(small_disk, capfd):
    """The user's case: --out on a file system that fills up while two workers checkpoint (torch's 'unexpected pos'
    in a worker, which then crossed the process boundary as up to 4 tracebacks). One line naming the file, from
    the parent; no temporary file left."""
    import re

    out = small_disk / "out"
    assert main(BASE + ["--jobs", "2", "--out", str(out)]) == 2
    line = _one_error_line(capfd)
    assert re.search(rf"error: disk full: cannot write '{re.escape(str(out))}/runs/vanilla__lag[02]__seed0/"
                     r"(checkpoint\.pt|metrics\.jsonl)' \(No space left on device\); free space or choose another "
                     "folder", line), line
    _no_partial_files(out)


def test_a_full_disk_at_the_lock_file_is_one_line(tmp_path, monkeypatch, capsys):
    """The folder lock records the pid in `.compare.lock`: the first write of a comparison, refused by a full disk
    before any work, naming the file (a failed flush names none)."""
    import builtins

    from isreshape_verl.sandbox import cli

    class FullText:
        """The real lock file (flock works on it), whose writes a full disk refuses."""

        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def opener(file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 - the lock's handle, closed by main
        return FullText(handle) if str(file).endswith(".compare.lock") else handle

    monkeypatch.setattr(cli, "open", opener, raising=False)
    out = tmp_path / "new" / "out"
    assert main(BASE + ["--out", str(out)]) == 2
    assert not _disk_full_line(capsys, out / ".compare.lock").endswith(KEPT)
    assert not (tmp_path / "new").exists()


def test_a_full_disk_at_the_first_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    """The --out probe meets a full disk: one line, and neither the probe file nor the new folder is left."""
    import builtins

    from isreshape_verl import paths

    def full_open(file, mode="r", *args, **kwargs):
        if ".write_test_" in str(file):
            builtins.open(file, mode).close()  # the file is created, as on a full tmpfs; its write then fails
            return builtins.open("/dev/full", mode, *args, **kwargs)
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(paths, "open", full_open, raising=False)
    out = tmp_path / "new" / "out"
    assert main(BASE + ["--out", str(out)]) == 2
    assert f"--out {str(out)!r}: the disk is full (No space left on device)" in _one_error_line(capsys)
    assert not (tmp_path / "new").exists()


# ---- Ctrl-C and SIGTERM (row 7): real signals, so real processes -------------------------------------------------
def _sigint_as_in_a_terminal() -> None:
    """A shell's background job (`pytest &`) starts with SIGINT ignored, which Python and its children keep; a
    terminal's foreground process has it at the default, where Python raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(argv, cache):
    env = {**os.environ, "ISRESHAPE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "isreshape_verl.sandbox", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_sigint_as_in_a_terminal)


def _wait_for(proc, ready, what):
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.2)
    if proc.poll() is not None or not ready():
        proc.kill()
        raise AssertionError(f"{what} never came: {proc.communicate()[1][-2000:]}")


def test_ctrl_c_during_the_warm_start_is_one_line_and_exit_130(tmp_path):
    """Row 7: a cold cache and an unreachable target keep the warm start busy; Ctrl-C (SIGINT to the process group,
    as a terminal sends it) ends it with one line, exit 130, and the --out folder it created is gone."""
    out, cache = tmp_path / "out", tmp_path / "cold"
    proc = _start(TINY + ["--warm-max-steps", "5000", "--warm-target", "1.0", "--out", str(out)], cache)
    _wait_for(proc, lambda: any(cache.rglob("*.lock")), "the warm start")
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err
    assert lines == ["interrupted during the warm start; no run had started, so there is nothing to resume"], err
    assert not out.exists() and not list(cache.rglob("*.tmp*"))


@pytest.mark.parametrize("mode, sig, code", [
    (["--lags", "0", "2", "--jobs", "2"], signal.SIGINT, 130),
    (["--async"], signal.SIGINT, 130),
    (["--lags", "0", "2"], signal.SIGTERM, 143),
], ids=["ctrl_c_jobs2", "ctrl_c_async", "sigterm"])
def test_a_signal_during_the_runs_is_one_line_from_the_parent(mode, sig, code, made, cache, tmp_path):
    """Ctrl-C reaches every process of the group: workers and the async generator stay quiet and the parent says
    how to resume (130). SIGTERM (`kill PID`) says so too, with exit 143."""
    out = tmp_path / "out"
    argv = TINY + mode + ["--out", str(out)]
    proc = _start(argv, cache)
    _wait_for(proc, lambda: any(p.stat().st_size > 0 for p in out.glob("runs/*/metrics.jsonl")), "a run")
    (os.killpg if sig == signal.SIGINT else os.kill)(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == code, err
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in err, err
    assert lines[0].startswith("terminated (SIGTERM); " if sig == signal.SIGTERM else "interrupted; "), err
