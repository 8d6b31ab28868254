"""GSM8K -> verl RL parquet (train.parquet, test.parquet).

Source: the Hugging Face hub (``openai/gsm8k``, config ``main``), or ``--local-dir DIR``
holding ``train.jsonl`` and ``test.jsonl`` with the same schema (``question``, ``answer``).

Each row: ``data_source="openai/gsm8k"`` (verl's gsm8k scorer), the question followed by
the instruction in ``verl_format.INSTRUCTIONS["gsm8k"]`` as one user message, and the
ground truth = the number after the last ``####`` of the worked answer, commas removed.

    python data_prep/gsm8k.py                                   # from the hub, to ~/data/gsm8k
    python data_prep/gsm8k.py --local-dir ../shared/data/gsm8k --output-dir data/gsm8k
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import verl_format as vf  # the sibling module: `python data_prep/gsm8k.py` puts data_prep/ on sys.path

SPLITS = ("train", "test")
OFFLINE_HINT = ("offline? pass --local-dir DIR, a folder with train.jsonl and test.jsonl (JSON lines with the fields "
                "'question' and 'answer', as in openai/gsm8k main)")


def convert(row: vf.SourceRow, split: str, index: int) -> dict:
    """One GSM8K row -> one verl row (BadRowError when a field or the ``#### N`` is missing)."""
    question = vf.require_str(row, "question")
    answer = vf.require_str(row, "answer")
    truth = vf.gsm8k_ground_truth(answer)
    if truth is None:
        raise vf.BadRowError(f"{row.where}:{row.line}: no numeric final answer after '####' in field 'answer'")
    return vf.verl_row(vf.GSM8K_SOURCE, row, split, index, question, truth, "gsm8k", answer=answer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="data_prep/gsm8k.py",
        description="Write GSM8K as verl RL parquet (train 7,473 rows, test 1,319 rows on the full data).",
    )
    parser.add_argument(
        "--local-dir",
        default=None,
        help="folder with train.jsonl and test.jsonl (schema of openai/gsm8k main); default: the HF hub",
    )
    vf.add_common_args(parser, default_out="~/data/gsm8k")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def reader(split):
        if args.local_dir:
            return lambda: vf.read_jsonl(Path(args.local_dir).expanduser() / f"{split}.jsonl")
        return lambda: vf.read_hub("openai/gsm8k", "main", split)

    jobs = [(f"gsm8k {split}", split, reader(split), convert) for split in SPLITS]
    try:
        return vf.convert_then_write(Path(args.output_dir).expanduser(), jobs, args.skip_bad, args.quiet,
                                     offline_hint=OFFLINE_HINT)
    except KeyboardInterrupt:
        return vf.interrupted("data_prep/gsm8k.py")


if __name__ == "__main__":
    sys.exit(main())
