"""ChatDataModule: OpenAI and ShareGPT files give identical samples, ids equal transformers, masks and
truncation as configured, the loading/caching/batching shared with InstructDataModule, bad records one line."""

import json
import logging
from pathlib import Path

import pytest
from conftest import asset

from lightning_tune.data import ChatDataModule, DataError, TokenizedDataModule
from lightning_tune.data import chat as chat_module
from lightning_tune.data.collate import IGNORE_INDEX

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "user", "content": "Remember 7."},
        {"role": "assistant", "content": "OK."},
        {"role": "user", "content": "Which number?"},
        {"role": "assistant", "content": "7"},
    ],
    [{"role": "user", "content": "Write code"}, {"role": "assistant", "content": "def f():\n    return 1"}],
]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def openai_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "openai.jsonl", [{"messages": c} for c in CONVERSATIONS])


def sharegpt_file(tmp_path: Path) -> Path:
    records = [{"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in c]} for c in CONVERSATIONS]
    return write_jsonl(tmp_path / "sharegpt.json", records)


def samples(dm: ChatDataModule) -> list[tuple[list[int], list[int]]]:
    dm.setup()
    return [(row["input_ids"], row["labels"]) for row in dm.train_dataset]


@pytest.fixture(params=["llama3_1_tokenizer", "qwen3_tokenizer"], scope="module")
def folder(request) -> Path:
    return asset(request.param)


def test_openai_and_sharegpt_give_identical_samples_equal_to_transformers(folder, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    openai = ChatDataModule(str(openai_file(tmp_path)), tokenizer_path=str(folder), cache_dir=str(tmp_path / "cache"), shuffle=False)
    sharegpt = ChatDataModule(str(sharegpt_file(tmp_path)), tokenizer_path=str(folder), cache_dir=str(tmp_path / "cache"), shuffle=False)
    assert samples(openai) == samples(sharegpt)
    for (ids, labels), conversation in zip(samples(openai), CONVERSATIONS):
        assert ids == reference.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        trained = [label for label in labels if label != IGNORE_INDEX]
        assert trained[-1] == reference.eos_token_id  # the last reply's end-of-turn token is trained
    assert openai.template_name == "the tokenizer's own"


def test_module_shares_loading_batching_and_resume_with_instruct(tmp_path) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    from lightning_tune.data import InstructDataModule
    from lightning_tune.data.sampler import ResumableDistributedSampler

    dm = ChatDataModule(cache_dir=str(tmp_path), max_seq_len=160, batch_size=4, val_size=10)  # the bundled demo
    assert isinstance(dm, TokenizedDataModule) and isinstance(InstructDataModule("demo", cache_dir=str(tmp_path)), TokenizedDataModule)
    loader = dm.train_dataloader()
    assert isinstance(loader, StatefulDataLoader) and isinstance(loader.sampler, ResumableDistributedSampler)
    batch = next(iter(loader))
    assert set(batch) >= {"input_ids", "labels", "positions"} and batch["input_ids"].shape[0] == 1  # packed
    assert len(dm.train_dataset) == 790 and len(dm.val_dataset) == 10 and dm.num_truncated == 0
    assert dm.template_name == "built-in 'llama2'"
    padded = ChatDataModule(cache_dir=str(tmp_path), max_seq_len=160, batch_size=4, pack=False)
    assert next(iter(padded.train_dataloader()))["input_ids"].shape[0] == 4


def test_second_setup_reads_the_cache(tmp_path, monkeypatch) -> None:
    calls = []
    original = chat_module.encode_conversation
    monkeypatch.setattr(chat_module, "encode_conversation", lambda *a, **k: calls.append(1) or original(*a, **k))
    path = openai_file(tmp_path)
    ChatDataModule(str(path), tokenizer_path=str(asset("llama3_1_tokenizer")), cache_dir=str(tmp_path / "c")).setup()
    assert len(calls) == 3
    ChatDataModule(str(path), tokenizer_path=str(asset("llama3_1_tokenizer")), cache_dir=str(tmp_path / "c")).setup()
    assert len(calls) == 3  # same data, tokenizer and settings: nothing re-encoded
    ChatDataModule(str(path), tokenizer_path=str(asset("llama3_1_tokenizer")), cache_dir=str(tmp_path / "c"), train_on="last_assistant").setup()
    assert len(calls) == 6


def test_train_on_and_truncation_through_the_module(tmp_path, caplog) -> None:
    path, folder = openai_file(tmp_path), str(asset("llama3_1_tokenizer"))
    full = samples(ChatDataModule(str(path), tokenizer_path=folder, cache_dir=str(tmp_path), shuffle=False))
    last = samples(ChatDataModule(str(path), tokenizer_path=folder, cache_dir=str(tmp_path), train_on="last_assistant", shuffle=False))
    every = samples(ChatDataModule(str(path), tokenizer_path=folder, cache_dir=str(tmp_path), train_on="all", shuffle=False))
    assert [ids for ids, _ in full] == [ids for ids, _ in last] == [ids for ids, _ in every]
    assert sum(label != IGNORE_INDEX for label in last[1][1]) < sum(label != IGNORE_INDEX for label in full[1][1])
    assert every[1][1] == every[1][0]
    n = len(full[1][0]) - 2  # cuts only conversation 1 (the longest) ...
    assert sorted(len(ids) for ids, _ in full)[-2] <= n
    with caplog.at_level(logging.WARNING):
        cut = ChatDataModule(str(path), tokenizer_path=folder, cache_dir=str(tmp_path), max_seq_len=n, shuffle=False)
        assert samples(cut)[1] == (full[1][0][:n], full[1][1][:n])  # ... keeping its start by default
    reports = [r.getMessage() for r in caplog.records if "longer than max_seq_len" in r.getMessage()]
    assert reports == [f"{path}: 1 of 3 conversations are longer than max_seq_len={n} tokens: kept their first {n} tokens (truncation=keep_start)"]
    dropped = ChatDataModule(str(path), tokenizer_path=folder, cache_dir=str(tmp_path), max_seq_len=n, truncation="drop", shuffle=False)
    assert samples(dropped) == [full[0], full[2]] and dropped.num_left_out == 1


def test_another_template_is_reported_against_the_own_one(tmp_path, caplog) -> None:
    folder = str(asset("llama3_1_tokenizer"))
    other = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    with caplog.at_level(logging.WARNING):
        dm = ChatDataModule(str(openai_file(tmp_path)), tokenizer_path=folder, chat_template=other, cache_dir=str(tmp_path))
        dm.setup()
    reports = [r.getMessage() for r in caplog.records if "differently from the tokenizer's own template" in r.getMessage()]
    assert len(reports) == 1 and "renders record 0" in reports[0] and "from token 4" in reports[0]


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"messages": []}, "record 1 (counting from 0): no messages"),
        ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "record 1 (counting from 0), message 0: unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "record 1 (counting from 0): no assistant turn"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}, "record 1 (counting from 0), message 0 (user): content must be a string, got int"),
        ({"text": "no messages column"}, "record 1 (counting from 0): no messages"),
    ],
)
def test_bad_records_name_the_source_and_record_and_cache_nothing(tmp_path, record, problem) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATIONS[0]}, record])
    cache = tmp_path / "cache"
    dm = ChatDataModule(str(path), tokenizer_path=str(asset("llama3_1_tokenizer")), cache_dir=str(cache))
    with pytest.raises(DataError) as error:
        dm.setup()
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path)) and problem in message, message
    assert not list(cache.rglob("cache-*.arrow"))  # no tokenised cache was written, not even a partial one


def test_a_template_that_fails_to_render_names_the_record(tmp_path) -> None:
    path = openai_file(tmp_path)
    failing = "{% if messages | length > 3 %}{{ raise_exception('at most one turn') }}{% endif %}{{ bos_token }}{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"
    dm = ChatDataModule(str(path), tokenizer_path=str(asset("llama3_1_tokenizer")), chat_template=failing, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"openai\.jsonl: record 1 \(counting from 0\): the chat template failed to render: at most one turn$"):
        dm.setup()
    with pytest.raises(DataError, match=r"data\.chat_template: 'nope' is neither a built-in"):
        ChatDataModule(str(path), tokenizer_path=str(asset("llama3_1_tokenizer")), chat_template="nope").setup()
    with pytest.raises(DataError, match=r"role_map: \{'bot': 'robot'\} map to unknown roles"):
        ChatDataModule(str(path), tokenizer_path=str(asset("llama3_1_tokenizer")), role_map={"bot": "robot"})
    with pytest.raises(DataError, match=r"column_map: unknown field\(s\) \['turns'\]"):
        ChatDataModule(str(path), tokenizer_path=str(asset("llama3_1_tokenizer")), column_map={"turns": "x"})


def test_data_verb_shows_chat_samples_with_masked_spans(tmp_path, capsys) -> None:
    from lightning_tune.cli import main

    assert main(["data", "--config", "tiny_chat.yaml", "--n", "1", f"--data.cache_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "demo: 736 training samples (64 held out for validation)" in out and "0 truncated to max_seq_len=160" in out
    assert "chat template: built-in 'llama2'; train_on: assistant" in out
    sample = out.split("--- sample 0:", 1)[1]
    assert sample.count("[[<s>") == sample.count("</s>") >= 2  # every turn's header masked, every reply's </s> trained
    assert "[/INST]]]" in sample or "[/INST] ]]" in sample
