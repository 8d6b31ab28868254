"""Bad inputs to `isreshape-verl kernels`, `plot-runs`, `lab` and the data_prep scripts: one line naming the bad
value and what is allowed, exit status 2, and no output (no partial, empty or 0-byte file or folder) left behind.
Ctrl-C: one line, exit status 130.

The data_prep scripts run as subprocesses, as the README runs them (`python data_prep/gsm8k.py`); a hub download
is made to fail deterministically with HF_HUB_OFFLINE=1 (no network is tried).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from isreshape_verl import plot_runs
from isreshape_verl.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
needs_gsm8k = pytest.mark.skipif(not (DATA / "gsm8k" / "test.jsonl").is_file(),
                                 reason=f"needs the real GSM8K JSON lines in {DATA / 'gsm8k'}")
GOOD_GSM8K = '{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n'
GOOD_MATH = '{"problem": "1+1?", "solution": "It is $\\\\boxed{2}$."}\n'


def one_line(text: str) -> str:
    """The single line of `text` (an error output); fails when there are more or none."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def data_prep(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"data_prep/{script}", *args, "--quiet"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """An existing folder this process cannot write: a read-only tmp folder, or for root (whom file modes do not
    stop) a sysfs folder."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    folder = Path("/sys/kernel")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        yield folder
        return
    pytest.skip("running as root with no read-only folder to write into")


# ---- 12, 13: kernels --plot ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("given, written", [("figs", "figs/kernel_weights.png"), ("figs/", "figs/kernel_weights.png"),
                                            ("g", "g.png"), ("g.svg", "g.svg"), ("g.PDF", "g.PDF")])
def test_row12_kernels_plot_prints_the_path_it_wrote(tmp_path, capsys, given, written):
    (tmp_path / "figs").mkdir()
    assert cli_main(["kernels", "--r", "1", "--plot", str(tmp_path / given)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[-1] == f"wrote {tmp_path / written}"
    assert (tmp_path / written).stat().st_size > 1000
    left = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert left == {"figs", written}  # nothing else: no DIR.png, no temporary file


@pytest.mark.parametrize("name, message", [
    ("x.txt", "--plot '{path}': cannot write a '.txt' file; allowed extensions: "),
    ("missing/g.png", "--plot '{path}': no such folder '{parent}'"),
])
def test_row13_kernels_plot_bad_extension_or_folder(tmp_path, capsys, name, message):
    path = tmp_path / name
    rc = cli_main(["kernels", "--r", "1", "--plot", str(path)])
    out = capsys.readouterr()
    line = one_line(out.err)
    assert rc == 2 and out.out == ""  # refused before the table
    assert line.startswith("isreshape-verl kernels: error: " + message.format(path=path, parent=path.parent)), line
    if name.endswith(".txt"):
        assert all(f".{ext}," in line for ext in ("png", "pdf", "svg"))
    assert list(tmp_path.iterdir()) == []


def test_row13_kernels_plot_into_an_unwritable_folder(unwritable_dir, capsys):
    path = unwritable_dir / "g.png"
    assert cli_main(["kernels", "--r", "1", "--plot", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and not path.exists()
    assert one_line(out.err).startswith(f"isreshape-verl kernels: error: --plot '{path}': folder '{unwritable_dir}' "
                                        "is not writable (")


@pytest.mark.parametrize("given", ["", "  "])
def test_row13_kernels_plot_empty_path(tmp_path, capsys, monkeypatch, given):
    """`--plot ''` (an unset shell variable, say) asked for a plot: one line and exit 2, not exit 0 without one."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["kernels", "--r", "1", "--plot", given]) == 2
    out = capsys.readouterr()
    assert out.out == "" and list(tmp_path.iterdir()) == []  # refused before the table; no '  .png' written
    assert one_line(out.err) == (f"isreshape-verl kernels: error: --plot {given!r}: an empty path; give a file "
                                 "(g.png) or a folder (which gets kernel_weights.png)")


# ---- 14: plot-runs on a file that is not text ------------------------------------------------------------------------
@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b'{"step": 1, "data": {"x": 1}}\n\xff\xfe\x00\n'])
def test_row14_plot_runs_binary_file(tmp_path, capsys, content):
    path = tmp_path / "metrics.bin"
    path.write_bytes(content)
    out = tmp_path / "plots" / "deep"
    assert plot_runs.main([str(path), "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"isreshape-verl plot-runs: error: {path}: not a metrics.jsonl text file (line "), line
    assert not (tmp_path / "plots").exists()  # the --out it made before reading is gone again


def test_row14_plot_runs_text_that_is_no_metrics(tmp_path, capsys):
    path = tmp_path / "notes.jsonl"
    path.write_text("hello\nworld\n")
    assert plot_runs.main([str(path), "--out", str(tmp_path / "plots")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line == (f"isreshape-verl plot-runs: error: no metrics in {path} (2 lines, none a FileLogger record "
                    "or a compare row)")
    assert not (tmp_path / "plots").exists()


# ---- 15-18: data_prep ---------------------------------------------------------------------------------------------
SCRIPTS = {"gsm8k.py": (GOOD_GSM8K, ["--local-dir"]), "math_dataset.py": (GOOD_MATH, ["--test-set", "full", "--local-dir"])}


def _source(tmp_path: Path, script: str, train: str | bytes) -> list[str]:
    """A --local-dir with `train` as train.jsonl and one good test row; the script's source flags."""
    good, flags = SCRIPTS[script]
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.jsonl").write_bytes(train.encode() if isinstance(train, str) else train)
    (src / "test.jsonl").write_text(good)
    return [*flags, str(src)]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("train, reason", [("", "empty file (expected JSON lines, one object a line)"),
                                           ("\n  \n", "empty file (expected JSON lines, one object a line)"),
                                           (b"\x89PNG\r\n\x1a\n\x00\xff", ("not a UTF-8 text file (line 1); "
                                                                           "expected JSON lines, one object a line"))])
def test_row15_data_prep_empty_or_binary_input(tmp_path, script, train, reason):
    source = _source(tmp_path, script, train)
    out = tmp_path / "out"
    proc = data_prep(script, *source, "--output-dir", str(out))
    assert proc.returncode == 2, proc.stderr
    assert one_line(proc.stderr) == f"error: {tmp_path / 'src' / 'train.jsonl'}: {reason}"
    assert not out.exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_row15_data_prep_every_row_skipped(tmp_path, script):
    source = _source(tmp_path, script, "{not json\n")
    out = tmp_path / "out"
    proc = data_prep(script, *source, "--output-dir", str(out), "--skip-bad")
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith("error: ") and "train: no rows left to write (skipped 1 bad rows; first: " in line
    assert str(tmp_path / "src" / "train.jsonl") in line and not out.exists()


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("sub", ["", "new/deeper"])
def test_row16_data_prep_unwritable_output_dir(tmp_path, unwritable_dir, script, sub):
    source = _source(tmp_path, script, SCRIPTS[script][0])
    out = unwritable_dir / sub if sub else unwritable_dir
    before = sorted(os.listdir(unwritable_dir))
    proc = data_prep(script, *source, "--output-dir", str(out))
    assert proc.returncode == 2, proc.stderr
    assert one_line(proc.stderr).startswith(f"error: --output-dir '{out}' is not writable ("), proc.stderr
    assert sorted(os.listdir(unwritable_dir)) == before


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("sub, message", [("", "error: --output-dir '{file}' exists and is not a folder"),
                                          ("sub", ("error: --output-dir '{file}/sub' cannot be created: '{file}' is a "
                                                   "file, not a folder"))])
def test_row17_data_prep_output_dir_is_a_file(tmp_path, script, sub, message):
    source = _source(tmp_path, script, SCRIPTS[script][0])
    blocker = tmp_path / "out.txt"
    blocker.write_text("keep me\n")
    proc = data_prep(script, *source, "--output-dir", str(blocker / sub if sub else blocker))
    assert proc.returncode == 2, proc.stderr
    assert one_line(proc.stderr) == message.format(file=blocker)
    assert blocker.read_text() == "keep me\n"


@pytest.mark.parametrize("script, repo, files", [
    ("gsm8k.py", "hf://openai/gsm8k/main[train]", ("--local-dir DIR, a folder with train.jsonl and test.jsonl (JSON "
                                                   "lines with the fields 'question' and 'answer'")),
    ("math_dataset.py", "hf://DigitalLearningGmbH/MATH-lighteval[train]",
     ("--local-dir DIR, a folder with MATH train.jsonl and test.jsonl (JSON lines with the fields 'problem' and "
      "'solution'")),
])
def test_row18_data_prep_download_fails_offline(tmp_path, script, repo, files):
    out = tmp_path / "out"
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = data_prep(script, "--output-dir", str(out), env=env)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith(f"error: could not download {repo} from the Hugging Face hub ("), line
    assert f"; offline? pass {files}" in line, line
    assert not out.exists()


def test_data_prep_interrupt_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """Ctrl-C while converting (the hub download and MATH's 7,500 rows take a while): exit 130, one line."""
    sys.path.insert(0, str(REPO / "data_prep"))
    try:
        import gsm8k
        import verl_format as vf
    finally:
        sys.path.remove(str(REPO / "data_prep"))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vf, "convert_rows", interrupt)
    source = _source(tmp_path, "gsm8k.py", GOOD_GSM8K)
    out = tmp_path / "out"
    assert gsm8k.main([*source, "--output-dir", str(out), "--quiet"]) == 130
    assert one_line(capsys.readouterr().err) == "data_prep/gsm8k.py: interrupted; nothing written"
    assert not out.exists()


@needs_gsm8k
def test_data_prep_output_is_whole(tmp_path):
    """The good path still writes both files, and nothing else (the temporary names are gone)."""
    out = tmp_path / "out"
    proc = data_prep("gsm8k.py", "--local-dir", str(DATA / "gsm8k"), "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["test.parquet", "train.parquet"]


# ---- Ctrl-C in kernels, plot-runs, lab ----------------------------------------------------------------------------
def test_kernels_and_plot_runs_interrupt_is_one_line(tmp_path, capsys, monkeypatch):
    from isreshape_verl import kernels_cli

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kernels_cli, "plot_weights", interrupt)
    assert cli_main(["kernels", "--r", "1", "--plot", str(tmp_path / "g.png")]) == 130
    assert one_line(capsys.readouterr().err) == "isreshape-verl kernels: error: interrupted"
    monkeypatch.setattr(plot_runs, "find_runs", interrupt)
    assert cli_main(["plot-runs", str(tmp_path), "--out", str(tmp_path / "plots")]) == 130
    assert one_line(capsys.readouterr().err) == "isreshape-verl plot-runs: error: interrupted"
    assert not (tmp_path / "g.png").exists()


def test_lab_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """SIGINT to a running `python -m isreshape_verl.lab` (the default run takes ~30 s): exit 130, one line, no
    traceback, and the --out folder it had made is removed again."""
    out = tmp_path / "lab" / "run"
    proc = subprocess.Popen([sys.executable, "-m", "isreshape_verl.lab", "--out", str(out), "--no-progress",
                             "--no-plots"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not inherited SIG_IGN
    try:
        deadline = time.time() + 120
        while not out.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)  # --out is made once the arguments are checked, right before the experiment
        assert out.exists(), "the lab never started"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # 130, or killed by SIGINT (-2) after the handler ran: a Ctrl-C that lands while torch is still importing can
    # make CPython end the process by SIGINT on exit (seen once in a fresh venv); a shell reports 130 for both
    assert proc.returncode in (130, -signal.SIGINT), stderr
    assert one_line(stderr) == f"isreshape-verl lab: error: interrupted; nothing written to {out}"
    assert not (tmp_path / "lab").exists()


def test_lab_missing_out_is_argparse_error(capsys):
    from isreshape_verl.lab import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.splitlines()[0] == "isreshape-verl lab: error: the following arguments are required: --out"
