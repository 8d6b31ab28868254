"""Procedurally generated, verifiable math problems for the CPU sandbox, scored with verl's rewards.

Every problem is a short chain of additions and subtractions, written either as bare arithmetic
("37+15-8=?") or as a one-line word problem ("Ann has 37 pens. She gets 15 more. How many pens now?").
The reference solution shows each step on its own line and ends in GSM8K's answer line:

    37+15=52
    52-8=44
    #### 44

so `verl.utils.reward_score.gsm8k.compute_score(response, answer)` (strict: the last `#### <number>`)
is the reward. `difficulty` (1–5) sets the number of operations and the operand range; train and test
problems come from different seeds and no test prompt ever appears in training.

Simplified on purpose: integers only, results never negative, a handful of word templates. That is
enough for a 1 M-parameter char-level model to be partially right after a short warm start and to
improve with RL; for GSM8K/MATH use `--data FILE.parquet` (verl format, as written by data_prep).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from verl.utils.reward_score import default_compute_score

GSM8K_SOURCE = "openai/gsm8k"  # the procedural task's answers are GSM8K-format

# difficulty → (min operations, max operations, largest operand)
DIFFICULTY_LEVELS = {1: (1, 2, 9), 2: (2, 2, 20), 3: (1, 2, 50), 4: (2, 3, 99), 5: (3, 4, 999)}

_NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Max", "Sam", "Tom")
_THINGS = ("pens", "cats", "eggs", "cups", "hats", "keys", "apples", "books")


@dataclass(frozen=True)
class Problem:
    prompt: str  # the question text, e.g. "37+15-8=?"
    solution: str  # the worked solution ending in "#### <answer>" (or "\\boxed{<answer>}" for MATH data)
    answer: str  # the ground truth, e.g. "44"
    data_source: str = GSM8K_SOURCE  # picks verl's scorer, as in verl's own reward manager


def _chain(rng: random.Random, difficulty: int) -> tuple[int, list[tuple[str, int]]]:
    lo_ops, hi_ops, top = DIFFICULTY_LEVELS[difficulty]
    start = rng.randint(1, top)
    ops, value = [], start
    for _ in range(rng.randint(lo_ops, hi_ops)):
        if value > 0 and rng.random() < 0.5:
            operand = rng.randint(1, min(value, top))
            ops.append(("-", operand))
            value -= operand
        else:
            operand = rng.randint(1, top)
            ops.append(("+", operand))
            value += operand
    return start, ops


def _solution(start: int, ops: list[tuple[str, int]]) -> tuple[str, str]:
    lines, value = [], start
    for op, operand in ops:
        new = value + operand if op == "+" else value - operand
        lines.append(f"{value}{op}{operand}={new}")
        value = new
    lines.append(f"#### {value}")
    return "\n".join(lines), str(value)


def _word_prompt(rng: random.Random, start: int, ops: list[tuple[str, int]]) -> str:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    parts = [f"{name} has {start} {thing}."]
    for op, operand in ops:
        parts.append(f"{'Gets' if op == '+' else 'Loses'} {operand}.")
    parts.append(f"How many {thing}?")
    return " ".join(parts)


def make_problem(rng: random.Random, difficulty: int = 3, word_share: float = 0.0) -> Problem:
    """One random problem; `word_share` of them are word problems, the rest bare arithmetic."""
    if difficulty not in DIFFICULTY_LEVELS:
        raise ValueError(f"difficulty={difficulty!r} is not allowed; allowed: {', '.join(map(str, DIFFICULTY_LEVELS))}")
    start, ops = _chain(rng, difficulty)
    solution, answer = _solution(start, ops)
    if rng.random() < word_share:
        prompt = _word_prompt(rng, start, ops)
    else:
        prompt = str(start) + "".join(f"{op}{operand}" for op, operand in ops) + "=?"
    return Problem(prompt, solution, answer)


def make_split(seed: int, n: int, difficulty: int = 3, word_share: float = 0.0, exclude: set | None = None,
               allow_fewer: bool = False) -> list[Problem]:
    """`n` distinct problems from `seed` whose prompts are not in `exclude` (used to keep test out of train).

    With `allow_fewer`, returns what it found when the difficulty has fewer than `n` distinct problems."""
    rng, seen, out = random.Random(seed), set(exclude or ()), []
    misses = 0  # consecutive duplicates: many means the difficulty has run out of distinct problems
    while len(out) < n:
        problem = make_problem(rng, difficulty, word_share)
        if problem.prompt in seen:
            misses += 1
            if misses > 5000:
                if allow_fewer and out:
                    return out
                raise ValueError(f"could not draw {n} distinct problems at difficulty {difficulty}; ask for fewer")
            continue
        misses = 0
        seen.add(problem.prompt)
        out.append(problem)
    return out


def score(responses: list[str], problems: list[Problem]) -> list[float]:
    """verl's reward for each response: `default_compute_score(data_source, ...)`, the function verl's reward
    manager calls, so a GSM8K problem is scored by the GSM8K scorer and a MATH problem by the MATH one."""
    return [float(default_compute_score(p.data_source, r, p.answer)) for r, p in zip(responses, problems)]


@dataclass(frozen=True)
class TaskData:
    """Prompts as text (chat messages for --data), reference solutions (for the warm start) and answers."""

    train: list[Problem]
    test: list[Problem]
    source: str


def procedural_task(seed: int, n_train: int, n_test: int, difficulty: int, word_share: float = 0.0) -> TaskData:
    """Test problems from `seed + 1_000_003`, train from `seed`, disjoint by prompt."""
    test = make_split(seed + 1_000_003, n_test, difficulty, word_share)
    train = make_split(seed, n_train, difficulty, word_share, exclude={p.prompt for p in test}, allow_fewer=True)
    return TaskData(train, test, f"procedural(difficulty={difficulty}, seed={seed})")


def unknown_characters(tokenizer, texts: list[str]) -> list[list[str]]:
    """For each text, the characters `tokenizer` turns into its unknown token, in order of appearance (for the
    tiny model's char-level tokenizer: every character outside `model.CHARSET`). Empty lists for a tokenizer
    without an unknown token (byte-level BPE writes any text) or without character offsets (slow tokenizers)."""
    unk = tokenizer.unk_token_id
    if unk is None or not getattr(tokenizer, "is_fast", False) or not texts:
        return [[] for _ in texts]
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    return [[text[a:b] for tok, (a, b) in zip(ids, offsets) if tok == unk]
            for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"])]


def _unknown_report(what: str, unknown: list[list[str]]) -> str | None:
    """'4346 character(s) of 14 kind(s) in 355 of 500 <what> ('\\' ×1512, ...)', or None when there are none."""
    counts = Counter(ch for chars in unknown for ch in chars)
    if not counts:
        return None
    listed = ", ".join(f"{ch!r} ×{n}" for ch, n in counts.most_common())
    hit = sum(1 for chars in unknown if chars)
    return f"{sum(counts.values())} character(s) of {len(counts)} kind(s) in {hit} of {len(unknown)} {what} ({listed})"


def fit_task(task: TaskData, policy, max_new_tokens: int, log=print) -> TaskData:
    """The task as `policy` can run it, saying what it changed.

    * Characters the policy's tokenizer maps to its unknown token (the tiny model's char-level tokenizer knows
      only `model.CHARSET`) are counted in the prompts and in the reference solutions (warm-start targets) and
      reported as one warning through `log`; nothing is dropped for them.
    * A problem whose prompt (in tokens, as `policy.prompt_ids` builds it) plus `max_new_tokens` exceeds the
      model's positions (`config.max_position_embeddings`; `TinyModelArgs.max_positions` for the tiny model)
      is dropped, with one line through `log` saying how many from each split and why.

    Raises ValueError naming the limit when no train or no test problem fits.
    """
    problems = task.train + task.test
    prompts = unknown_characters(policy.tokenizer, [p.prompt for p in problems])
    solutions = unknown_characters(policy.tokenizer, [p.solution for p in problems])
    found = [r for r in (_unknown_report("prompts", prompts),
                         _unknown_report("reference solutions (the model cannot write them)", solutions)) if r]
    if found:
        unk = policy.tokenizer.unk_token
        log(f"warning: {task.source}: characters outside the tokenizer's vocabulary become {unk}: " + "; ".join(found))

    limit = int(policy.model.config.max_position_embeddings)
    budget = limit - max_new_tokens  # the longest prompt that leaves room for a full response

    splits = {"train": task.train, "test": task.test}
    lengths = {name: [len(policy.prompt_ids(p.prompt)) for p in split] for name, split in splits.items()}
    kept = {name: [p for p, n in zip(split, lengths[name]) if n <= budget] for name, split in splits.items()}
    why = (f"prompt + max_new_tokens ({max_new_tokens}) must fit the model's {limit} positions, "
           f"so a prompt may have at most {budget} tokens")
    for name in splits:
        if not kept[name]:
            raise ValueError(f"{task.source}: no {name} problem fits: {why}, and all {len(splits[name])} are longer "
                             f"(the shortest has {min(lengths[name], default=0)}); lower max_new_tokens or use a "
                             "model with more positions")
    dropped = {name: len(splits[name]) - len(kept[name]) for name in splits}
    if not any(dropped.values()):
        return task
    longest = max(max(n, default=0) for n in lengths.values())
    log(f"{task.source}: dropped {dropped['train']} of {len(task.train)} train and {dropped['test']} of "
        f"{len(task.test)} test problems: {why} (the longest prompt has {longest})")
    return TaskData(kept["train"], kept["test"], f"{task.source}, prompts ≤ {budget} tokens")


def _check_scorers(path: str, problems: list[Problem]) -> None:
    """Refuse data whose data_source verl cannot score, or whose reference solution would score 0."""
    for source in sorted({p.data_source for p in problems}):
        first = next(p for p in problems if p.data_source == source)
        try:
            reward = float(default_compute_score(source, first.solution, first.answer))
        except NotImplementedError:
            raise ValueError(f"{path}: verl has no reward function for data_source {source!r} "
                             "(see verl.utils.reward_score.default_compute_score)") from None
        if reward <= 0:
            raise ValueError(f"{path}: verl's scorer for {source!r} gives {reward} to the reference answer "
                             f"{first.answer!r}; the sandbox cannot learn from this data")


def _type_problem(field, expected: str, ok) -> str | None:
    return None if ok(field.type) else f"column {field.name} is {field.type}; expected {expected}"


def check_verl_parquet(path: str) -> None:
    """Refuse, before any work, a parquet file that is not verl-format data, naming the column and the type
    expected (verl's RL dataset reads these columns the same way):

        prompt        list<struct<role: string, content: string>>   the chat messages
        reward_model  struct<ground_truth: ...>                      the answer verl's scorer compares with
        data_source   string (optional)                              picks verl's scorer
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as err:  # noqa: BLE001 - any reader error means "not parquet"
        raise ValueError(f"--data {path!r} is not a readable parquet file ({err})") from None
    missing = [name for name in ("prompt", "reward_model") if name not in schema.names]
    if missing:
        raise ValueError(f"--data {path!r} is not verl-format: it needs columns prompt and reward_model "
                         f"(missing {', '.join(missing)})")

    def is_messages(kind):
        return ((pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_struct(kind.value_type)
                and {"role", "content"} <= {f.name for f in kind.value_type})

    checks = [(schema.field("prompt"), "a list of chat messages, list<struct<role: string, content: string>>",
               is_messages),
              (schema.field("reward_model"), "struct<ground_truth: ...> (e.g. {'style': 'rule', 'ground_truth': "
               "'42'})", lambda kind: pa.types.is_struct(kind) and "ground_truth" in {f.name for f in kind})]
    if "data_source" in schema.names:
        checks.append((schema.field("data_source"), "string",
                       lambda kind: pa.types.is_string(kind) or pa.types.is_large_string(kind)))
    for field, expected, ok in checks:
        problem = _type_problem(field, expected, ok)
        if problem:
            raise ValueError(f"--data {path!r}: {problem}")


def parquet_task(path: str, n_test: int, seed: int, log=print) -> TaskData:
    """verl-format parquet (prompt = chat messages, reward_model.ground_truth); a seeded hold-out is the test split.

    The prompt's last user message is the question; `extra_info.answer` (GSM8K's worked solution) is used
    as the warm-start target when present, else `#### <ground truth>`.
    """
    import pandas as pd

    frame = pd.read_parquet(path)
    missing = {"prompt", "reward_model"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path} is not verl-format data: missing column(s) {', '.join(sorted(missing))}")
    problems = []
    for row in frame.itertuples(index=False):
        messages = list(row.prompt)
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        truth = str(row.reward_model["ground_truth"])
        source = str(getattr(row, "data_source", GSM8K_SOURCE) or GSM8K_SOURCE)
        extra = getattr(row, "extra_info", None) or {}
        if source == GSM8K_SOURCE:
            solution = extra.get("answer") if isinstance(extra, dict) and extra.get("answer") else f"#### {truth}"
        else:  # verl's MATH scorers read the last \boxed{...}
            solution = f"The answer is $\\boxed{{{truth}}}$."
        problems.append(Problem(question, str(solution), truth, source))
    _check_scorers(path, problems)
    if len(problems) < 2:
        raise ValueError(f"{path} has {len(problems)} rows; need at least 2")
    random.Random(seed).shuffle(problems)
    wanted, n_test = n_test, min(n_test, len(problems) // 5 or 1)
    if n_test < wanted:  # say so: an accuracy on a handful of problems moves in big steps
        log(f"warning: {path}: {n_test} test problems instead of the {wanted} asked for (at most a fifth of its "
            f"{len(problems)} rows is held out); one problem is {100 / n_test:.1f} accuracy points")
    return TaskData(problems[n_test:], problems[:n_test], f"parquet({path})")
