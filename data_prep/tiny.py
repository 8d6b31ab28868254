"""The CPU sandbox's task and tiny model, for verl: RL parquet + a Hugging Face model folder.

Writes, under ``--output-dir`` (default ``~/data/tiny``)::

    train.parquet   the sandbox's procedural train pool (default preset: difficulty 2, bare arithmetic, task
                    seed 0; 19,873 rows, because difficulty 2 runs out of distinct problems before 20,000)
    test.parquet    the sandbox's RL test set (the first --n-test = 500 problems of its test split; the warm
                    start picked its checkpoint on the first --warm-eval-problems = 256 of them, as the sandbox does)
    model/          the sandbox's warm-started tiny Qwen2 (0.60 M parameters, fp32 safetensors) with its
                    char-level tokenizer, a chat template, and isreshape_tiny.json saying what it is

so that a verl run on these files starts where ``isreshape-verl compare`` starts: the same problems, the same
prompt tokens, the same weights. The task, the model and the warm start are the sandbox's own code
(``experiment.build_task``, ``model.build_policy``, ``warmstart.load_or_train``) called with the sandbox's
identity, so the warm start comes from the sandbox's cache (``$ISRESHAPE_CACHE``, default
``~/.cache/isreshape-verl``) when a ``compare`` run with the same settings has trained it, and lands there
otherwise (minutes the first time: 500 steps, 5.6 min on 2 cores shared with another job;
129 s on 2 idle Intel Xeon cores, as the README's timing of `compare` measured).

Rows follow ``verl_format`` (data_source, prompt, ability, reward_model, extra_info), except that the user
message is the bare question ("13-9-3=?"), with no instruction: the tiny model was warm-started on
``question + "\\n"``. ``data_source`` is "openai/gsm8k": every reference solution ends in ``#### <answer>`` and
scores 1.0 with ``verl.utils.reward_score.default_compute_score`` (checked for every row before writing).
``extra_info.answer`` holds the worked solution, so ``isreshape-verl compare --data DIR/train.parquet`` can
warm-start from the file too.

The tokenizer. The sandbox's tokenizer is char-level (one token per character of ``model.CHARSET``, "\\n" and " "
included). Saved as is, transformers 5 does not load it back: for ``model_type=qwen2`` AutoTokenizer always
builds a ``Qwen2Tokenizer`` (qwen2 is in ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``, so ``tokenizer_class``
in tokenizer_config.json is overridden), and Qwen2Tokenizer rebuilds a byte-level BPE from the saved vocabulary,
whose "\\n" and " " are then missing ("\\n" is "Ċ" and " " is "Ġ" in byte-level form): they vanish. So the folder
holds the same vocabulary (same ids) in byte-level form with no merges: Qwen2Tokenizer, a plain
``PreTrainedTokenizerFast`` over tokenizer.json both give the sandbox's ids for any text over CHARSET.
Text outside CHARSET is dropped instead of becoming ``<unk>`` (the procedural task has none). The chat template
renders a user (or system) message as ``content + "\\n"`` and an assistant message as ``content + <eos>``, so
verl's prompt for a row is exactly the sandbox's ``question + "\\n"``.

Before anything is moved into ``--output-dir``, the folder is loaded back and checked: token ids and decoding of
every prompt and solution, the chat-templated prompt of every problem, and the logits on a batch of prompts
must equal the in-memory sandbox policy's. Everything is written into a temporary folder inside
``--output-dir`` and then renamed into place file by file; only train.parquet, test.parquet and the files
of model/ that this script writes are replaced.

    python data_prep/tiny.py                                  # ~/data/tiny, warm-started (minutes the first time)
    python data_prep/tiny.py --output-dir data/tiny --no-warm-start --n-train 64 --n-test 16   # seconds
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import verl_format as vf  # the sibling module: `python data_prep/tiny.py` puts data_prep/ on sys.path

from isreshape_verl.cli_args import ArgumentParser, add_flags, build, check
from isreshape_verl.sandbox import cli as sandbox_cli
from isreshape_verl.sandbox.warmstart import WarmStartArgs

PROG = "data_prep/tiny.py"
SPLITS = ("train", "test")
MODEL_DIR = "model"
INFO_FILE = "isreshape_tiny.json"

# The sandbox's default preset, built the way `isreshape-verl compare` builds it (the one owner of its values).
SANDBOX_DEFAULT = build(sandbox_cli.CompareArgs, dict(sandbox_cli.PRESETS["default"][1]), sandbox_cli.build_parser()[1])

# The sandbox's prompt format (model.Policy.prompt_ids without a template: question + "\n"; responses end in EOS)
# as a chat template, which is what verl applies to the parquet's prompt messages.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
    "{%- else -%}{{ message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass
class Args:
    """Everything data_prep/tiny.py can set; task and model settings not listed are the sandbox default preset's."""

    output_dir: str = "~/data/tiny"
    """Where train.parquet, test.parquet and model/ go."""
    n_train: int = SANDBOX_DEFAULT.n_train
    """Training problems (the sandbox's --n-train); fewer are written when the task runs out of distinct ones."""
    n_test: int = SANDBOX_DEFAULT.rl.eval_problems
    """Test problems (the sandbox's --eval-problems: the set its RL runs are tested on)."""
    seed: int = SANDBOX_DEFAULT.task_seed
    """Seed of the procedural train/test split (the sandbox's --task-seed); a new seed trains a new warm start."""
    no_warm_start: bool = False
    """Save the freshly initialised model instead of the warm-started one (seconds instead of minutes; for tests)."""
    quiet: bool = False
    """No progress bar during the warm start (a line every --warm-eval-every steps instead)."""
    warm: WarmStartArgs = field(default_factory=WarmStartArgs, metadata={"prefix": "warm"})

    def __post_init__(self):
        check("n_train", self.n_train, self.n_train > 0, "> 0")
        check("n_test", self.n_test, self.n_test > 0, "> 0")


class OutputError(ValueError):
    """An --output-dir that cannot take the files (exit 2)."""


def build_parser() -> tuple[ArgumentParser, list]:
    parser = ArgumentParser(
        prog=PROG,
        description="Write the CPU sandbox's procedural task as verl RL parquet and its warm-started tiny Qwen2 "
        "as a Hugging Face model folder (default preset settings).",
    )
    return parser, add_flags(parser, Args)


def sandbox_args(args: Args):
    """The sandbox's CompareArgs for these settings: its default preset with this task size, seed and warm start."""
    rl = replace(SANDBOX_DEFAULT.rl, eval_problems=args.n_test)
    return replace(SANDBOX_DEFAULT, n_train=args.n_train, task_seed=args.seed, rl=rl, warm=args.warm)


# --------------------------------------------------------------------------------------------
# output folder
# --------------------------------------------------------------------------------------------
def check_output_dir(out: Path) -> None:
    """Create `out` if needed and prove it takes files; the paths this script owns must be of the right kind."""
    from isreshape_verl.paths import ensure_writable_dir

    if out.exists() and not out.is_dir():
        raise OutputError(f"--output-dir {str(out)!r} is a file; a folder (existing or new) is expected")
    ensure_writable_dir(str(out), flag="--output-dir")
    for name in (f"{split}.parquet" for split in SPLITS):
        if (out / name).is_dir():
            raise OutputError(f"--output-dir {str(out)!r}: {name} is a folder; this script writes a file there")
    if (out / MODEL_DIR).exists() and not (out / MODEL_DIR).is_dir():
        raise OutputError(f"--output-dir {str(out)!r}: {MODEL_DIR} is a file; this script writes a folder there")


def install(tmp: Path, out: Path) -> None:
    """Move every file written under `tmp` to the same place under `out` (atomic renames, same filesystem)."""
    for split in SPLITS:
        os.replace(tmp / f"{split}.parquet", out / f"{split}.parquet")
    (out / MODEL_DIR).mkdir(exist_ok=True)
    for path in sorted((tmp / MODEL_DIR).iterdir()):
        os.replace(path, out / MODEL_DIR / path.name)


# --------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------
def verl_rows(problems, split: str, source: str) -> list[dict]:
    """verl_format's row layout with the bare question as the user message (the tiny model's prompt)."""
    return [
        {
            "data_source": p.data_source,
            "prompt": [{"role": "user", "content": p.prompt}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": p.answer},
            "extra_info": {"split": split, "index": i, "question": p.prompt, "answer": p.solution, "source": source},
        }
        for i, p in enumerate(problems)
    ]


def unscored(problems) -> list[str]:
    """Problems whose reference solution verl's default_compute_score does not give 1.0 (should be none)."""
    from verl.utils.reward_score import default_compute_score

    return [p.prompt for p in problems if float(default_compute_score(p.data_source, p.solution, p.answer)) != 1.0]


# --------------------------------------------------------------------------------------------
# model folder
# --------------------------------------------------------------------------------------------
def byte_level_tokenizer(char_tokenizer):
    """The sandbox's char tokenizer with the same ids, as a byte-level BPE without merges (what Qwen2Tokenizer
    rebuilds on load), so every loader of a qwen2 folder gives the sandbox's ids; see the module docstring."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    special = {char_tokenizer.pad_token, char_tokenizer.eos_token, char_tokenizer.unk_token}

    def form(token: str) -> str:  # "\n" -> "Ċ", " " -> "Ġ", printable ASCII unchanged
        return token if token in special else "".join(piece for piece, _ in byte_level.pre_tokenize_str(token))

    vocab = {form(token): i for token, i in char_tokenizer.get_vocab().items()}
    assert len(vocab) == len(char_tokenizer.get_vocab()), "two characters share a byte-level form"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=char_tokenizer.pad_token,
                                  eos_token=char_tokenizer.eos_token, unk_token=char_tokenizer.unk_token)
    out.chat_template = CHAT_TEMPLATE
    return out


def _edit_json(path: Path, **values) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_model(policy, folder: Path, info: dict) -> None:
    """`policy` as a Hugging Face folder: fp32 safetensors, config with head_dim and dtype, tokenizer, info json."""
    import torch

    model = policy.model.to(torch.float32)
    config = model.config
    config.head_dim = config.hidden_size // config.num_attention_heads  # what Qwen2 computes when absent
    model.save_pretrained(folder)
    byte_level_tokenizer(policy.tokenizer).save_pretrained(folder)
    # dtype for transformers 5 is written by save_pretrained; torch_dtype is its name in transformers 4 and vLLM
    _edit_json(folder / "config.json", dtype="float32", torch_dtype="float32")
    # transformers 5 builds a Qwen2Tokenizer for any qwen2 folder anyway; transformers 4 needs the name to load it
    _edit_json(folder / "tokenizer_config.json", tokenizer_class="Qwen2Tokenizer")
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1, default=str) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():  # save_pretrained writes the weights through a private (0600) temp file
        os.chmod(path, 0o666 & ~umask)


def verify_folder(folder: Path, policy, problems) -> list[str]:
    """Load `folder` back with AutoTokenizer / AutoModelForCausalLM and compare with the in-memory `policy`:
    ids and decoding of every prompt and solution, the chat-templated prompt of every problem, and the logits
    on a batch of prompts. Returns what disagrees (empty when the folder reproduces the policy)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    found = []
    tok = AutoTokenizer.from_pretrained(folder)
    texts = [p.prompt for p in problems] + [p.solution for p in problems]
    saved = tok(texts, add_special_tokens=False)["input_ids"]
    sandbox = policy.tokenizer(texts, add_special_tokens=False)["input_ids"]
    bad = [t for t, a, b in zip(texts, saved, sandbox) if a != b]
    if bad:
        found.append(f"{len(bad)} of {len(texts)} texts tokenize differently ({type(tok).__name__}), e.g. {bad[0]!r}")
    bad = [(text, back) for back, text in zip(tok.batch_decode(saved), texts) if back != text]
    if bad:
        found.append(f"{len(bad)} of {len(texts)} texts do not decode back, e.g. {bad[0][0]!r} -> {bad[0][1]!r}")
    prompts = tok.apply_chat_template([[{"role": "user", "content": p.prompt}] for p in problems],
                                      tokenize=False, add_generation_prompt=True)
    bad = [p.prompt for p, text in zip(problems, prompts) if text != p.prompt + "\n"]
    if bad:
        found.append(f"the chat template does not give question + '\\n' for {len(bad)} problems, e.g. {bad[0]!r}")

    from isreshape_verl.sandbox.rollout import left_pad

    ids, mask = left_pad([policy.prompt_ids(p.prompt) for p in problems[:32]], policy.pad_id)  # (B, P)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    was_training = policy.model.training
    policy.model.eval()
    with torch.no_grad():
        diff = (loaded(input_ids=ids, attention_mask=mask).logits - policy.model(input_ids=ids, attention_mask=mask)
                .logits).abs().max().item()
    policy.model.train(was_training)
    if diff > 1e-6:
        found.append(f"the loaded model's logits differ from the sandbox policy's by up to {diff:.3g}")
    return found


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, flags = build_parser()
    ns = parser.parse_args(argv)
    try:
        args = build(Args, vars(ns), flags)
        out = Path(args.output_dir).expanduser()
        created = not out.exists()
        check_output_dir(out)
    except ValueError as err:  # SettingError from a flag, OutputError, or ensure_writable_dir's ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    rc = 1
    try:
        rc = write(args, out, argv, n_train_given=ns.n_train is not None)
        return rc
    except OSError as err:  # a full disk, mostly (the cache, the parquet or the model folder): nothing was installed
        from isreshape_verl.paths import DISK_FULL, os_error_line

        if err.errno not in DISK_FULL and err.filename is None:
            raise  # not a file of ours (a closed stdout pipe, say)
        print(f"error: {os_error_line(err)}", file=sys.stderr)
        rc = 2
        return rc
    finally:
        if rc != 0 and created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a folder this run created and left empty: leave nothing behind


def write(args: Args, out: Path, argv: list[str], n_train_given: bool = True) -> int:
    """Build the task and the (warm-started) policy, write everything into a temporary folder inside `out`,
    check the model folder, then move the files into place. Returns the exit code; a file that cannot be written
    (a full disk) raises OSError naming the file of `out` it was for, with nothing installed.

    `n_train_given`: --n-train was on the command line. Only then does a pool smaller than asked for get a note:
    the default 20,000 is the sandbox's, whose difficulty-2 pool holds 19,873 (the module docstring says so)."""
    import torch
    import transformers

    from isreshape_verl.paths import naming
    from isreshape_verl.sandbox.experiment import build_task, model_identity, task_identity
    from isreshape_verl.sandbox.model import build_policy
    from isreshape_verl.sandbox.rollout import greedy_accuracy
    from isreshape_verl.sandbox.task import fit_task
    from isreshape_verl.sandbox.warmstart import load_or_train

    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" / "Loading weights" bars
    t0 = time.perf_counter()
    sargs = sandbox_args(args)
    policy = build_policy(sargs.model, sargs.tiny, 0)  # as experiment.py builds it: the tiny Qwen2, seed 0
    try:
        task = fit_task(build_task(sargs), policy, sargs.rl.max_new_tokens)
    except ValueError as err:  # more distinct test problems than the difficulty has
        print(f"error: --n-test {args.n_test} is too large for the task: {err}", file=sys.stderr)
        return 2
    train, test = task.train, task.test[: args.n_test]
    if n_train_given and len(train) < args.n_train:
        print(f"note: {task.source} has {len(train)} distinct train problems besides the test split "
              f"(--n-train {args.n_train} asked for more)")
    missed = unscored(train + test)
    if missed:  # the task and verl's scorer disagree: a bug, not bad input
        print(f"error: verl's default_compute_score gives < 1.0 to {len(missed)} reference solutions, e.g. "
              f"{missed[0]!r}", file=sys.stderr)
        return 1
    print(f"policy: {policy.description}, {policy.num_parameters / 1e6:.2f} M parameters")
    print(f"task: {task.source}: {len(train)} train / {len(test)} test problems")

    identity = {"model": model_identity(sargs), "task": task_identity(sargs)}
    if args.no_warm_start:
        warm = {"trained": False, "note": "--no-warm-start: the freshly initialised tiny Qwen2 (torch seed 0), "
                "not the sandbox's warm start"}
    else:
        meta = load_or_train(policy, identity, task.train, task.test, sargs.warm, sargs.rl.max_new_tokens,
                             progress=not args.quiet)
        how = "from the sandbox's cache" if meta["cached"] else f"trained in {meta['seconds']:.0f} s"
        print(f"warm start: greedy accuracy {meta['accuracy']:.3f} after {meta['steps']} steps ({how})")
        warm = {"trained": True, "accuracy": meta["accuracy"], "steps": meta["steps"],
                "accuracy_on": f"the first {min(sargs.warm.eval_problems, len(task.test))} problems of the "
                f"sandbox's test split (test.parquet's first rows), greedy, {sargs.rl.max_new_tokens} new tokens",
                "seconds": meta.get("seconds"), "cached": meta["cached"], "cache_file": meta["path"],
                "settings": asdict(sargs.warm), "history": meta.get("history")}
    test_accuracy = greedy_accuracy(policy, test, sargs.rl.max_new_tokens)
    print(f"model: greedy accuracy on test.parquet ({len(test)} problems): {test_accuracy:.3f}")

    info = {
        "what": "the isreshape-verl CPU sandbox's tiny Qwen2 (char-level vocabulary as a byte-level BPE without "
                "merges) for the files next to this folder; prompt = question + '\\n' (the chat template), "
                "response = worked solution + <eos>",
        "warm_start": warm,
        "test_accuracy": {"value": test_accuracy, "problems": len(test),
                          "how": f"greedy, {sargs.rl.max_new_tokens} new tokens, verl's gsm8k scorer"},
        "model": asdict(sargs.tiny), "parameters": policy.num_parameters,
        "task": {**task_identity(sargs), "source": task.source, "train_rows": len(train), "test_rows": len(test)},
        "sandbox_identity": identity,
        "command": " ".join([PROG, *argv]),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }

    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out))
    try:
        for split, problems in zip(SPLITS, (train, test)):
            with naming(str(out / f"{split}.parquet"), str(tmp / f"{split}.parquet")):  # pyarrow names no file
                vf.write_parquet(verl_rows(problems, split, task.source), tmp / f"{split}.parquet")
        with naming(str(out / MODEL_DIR), str(tmp / MODEL_DIR)):  # safetensors says ENOSPC in words only
            save_model(policy, tmp / MODEL_DIR, info)
        found = verify_folder(tmp / MODEL_DIR, policy, train + test)
        if found:
            print("error: the saved model folder does not reproduce the sandbox policy: " + "; ".join(found),
                  file=sys.stderr)
            return 1
        install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for split, problems in zip(SPLITS, (train, test)):
        print(f"tiny {split}: wrote {len(problems)} rows to {out / f'{split}.parquet'}")
    print(f"tiny model: wrote {out / MODEL_DIR} (checked: tokenizer ids, decoding, chat template and logits equal "
          f"the sandbox's) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
