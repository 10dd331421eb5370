"""Write the bundled multi-turn chat demo (`assets/chat_demo.jsonl`, OpenAI `messages` records).

Like `make_demo.py`, written by this project from a fixed seed so a test can check the shipped file
is exactly what this script writes. Every conversation has two or three turns whose later answers
depend on earlier ones (remember a word, keep a running sum, the first/last item of a list given
before, a word in capitals then backwards), so a tiny model can only fit them by using the context,
and visibly does in a few minutes on a CPU. Words come from the demo tokenizer's vocabulary, so the
bundled demo tokenizer (`assets/demo_tokenizer.model`, with the built-in llama2 chat template) encodes them well.

Run: python -m lightning_tune.data.demo.make_chat_demo
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lightning_tune.data.demo.make_demo import WORDS

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # lightning_tune/data/assets
SEED = 4321
PER_TASK = 200
SYSTEM = "Answer in a few words."


def _conversation(rng: random.Random, turns: list[tuple[str, str]]) -> dict:
    """A record: an optional system message (a third of them), then the user/assistant turns."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 1 / 3 else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def chat_demo_records() -> list[dict]:
    """The demo conversations, the same on every run and platform."""
    rng = random.Random(SEED)
    records: list[dict] = []
    for _ in range(PER_TASK):
        word = rng.choice(WORDS)
        records.append(_conversation(rng, [(f"Remember the word {word}.", f"OK, {word}."), ("Which word did I give you?", word)]))

        a, b, c = rng.randint(0, 20), rng.randint(0, 20), rng.randint(0, 9)
        records.append(_conversation(rng, [(f"Add {a} and {b}.", str(a + b)), (f"Now add {c}.", str(a + b + c))]))

        items = rng.sample(WORDS, rng.randint(3, 5))
        turns = [(f"Here is a list: {', '.join(items)}.", f"{len(items)} items."), ("What is the first item?", items[0])]
        if rng.random() < 0.5:
            turns.append(("And the last one?", items[-1]))
        records.append(_conversation(rng, turns))

        word = rng.choice(WORDS)
        records.append(_conversation(rng, [(f"Write {word} in capital letters.", word.upper()), ("Now write it backwards.", word.upper()[::-1])]))
    return records


def chat_demo_jsonl(records: list[dict]) -> str:
    """The records as JSON lines (sorted keys, ASCII), the exact text of the shipped file."""
    return "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)


def main() -> None:
    path = ASSETS / "chat_demo.jsonl"
    path.write_text(chat_demo_jsonl(chat_demo_records()), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
