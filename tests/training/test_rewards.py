"""GRPO's built-in rewards and how reward functions are called (issue 31)."""

from __future__ import annotations

import math

import pytest

from lightning_tune.training.rewards import accuracy, extract_answer, format, numeric, resolve_reward_funcs, score, soft_overlong_punishment


def test_accuracy_reads_gsm8k_and_boxed_answers_exactly() -> None:
    reference = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,234"
    completions = ["So the total is \\boxed{1234}.", "The answer is 1234.0", "#### 1235", "I cannot tell.", [{"role": "assistant", "content": "#### $1,234"}]]
    assert accuracy(None, completions, answer=[reference] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert accuracy(None, ["3/4", "0.75", "\\boxed{\\frac{3}{4}}"], solution=["0.75", "\\boxed{0.75}", "0.75"])[:2] == [1.0, 1.0]
    assert accuracy(None, ["5"], answer=["no number here"]) == [None]  # unscorable: NaN reward, advantage 0
    assert extract_answer("first 3, then #### -7 and 9") == -7
    with pytest.raises(ValueError, match="no 'answer' or 'solution' column"):
        accuracy(None, ["1"])


def test_format_numeric_and_overlong_equal_trl() -> None:
    from trl.rewards import get_soft_overlong_punishment, think_format_reward

    texts = ["<think>\nreasoning\n</think>\nThe answer.", "<think>no end", "answer only", "<think>a</think>b"]
    assert format(None, texts) == think_format_reward([[{"content": t}] for t in texts])
    assert numeric(None, ["12 34", "a1", "", "x"]) == [1.0, 0.5, 0.0, 0.0]
    ids = [[1] * n for n in (70, 80, 81, 90, 100, 101)]
    assert soft_overlong_punishment(100, 20)(None, None, completion_ids=ids) == get_soft_overlong_punishment(100, 20)(completion_ids=ids)


def boom(prompts, completions, **columns):
    if any("bad" in c for c in completions):
        raise KeyError("no such key")
    return [1.0] * len(completions)


def test_score_names_the_function_and_the_sample_in_one_line() -> None:
    funcs = [("boom", boom), ("numeric", numeric)]
    table = score(funcs, ["p"] * 2, ["1", "2"], [[1], [2]], {})
    assert table == [[1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(RuntimeError, match=r"reward function 'boom' raised KeyError on completion 1 \('bad one'\): 'no such key'") as error:
        score(funcs, ["p"] * 3, ["ok", "bad one", "fine"], [[1], [2], [3]], {})
    assert "\n" not in str(error.value)
    with pytest.raises(RuntimeError, match="returned 1 rewards for 2 completions"):
        score([("short", lambda **kw: [1.0])], ["p"] * 2, ["a", "b"], [[1], [2]], {})
    with pytest.raises(RuntimeError, match=r"returned 'x' for completion 0"):
        score([("text", lambda **kw: ["x"])], ["p"], ["a"], [[1]], {})
    nan = score([("none", lambda **kw: [None])], ["p"], ["a"], [[1]], {})
    assert math.isnan(nan[0][0])


def test_resolve_reward_funcs() -> None:
    funcs = resolve_reward_funcs(["accuracy", "overlong", "lightning_tune.training.rewards.numeric"], max_completion_len=100)
    assert [name for name, _ in funcs] == ["accuracy", "overlong", "numeric"]
    assert funcs[1][1](None, None, completion_ids=[[0] * 90]) == [-0.5]  # the last fifth (20 tokens) punished
    with pytest.raises(ValueError, match="is not a callable"):
        resolve_reward_funcs(["lightning_tune.training.rewards.BUILTIN"], 10)
    with pytest.raises(ValueError, match="neither a built-in"):
        resolve_reward_funcs(["correct"], 10)
