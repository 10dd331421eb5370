"""Write the bundled preference demo (`assets/preference_demo.jsonl`: prompt / chosen / rejected strings).

Written by this project from a fixed seed, so a test can check the shipped file is exactly what this
script writes. Each prompt asks for a small task over demo-vocabulary words (repeat a word, sum two
numbers, the first or last of a list); the chosen reply answers it, the rejected one is the kind of
reply a preference set rejects (a wrong answer, or an unhelpful refusal). The preference is
consistent, so DPO on a tiny model raises `rewards/accuracies` from 0 to near 1 within a few dozen
steps on a CPU (`configs/tiny_dpo.yaml`).

Run: python -m lightning_tune.data.demo.make_preference_demo
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lightning_tune.data.demo.make_demo import WORDS

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # lightning_tune/data/assets
SEED = 2719
COUNT = 400
REFUSALS = ("I do not know.", "I cannot help with that.", "Ask someone else.")


def _pair(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        word = rng.choice(WORDS)
        prompt, answer, wrong = f"Repeat the word {word}.", word, rng.choice([w for w in WORDS if w != word])
    elif kind == 1:
        a, b = rng.randrange(10), rng.randrange(10)
        prompt, answer, wrong = f"Add {a} and {b}.", str(a + b), str(a + b + rng.choice([-2, -1, 1, 2]))
    else:
        items = rng.sample(WORDS, 3)
        which = rng.choice(["first", "last"])
        answer = items[0] if which == "first" else items[-1]
        prompt, wrong = f"Name the {which} of {', '.join(items)}.", items[-1] if which == "first" else items[0]
    rejected = rng.choice(REFUSALS) if rng.random() < 0.5 else f"The answer is {wrong}."
    return {"prompt": prompt + "\n", "chosen": f"The answer is {answer}.", "rejected": rejected}


def preference_demo_records() -> list[dict]:
    """The demo pairs, the same on every run and platform."""
    rng = random.Random(SEED)
    return [_pair(rng) for _ in range(COUNT)]


def write(path: Path = ASSETS / "preference_demo.jsonl") -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in preference_demo_records()), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write())
