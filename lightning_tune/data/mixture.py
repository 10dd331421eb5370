"""Mixtures of sources (`mixture:` of every data module): the entries checked, how many samples each gives (by
`weight`, never oversampled, or by `count`), which ones (`draw`, seeded) and their token counts; and the split specs
`datasets` reads (`check_split`). `TokenizedDataModule` builds one module per entry and concatenates their draws."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import datasets
import torch

from lightning_tune.data.collate import IGNORE_INDEX
from lightning_tune.data.errors import DataError

# The loading keys a `mixture` entry may set for itself (the batch and tokenizer settings are the mixture's).
LOAD_KEYS = ("source", "name", "revision", "data_files", "split")
# The kinds of SFT sample a `mixture` entry may name as its `format` (the module classes, imported when named).
FORMATS = {"instruct": ("lightning_tune.data.instruct", "InstructDataModule"), "chat": ("lightning_tune.data.chat", "ChatDataModule")}


def check_split(split: str, key: str) -> list[str]:
    """The split names in a `datasets` split spec ("train", "train[:10%]", "train[10:20]+test"); a spec
    `datasets` cannot read is one line naming `key`."""
    try:
        instruction = datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as error:
        raise DataError(
            f"{key}: {split!r} is not a split datasets can read ({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}); e.g. train, train[:10%], train[100:200]"
        ) from None
    del instruction  # read: the spec is valid; its names are what precedes each slice
    return [part.split("[")[0].strip() for part in split.split("+")]


def own_parameters(cls: type) -> set[str]:
    """The named `__init__` parameters a data module class (and its bases below `TokenizedDataModule`) declares:
    the keys of its own format, beside the shared ones."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__name__ == "TokenizedDataModule":
            break
        if "__init__" in klass.__dict__:
            init = inspect.unwrap(klass.__dict__["__init__"])
            names |= {n for n, p in inspect.signature(init).parameters.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names


def mixture_format(name: str, key: str = "format") -> type:
    """The data module class of a `format` name (instruct, chat)."""
    if name not in FORMATS:
        raise DataError(f"{key}: unknown format {name!r}; one of {', '.join(FORMATS)}")
    module, attribute = FORMATS[name]
    return getattr(importlib.import_module(module), attribute)


def check_mixture(mixture: list[dict[str, Any]], cls: type) -> list[dict[str, Any]]:
    """The `mixture` entries checked: each a mapping with a source, known keys, a positive `weight` (every entry
    or none) or a whole `count` (not with weights), a readable split. One line naming the entry otherwise."""
    if not isinstance(mixture, list) or not mixture:
        raise DataError("mixture: expected a list of sources ({source: ..., weight: ...}), got " + (repr(mixture)[:40] if mixture != [] else "an empty list"))
    entries = []
    own = own_parameters(cls)
    for i, entry in enumerate(mixture):
        where = f"mixture[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("source"), str) or not entry["source"]:
            raise DataError(f"{where}: expected a mapping with a source (e.g. {{source: tatsu-lab/alpaca, weight: 0.7}}), got {str(entry)[:60]!r}")
        keys = own if "format" not in entry else own_parameters(mixture_format(entry["format"], f"{where}.format"))
        allowed = set(LOAD_KEYS) | {"weight", "count", "format"} | keys
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise DataError(f"{where}: unknown key(s) {unknown}; an entry takes {', '.join(sorted(allowed))}")
        if "weight" in entry and "count" in entry:
            raise DataError(f"{where}: give weight (a proportion) or count (a number of samples), not both")
        weight = entry.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise DataError(f"{where}.weight: expected a positive number, got {weight!r}")
        count = entry.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise DataError(f"{where}.count: expected a whole number of samples, 1 or more, got {count!r}")
        check_split(entry.get("split", "train"), f"{where}.split")
        entries.append(dict(entry))
    weighted = [i for i, entry in enumerate(entries) if "weight" in entry]
    if weighted and len(weighted) != len(entries):
        missing = [i for i in range(len(entries)) if i not in weighted]
        raise DataError(f"mixture: entries {missing} have no weight; give every entry a weight (proportions) or none (each its count, or all its samples)")
    return entries


def mixture_counts(available: list[int], entries: list[dict[str, Any]]) -> list[int]:
    """How many samples each entry contributes. With weights: proportions p_i = w_i / sum(w), and the largest
    mixture that keeps them without repeating a sample (as TRL's mixtures: no oversampling): N = min_i(a_i / p_i)
    and n_i = floor(p_i N), in exact fractions, so the limiting source gives all of its samples. Without: each
    entry's `count` (more than the source has repeats it: `draw`), else all of its samples."""
    if entries and "weight" in entries[0]:
        weights = [Fraction(str(entry["weight"])) for entry in entries]  # decimal: 0.3 is 3/10, not the float nearest it
        shares = [w / sum(weights) for w in weights]
        total = min(Fraction(a) / p for a, p in zip(available, shares))
        return [math.floor(p * total) for p in shares]
    return [entry.get("count", a) for entry, a in zip(entries, available)]


def draw(available: int, count: int, generator: torch.Generator) -> list[int]:
    """`count` indices of `available` samples: a seeded random subset when count <= available (no repeats), else
    every sample count // available times and a seeded subset of the rest."""
    if available == 0:  # an empty source (an empty file, a split sliced to nothing): nothing to draw, not a division by 0
        if count:
            raise DataError(f"mixture: a source with no samples cannot give {count}")
        return []
    whole, rest = divmod(count, available)
    return list(range(available)) * whole + torch.randperm(available, generator=generator)[:rest].tolist()


def token_counts(data: datasets.Dataset) -> tuple[int, int]:
    """(tokens, trained tokens) of tokenised samples: over every `*input_ids` and `*labels` column, in Arrow."""
    import pyarrow.compute as pc

    table = data.with_format("arrow")[:]
    tokens = sum(pc.sum(pc.list_value_length(table[name])).as_py() or 0 for name in data.column_names if name.endswith("input_ids"))
    trained = sum(pc.sum(pc.not_equal(pc.list_flatten(table[name]), IGNORE_INDEX)).as_py() or 0 for name in data.column_names if name.endswith("labels"))
    return tokens, trained
