"""Write the bundled arithmetic prompts (`assets/arithmetic_demo.jsonl`: `prompt` / `answer` strings), the data of
the real-model GRPO demo (`configs/grpo_smollm2_135m_lora.yaml`).

Written by this project from a fixed seed, so a test can check the shipped file is exactly what this script
writes. Each prompt asks for the sum or difference of a number below 20 and a digit, and says how to answer
(the number alone); 260 prompts, no two alike; `answer` is GSM8K's form (`#### n`), which the built-in `accuracy` reward reads.
SmolLM2-135M-Instruct answers about 6 in 10 right greedily but only 1 in 10 when it samples at temperature 1
(it miscounts, or talks past the completion length): GRPO raises that within minutes on a CPU.

Run: python -m lightning_tune.data.demo.make_arithmetic_demo
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # lightning_tune/data/assets
SEED = 1234


def _record(a: int, op: str, b: int) -> dict:
    answer = a + b if op == "+" else a - b
    return {"prompt": f"What is {a} {op} {b}? Reply with the number only.", "answer": f"#### {answer}"}


def arithmetic_demo_records() -> list[dict]:
    """Every sum a + b and difference a - b (a >= b) of a in 2..19 and b in 2..9, each once (so held-out
    prompts are not also trained on), in a seeded order: the same on every run and platform."""
    records = [_record(a, op, b) for op in "+-" for a in range(2, 20) for b in range(2, 10) if op == "+" or a >= b]
    random.Random(SEED).shuffle(records)
    return records


def arithmetic_demo_jsonl(records: list[dict]) -> str:
    """The file's text: one JSON record a line."""
    return "".join(json.dumps(record) + "\n" for record in records)


def write(path: Path = ASSETS / "arithmetic_demo.jsonl") -> Path:
    path.write_text(arithmetic_demo_jsonl(arithmetic_demo_records()), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write())
