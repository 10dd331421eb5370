"""Verifiable rewards for GRPO, and how a recipe's `reward_funcs` names become callables.

A reward function has TRL's signature: `f(prompts, completions, completion_ids, **columns) -> list[float | None]`,
one value per completion; `completions` are texts (or, for chat prompts, `[{"role": "assistant", "content":
text}]`), the data set's other columns arrive as keyword lists (one entry per completion) and None marks a
completion the function cannot score. Built-ins, by short name: `accuracy` (the final number equals the
reference answer: GSM8K's `#### n`, `\\boxed{n}`), `format` (`<think>...</think>` then an answer),
`overlong` (DAPO's soft overlong punishment), `numeric` (a dense share-of-digits reward for demos). Anything else is an import path the user gave in the config or
on the command line (`resolve_reward_funcs`); a path read from a checkpoint is never imported by the recipes.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from lightning_tune.training.reward_scorer import RewardModelScorer

RewardFunc = Callable[..., list]

_NUMBER = re.compile(r"-?\$?\s*\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_HASHES = re.compile(r"####\s*([^\n]+)")
_THINK = re.compile(r"^\s*<think>.+?</think>\s*\S", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of a chat completion's (last) message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def _boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def parse_number(text: str, last: bool = True) -> Fraction | None:
    """The last (or first) number in `text` as an exact fraction ("1,234", "$5", "-0.5", "3/4"), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    token = found[-1 if last else 0].replace(",", "").replace("$", "").replace(" ", "")
    try:
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> Fraction | None:
    """The final answer of a solution text: the number right after GSM8K's (last) `####`, else in the last
    `\\boxed{}`, else the last number."""
    marked = _HASHES.findall(text)
    if marked:
        return parse_number(marked[-1], last=False)
    boxed = _boxed(text)
    return parse_number(boxed if boxed is not None else text)


def accuracy(prompts: list, completions: list, answer: list | None = None, solution: list | None = None, **columns: Any) -> list[float | None]:
    """1.0 when the completion's final number equals the reference's, else 0.0 (exact, as fractions).

    The reference is the `answer` column (GSM8K: `... #### 72`), else `solution` (a number, `\\boxed{}` or
    `####`); None for a completion whose reference has no number (unscorable)."""
    references = answer if answer is not None else solution
    if references is None:
        raise ValueError("accuracy: the data has no 'answer' or 'solution' column to compare with")
    rewards: list[float | None] = []
    for completion, reference in zip(completions, references, strict=True):
        want = extract_answer(str(reference))
        if want is None:
            rewards.append(None)
            continue
        got = extract_answer(completion_text(completion))
        rewards.append(1.0 if got is not None and got == want else 0.0)
    return rewards


def format(prompts: list, completions: list, **columns: Any) -> list[float]:  # noqa: A001 (the reward's name in configs)
    """1.0 when the completion reasons inside `<think>...</think>` and then gives an answer, else 0.0."""
    return [1.0 if _THINK.match(completion_text(c)) else 0.0 for c in completions]


def numeric(prompts: list, completions: list, **columns: Any) -> list[float]:
    """The share of the completion's non-space characters that are digits (0 for an empty one): a dense
    reward for answering with a number only, which a tiny random model can learn in minutes (the CPU demo)."""
    rewards = []
    for completion in completions:
        text = "".join(completion_text(completion).split())
        rewards.append(sum(ch.isdigit() for ch in text) / len(text) if text else 0.0)
    return rewards


def soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> RewardFunc:
    """DAPO's soft overlong punishment (TRL's `get_soft_overlong_punishment`): 0 up to
    `max_completion_len - soft_punish_cache` tokens, then falling linearly to -1 at `max_completion_len`."""
    if not 0 < soft_punish_cache <= max_completion_len:
        raise ValueError(f"soft_punish_cache: must be in (0, max_completion_len={max_completion_len}], got {soft_punish_cache}")

    def overlong(prompts: list, completions: list, completion_ids: list, **columns: Any) -> list[float]:
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= max_completion_len - soft_punish_cache:
                rewards.append(0.0)
            elif length <= max_completion_len:
                rewards.append((max_completion_len - soft_punish_cache - length) / soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards

    return overlong


BUILTIN = ("accuracy", "format", "numeric", "overlong")


def resolve_reward_funcs(names: Sequence[str], max_completion_len: int) -> list[tuple[str, RewardFunc]]:
    """(name, callable) of each configured reward: a built-in short name, a reward model directory
    (`training/reward_scorer.py`: a `RewardModel` export or any one-label transformers sequence classifier),
    or an import path `package.module.func`
    (imported here: call this only with names a user gave, never with ones read from a file). `overlong`
    punishes the last fifth of `max_completion_len` (DAPO's 4096 of 20480)."""
    funcs = []
    for name in names:
        if name == "overlong":
            funcs.append((name, soft_overlong_punishment(max_completion_len, max(1, max_completion_len // 5))))
        elif name in BUILTIN:
            funcs.append((name, globals()[name]))
        elif Path(name).expanduser().is_dir():  # a reward model (a RewardModel export or a transformers sequence classifier)
            device = "cuda" if torch.cuda.is_available() else None  # each rank's own GPU once Lightning has set it
            funcs.append((Path(name).name, RewardModelScorer(Path(name).expanduser(), device=device)))
        else:
            module_name, _, attr = name.rpartition(".")
            if not module_name:
                raise ValueError(f"reward_funcs: {name!r} is neither a built-in ({', '.join(BUILTIN)}) nor an import path such as my_rewards.correct")
            try:
                func = getattr(importlib.import_module(module_name), attr, None)
            except ImportError as error:
                raise ValueError(f"reward_funcs: cannot import {module_name!r} for {name!r} ({error})") from None
            if not callable(func):
                raise ValueError(f"reward_funcs: {name!r} is not a callable f(prompts, completions, **columns) -> list of floats")
            funcs.append((attr, func))
    return funcs


def score(funcs: Sequence[tuple[str, RewardFunc]], prompts: list, completions: list, completion_ids: list, columns: dict[str, list]) -> list[list[float]]:
    """[completion][function] rewards, NaN for a None; a function that raises, or returns the wrong count or
    a non-number, is named in one line with the completion it failed on."""
    table = [[math.nan] * len(funcs) for _ in completions]
    for f, (name, func) in enumerate(funcs):
        try:
            values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as error:
            index = _failing_sample(func, prompts, completions, completion_ids, columns)
            where = f"completion {index} ({completion_text(completions[index])[:60]!r})" if index is not None else f"a batch of {len(completions)} completions"
            message = str(error).splitlines()[0] if str(error) else ""
            raise RuntimeError(f"reward function {name!r} raised {type(error).__name__} on {where}: {message}") from error
        values = list(values)
        if len(values) != len(completions):
            raise RuntimeError(f"reward function {name!r} returned {len(values)} rewards for {len(completions)} completions (one per completion expected)")
        for i, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise RuntimeError(f"reward function {name!r} returned {value!r} for completion {i} ({completion_text(completions[i])[:60]!r}); expected a float or None")
            table[i][f] = float(value)
    return table


def _failing_sample(func: RewardFunc, prompts: list, completions: list, completion_ids: list, columns: dict[str, list]) -> int | None:
    """The first completion `func` raises on when called on it alone (None if none does alone)."""
    for i in range(len(completions)):
        try:
            func(prompts=prompts[i : i + 1], completions=completions[i : i + 1], completion_ids=completion_ids[i : i + 1], **{k: v[i : i + 1] for k, v in columns.items()})
        except Exception:
            return i
    return None
