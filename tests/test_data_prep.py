"""data_prep/gsm8k.py and data_prep/math_dataset.py on the real data in ../shared/data.

The scripts are run as subprocesses exactly as the README says (``python data_prep/math_dataset.py``);
bad-row handling is tested in-process on small hand-written files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from isreshape_verl.testing.files import load_data_prep

REPO = Path(__file__).resolve().parents[1]
DATA_PREP = REPO / "data_prep"
DATA = REPO.parent / "shared" / "data"
DATA_FILES = ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "math/train.jsonl", "math/test.jsonl", "math500/test.jsonl")
_missing = [name for name in DATA_FILES if not (DATA / name).is_file()]
needs_data = pytest.mark.skipif(
    bool(_missing),
    reason=f"needs the folder ../shared/data ({DATA}) beside the repo, which holds the real GSM8K, MATH and "
    f"MATH-500 JSON lines; missing: {', '.join(_missing)}",
)


_load = load_data_prep


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def gsm8k_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("gsm8k")
    proc = _run(["data_prep/gsm8k.py", "--local-dir", "../shared/data/gsm8k", "--output-dir", str(out), "--quiet"])
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


@pytest.fixture(scope="module")
def math_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("math")
    proc = _run(["data_prep/math_dataset.py", "--local-dir", "../shared/data/math", "--output-dir", str(out),
                 "--quiet"])
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


@needs_data
def test_gsm8k_row_counts_and_schema(gsm8k_out):
    out, stdout = gsm8k_out
    assert f"gsm8k train: wrote 7473 rows to {out / 'train.parquet'}" in stdout
    assert f"gsm8k test: wrote 1319 rows to {out / 'test.parquet'}" in stdout
    train = pd.read_parquet(out / "train.parquet")
    test = pd.read_parquet(out / "test.parquet")
    assert (len(train), len(test)) == (7473, 1319)
    assert list(train.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert set(train.data_source) == {"openai/gsm8k"}
    row = test.iloc[0]
    assert row.prompt[0]["role"] == "user"
    assert row.prompt[0]["content"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert row.prompt[0]["content"].endswith('output the final answer after "####".')
    assert row.reward_model == {"style": "rule", "ground_truth": "18"}
    assert row.extra_info["split"] == "test" and row.extra_info["index"] == 0
    # every row has a numeric ground truth, commas removed
    for frame in (train, test):
        truths = frame.reward_model.map(lambda r: r["ground_truth"])
        assert truths.str.fullmatch(r"-?[0-9]+(\.[0-9]+)?").all()
    comma_rows = train[train.extra_info.map(lambda e: "," in e["answer"].rsplit("####", 1)[1])]
    assert len(comma_rows) > 0
    assert "," not in "".join(comma_rows.reward_model.map(lambda r: r["ground_truth"]))


@needs_data
def test_math_row_counts_default_and_full(math_out, tmp_path):
    out, stdout = math_out
    assert "math train: wrote 7500 rows" in stdout
    assert "math test (math500): wrote 500 rows" in stdout
    train = pd.read_parquet(out / "train.parquet")
    test = pd.read_parquet(out / "test.parquet")
    assert (len(train), len(test)) == (7500, 500)
    assert set(train.data_source) == {"DigitalLearningGmbH/MATH-lighteval"}
    assert set(test.data_source) == {"HuggingFaceH4/MATH-500"}
    assert train.prompt.map(lambda p: p[0]["content"].endswith("final answer within \\boxed{}.")).all()
    # every row gets a non-empty ground truth (the two empty-box train rows come from the errata)
    assert train.reward_model.map(lambda r: bool(r["ground_truth"])).all()
    assert test.reward_model.map(lambda r: bool(r["ground_truth"])).all()
    errata = train[train.extra_info.map(lambda e: "\\boxed{}" in e["solution"])]
    assert sorted(errata.extra_info.map(lambda e: e["unique_id"])) == [
        "train/number_theory/7115.json",
        "train/number_theory/7117.json",
    ]
    assert set(errata.reward_model.map(lambda r: r["ground_truth"])) == {"0"}
    # MATH-500 is a subset of MATH test, not of MATH train
    assert not set(test.extra_info.map(lambda e: e["unique_id"])) & set(train.extra_info.map(lambda e: e["unique_id"]))

    full = tmp_path / "full"
    proc = _run(["data_prep/math_dataset.py", "--local-dir", "../shared/data/math", "--test-set", "full",
                 "--output-dir", str(full), "--quiet"])
    assert proc.returncode == 0, proc.stderr
    assert "math test (full): wrote 5000 rows" in proc.stdout
    assert len(pd.read_parquet(full / "test.parquet")) == 5000


def _acceptance(frame: pd.DataFrame, reference) -> tuple[int, list[str]]:
    """Score each row's reference solution with verl's dispatch; return (accepted, exceptions)."""
    from verl.utils.reward_score import default_compute_score

    ok, bad = 0, []
    for row in frame.itertuples():
        score = default_compute_score(row.data_source, reference(row.extra_info), row.reward_model["ground_truth"])
        if float(score) == 1.0:
            ok += 1
        else:
            bad.append(f"{row.extra_info['source_file']}:{row.extra_info['source_line']}")
    return ok, bad


@needs_data
def test_verl_scorer_accepts_reference_solutions(gsm8k_out, math_out):
    """verl's default reward dispatch scores the reference solution (as a model would write it)
    1.0 on >= 99 % of GSM8K test and MATH-500 rows. Measured: 1319/1319 and 500/500."""
    vf = _load("gsm8k").vf  # the very module the scripts use
    gsm = pd.read_parquet(gsm8k_out[0] / "test.parquet")
    ok, exceptions = _acceptance(gsm, lambda e: vf.gsm8k_model_style(e["answer"]))
    print(f"GSM8K test: {ok}/{len(gsm)} accepted; exceptions: {exceptions}")
    assert ok / len(gsm) >= 0.99 and exceptions == [], exceptions
    # the model-style text has no calculator annotations but keeps the final line
    sample = vf.gsm8k_model_style(gsm.iloc[0].extra_info["answer"])
    assert "<<" not in sample and sample.endswith("#### 18")

    m500 = pd.read_parquet(math_out[0] / "test.parquet")
    ok, exceptions = _acceptance(m500, lambda e: e["solution"])
    print(f"MATH-500: {ok}/{len(m500)} accepted; exceptions: {exceptions}")
    assert ok / len(m500) >= 0.99 and exceptions == [], exceptions

    # the scorer is not trivially generous: a wrong final answer scores 0
    from verl.utils.reward_score import default_compute_score

    assert default_compute_score("openai/gsm8k", "so #### 17", "18") == 0
    assert default_compute_score("HuggingFaceH4/MATH-500", "\\boxed{3}", m500.iloc[0].reward_model["ground_truth"]) == 0


@needs_data
def test_scorer_exceptions_on_math_train_are_exactly_the_errata(math_out):
    """On MATH train the reference solution scores 1.0 except on the two rows whose solution ends
    in an empty \\boxed{} (their ground truth comes from the errata, the text cannot match it)."""
    train = pd.read_parquet(math_out[0] / "train.parquet")
    ok, exceptions = _acceptance(train, lambda e: e["solution"])
    print(f"MATH train: {ok}/{len(train)} accepted; exceptions: {exceptions}")
    assert ok == 7498
    assert exceptions == ["../shared/data/math/train.jsonl:5530", "../shared/data/math/train.jsonl:5532"]


@needs_data
def test_math500_answer_field_agrees_with_boxed():
    vf = _load("gsm8k").vf  # the very module the scripts use
    rows = [json.loads(line) for line in (DATA / "math500" / "test.jsonl").open()]
    disagree = [r["unique_id"] for r in rows if not vf.answers_agree(vf.boxed_answer(r["solution"]), r["answer"])]
    assert len(rows) == 500 and disagree == []


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_rows_error_with_file_and_line_or_skip(tmp_path, capsys):
    gsm8k = _load("gsm8k")
    good = json.dumps({"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"})
    src = tmp_path / "src"
    _write(src / "test.jsonl", [good])
    _write(src / "train.jsonl", [good, "{not json", json.dumps({"question": "q"}),
                                 json.dumps({"question": "q", "answer": "no final answer"}), "", good])
    out = tmp_path / "out"
    assert gsm8k.main(["--local-dir", str(src), "--output-dir", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{src / 'train.jsonl'}:2: not valid JSON" in err and "--skip-bad" in err
    assert not (out / "train.parquet").exists()

    assert gsm8k.main(["--local-dir", str(src), "--output-dir", str(out), "--quiet", "--skip-bad"]) == 0
    stdout = capsys.readouterr().out
    assert "gsm8k train: wrote 2 rows" in stdout and "skipped 3 bad rows" in stdout
    assert "gsm8k test: wrote 1 rows" in stdout
    train = pd.read_parquet(out / "train.parquet")
    assert list(train.extra_info.map(lambda e: e["source_line"])) == [1, 6]
    assert list(train.extra_info.map(lambda e: e["index"])) == [0, 1]


def test_no_file_is_written_until_every_input_is_good(tmp_path, capsys):
    """A bad row in test.jsonl stops the run before train.parquet is written; a missing input is one line."""
    gsm8k = _load("gsm8k")
    good = json.dumps({"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"})
    src = tmp_path / "src"
    _write(src / "train.jsonl", [good, good])
    _write(src / "test.jsonl", [good, "{not json"])
    out = tmp_path / "out"
    assert gsm8k.main(["--local-dir", str(src), "--output-dir", str(out), "--quiet"]) == 2
    assert f"{src / 'test.jsonl'}:2: not valid JSON" in capsys.readouterr().err
    assert not (out / "train.parquet").exists() and not (out / "test.parquet").exists()
    assert gsm8k.main(["--local-dir", str(tmp_path / "missing"), "--output-dir", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {tmp_path / 'missing' / 'train.jsonl'}: no such file (expected JSON lines)"


def test_bad_row_reasons_name_the_problem(tmp_path):
    vf = _load("gsm8k").vf  # the very module the scripts use
    gsm8k = _load("gsm8k")
    math_mod = _load("math_dataset")
    row = vf.SourceRow("f.jsonl", 7, {"question": "q"})
    with pytest.raises(vf.BadRowError, match=r"f\.jsonl:7: missing field 'answer'"):
        gsm8k.convert(row, "train", 0)
    with pytest.raises(vf.BadRowError, match=r"f\.jsonl:3: no numeric final answer"):
        gsm8k.convert(vf.SourceRow("f.jsonl", 3, {"question": "q", "answer": "#### many"}), "train", 0)
    with pytest.raises(vf.BadRowError, match=r"expected a JSON object, got list"):
        gsm8k.convert(vf.SourceRow("f.jsonl", 4, [1, 2]), "train", 0)
    with pytest.raises(vf.BadRowError, match=r"f\.jsonl:5: no \\boxed\{\} final answer"):
        math_mod.convert_math(vf.SourceRow("f.jsonl", 5, {"problem": "p", "solution": "it is 4"}), "train", 0)
    with pytest.raises(vf.BadRowError, match=r"disagrees with 'answer' \('5'\)"):
        math_mod.convert_math500(
            vf.SourceRow("f.jsonl", 6, {"problem": "p", "solution": "\\boxed{4}", "answer": "5"}), "test", 0
        )
    # equivalent spellings agree (verl's normalisation)
    ok = math_mod.convert_math500(
        vf.SourceRow("f.jsonl", 8, {"problem": "p", "solution": "so \\boxed{\\frac12}", "answer": "\\frac{1}{2}"}),
        "test", 0,
    )
    assert ok["reward_model"]["ground_truth"] == "\\frac12"
    assert vf.gsm8k_ground_truth("x\n#### 1,234") == "1234"
    assert vf.gsm8k_ground_truth("x\n#### -3.5") == "-3.5"


def test_no_data_prep_script_shadows_a_stdlib_module():
    """`python data_prep/X.py` puts data_prep/ first on sys.path: a script named like a stdlib module
    (math.py) would replace it for numpy, pyarrow and verl."""
    names = {path.stem for path in DATA_PREP.glob("*.py")}
    assert names & set(sys.stdlib_module_names) == set()


def test_math_script_runs_as_documented(tmp_path):
    """`python data_prep/math_dataset.py` converts local JSON lines and writes parquet."""
    src = tmp_path / "m"
    row = {"problem": "What is $\\sqrt{16}$?", "solution": "It is $\\boxed{4}$.", "level": "Level 1", "type": "Algebra"}
    _write(src / "train.jsonl", [json.dumps(row)])
    _write(src / "test.jsonl", [json.dumps(row)])
    out = tmp_path / "out"
    proc = _run(["data_prep/math_dataset.py", "--local-dir", str(src), "--test-set", "full", "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "math train: wrote 1 rows" in proc.stdout and "math test (full): wrote 1 rows" in proc.stdout
    assert pd.read_parquet(out / "test.parquet").iloc[0].reward_model["ground_truth"] == "4"
    # and from inside data_prep/ itself
    proc = subprocess.run([sys.executable, "math_dataset.py", "--help"], cwd=DATA_PREP,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--test-set {math500,full}" in proc.stdout, proc.stderr
    # math500 with --local-dir but no math500 folder next to it: a clear error
    proc = _run(["data_prep/math_dataset.py", "--local-dir", str(src), "--output-dir", str(out)])
    assert proc.returncode != 0 and "--math500-dir" in proc.stderr


def _tiny_chat_tokenizer():
    """A word-level tokenizer with a chat template, built offline (no model download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>", pad_token="<eos>")
    hf.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return hf


@needs_data
def test_verl_rl_dataset_reads_the_parquet(gsm8k_out, math_out, tmp_path):
    """verl's own RLHFDataset (what main_ppo's trainer builds from data.train_files) loads the files,
    keeps every prompt under the recipes' max_prompt_length, and hands the chat messages and the
    reward fields through unchanged."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tokenizer = _tiny_chat_tokenizer()
    for out, max_len, n_rows in ((gsm8k_out[0], 512, 1319), (math_out[0], 1024, 500)):
        config = OmegaConf.create({"max_prompt_length": max_len, "filter_overlong_prompts": True,
                                   "filter_overlong_prompts_workers": 1, "cache_dir": str(tmp_path / "cache"),
                                   "truncation": "error"})
        ds = RLHFDataset(data_files=str(out / "test.parquet"), tokenizer=tokenizer, config=config)
        assert len(ds) == n_rows
        item = ds[0]
        frame = pd.read_parquet(out / "test.parquet")
        assert item["raw_prompt"] == [dict(m) for m in frame.iloc[0].prompt]
        assert item["reward_model"]["ground_truth"] == frame.iloc[0].reward_model["ground_truth"]
        assert item["data_source"] == frame.iloc[0].data_source and item["index"] == 0


@needs_data
def test_math_parquet_through_the_sandbox_gets_reward_on_reference_answers(math_out):
    """`compare --data` with a MATH parquet scores with verl's MATH scorer: every reference answer of
    MATH-500 and of the train split earns reward 1 (with the GSM8K scorer, MATH-500 would earn 0)."""
    from isreshape_verl.sandbox.task import parquet_task, score

    out, _ = math_out
    for split, n in (("test", 500), ("train", 7500)):
        task = parquet_task(str(out / f"{split}.parquet"), 0, 0)
        problems = task.train + task.test
        assert len(problems) == n
        rewards = score([p.solution for p in problems], problems)
        assert sum(rewards) >= n - 2, (split, sum(rewards))  # MATH train: 2 rows have an empty \boxed{}
