"""MATH -> verl RL parquet: train on MATH train (7,500), test on MATH-500 (500) or the full MATH test (5,000).

Sources: the Hugging Face hub (``DigitalLearningGmbH/MATH-lighteval`` for MATH train/test,
``HuggingFaceH4/MATH-500`` for MATH-500), or local JSON lines with the same schema:
``--local-dir DIR`` holds MATH ``train.jsonl`` / ``test.jsonl``; ``--math500-dir DIR5``
holds MATH-500 ``test.jsonl`` (default with --local-dir: ``DIR/../math500``).

Each row: the problem followed by ``verl_format.INSTRUCTIONS["math"]`` (answer in \\boxed{})
as one user message; ``data_source`` = ``DigitalLearningGmbH/MATH-lighteval`` (train, full
test) or ``HuggingFaceH4/MATH-500`` -- both route to verl's math scorer; ground truth = the
last \\boxed{} of the solution (for MATH-500 it must agree with the ``answer`` field).

    python data_prep/math_dataset.py                    # hub, test = MATH-500, to ~/data/math
    python data_prep/math_dataset.py --test-set full    # test = the 5,000 MATH test problems
    python data_prep/math_dataset.py --local-dir ../shared/data/math --output-dir data/math

Never train on MATH test when evaluating on MATH-500: every MATH-500 problem is a MATH test problem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import verl_format as vf  # the sibling module: `python data_prep/math_dataset.py` puts data_prep/ on sys.path

TEST_SETS = ("math500", "full")
OFFLINE_HINT = ("offline? pass --local-dir DIR, a folder with MATH train.jsonl and test.jsonl (JSON lines with the "
                "fields 'problem' and 'solution', as in DigitalLearningGmbH/MATH-lighteval), and for --test-set math500 "
                "--math500-dir DIR5 with MATH-500 test.jsonl (fields 'problem', 'solution', 'answer')")


def convert_math(row: vf.SourceRow, split: str, index: int) -> dict:
    """A MATH (lighteval schema) row -> a verl row; the ground truth is the last \\boxed{}."""
    problem = vf.require_str(row, "problem")
    solution = vf.require_str(row, "solution")
    truth = vf.boxed_answer(solution) or vf.math_erratum(problem)
    if truth is None:
        raise vf.BadRowError(f"{row.where}:{row.line}: no \\boxed{{}} final answer in field 'solution'")
    return _row(vf.MATH_SOURCE, row, split, index, problem, solution, truth,
                level=str(row.data.get("level", "")), subject=str(row.data.get("type", "")))


def convert_math500(row: vf.SourceRow, split: str, index: int) -> dict:
    """A MATH-500 row -> a verl row; the last \\boxed{} must agree with the ``answer`` field."""
    problem = vf.require_str(row, "problem")
    solution = vf.require_str(row, "solution")
    answer = vf.require_str(row, "answer")
    truth = vf.boxed_answer(solution)
    if truth is None:
        raise vf.BadRowError(f"{row.where}:{row.line}: no \\boxed{{}} final answer in field 'solution'")
    if not vf.answers_agree(truth, answer):
        raise vf.BadRowError(
            f"{row.where}:{row.line}: last \\boxed{{}} of the solution ({truth!r}) disagrees with 'answer' ({answer!r})"
        )
    return _row(vf.MATH500_SOURCE, row, split, index, problem, solution, truth,
                level=str(row.data.get("level", "")), subject=str(row.data.get("subject", "")))


def _row(source, row, split, index, problem, solution, truth, level, subject) -> dict:
    return vf.verl_row(source, row, split, index, problem, truth, "math", solution=solution, level=level,
                       subject=subject, unique_id=str(row.data.get("unique_id", "")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="data_prep/math_dataset.py",
        description="Write MATH as verl RL parquet: train = MATH train (7,500); "
        "test = MATH-500 (500, default) or the full MATH test (5,000).",
    )
    parser.add_argument(
        "--test-set",
        choices=TEST_SETS,
        default="math500",
        help="math500: HuggingFaceH4/MATH-500 (default); full: the 5,000 MATH test problems",
    )
    parser.add_argument(
        "--local-dir",
        default=None,
        help="folder with MATH train.jsonl and test.jsonl (schema of DigitalLearningGmbH/MATH-lighteval); "
        "default: the HF hub",
    )
    parser.add_argument(
        "--math500-dir",
        default=None,
        help="folder with MATH-500 test.jsonl (schema of HuggingFaceH4/MATH-500); "
        "default: LOCAL_DIR/../math500 with --local-dir, else the HF hub",
    )
    vf.add_common_args(parser, default_out="~/data/math")
    return parser


def _sources(args) -> dict:
    """split -> (rows iterator, converter)."""
    local = Path(args.local_dir).expanduser() if args.local_dir else None
    train = vf.read_jsonl(local / "train.jsonl") if local else vf.read_hub(vf.MATH_SOURCE, None, "train")
    if args.test_set == "full":
        test = vf.read_jsonl(local / "test.jsonl") if local else vf.read_hub(vf.MATH_SOURCE, None, "test")
        return {"train": (train, convert_math), "test": (test, convert_math)}
    if args.math500_dir:
        test = vf.read_jsonl(Path(args.math500_dir).expanduser() / "test.jsonl")
    elif local:
        guess = local.parent / "math500" / "test.jsonl"
        if not guess.is_file():
            raise FileNotFoundError(f"--test-set math500 with --local-dir needs --math500-dir (looked for {guess})")
        test = vf.read_jsonl(guess)
    else:
        test = vf.read_hub(vf.MATH500_SOURCE, None, "test")
    return {"train": (train, convert_math), "test": (test, convert_math500)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            sources = _sources(args)
        except (FileNotFoundError, vf.InputError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        jobs = [(f"math {split}" + (f" ({args.test_set})" if split == "test" else ""), split,
                 (lambda rows=rows: rows), converter) for split, (rows, converter) in sources.items()]
        return vf.convert_then_write(Path(args.output_dir).expanduser(), jobs, args.skip_bad, args.quiet,
                                     offline_hint=OFFLINE_HINT)
    except KeyboardInterrupt:
        return vf.interrupted("data_prep/math_dataset.py")


if __name__ == "__main__":
    sys.exit(main())
