"""data_prep/tiny.py: the sandbox's task as verl parquet and its tiny Qwen2 as a Hugging Face folder.

One documented run (``python data_prep/tiny.py --no-warm-start``, small sizes) is checked against the sandbox's
own objects: the same problems, verl's reward 1.0 on every reference solution, the same token ids through
AutoTokenizer, the chat template and verl's own dataset / agent-loop tokenization, the same logits. Bad input
and the warm-start path (with a few-step warm start in a private cache) run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from isreshape_verl.testing.files import load_data_prep, small_disk as small_disk_fixture
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_PREP = REPO / "data_prep"
N_TRAIN, N_TEST = 48, 16
# The sandbox's test split has max(--eval-problems, --warm-eval-problems) = max(16, 256) = 256 problems (the
# train pool excludes all of them); test.parquet holds its first 16.
SPLIT_TEST = 256


_load = load_data_prep


def _small(out: Path, *extra: str) -> list[str]:
    return ["--output-dir", str(out), "--n-train", str(N_TRAIN), "--n-test", str(N_TEST), "--quiet", *extra]


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    """One run as the docstring documents it: `python data_prep/tiny.py ... --no-warm-start`."""
    out = tmp_path_factory.mktemp("tiny")
    proc = subprocess.run([sys.executable, "data_prep/tiny.py", *_small(out, "--no-warm-start")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


@pytest.fixture(scope="module")
def sandbox():
    """What the sandbox builds for these settings: the fresh tiny Qwen2 (seed 0) and the procedural task."""
    from isreshape_verl.sandbox.model import TinyModelArgs, tiny_policy
    from isreshape_verl.sandbox.task import procedural_task

    policy = tiny_policy(TinyModelArgs(), 0)
    task = procedural_task(0, N_TRAIN, SPLIT_TEST, difficulty=2, word_share=0.0)
    return policy, task.train, task.test[:N_TEST]


def _texts(train, test) -> list[str]:
    """Every prompt and solution of the written problems, word problems (spaces, letters, '.'), and CHARSET."""
    from isreshape_verl.sandbox.model import CHARSET
    from isreshape_verl.sandbox.task import make_split

    words = make_split(7, 40, difficulty=3, word_share=1.0)
    problems = train + test + words
    return [p.prompt for p in problems] + [p.solution for p in problems] + [CHARSET, CHARSET[::-1], "a  b\n\n c "]


def test_rows_are_the_sandbox_task_and_verl_scores_every_reference_1(tiny_out, sandbox):
    out, stdout = tiny_out
    _, train, test = sandbox
    assert f"tiny train: wrote {N_TRAIN} rows to {out / 'train.parquet'}" in stdout
    assert f"tiny test: wrote {N_TEST} rows to {out / 'test.parquet'}" in stdout
    from verl.utils.reward_score import default_compute_score

    for split, problems in (("train", train), ("test", test)):
        frame = pd.read_parquet(out / f"{split}.parquet")
        assert list(frame.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
        assert len(frame) == len(problems)
        assert set(frame.data_source) == {"openai/gsm8k"} and set(frame.ability) == {"math"}
        for i, (row, p) in enumerate(zip(frame.itertuples(), problems)):
            assert [dict(m) for m in row.prompt] == [{"role": "user", "content": p.prompt}]  # the bare question
            assert row.reward_model == {"style": "rule", "ground_truth": p.answer}
            assert row.extra_info["answer"] == p.solution and row.extra_info["index"] == i
            assert row.extra_info["split"] == split
            assert default_compute_score(row.data_source, row.extra_info["answer"], p.answer) == 1.0
    assert pd.read_parquet(out / "test.parquet").iloc[0].prompt[0]["content"] == "17+17+6=?"  # test[0], seed 0
    # train and test are disjoint; the scorer is not generous: a wrong final answer scores 0
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert default_compute_score("openai/gsm8k", "#### 41", "40") == 0


def test_model_folder_loads_with_the_sandbox_weights_and_config(tiny_out, sandbox):
    from transformers import AutoModelForCausalLM

    out, _ = tiny_out
    policy, _, test = sandbox
    folder = out / "model"
    assert (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM" and {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.tensor([policy.prompt_ids(test[0].prompt) + policy.response_ids(test[0].solution)])  # (1, T)
    policy.model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, policy.model(ids).logits)

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["head_dim"] == 32  # hidden 128 / 4 heads
    assert (config["dtype"], config["torch_dtype"]) == ("float32", "float32")
    assert (config["eos_token_id"], config["pad_token_id"], config["vocab_size"]) == (1, 0, 86)  # 3 specials + 83
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 1

    info = json.loads((folder / "isreshape_tiny.json").read_text())
    assert info["warm_start"]["trained"] is False and "--no-warm-start" in info["warm_start"]["note"]
    assert (info["task"]["train_rows"], info["task"]["test_rows"]) == (N_TRAIN, N_TEST)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())


def test_tokenizer_round_trips_the_sandbox_ids(tiny_out, sandbox):
    """AutoTokenizer builds a Qwen2Tokenizer for any qwen2 folder (transformers 5); the byte-level vocabulary makes
    it, and a plain PreTrainedTokenizerFast over tokenizer.json, give the char tokenizer's ids, "\\n" and " " too."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out, _ = tiny_out
    policy, train, test = sandbox
    texts = _texts(train, test)
    assert sum(t.count("\n") for t in texts) > 100 and sum(t.count(" ") for t in texts) > 100
    expected = policy.tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [len(ids) for ids in expected] == [len(t) for t in texts]  # char-level: one id per character
    for tok in (AutoTokenizer.from_pretrained(out / "model"), PreTrainedTokenizerFast.from_pretrained(out / "model")):
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        assert ids == expected, type(tok).__name__
        assert tok.batch_decode(ids) == texts
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (0, 1, 2, 86)
    assert type(AutoTokenizer.from_pretrained(out / "model")).__name__ == "Qwen2Tokenizer"


def test_chat_template_is_the_sandbox_prompt_format(tiny_out, sandbox):
    from transformers import AutoTokenizer
    from verl.utils.tokenizer import normalize_token_ids

    out, _ = tiny_out
    policy, train, test = sandbox
    tok = AutoTokenizer.from_pretrained(out / "model")
    for p in train + test:
        messages = [{"role": "user", "content": p.prompt}]
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == p.prompt + "\n"
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)  # a BatchEncoding in v5
        assert normalize_token_ids(ids) == policy.prompt_ids(p.prompt)
    # a finished turn: the sandbox's warm-start target, prompt ids + solution ids + EOS
    p = test[0]
    turn = [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.solution}]
    ids = normalize_token_ids(tok.apply_chat_template(turn, tokenize=True, add_generation_prompt=False))
    assert ids == policy.prompt_ids(p.prompt) + policy.response_ids(p.solution)


def test_verl_dataset_and_agent_loop_tokenize_prompts_as_the_sandbox(tiny_out, sandbox, tmp_path):
    """verl's RLHFDataset (with its overlong-prompt filter, which tokenizes through the chat template) keeps every
    row, and the agent loop's prompt builder for model_type qwen2 gives the sandbox's prompt ids for each."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.tokenizer import hf_processor, hf_tokenizer
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    out, _ = tiny_out
    policy, _, test = sandbox
    folder = str(out / "model")
    tokenizer = hf_tokenizer(folder)
    assert hf_processor(folder) is None  # text only: verl takes the tokenizer path
    config = OmegaConf.create({"max_prompt_length": 256 - 28, "filter_overlong_prompts": True,
                               "filter_overlong_prompts_workers": 1, "cache_dir": str(tmp_path / "cache"),
                               "truncation": "error"})
    ds = RLHFDataset(data_files=str(out / "test.parquet"), tokenizer=tokenizer, config=config)
    assert len(ds) == N_TEST
    model_type = json.loads((out / "model" / "config.json").read_text())["model_type"]
    builder = create_continuous_token_builder(tokenizer, hf_model_type=model_type)
    assert type(builder).__name__ == "QwenContinuousTokenBuilder"
    for i, p in enumerate(test):
        item = ds[i]
        assert item["raw_prompt"] == [{"role": "user", "content": p.prompt}]
        assert item["reward_model"]["ground_truth"] == p.answer and item["data_source"] == "openai/gsm8k"
        assert builder.build_initial_tokens(item["raw_prompt"]) == policy.prompt_ids(p.prompt)


def test_the_sandbox_reads_the_files_back(tiny_out, sandbox):
    """`isreshape-verl compare --model DIR/model --data DIR/train.parquet` sees the same prompts and targets."""
    from isreshape_verl.sandbox.model import local_policy
    from isreshape_verl.sandbox.task import parquet_task

    out, _ = tiny_out
    policy, train, test = sandbox
    loaded = local_policy(str(out / "model"))
    assert loaded.use_chat_template
    for p in test:
        assert loaded.prompt_ids(p.prompt) == policy.prompt_ids(p.prompt)
        assert loaded.response_ids(p.solution) == policy.response_ids(p.solution)
    task = parquet_task(str(out / "train.parquet"), n_test=1, seed=0)
    assert sorted((p.prompt, p.solution, p.answer) for p in task.train + task.test) == \
        sorted((p.prompt, p.solution, p.answer) for p in train)


def test_defaults_are_the_sandbox_default_preset(tmp_path):
    """With no flags, the script's task and warm start have the sandbox's default identity, so the two share the
    warm-start cache entry."""
    from isreshape_verl.sandbox import cli
    from isreshape_verl.sandbox.experiment import model_identity, task_identity

    tiny = _load("tiny")
    mine = tiny.sandbox_args(tiny.Args())
    theirs, _ = cli.resolve_args(["--out", str(tmp_path / "compare")])  # `isreshape-verl compare` (default preset)
    assert (model_identity(mine), task_identity(mine)) == (model_identity(theirs), task_identity(theirs))
    assert (mine.warm, mine.rl.max_new_tokens, mine.tiny) == (theirs.warm, theirs.rl.max_new_tokens, theirs.tiny)
    assert (tiny.Args().n_train, tiny.Args().n_test, tiny.Args().seed) == (20000, 500, 0)


def _read_only_dir(tmp_path: Path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions: a folder under /sys cannot be created
        return Path("/sys/isreshape_tiny_test")
    return ro / "out"


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    tiny = _load("tiny")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    new = tmp_path / "new"
    cases = [
        (["--output-dir", str(a_file)], f"error: --output-dir '{a_file}' is a file; a folder (existing or new) is "
                                        "expected"),
        (["--output-dir", str(a_file / "sub")], f"error: --output-dir '{a_file / 'sub'}' is not writable"),
        (["--output-dir", str(_read_only_dir(tmp_path))], "is not writable ("),
        (["--output-dir", str(new), "--n-train", "0"], "error: --n-train must be > 0; got 0"),
        (["--output-dir", str(new), "--n-test", "-3"], "error: --n-test must be > 0; got -3"),
        (["--output-dir", str(new), "--n-test", "100000"],
         "error: --n-test 100000 is too large for the task: could not draw 100000 distinct problems"),
    ]
    for argv, message in cases:
        assert tiny.main([*argv, "--no-warm-start", "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("error: "), (argv, err)
    assert a_file.read_text() == "x" and not new.exists()  # nothing created, not even the empty folder
    with pytest.raises(SystemExit) as exc:  # argparse: one line and a pointer to --help, exit 2
        tiny.main(["--n-train", "many"])
    assert exc.value.code == 2 and "invalid int value: 'many'" in capsys.readouterr().err


def test_rerun_replaces_only_the_files_it_owns(tmp_path, capsys):
    tiny = _load("tiny")
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (out / "model" / "notes.md").write_text("mine too")
    (out / "train.parquet").write_text("stale")
    assert tiny.main(_small(out, "--no-warm-start", "--n-train", "5")) == 0
    assert (out / "keep.txt").read_text() == "mine" and (out / "model" / "notes.md").read_text() == "mine too"
    assert len(pd.read_parquet(out / "train.parquet")) == 5
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "model", "test.parquet", "train.parquet"]  # no temp
    assert "tiny model: wrote" in capsys.readouterr().out


def test_warm_start_comes_from_the_sandbox_cache(tmp_path, monkeypatch, capsys):
    """A 2-step warm start in a private cache: trained once under the key `isreshape-verl compare` computes for the
    same settings, saved as the folder's weights, then loaded from the cache by the next run."""
    from safetensors.torch import load_file

    from isreshape_verl.sandbox import cli
    from isreshape_verl.sandbox.experiment import model_identity, task_identity
    from isreshape_verl.sandbox.warmstart import cache_key

    monkeypatch.setenv("ISRESHAPE_CACHE", str(tmp_path / "cache"))
    tiny = _load("tiny")
    warm = ["--warm-max-steps", "2", "--warm-eval-every", "1", "--warm-eval-problems", "4", "--warm-batch-size", "8"]
    out = tmp_path / "out"
    assert tiny.main(_small(out, *warm)) == 0
    assert "warm start: training (cache key" in capsys.readouterr().out

    sandbox, _ = cli.resolve_args(["--n-train", str(N_TRAIN), "--eval-problems", str(N_TEST), *warm,
                                   "--out", str(tmp_path / "compare")])
    identity = {"model": model_identity(sandbox), "task": task_identity(sandbox)}
    key = cache_key({"identity": identity, "warm_start": asdict(sandbox.warm),
                     "max_new_tokens": sandbox.rl.max_new_tokens})
    cached = torch.load(tmp_path / "cache" / "warmstart" / f"{key}.pt", weights_only=True)
    saved = load_file(out / "model" / "model.safetensors")
    assert saved.keys() <= cached.keys() and all(torch.equal(saved[k], cached[k]) for k in saved)
    info = json.loads((out / "model" / "isreshape_tiny.json").read_text())["warm_start"]
    assert info["trained"] is True and info["cached"] is False and info["steps"] in (1, 2)
    assert info["history"][0][0] == 0 and len(info["history"]) == 3  # step 0, 1, 2

    assert tiny.main(_small(tmp_path / "again", *warm)) == 0
    assert "warm start: loaded from cache" in capsys.readouterr().out
    again = load_file(tmp_path / "again" / "model" / "model.safetensors")
    assert all(torch.equal(again[k], saved[k]) for k in saved)


class _Stop(Exception):
    """Raised where the test has seen what it needs: the rest of the run (minutes with 20,000 rows) is not needed."""


def _stop(*args, **kwargs):
    raise _Stop


@pytest.mark.parametrize("n_train", [None, "20000"], ids=["default", "asked_for"])
def test_the_pool_note_is_only_for_an_n_train_that_was_asked_for(n_train, tmp_path, monkeypatch, capsys):
    """The default --n-train is the sandbox's 20,000, whose difficulty-2 pool holds 19,873 problems (the docstring
    says so): without the flag no note; `--n-train 20000` typed by the user gets it. The run stops right after the
    note (at the reward check)."""
    tiny = _load("tiny")
    monkeypatch.setattr(tiny, "unscored", _stop)
    argv = ["--output-dir", str(tmp_path / "out"), "--no-warm-start", "--quiet"]
    with pytest.raises(_Stop):
        tiny.main(argv + (["--n-train", n_train] if n_train else []))
    out = capsys.readouterr().out
    if n_train is None:
        assert "note" not in out and "--n-train" not in out, out
    else:
        assert out == ("note: procedural(difficulty=2, seed=0) has 19873 distinct train problems besides the test "
                       "split (--n-train 20000 asked for more)\n")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs: room for the folder probe and the parquet files of a small run, not for the 2.4 MB model."""
    yield from small_disk_fixture(tmp_path / "small")


def test_a_full_disk_at_the_parquet_is_one_line_and_installs_nothing(tmp_path, monkeypatch, capsys):
    """train.parquet meets a full disk (/dev/full answers with ENOSPC, as a full tmpfs does; pyarrow's OSError names
    no file): one line naming the file, exit 2, the folder's earlier files untouched, no temporary folder left."""
    import tempfile

    tiny = _load("tiny")
    made = tempfile.mkdtemp

    def full_temp_folder(*args, **kwargs):
        folder = made(*args, **kwargs)
        Path(folder, "train.parquet").symlink_to("/dev/full")
        return folder

    monkeypatch.setattr(tiny.tempfile, "mkdtemp", full_temp_folder)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.parquet").write_text("earlier")
    assert tiny.main(_small(out, "--no-warm-start")) == 2
    err = capsys.readouterr().err
    assert err == (f"error: disk full: cannot write {str(out / 'train.parquet')!r} (No space left on device); free "
                   "space or choose another folder\n")
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"] and (out / "train.parquet").read_text() == "earlier"


def test_a_real_full_disk_at_the_model_is_one_line_and_leaves_nothing(small_disk, capsys):
    """On a 1 MB tmpfs the parquet files fit and the model does not (safetensors says ENOSPC only in words): one line
    naming the model folder, exit 2, and the --output-dir this run created is gone."""
    tiny = _load("tiny")
    out = small_disk / "out"
    assert tiny.main(_small(out, "--no-warm-start")) == 2
    err = capsys.readouterr().err
    assert err == (f"error: disk full: cannot write {str(out / 'model')!r} (No space left on device); free space or "
                   "choose another folder\n")
    assert list(small_disk.iterdir()) == []
