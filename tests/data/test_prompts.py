"""GRPO's prompts (issue 31): string prompts through the template, chat prompts through the chat template with
the generation prompt (ids equal transformers' `apply_chat_template`), the other columns kept for the rewards,
long prompts left out, bad records in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import asset

from lightning_tune.data import DataError, PromptDataModule
from lightning_tune.data.base import DEMO_TOKENIZER
from lightning_tune.tokenizer.chat_template import render


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_demo_prompts_and_columns(tmp_path: Path) -> None:
    """The demo's string prompts are BOS + their tokens (no EOS); `answer` (from the demo's chosen reply) and
    the other columns arrive per prompt, in batch order."""
    data = PromptDataModule(source="demo", batch_size=3, shuffle=False, cache_dir=str(tmp_path))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert len(batch["prompt_ids"]) == 3 and set(batch["columns"]) == {"answer", "rejected"}
    for ids, prompt, answer, index in zip(batch["prompt_ids"], batch["prompts"], batch["columns"]["answer"], batch["prompt_index"], strict=True):
        assert ids == data.tokenizer.encode(prompt, add_bos=True, add_eos=False)
        assert answer.startswith("The answer is") and isinstance(index, int)


def test_chat_prompts_equal_transformers_apply_chat_template(tmp_path: Path) -> None:
    """Message prompts (and string prompts with as_chat, a system prompt first, Qwen 3's enable_thinking off)
    render with the tokenizer's own template and the generation prompt: the ids transformers' apply_chat_template gives."""
    import transformers

    folder = asset("qwen3_tokenizer")
    records = [
        {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}], "answer": "red"},
    ]
    data = PromptDataModule(source=str(write(tmp_path / "chat.jsonl", records)), tokenizer_path=str(folder), batch_size=2, shuffle=False, cache_dir=str(tmp_path / "c"))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    for ids, prompt in zip(batch["prompt_ids"], batch["prompts"], strict=True):
        assert ids == reference.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert batch["columns"] == {"answer": ["5", "red"]}

    strings = write(tmp_path / "strings.jsonl", [{"question": "What is 2 + 3?", "answer": "#### 5"}])
    data = PromptDataModule(
        source=str(strings), tokenizer_path=str(folder), as_chat=True, system_prompt="Think first.", chat_template_kwargs={"enable_thinking": False}, batch_size=1, cache_dir=str(tmp_path / "d")
    )
    data.setup("fit")
    (ids,) = next(iter(data.train_dataloader()))["prompt_ids"]
    messages = [{"role": "system", "content": "Think first."}, {"role": "user", "content": "What is 2 + 3?"}]
    want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, enable_thinking=False)["input_ids"]
    assert ids == want and want != reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]

    # Exported with the model (a fit writes chat_template_used into merged/ and the GGUF): rendered without the
    # system prompt and enable_thinking, by transformers and by our `chat`'s renderer, it prompts as the run did;
    # a caller's own system message and variables still win.
    exported, plain = data.chat_template_used, [{"role": "user", "content": "What is 2 + 3?"}]
    assert reference.apply_chat_template(plain, chat_template=exported, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] == ids
    assert data.tokenizer.encode_with_offsets(render(exported, plain, special_tokens=data.tokenizer.special_tokens, add_generation_prompt=True).text, chat=True)[0] == ids
    other = [{"role": "system", "content": "Other."}, *plain]
    assert (
        reference.apply_chat_template(other, chat_template=exported, add_generation_prompt=True, tokenize=True, return_dict=True, enable_thinking=True)["input_ids"]
        == reference.apply_chat_template(other, add_generation_prompt=True, tokenize=True, return_dict=True, enable_thinking=True)["input_ids"]
    )


def test_long_prompts_are_left_out_and_bad_records_named(tmp_path: Path) -> None:
    records = [{"prompt": "short one", "answer": "1"}, {"prompt": " ".join(["long"] * 40), "answer": "2"}, {"prompt": "also short", "answer": "3"}]
    data = PromptDataModule(source=str(write(tmp_path / "p.jsonl", records)), tokenizer_path=str(DEMO_TOKENIZER), max_seq_len=16, batch_size=4, cache_dir=str(tmp_path / "c"))
    data.setup("fit")
    assert len(data.train_dataset) == 2 and data.num_truncated == 1
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": ""}])
    with pytest.raises(DataError, match=r"record 1 \(counting from 0\): 'prompt' is missing or empty") as error:
        PromptDataModule(source=str(bad), tokenizer_path=data.tokenizer_path, cache_dir=str(tmp_path / "e")).setup("fit")
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="no column 'question' for the prompt"):
        PromptDataModule(source=str(bad), tokenizer_path=data.tokenizer_path, column_map={"prompt": "question"}, cache_dir=str(tmp_path / "f")).setup("fit")


def test_the_arithmetic_demo_is_what_its_script_writes_and_loads_by_pkg_path(tmp_path: Path) -> None:
    """The real-model GRPO demo's prompts (grpo_smollm2_135m_lora.yaml) are exactly what the script writes, each
    answer is its question's sum or difference, and `pkg://lightning_tune/...` names the shipped file as a source."""
    import re

    from lightning_tune.data.demo.make_arithmetic_demo import ASSETS, arithmetic_demo_jsonl, arithmetic_demo_records

    records = arithmetic_demo_records()
    assert (ASSETS / "arithmetic_demo.jsonl").read_text(encoding="utf-8") == arithmetic_demo_jsonl(records)
    for record in records:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\? Reply with the number only\.", record["prompt"]).groups()
        assert record["answer"] == f"#### {int(a) + int(b) if op == '+' else int(a) - int(b)}" and (op == "+" or int(a) >= int(b))
    assert len({r["prompt"] for r in records}) == len(records) == 260  # no prompt twice: held-out ones are not trained on

    source = "pkg://lightning_tune/data/assets/arithmetic_demo.jsonl"
    data = PromptDataModule(source=source, tokenizer_path=str(DEMO_TOKENIZER), batch_size=2, shuffle=False, val_size=32, cache_dir=str(tmp_path))
    data.setup("fit")
    assert len(data.train_dataset) + len(data.val_dataset) == len(records)
    batch = next(iter(data.train_dataloader()))
    prompts = {r["prompt"]: r["answer"] for r in records}
    assert all(prompts[p] == a for p, a in zip(batch["prompts"], batch["columns"]["answer"], strict=True))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("pkg://lightning_tune/../setup.jsonl", "leaves package 'lightning_tune'"),
        ("pkg://no_such_package_xyz/data.jsonl", "Python package 'no_such_package_xyz' is not installed"),
        ("pkg://lightning_tune/data/assets/missing.jsonl", "pkg://lightning_tune/data/assets/missing.jsonl: no such file"),
    ],
)
def test_a_bad_pkg_source_is_one_line(source: str, expected: str) -> None:
    with pytest.raises(DataError) as error:
        PromptDataModule(source=source, tokenizer_path=str(DEMO_TOKENIZER))
    assert expected in str(error.value) and "\n" not in str(error.value)
