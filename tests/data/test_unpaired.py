"""UnpairedDataModule and collate_unpaired (issue 33, KTO's data): encoding as the preference data's sides,
the labels, TRL's mismatched KL rows, conversational records and bad records in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import asset

from lightning_tune.data import DataError, UnpairedDataModule, collate_unpaired, encode_sample
from lightning_tune.data.base import DEMO_TOKENIZER
from lightning_tune.data.collate import IGNORE_INDEX

RECORDS = [
    {"prompt": "Add 2 and 3.\n", "completion": "The answer is 5.", "label": True},
    {"prompt": "Name the first of red, car.\n", "completion": "Ask someone else.", "label": False},
    {"prompt": "Repeat sun.\n", "completion": "sun", "label": True},
]


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def module(tmp_path: Path, records: list[dict], **kwargs) -> UnpairedDataModule:
    settings = {
        "source": str(write(tmp_path / "records.jsonl", records)),
        "tokenizer_path": str(DEMO_TOKENIZER),
        "batch_size": len(records),
        "shuffle": False,
        "cache_dir": str(tmp_path / "cache"),
        **kwargs,
    }
    data = UnpairedDataModule(**settings)
    data.setup("fit")
    return data


def test_samples_are_encoded_as_sft_samples_with_their_label(tmp_path: Path) -> None:
    data = module(tmp_path, RECORDS, max_seq_len=64)
    for record, sample in zip(RECORDS, data.train_dataset, strict=True):
        want = encode_sample(data.tokenizer, record["prompt"], record["completion"], 64)
        assert (sample["input_ids"], sample["labels"], sample["label"]) == (want["input_ids"], want["labels"], record["label"])
        assert sample["labels"][: sample["prompt_len"]] == [IGNORE_INDEX] * sample["prompt_len"] and sample["labels"][sample["prompt_len"]] != IGNORE_INDEX


def test_kl_rows_pair_each_prompt_with_the_previous_completion(tmp_path: Path) -> None:
    """TRL's rotation within a batch: row i = prompt i + completion i-1 (row 0 takes the last one's), completion trained."""
    data = module(tmp_path, RECORDS, max_seq_len=64)
    samples = list(data.train_dataset)
    batch = next(iter(data.train_dataloader()))
    assert batch["label"].tolist() == [True, False, True]
    for i, sample in enumerate(samples):
        other = samples[i - 1]
        n, m = sample["prompt_len"], other["prompt_len"]
        ids = [*sample["input_ids"][:n], *other["input_ids"][m:]]
        assert batch["kl_input_ids"][i, : len(ids)].tolist() == ids
        assert batch["kl_labels"][i, : len(ids)].tolist() == [IGNORE_INDEX] * n + other["labels"][m:]
        assert (batch["kl_labels"][i, len(ids) :] == IGNORE_INDEX).all()
    # Truncated to max_seq_len, keeping the start: row 0 (prompt 0 + the last completion) cut one token into the completion.
    cut = samples[0]["prompt_len"] + 1
    short = collate_unpaired(samples, pad_id=data.tokenizer.pad_id, max_seq_len=cut)
    assert short["kl_input_ids"].shape[1] == cut
    assert short["kl_input_ids"][0].tolist() == [*samples[0]["input_ids"][: cut - 1], samples[-1]["input_ids"][samples[-1]["prompt_len"]]]
    assert (short["kl_labels"][0] != IGNORE_INDEX).sum() == 1


def test_conversational_records_train_the_reply(tmp_path: Path) -> None:
    records = [
        {"prompt": [{"role": "user", "content": "Add 2 and 3."}], "completion": [{"role": "assistant", "content": "5"}], "label": True},
        {"prompt": [{"role": "user", "content": "Repeat red."}], "completion": "blue", "label": False},
    ]
    data = module(tmp_path, records, chat_template="llama2", max_seq_len=64)
    for sample in data.train_dataset:
        trained = [t for t, label in zip(sample["input_ids"], sample["labels"], strict=True) if label != IGNORE_INDEX]
        assert 0 < sample["prompt_len"] < len(sample["input_ids"]) and trained
    assert [s["label"] for s in data.train_dataset] == [True, False]


@pytest.mark.parametrize("tools", [None, "json"])
def test_conversational_records_are_tokenised_as_trl_kto_tokenises_them(tools: str | None, tmp_path: Path) -> None:
    """Conversational records as TRL 1.16's KTOTrainer `tokenize_fn` tokenises them, with TRL's own helpers: the prompt
    rendered with the generation prompt, prompt + completion rendered whole (a record's `tools`, here its JSON string,
    passed to both as `tools=`), the completion every token after their common prefix. So what Qwen 3 writes after
    <|im_end|> ("\n") trains as TRL trains it, and a completion that is a turn of tool calls trains whole."""
    transformers = pytest.importorskip("transformers")
    trl_data = pytest.importorskip("trl.data_utils")
    folder = asset("qwen3_tokenizer")
    schemas = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    prompt = [{"role": "user", "content": "What is the weather in Paris?"}]
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    completions = [[call], [{"role": "assistant", "content": "It is sunny."}]] if tools else [[{"role": "assistant", "content": "It is sunny."}], "Rain."]
    records = [{"prompt": prompt, "completion": completion, "label": i == 0} | ({"tools": json.dumps(schemas)} if tools else {}) for i, completion in enumerate(completions)]
    data = module(tmp_path, records, tokenizer_path=str(folder), max_seq_len=512)
    reference = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    kwargs = {"tools": schemas if tools else None}
    for sample, completion in zip(data.train_dataset, completions, strict=True):
        completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        prompt_ids = trl_data._tokenize(reference, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
        ids = trl_data._tokenize(reference, prompt + completion, **kwargs)["input_ids"]
        start = trl_data.common_prefix_length(prompt_ids, ids)
        assert list(sample["input_ids"]) == ids and sample["prompt_len"] == start
        assert list(sample["labels"]) == [IGNORE_INDEX] * start + ids[start:]
        assert reference.decode(ids[start:]).endswith("<|im_end|>\n")
        assert ("get_weather" in reference.decode(ids[:start])) == bool(tools)
    if tools:
        assert "<tool_call>" in reference.decode(data.train_dataset[0]["input_ids"][data.train_dataset[0]["prompt_len"] :])


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "w", "completion": "x", "label": "yes"}, r"record 1 \(counting from 0\): 'label' must be true \(desirable\) or false"),
        ({"prompt": "w", "completion": "", "label": True}, r"record 1 \(counting from 0\): 'completion' is missing or empty"),
        ({"prompt": "w " * 80, "completion": "x", "label": True}, r"record 1 \(counting from 0\): the prompt fills all max_seq_len=16"),
    ],
    ids=["label", "empty", "long-prompt"],
)
def test_bad_record_is_one_line_naming_it(tmp_path: Path, record: dict, message: str) -> None:
    with pytest.raises(DataError, match=message) as error:
        module(tmp_path, [RECORDS[0], record], max_seq_len=16)
    assert "\n" not in str(error.value)


def test_demo_is_the_preference_demo_unpaired() -> None:
    data = UnpairedDataModule(source="demo")
    data.setup("fit")
    assert len(data.train_dataset) == 800 and sum(data.train_dataset["label"]) == 400
