"""Sandbox task generator and verl's GSM8K reward."""

import random

import pytest

from isreshape_verl.sandbox.task import DIFFICULTY_LEVELS, Problem, make_problem, make_split, procedural_task, score


def _evaluate(prompt: str) -> int:
    """Independent check of a bare-arithmetic prompt like '37+15-8=?'."""
    return eval(prompt.removesuffix("=?"))  # noqa: S307 - digits and +/- only, generated here


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTY_LEVELS))
def test_answers_are_right(difficulty):
    rng = random.Random(difficulty)
    for _ in range(200):
        p = make_problem(rng, difficulty, word_share=0.0)
        assert p.solution.endswith(f"#### {p.answer}")
        assert int(p.answer) == _evaluate(p.prompt) >= 0
        lo, hi, top = DIFFICULTY_LEVELS[difficulty]
        assert lo <= p.prompt.count("+") + p.prompt.count("-") <= hi
        for line in p.solution.splitlines()[:-1]:  # every worked step is right
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs)  # noqa: S307


def test_known_problems_and_word_problems():
    rng = random.Random(0)
    words = [make_problem(rng, 3, word_share=1.0) for _ in range(50)]
    for p in words:
        assert p.prompt.endswith("?") and "How many" in p.prompt
        numbers = [int(t.strip(".")) for t in p.prompt.split() if t.strip(".").isdigit()]
        value = numbers[0]
        for token, n in zip([t for t in p.prompt.split() if t in ("Gets", "Loses")], numbers[1:]):
            value = value + n if token == "Gets" else value - n
        assert str(value) == p.answer


def _gsm8k(answer):
    return Problem("q", f"#### {answer}", answer)


def test_verl_gsm8k_scorer_accepts_format_and_rejects_wrong():
    assert score(["37+15=52\n52-8=44\n#### 44"], [_gsm8k("44")]) == [1.0]
    assert score(["#### 45"], [_gsm8k("44")]) == [0.0]
    assert score(["the answer is 44"], [_gsm8k("44")]) == [0.0]  # strict: needs '#### '
    assert score(["#### 4\n#### 44"], [_gsm8k("44")]) == [1.0]  # the last answer line counts
    assert score([""], [_gsm8k("0")]) == [0.0]


def test_the_data_source_picks_verls_scorer():
    math = Problem("q", "", "\\frac{1}{2}", "HuggingFaceH4/MATH-500")
    assert score(["so $\\boxed{\\frac{1}{2}}$"], [math]) == [1.0]  # the MATH scorer reads \boxed
    assert score(["#### \\frac{1}{2}"], [math]) == [0.0]
    assert score(["so $\\boxed{44}$"], [_gsm8k("44")]) == [0.0]  # and GSM8K's reads '#### ' only


def test_parquet_with_a_source_verl_cannot_score_is_refused(tmp_path):
    import pandas as pd

    from isreshape_verl.sandbox.task import parquet_task

    rows = [{"data_source": "my/unknown", "prompt": [{"role": "user", "content": f"{i}+1?"}],
             "reward_model": {"ground_truth": str(i + 1)}} for i in range(5)]
    pd.DataFrame(rows).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="verl has no reward function for data_source 'my/unknown'"):
        parquet_task(str(tmp_path / "x.parquet"), 2, 0)


def test_split_is_seeded_and_disjoint():
    a = procedural_task(0, 500, 100, 2)
    b = procedural_task(0, 500, 100, 2)
    assert a.train == b.train and a.test == b.test
    assert not {p.prompt for p in a.train} & {p.prompt for p in a.test}
    assert procedural_task(1, 50, 20, 2).test != a.test[:20]
    with pytest.raises(ValueError, match="difficulty"):
        make_problem(random.Random(0), 9)
    # a small difficulty has few distinct problems: the train pool is what exists, not an error
    assert 0 < len(make_split(0, 20000, 1, allow_fewer=True)) < 20000


@pytest.fixture(scope="module")
def tiny_policy():
    from isreshape_verl.sandbox.model import TinyModelArgs, build_policy

    return build_policy(None, TinyModelArgs(), 0)


def test_math_like_parquet_warns_with_the_count_of_unknown_characters(tmp_path, tiny_policy):
    import pandas as pd

    from isreshape_verl.sandbox.task import fit_task, parquet_task

    prompts = [f"What is {i}+1?" for i in range(7)] + ["Find $x^2$ or $y^3$.", "Let $\\frac{1}{2}$ be a_b.", "ok"]
    rows = [{"data_source": "HuggingFaceH4/MATH-500", "prompt": [{"role": "user", "content": q}],
             "reward_model": {"ground_truth": str(i)}} for i, q in enumerate(prompts)]
    pd.DataFrame(rows).to_parquet(tmp_path / "math.parquet")
    task = parquet_task(str(tmp_path / "math.parquet"), 2, 0)
    logged = []
    fitted = fit_task(task, tiny_policy, 28, log=logged.append)
    assert fitted is task  # every prompt fits: nothing dropped, no second line
    assert len(logged) == 1 and logged[0].startswith(f"warning: {task.source}: characters outside")
    # prompts: '^' ×2 (one prompt) + '\\' ×1, '{' ×2, '}' ×2, '_' ×1 (another) = 8 characters, 5 kinds, 2 prompts
    assert "8 character(s) of 5 kind(s) in 2 of 10 prompts" in logged[0]
    assert "'^' ×2" in logged[0] and "'{' ×2" in logged[0] and "'\\\\' ×1" in logged[0] and "'_' ×1" in logged[0]
    # each MATH reference solution "The answer is $\\boxed{i}$." has one '\\', one '{', one '}': 30 in 10 of 10
    assert "30 character(s) of 3 kind(s) in 10 of 10 reference solutions (the model cannot write them)" in logged[0]


def test_procedural_task_fits_silently(tiny_policy):
    from isreshape_verl.sandbox.task import fit_task

    task = procedural_task(0, 50, 10, 3, word_share=0.5)
    logged = []
    assert fit_task(task, tiny_policy, 28, log=logged.append) is task and logged == []


def test_over_long_prompts_are_dropped_with_the_reason_and_refused_when_none_is_left(tiny_policy):
    from isreshape_verl.sandbox.task import TaskData, fit_task

    limit = tiny_policy.model.config.max_position_embeddings  # 256: TinyModelArgs.max_positions
    budget = limit - 28  # prompt tokens = characters + 1 ("\n" ends the prompt): 227 characters just fit
    fits, too_long = Problem("a" * (budget - 1), "#### 1", "1"), Problem("b" * budget, "#### 1", "1")
    longest = Problem("c" * 300, "#### 1", "1")
    task = TaskData([fits, too_long, longest], [fits, too_long], "t")
    logged = []
    fitted = fit_task(task, tiny_policy, 28, log=logged.append)
    assert fitted.train == [fits] and fitted.test == [fits]
    assert logged == [f"t: dropped 2 of 3 train and 1 of 2 test problems: prompt + max_new_tokens (28) must fit the "
                      f"model's {limit} positions, so a prompt may have at most {budget} tokens (the longest prompt "
                      "has 301)"]
    refused = rf"t: no test problem fits: .* all 1 are longer \(the shortest has {budget + 1}\)"
    with pytest.raises(ValueError, match=refused):
        fit_task(TaskData([fits], [too_long], "t"), tiny_policy, 28)
    with pytest.raises(ValueError, match=f"no train problem fits: prompt \\+ max_new_tokens \\({limit}\\)"):
        fit_task(task, tiny_policy, limit)  # no room left for any prompt
