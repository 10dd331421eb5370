"""Where records come from (issue 34): a Hub data set's config (`name`), `revision`, `data_files`, a sliced `split`
and column maps, tested on local folders laid out as Hub data sets are (a README.md `configs:` block, a config per
folder, sharded splits). The reference is `datasets.load_dataset` itself on the same folder."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from lightning_tune.cli import main
from lightning_tune.data import ChatDataModule, DataError, InstructDataModule, PreferenceDataModule, PromptDataModule, UnpairedDataModule
from lightning_tune.data.base import DEMO_TOKENIZER
from lightning_tune.data.instruct import encode_sample
from lightning_tune.data.templates import ALPACA
from lightning_tune.tokenizer import load_tokenizer

README = """---
configs:
- config_name: main
  default: true
  data_files:
  - split: train
    path: main/train-*.parquet
  - split: test
    path: main/test-*.parquet
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train.parquet
---
# A data set laid out as on the Hub: two configs, the main one's train split in two parquet shards.
"""


def records(prefix: str, count: int) -> list[dict]:
    """Question/answer records (GSM8K's column names), each distinct."""
    return [{"question": f"{prefix} question {i}: what is {i} plus {i % 7}?", "answer": f"{i + i % 7}"} for i in range(count)]


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    """tmp_path/hub: config main (train: 2 parquet shards of 30 and 20 records; test: 10), config socratic (train: 12)."""
    root = tmp_path / "hub"
    (root / "main").mkdir(parents=True)
    (root / "socratic").mkdir()
    (root / "README.md").write_text(README)
    pd.DataFrame(records("main-a", 30)).to_parquet(root / "main" / "train-00000-of-00002.parquet", index=False)
    pd.DataFrame(records("main-b", 20)).to_parquet(root / "main" / "train-00001-of-00002.parquet", index=False)
    pd.DataFrame(records("main-test", 10)).to_parquet(root / "main" / "test-00000-of-00001.parquet", index=False)
    pd.DataFrame(records("socratic", 12)).to_parquet(root / "socratic" / "train.parquet", index=False)
    return root


QA = {"instruction": "question", "output": "answer"}


def instruct(source: Path | str, tmp_path: Path, **kwargs) -> InstructDataModule:
    dm = InstructDataModule(source=str(source), tokenizer_path=str(DEMO_TOKENIZER), cache_dir=str(tmp_path / "cache"), shuffle=False, pack=False, **kwargs)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("name, split", [("main", "train"), ("main", "train[:50%]"), ("main", "train[10:25]"), ("main", "test"), ("socratic", "train[-4:]"), (None, "train+test")])
def test_config_and_sliced_split_give_what_load_dataset_gives(hub, tmp_path, name, split) -> None:
    """Each sample is encode_sample of the record `datasets.load_dataset(folder, name, split=split)` returns at that place."""
    dm = instruct(hub, tmp_path, name=name, split=split, column_map=QA)
    expected = datasets.load_dataset(str(hub), name, split=split, cache_dir=str(tmp_path / "reference"))
    tokenizer = load_tokenizer(str(DEMO_TOKENIZER))
    assert len(dm.train_dataset) == len(expected) > 0
    for sample, record in zip(dm.train_dataset, expected):
        want = encode_sample(tokenizer, ALPACA.format(record["question"], ""), record["answer"], dm.max_seq_len)
        assert (sample["input_ids"], sample["labels"]) == (want["input_ids"], want["labels"])
    if name == "socratic":
        assert all(r["question"].startswith("socratic") for r in expected)


def test_data_files_pick_files_of_a_folder(tmp_path) -> None:
    """data_files (relative to the folder, as `datasets` reads them) selects those files only."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for name, count in (("a", 5), ("b", 3), ("c", 4)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"instruction": f"{name}{i}", "output": "x"}) + "\n" for i in range(count)))
    assert len(instruct(folder, tmp_path).train_dataset) == 12
    assert len(instruct(folder, tmp_path, data_files="b.jsonl").train_dataset) == 3
    assert len(instruct(folder, tmp_path, data_files=["a.jsonl", "c.jsonl"]).train_dataset) == 9
    assert len(instruct(folder, tmp_path, data_files={"train": "c.jsonl"}).train_dataset) == 4


def test_options_reach_load_dataset_as_given(hub, tmp_path, monkeypatch) -> None:
    """name, revision, data_files and split go to `datasets.load_dataset` unchanged (a local folder ignores revision; the Hub does not)."""
    calls: list[tuple[tuple, dict]] = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    files = {"train": "main/train-00001-of-00002.parquet"}
    dm = instruct(hub, tmp_path, name="main", revision="0123abc", data_files=files, split="train[:5]", column_map=QA)
    assert calls == [((str(hub),), {"name": "main", "revision": "0123abc", "data_files": files, "split": "train[:5]", "cache_dir": str(tmp_path / "cache")})]
    assert len(dm.train_dataset) == 5 and dm.load_options()["revision"] == "0123abc"


def test_slicing_a_single_file(tmp_path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"i{i}", "output": f"o{i}"}) + "\n" for i in range(20)))
    assert len(instruct(path, tmp_path, split="train[:10%]").train_dataset) == 2
    assert len(instruct(path, tmp_path, split="train[5:]").train_dataset) == 15


# One-line errors: (module, settings, the line expected in full or in part)
COLUMN_ERRORS = [
    (InstructDataModule, dict(column_map={"instruction": "prompt", "output": "answer"}), "no column 'prompt' for field 'instruction' (columns: question, answer)"),
    (InstructDataModule, dict(), "no column 'instruction' for field 'instruction' (columns: question, answer)"),
    (ChatDataModule, dict(check_samples=0, chat_template="llama2"), "no column 'messages' of messages (columns: question, answer)"),
    (PreferenceDataModule, dict(column_map={"prompt": "question"}), "no column 'chosen' for field 'chosen' (columns: question, answer)"),
    (UnpairedDataModule, dict(column_map={"prompt": "question", "completion": "answer"}), "no column 'label' for field 'label' (columns: question, answer)"),
    (PromptDataModule, dict(column_map={"prompt": "text"}), "no column 'text' for the prompt (columns: question, answer)"),
]


@pytest.mark.parametrize("cls, settings, expected", COLUMN_ERRORS, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(COLUMN_ERRORS)])
def test_column_map_is_checked_against_the_real_columns(hub, tmp_path, cls, settings, expected) -> None:
    """Every data module names, in one line at setup, the column it misses and the columns the data has."""
    dm = cls(source=str(hub), name="main", tokenizer_path=str(DEMO_TOKENIZER), cache_dir=str(tmp_path / "cache"), **settings)
    with pytest.raises(DataError) as error:
        dm.setup("fit")
    assert "\n" not in str(error.value) and expected in str(error.value)


def test_prompts_subset_is_the_config_name(hub, tmp_path) -> None:
    """PromptDataModule's older `subset` is `name`: the same records."""
    kwargs = dict(source=str(hub), tokenizer_path=str(DEMO_TOKENIZER), cache_dir=str(tmp_path / "cache"), split="train[:6]", shuffle=False)
    by_subset, by_name = PromptDataModule(subset="socratic", **kwargs), PromptDataModule(name="socratic", **kwargs)
    by_subset.setup("fit")
    by_name.setup("fit")
    assert by_subset.train_dataset["prompt"] == by_name.train_dataset["prompt"] == [r["question"] for r in records("socratic", 6)]


def test_bad_options_are_one_line(hub, tmp_path) -> None:
    single = tmp_path / "one.jsonl"
    single.write_text(json.dumps({"instruction": "i", "output": "o"}) + "\n")
    at_init = [
        (dict(source=str(hub), split="train[:5"), "split: 'train[:5' is not a split datasets can read"),
        (dict(source=str(single), split="test"), "split: a single file has one split, train (sliceable: train[:10%]), got 'test'"),
        (dict(source=str(single), name="main", revision="abc"), "name, revision: only for a Hub data set or a folder laid out as one"),
        (dict(source=str(single), data_files="x.jsonl"), "data_files: only for a Hub data set"),
        (dict(source=str(hub), streaming=True, val_size=0.1), "val_size: a stream has no known length"),
        (dict(source=str(hub), streaming=True, group_by_length=True), "group_by_length: needs every sample's length up front"),
        (dict(source=str(hub), streaming=True, mixture=[{"source": str(hub)}]), "streaming: takes one source, not a mixture"),
    ]
    for kwargs, expected in at_init:
        with pytest.raises(DataError) as error:
            InstructDataModule(tokenizer_path=str(DEMO_TOKENIZER), **kwargs)
        assert "\n" not in str(error.value) and expected in str(error.value), kwargs
    with pytest.raises(DataError) as error:
        instruct(hub, tmp_path, name="main", split="validation", column_map=QA)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{hub}, name 'main', split 'validation': cannot load this folder (")


def test_cli_bad_split_is_one_line_and_exit_code(capsys) -> None:
    assert main(["data", "--config", "tiny_lora.yaml", "--data.split", "train[:5"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "split: 'train[:5' is not a split datasets can read" in err


def test_demo_stands_in_for_any_data(tmp_path) -> None:
    """check-config swaps a config's source for "demo": the Hub options of the config (a revision, a config name, a
    split such as train_sft) are then ignored, a slice of train still applies."""
    full = instruct("demo", tmp_path, name="main", revision="0123abc", split="train_sft")
    assert len(full.train_dataset) == 1500
    assert len(instruct("demo", tmp_path, name="main", split="train[:10]").train_dataset) == 10


@pytest.mark.parametrize(
    "error, says",
    [
        (ConnectionError("Couldn't reach 'org/data' on the Hub (LocalEntryNotFoundError)"), "; you are offline: point source at a local copy (a folder laid out as on the Hub"),
        (FileNotFoundError("Dataset 'org/data' doesn't exist on the Hub or cannot be accessed."), "; if you are offline, point source at a local folder"),
    ],
)
def test_a_hub_name_without_a_network_is_one_line_saying_so(tmp_path, monkeypatch, error, says) -> None:
    """What `datasets` raises with no network (as on this machine without HF_HUB_OFFLINE) against what it raises for a
    name the Hub does not have: only the first is called offline; both are one line naming the options given."""

    def unreachable(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    dm = InstructDataModule(source="org/data", name="main", revision="abc", tokenizer_path=str(DEMO_TOKENIZER), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as caught:
        dm.setup("fit")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"org/data, name 'main', revision 'abc': cannot load this data set from the Hugging Face Hub ({error})")
    assert says in message and ("you are offline:" in message) == isinstance(error, ConnectionError)
