"""Templates, sample encoding (exact ids, masks, truncation), collate, and the demo assets' generator."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from conftest import asset

from lightning_tune.data import IGNORE_INDEX, DataError, collate, encode_sample, get_template
from lightning_tune.data.demo import make_demo
from lightning_tune.data.templates import ALPACA, TEMPLATES


@pytest.fixture
def records(alpaca_tiny_path: Path) -> list[dict]:
    return json.loads(alpaca_tiny_path.read_text())


def reference_sample(reference: spm.SentencePieceProcessor, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Prompt and response ids from sentencepiece alone: encode the whole text once and split at the prompt's length."""
    prompt_ids = reference.encode(prompt)
    whole = reference.encode(prompt + response)
    assert whole[: len(prompt_ids)] == prompt_ids  # the boundary is clean for a prompt ending in "\n"
    return prompt_ids, whole[len(prompt_ids) :]


# --- templates -----------------------------------------------------------------------------------------


def test_alpaca_template_reproduces_every_text_field(records: list[dict]) -> None:
    with_input = sum(bool(record["input"]) for record in records)
    assert 0 < with_input < len(records)  # both forms are exercised
    for record in records:
        assert ALPACA.format(record["instruction"], record["input"]) + record["output"] == record["text"]


def test_template_registry() -> None:
    assert get_template("alpaca") is ALPACA
    none = get_template("none")
    assert none.format("Just the instruction.") == "Just the instruction."
    assert none.format("Instruction", "input") == "Instruction\ninput"
    assert ALPACA.format("Keep {braces} as {is}", "{x}").count("{braces}") == 1
    with pytest.raises(DataError, match="unknown prompt template 'alpaka'; choose one of: alpaca, none"):
        get_template("alpaka")
    assert sorted(TEMPLATES) == ["alpaca", "none"]


# --- encode_sample: exact ids and labels against sentencepiece --------------------------------------------


@pytest.mark.parametrize("has_input", [False, True])
@pytest.mark.parametrize("train_on_input", [False, True])
def test_exact_ids_and_labels(records, llama, reference, has_input: bool, train_on_input: bool) -> None:
    record = next(r for r in records if bool(r["input"]) == has_input)
    prompt = ALPACA.format(record["instruction"], record["input"])
    prompt_ids, response_ids = reference_sample(reference, prompt, record["output"])
    sample = encode_sample(llama, prompt, record["output"], max_seq_len=512, train_on_input=train_on_input)
    expected_ids = [1, *prompt_ids, *response_ids, 2]
    assert sample["input_ids"] == expected_ids
    if train_on_input:
        assert sample["labels"] == expected_ids
    else:
        assert sample["labels"] == [IGNORE_INDEX] * (1 + len(prompt_ids)) + response_ids + [2]
    assert sample["truncated"] is False
    # The first trained token is the response's first token: the prompt's "### Response:\n" ends just before it.
    boundary = 1 + len(prompt_ids)
    assert llama.decode(sample["input_ids"][:boundary]).endswith("### Response:\n")
    assert llama.decode(sample["input_ids"][boundary:]) == record["output"]


def test_every_record_has_one_bos_one_eos_and_aligned_labels(records, llama) -> None:
    for record in records:
        prompt = ALPACA.format(record["instruction"], record["input"])
        sample = encode_sample(llama, prompt, record["output"], max_seq_len=512)
        ids, labels = sample["input_ids"], sample["labels"]
        assert ids.count(llama.bos_id) == 1 and ids[0] == llama.bos_id
        assert ids.count(llama.eos_id) == 1 and ids[-1] == llama.eos_id
        assert len(labels) == len(ids)
        assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids))  # not shifted


def test_truncation_prompt_start_cuts_the_prompt_start_first(records, llama, reference) -> None:
    record = next(r for r in records if r["input"])
    prompt = ALPACA.format(record["instruction"], record["input"])
    prompt_ids, response_ids = reference_sample(reference, prompt, record["output"])
    keep = 6
    max_seq_len = 2 + keep + len(response_ids)
    sample = encode_sample(llama, prompt, record["output"], max_seq_len=max_seq_len, truncation="prompt_start")
    assert sample["truncated"] is True
    assert sample["input_ids"] == [1, *prompt_ids[-keep:], *response_ids, 2]
    assert sample["labels"] == [IGNORE_INDEX] * (1 + keep) + response_ids + [2]
    assert len(sample["input_ids"]) == max_seq_len
    assert llama.decode(prompt_ids[-keep:]).endswith("### Response:\n")  # the header survives
    # Exactly at the limit nothing is cut.
    exact = encode_sample(llama, prompt, record["output"], max_seq_len=2 + len(prompt_ids) + len(response_ids), truncation="prompt_start")
    assert exact["truncated"] is False and exact["input_ids"] == [1, *prompt_ids, *response_ids, 2]


def test_truncation_prompt_start_cuts_the_response_end_only_when_it_alone_does_not_fit(records, llama, reference) -> None:
    record = records[0]  # a three-sentence response
    prompt = ALPACA.format(record["instruction"], record["input"])
    _, response_ids = reference_sample(reference, prompt, record["output"])
    max_seq_len = 10
    for train_on_input in (False, True):
        sample = encode_sample(llama, prompt, record["output"], max_seq_len=max_seq_len, train_on_input=train_on_input, truncation="prompt_start")
        assert sample["truncated"] is True
        assert sample["input_ids"] == [1, *response_ids[: max_seq_len - 2], 2]  # EOS kept, prompt gone
        expected_labels = sample["input_ids"] if train_on_input else [IGNORE_INDEX, *response_ids[: max_seq_len - 2], 2]
        assert sample["labels"] == expected_labels
    with pytest.raises(ValueError, match="max_seq_len must be at least 2"):
        encode_sample(llama, prompt, record["output"], max_seq_len=1)


def test_truncation_keeps_the_start_by_default(records, llama, reference) -> None:
    record = next(r for r in records if r["input"])
    prompt = ALPACA.format(record["instruction"], record["input"])
    prompt_ids, response_ids = reference_sample(reference, prompt, record["output"])
    full = [1, *prompt_ids, *response_ids, 2]
    for max_seq_len in (5, len(prompt_ids) + 1, len(prompt_ids) + 4, len(full) - 1):
        sample = encode_sample(llama, prompt, record["output"], max_seq_len=max_seq_len)
        assert sample["truncated"] is True
        assert sample["input_ids"] == full[:max_seq_len]  # the instruction survives; no EOS after a cut reply
        expected = [IGNORE_INDEX] * (1 + len(prompt_ids)) + response_ids + [2]
        assert sample["labels"] == expected[:max_seq_len]
    exact = encode_sample(llama, prompt, record["output"], max_seq_len=len(full))
    assert exact["truncated"] is False and exact["input_ids"] == full


def test_alpaca_on_llama3_ids_equal_tokenizing_the_whole_text(records) -> None:
    # Byte-level BPE: encoding prompt and response separately would differ where a merge crosses the
    # boundary; one encoding of the whole text, split by offsets, gives exactly transformers' ids.
    transformers = pytest.importorskip("transformers")
    from lightning_tune.tokenizer import load_tokenizer

    folder = asset("llama3_1_tokenizer")
    ours, reference = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    for record in records:
        prompt = ALPACA.format(record["instruction"], record["input"])
        sample = encode_sample(ours, prompt, record["output"], max_seq_len=4096)
        whole = reference(prompt + record["output"])["input_ids"]  # BOS + ids of the whole text
        assert sample["input_ids"] == [*whole, reference.eos_token_id], record["instruction"]
        trained = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]
        assert ours.decode(trained) == record["output"] + "<|eot_id|>"
        first = sample["labels"].index(trained[0])
        assert ours.decode(sample["input_ids"][1:first]) == prompt  # the masked part is exactly the prompt


# --- collate -------------------------------------------------------------------------------------------


def test_collate_right_pads_to_the_longest_in_the_batch() -> None:
    samples = [
        {"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]},
        {"input_ids": [1, 7, 2], "labels": [1, 7, 2]},
        {"input_ids": [1, 8, 9, 10, 11, 2], "labels": [-100, 8, 9, 10, 11, 2]},
    ]
    batch = collate(samples, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "label_index"}
    # b * T + t for every position t whose next label is trained (computed on the host, for the loss)
    assert batch["label_index"].tolist() == [1, 2, 6, 7, 12, 13, 14, 15, 16]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 6)  # longest of the batch, not max_seq_len
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0], [1, 8, 9, 10, 11, 2]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 2, -100, -100], [1, 7, 2, -100, -100, -100], [-100, 8, 9, 10, 11, 2]]


def test_right_padding_does_not_change_real_tokens_under_causal_attention() -> None:
    # The documented attention story, checked: a causal layer's outputs at real positions ignore the padding.
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    embed = torch.nn.Embedding(16, 8)
    short = collate([{"input_ids": [1, 5, 2], "labels": [1, 5, 2]}], pad_id=0)["input_ids"]
    padded = collate([{"input_ids": [1, 5, 2], "labels": [1, 5, 2]}, {"input_ids": [1, 3, 4, 6, 7, 2], "labels": [1] * 6}], pad_id=0)["input_ids"][:1]

    def run(ids: torch.Tensor) -> torch.Tensor:
        x = embed(ids)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return attention(x, x, x, attn_mask=mask, need_weights=False)[0]

    torch.testing.assert_close(run(padded)[:, :3], run(short))


# --- demo assets -----------------------------------------------------------------------------------------


def test_demo_generator_reproduces_the_shipped_assets() -> None:
    records = make_demo.demo_records()
    shipped = make_demo.ASSETS / "demo.jsonl"
    assert make_demo.demo_jsonl(records) == shipped.read_text(encoding="utf-8")
    assert 300 <= len(records) <= 2000
    tasks = {record["instruction"] for record in records if not record["instruction"].startswith("Count from")}
    assert len(tasks) == 5 and any(not record["input"] for record in records)
    shipped_model = spm.SentencePieceProcessor(model_file=str(make_demo.ASSETS / "demo_tokenizer.model"))
    retrained = spm.SentencePieceProcessor(model_proto=make_demo.train_demo_tokenizer(records))
    pieces = [shipped_model.id_to_piece(i) for i in range(shipped_model.vocab_size())]
    assert pieces == [retrained.id_to_piece(i) for i in range(retrained.vocab_size())]
    assert sum(path.stat().st_size for path in make_demo.ASSETS.iterdir()) < 1_000_000


def test_demo_answers_follow_from_the_input() -> None:
    for record in make_demo.demo_records():
        instruction, given, answer = record["instruction"], record["input"], record["output"]
        if instruction.startswith("Write the word"):
            assert answer == given.upper()
        elif instruction.startswith("Reverse"):
            assert answer.split(", ") == given.split(", ")[::-1]
        elif instruction.startswith("Add"):
            a, b = given.split(" + ")
            assert int(answer) == int(a) + int(b)
        elif instruction.startswith("Name the last"):
            assert answer == given.split(", ")[-1]
        elif instruction.startswith("How many"):
            assert int(answer) == len(given.split(", "))
        else:
            start, stop = (int(word.rstrip(".")) for word in instruction.split()[2::2])
            assert answer == " ".join(str(n) for n in range(start, stop + 1))
