"""The golden commands: every recipe entry point's `DRY_RUN=1` output equals the one recorded before the launch
layer moved from bash to Python (`tests/golden/dry_runs.json`, written by `tests/golden/record_dry_runs.py`).

Compared per line as argv lists (`shlex.split`), so a change of quoting style (bash's `%q` against Python's
`shlex.quote`) is allowed and a change of any argument is not. Exit status and stderr are compared as text.

The recipe and compare cases call the launcher in-process (`isreshape_verl.launch.cli.main`, what each script
execs; seconds for all of them); the cluster scripts, and a few recipes through their bash wrapper, run as the
user runs them.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shlex
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
GOLDEN = json.loads((HERE / "golden" / "dry_runs.json").read_text())

_spec = importlib.util.spec_from_file_location("record_dry_runs", HERE / "golden" / "record_dry_runs.py")
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)


def words(stdout: str) -> list:
    """Each printed line (continuations joined) as its argv list, or as text where it is not shell syntax."""
    lines = []
    for line in stdout.replace("\\\n", " ").splitlines():
        try:
            lines.append(shlex.split(line))
        except ValueError:
            lines.append(line)
    return lines


@pytest.fixture(scope="module")
def vllm_dir():
    return record.fake_vllm()


def test_the_golden_file_covers_every_recipe_mode_and_device():
    assert len(GOLDEN) == len(record.cases()) >= 80
    scripts = {case["script"] for case in GOLDEN.values()}
    assert {f"recipes/{d}/{l}.sh" for d in ("gsm8k", "math", "tiny") for l in ("grpo", "sapo", "isreshape", "compare")} <= scripts


def in_process(case: dict, vllm_dir: str, monkeypatch) -> dict:
    """The case through `isreshape_verl.launch.cli.main`, with the environment `run_case` gives the script."""
    from isreshape_verl.launch.cli import main

    dataset, script = re.fullmatch(r"recipes/(\w+)/(\w+)\.sh", case["script"]).groups()
    argv = ["compare", dataset] if script == "compare" else ["recipe", dataset, script]
    env = {"PATH": "/usr/bin", "HOME": record.HOME, "DRY_RUN": "1", "RECIPE_CHECK": "0", "PYTHONPATH": vllm_dir,
           "TMPDIR": "/tmp", **case["env"]}
    monkeypatch.chdir(record.REPO)
    monkeypatch.syspath_prepend(vllm_dir)
    out, err = io.StringIO(), io.StringIO()
    status = main([*argv, *case["args"]], env=env, out=out, err=err)
    return {"returncode": status, "stdout": record.normalise(out.getvalue()), "stderr": record.normalise(err.getvalue())}


THROUGH_BASH = {next(k for k in GOLDEN if "compare.sh" in k and "LOSSES" in k),
                next(k for k in GOLDEN if k.startswith("ROLLOUT=vllm ASYNC=separate")), "recipes/tiny/isreshape.sh"}


@pytest.mark.parametrize("case_id", list(GOLDEN))
def test_dry_run_output_equals_the_golden_one(case_id, vllm_dir, monkeypatch):
    golden = GOLDEN[case_id]
    if "cluster" in golden["script"] or case_id in THROUGH_BASH:
        now = record.run_case(golden, vllm_dir)
    else:
        now = in_process(golden, vllm_dir, monkeypatch)
    assert now["returncode"] == golden["returncode"], now["stderr"]
    assert now["stderr"] == golden["stderr"]
    assert words(now["stdout"]) == words(golden["stdout"])
