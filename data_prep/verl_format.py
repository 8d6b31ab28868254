"""Shared code of ``data_prep/gsm8k.py`` and ``data_prep/math_dataset.py``: read, check, convert, write.

Each source row becomes one row of verl's RL parquet format::

    data_source   str   routes to verl's default reward dispatch
                        (verl.utils.reward_score.default_compute_score):
                        "openai/gsm8k" -> gsm8k scorer (strict "#### N" match);
                        "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500"
                        -> math scorer (last \\boxed{} vs ground truth, after string normalisation)
    prompt        list  chat messages: [{"role": "user", "content": <problem + instruction>}]
    ability       str   "math"
    reward_model  dict  {"style": "rule", "ground_truth": <final answer string>}
    extra_info    dict  {"split", "index", "source_file", "source_line", "question", "answer", ...}

Ground truth
    GSM8K: the text after the last ``####`` of the worked answer, stripped, commas removed
    ("#### 1,234" -> "1234"); it must parse as a number.
    MATH / MATH-500: the content of the last ``\\boxed{...}`` of the solution (verl's own
    ``last_boxed_only_string`` / ``remove_boxed``); the two real MATH train rows whose box is
    empty take their answer from :data:`MATH_ERRATA`. MATH-500 rows also carry an ``answer``
    field; it must agree with the boxed answer under verl's ``is_equiv`` or the row is bad.

Bad rows (not JSON, not an object, a missing or empty field, no final answer, answers that
disagree) raise :class:`BadRowError` naming the file and line; with ``skip_bad=True`` they are
skipped, counted, and reported by the caller -- never silently.

Prompts live in :data:`INSTRUCTIONS` (the one place to change them); they follow verl's own
``examples/data_preprocess`` phrasing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# The one place where the prompts are phrased.
# --------------------------------------------------------------------------------------------
INSTRUCTIONS: dict[str, str] = {
    "gsm8k": 'Let\'s think step by step and output the final answer after "####".',
    "math": "Let's think step by step and output the final answer within \\boxed{}.",
}

# data_source values understood by verl.utils.reward_score.default_compute_score
GSM8K_SOURCE = "openai/gsm8k"
MATH_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
MATH500_SOURCE = "HuggingFaceH4/MATH-500"

# Rows of the real MATH release whose solution ends in an EMPTY \\boxed{} (the answer was lost
# when the data set was typeset). Keyed by the SHA-256 of the problem text so that hub and
# local copies both match; value = (ground truth, why). Both are multiple-choice questions
# whose worked solution proves the count is 0 (choice A).
MATH_ERRATA: dict[str, tuple[str, str]] = {
    "6bf518e40168794fbba95ee91ea9d554d1df9d1e01976b708d82702736b488c7": (
        "0",
        "train/number_theory/7115.json: 'there are \\boxed{} primes in that range'; the solution shows none",
    ),
    "debc1683173552965f459a0842c34b946893bc89d68e686bc97eca8e04a94c2a": (
        "0",
        "train/number_theory/7117.json: 'P+n is not prime for any n, so the answer is \\boxed{}' (N = 0)",
    ),
}

_NUMBER_RE = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")
_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")


class BadRowError(ValueError):
    """A source row that cannot become a training row; the message names file and line."""


class InputError(ValueError):
    """An input or output the run cannot use at all (empty or binary file, failed download, unwritable
    --output-dir); the message is the whole one-line error."""


class DownloadError(InputError):
    """The Hugging Face hub could not give a data set (offline, unreachable, unknown repo)."""


@dataclass
class ConvertStats:
    """What happened to one split: rows written, rows skipped (with the first few reasons)."""

    written: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)


@dataclass
class SourceRow:
    """One raw row with where it came from (file or hub id, 1-based line or row number)."""

    where: str
    line: int
    data: Any


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike) -> Iterator[SourceRow]:
    """Yield every non-blank line of a JSON-lines file; lines that are not JSON yield a
    :class:`SourceRow` whose ``data`` is a :class:`BadRowError` (decided later: raise or skip)."""
    path = Path(path)
    if not path.is_file():  # raised here, when called, not at the first row
        raise FileNotFoundError(f"{path}: no such file (expected JSON lines)")
    if not any(line.strip() for _, line in _lines(path)):  # stops at the first non-blank line
        raise InputError(f"{path}: empty file (expected JSON lines, one object a line)")
    return _jsonl_rows(path)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file; InputError naming the file if it is not text."""
    lineno = 0
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                yield lineno, line
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file (line {lineno + 1}); expected JSON lines, "
                         "one object a line") from None


def _jsonl_rows(path: Path) -> Iterator[SourceRow]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            obj = BadRowError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})")
        yield SourceRow(str(path), lineno, obj)


def read_hub(repo: str, config: str | None, split: str) -> Iterator[SourceRow]:
    """Yield the rows of a Hugging Face hub data set split (needs network and ``datasets``); DownloadError
    (one line, naming the data set) when the hub cannot give it."""
    where = f"hf://{repo}" + (f"/{config}" if config else "") + f"[{split}]"
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a declared dependency of the recipes
        raise DownloadError(f"cannot read {where}: reading from the Hugging Face hub needs the `datasets` "
                            "package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(repo, config, split=split) if config else datasets.load_dataset(repo, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, DNS, proxy, 404, cache: all end the same way
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DownloadError(f"could not download {where} from the Hugging Face hub ({reason})") from None
    for i, row in enumerate(ds, start=1):
        yield SourceRow(where, i, dict(row))


# --------------------------------------------------------------------------------------------
# field checks and ground truth
# --------------------------------------------------------------------------------------------
def require_str(row: SourceRow, name: str) -> str:
    """Return a non-empty string field or raise BadRowError naming file, line and field."""
    if not isinstance(row.data, dict):
        raise BadRowError(f"{row.where}:{row.line}: expected a JSON object, got {type(row.data).__name__}")
    if name not in row.data or row.data[name] is None:
        raise BadRowError(f"{row.where}:{row.line}: missing field {name!r} (fields: {sorted(row.data)})")
    value = row.data[name]
    if not isinstance(value, str) or not value.strip():
        raise BadRowError(f"{row.where}:{row.line}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def gsm8k_ground_truth(answer: str) -> str | None:
    """Final answer of a GSM8K worked solution: the text after the last ``####``, commas
    removed (verl's gsm8k scorer removes them from the model's answer too); None if absent
    or not a number."""
    if "####" not in answer:
        return None
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return final if _NUMBER_RE.match(final) else None


def gsm8k_model_style(answer: str) -> str:
    """A GSM8K reference solution as a model would write it: calculator annotations
    ``<<48/2=24>>`` removed, the ``#### N`` line kept."""
    return _CALCULATOR_RE.sub("", answer)


def boxed_answer(solution: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``) of a solution, with verl's parser."""
    from verl.utils.reward_score.math_reward import last_boxed_only_string, remove_boxed

    boxed = last_boxed_only_string(solution)
    if boxed is None:
        return None
    try:
        inner = remove_boxed(boxed)
    except AssertionError:
        return None
    return inner.strip() or None


def math_erratum(problem: str) -> str | None:
    """Ground truth from :data:`MATH_ERRATA` for a problem whose solution has an empty box, else None."""
    import hashlib

    hit = MATH_ERRATA.get(hashlib.sha256(problem.encode("utf-8")).hexdigest())
    return hit[0] if hit else None


def answers_agree(a: str, b: str) -> bool:
    """verl's math equivalence (string normalisation: fractions, units, spaces, ...)."""
    from verl.utils.reward_score.math_reward import is_equiv

    return bool(is_equiv(a, b))


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------
RowConverter = Callable[[SourceRow, str, int], dict]


def verl_row(source: str, row: SourceRow, split: str, index: int, question: str, truth: str, task: str,
             **extra) -> dict:
    """One row in verl's RLHF-dataset layout: the prompt is `question` plus INSTRUCTIONS[task]; `extra_info`
    records where the row came from (file and line) and every `extra` field."""
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": f"{question} {INSTRUCTIONS[task]}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": truth},
        "extra_info": {"split": split, "index": index, "source_file": row.where, "source_line": row.line,
                       "question": question, **extra},
    }


def convert_rows(
    rows: Iterable[SourceRow], convert: RowConverter, split: str, skip_bad: bool, progress: str | None = None
) -> tuple[list[dict], ConvertStats]:
    """Apply ``convert(row, split, index)`` to every row; a BadRowError is raised, or with
    ``skip_bad`` counted in the returned stats. ``index`` counts written rows from 0."""
    from tqdm import tqdm

    out: list[dict] = []
    stats = ConvertStats()
    for row in tqdm(rows, desc=progress or split, unit="row", leave=False, disable=progress is None):
        try:
            if isinstance(row.data, BadRowError):
                raise row.data
            out.append(convert(row, split, len(out)))
        except BadRowError as exc:
            if not skip_bad:
                raise
            stats.skip(str(exc))
    stats.written = len(out)
    return out, stats


def write_parquet(rows: list[dict], path: Path) -> None:
    """Write rows with pyarrow (nested prompt / reward_model / extra_info as list/struct columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        raise ValueError(f"refusing to write {path}: no rows left (all bad?)")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def check_output_dir(folder: Path, flag: str = "--output-dir") -> None:
    """InputError (one line, naming `folder`) unless `folder` is, or can be created as, a writable folder.

    Creates nothing: the write probe is an unnamed temporary file in `folder` or its nearest existing parent."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{flag} {str(folder)!r} exists and is not a folder")
    base = folder
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise InputError(f"{flag} {str(folder)!r} cannot be created: {str(base)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        raise InputError(f"{flag} {str(folder)!r} is not writable ({err.strerror or err})") from None


def convert_then_write(out_dir: Path, jobs, skip_bad: bool, quiet: bool, offline_hint: str = "") -> int:
    """Convert every split, then write `<split>.parquet` for each; returns the exit code.

    `jobs`: (name, split, read_rows, converter) with `read_rows()` giving the source rows. `out_dir` is checked
    first, and every split is read and checked before any file is written; the files are written under
    temporary names and renamed into place together, so a bad row, an empty or missing input, a failed download
    (reported with `offline_hint`), an unwritable `out_dir` or Ctrl-C leaves no half-written output. Each is
    reported in one line (exit 2; Ctrl-C: KeyboardInterrupt, for the caller).
    """
    results = []
    try:
        check_output_dir(out_dir)
        for name, split, read_rows, converter in jobs:
            converted, stats = convert_rows(read_rows(), converter, split, skip_bad, progress=None if quiet else name)
            if not converted:
                first = f"; first: {stats.reasons[0]}" if stats.reasons else ""
                raise InputError(f"{name}: no rows left to write (skipped {stats.skipped} bad rows{first})")
            results.append((name, split, converted, stats))
    except DownloadError as exc:
        print(f"error: {exc}" + (f"; {offline_hint}" if offline_hint else ""), file=sys.stderr)
        return 2
    except (FileNotFoundError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BadRowError as exc:
        print(f"error: {exc} (use --skip-bad to skip bad rows)", file=sys.stderr)
        return 2
    temporary = {split: out_dir / f".{split}.parquet.tmp-{os.getpid()}" for _, split, _, _ in results}
    try:
        for _, split, converted, _ in results:
            write_parquet(converted, temporary[split])
        for _, split, _, _ in results:
            os.replace(temporary[split], out_dir / f"{split}.parquet")
    except OSError as exc:
        print(f"error: cannot write to --output-dir {str(out_dir)!r} ({exc.strerror or exc})", file=sys.stderr)
        return 2
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
    for name, split, _, stats in results:
        print(report(name, out_dir / f"{split}.parquet", stats))
    return 0


def interrupted(prog: str) -> int:
    """Ctrl-C: one line, exit status 130 (nothing was written: every file is renamed into place at the end)."""
    print(f"{prog}: interrupted; nothing written", file=sys.stderr)
    return 130


def report(name: str, path: Path, stats: ConvertStats) -> str:
    """One line per written split: ``<name>: wrote N rows to PATH (skipped K bad rows: ...)``."""
    line = f"{name}: wrote {stats.written} rows to {path}"
    if stats.skipped:
        line += f" (skipped {stats.skipped} bad rows; first: {stats.reasons[0]})"
    return line


def add_common_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    """Options shared by both scripts."""
    parser.add_argument(
        "--output-dir",
        default=default_out,
        help=f"where train.parquet and test.parquet go (default: {default_out})",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad rows (not JSON, missing fields, no final answer) and report how many; "
        "default: stop with an error naming file and line",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
