"""Loaders of the bundled demo tasks: local JSON lines, read in memory, never from the Hugging Face Hub.

lm-eval's `dataset_path: json` + `data_files` would resolve a relative path against the current
directory, so the tasks name this module's loader as `custom_dataset` instead: the files are found
beside this file wherever the package is installed, and nothing is written to the datasets cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load(name: str) -> Any:
    """{"test": NAME.jsonl, "fewshot": NAME_fewshot.jsonl where it exists} as a DatasetDict (in memory)."""
    import datasets

    splits = {}
    for split, file in (("test", f"{name}.jsonl"), ("fewshot", f"{name}_fewshot.jsonl")):
        path = HERE / file
        if path.is_file():
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            splits[split] = datasets.Dataset.from_list(records)
    return datasets.DatasetDict(splits)


def load_choice(**kwargs: Any) -> Any:
    """demo_choice.jsonl: instruction, input, choices, answer (index of the right choice); few-shot examples apart."""
    return _load("demo_choice")


def load_generate(**kwargs: Any) -> Any:
    """demo_generate.jsonl: instruction, input, output (the exact answer); few-shot examples apart."""
    return _load("demo_generate")


def load_text(**kwargs: Any) -> Any:
    """demo_text.jsonl: text (scored whole, for perplexity)."""
    return _load("demo_text")
