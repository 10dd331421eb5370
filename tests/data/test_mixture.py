"""Mixtures (issue 34): several sources, each with its own loading keys, column map or format, drawn by `weight`
(proportions, never oversampled) or `count`, reproducible from `seed`, split across DDP ranks with no sample lost or
doubled. Each source's samples are identified by their ids, which the reference (the same module on that source
alone) gives."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from lightning_tune.cli import main
from lightning_tune.cli.parser import print_config
from lightning_tune.data import ChatDataModule, DataError, InstructDataModule
from lightning_tune.data.base import DEMO_TOKENIZER
from lightning_tune.data.mixture import mixture_counts

SIZES = {"a": 40, "b": 25, "c": 60}


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    """Three instruction files of distinct records; c's columns are named question/answer (a column map reads them)."""
    paths = {}
    for name, size in SIZES.items():
        path = tmp_path / f"{name}.jsonl"
        keys = ("question", "answer") if name == "c" else ("instruction", "output")
        path.write_text("".join(json.dumps({keys[0]: f"source {name} record {i}: say {i}", keys[1]: f"{name}{i}"}) + "\n" for i in range(size)))
        paths[name] = path
    return paths


def entries(sources: dict[str, Path], **extra: dict) -> list[dict]:
    out = []
    for name, path in sources.items():
        entry = {"source": str(path), **extra.get(name, {})}
        if name == "c":
            entry["column_map"] = {"instruction": "question", "output": "answer"}
        out.append(entry)
    return out


def module(tmp_path: Path, mixture: list[dict], **kwargs) -> InstructDataModule:
    dm = InstructDataModule(mixture=mixture, tokenizer_path=str(DEMO_TOKENIZER), cache_dir=str(tmp_path / "cache"), pack=False, **kwargs)
    dm.setup("fit")
    return dm


def alone(tmp_path: Path, entry: dict) -> list[tuple[int, ...]]:
    """The reference: the samples of one entry's source through the module alone."""
    dm = InstructDataModule(tokenizer_path=str(DEMO_TOKENIZER), cache_dir=str(tmp_path / "cache"), pack=False, shuffle=False, **entry)
    dm.setup("fit")
    return [tuple(ids) for ids in dm.train_dataset["input_ids"]]


def origin(tmp_path: Path, mixture: list[dict]) -> dict[tuple[int, ...], int]:
    """Sample ids -> the index of the entry whose source gives it."""
    table: dict[tuple[int, ...], int] = {}
    for i, entry in enumerate(mixture):
        own = {k: v for k, v in entry.items() if k not in ("weight", "count")}
        for ids in alone(tmp_path, own):
            assert ids not in table  # the sources' samples are distinct, so each identifies its source
            table[ids] = i
    return table


def test_weights_give_the_largest_mixture_in_proportion_without_oversampling(sources, tmp_path) -> None:
    """Weights 0.5 / 0.3 / 0.2 over 40 / 25 / 60 samples: p = (1/2, 3/10, 1/5); N = min(40/(1/2), 25/(3/10), 60/(1/5))
    = min(80, 83.3, 300) = 80, so n = floor(p N) = 40, 24, 16: a is used whole, none is repeated."""
    mixture = entries(sources, a={"weight": 0.5}, b={"weight": 0.3}, c={"weight": 0.2})
    dm = module(tmp_path, mixture)
    table = origin(tmp_path, mixture)
    got = Counter(table[tuple(ids)] for ids in dm.train_dataset["input_ids"])
    assert [got[i] for i in range(3)] == [40, 24, 16] == [s["drawn"] for s in dm.mixture_stats]
    assert len(set(map(tuple, dm.train_dataset["input_ids"]))) == len(dm.train_dataset) == 80  # no sample twice
    assert [s["available"] for s in dm.mixture_stats] == [40, 25, 60]
    # tokens per source: the sum over exactly those samples
    by_source = Counter()
    trained = Counter()
    for ids, labels in zip(dm.train_dataset["input_ids"], dm.train_dataset["labels"]):
        by_source[table[tuple(ids)]] += len(ids)
        trained[table[tuple(ids)]] += sum(label != -100 for label in labels)
    assert [(s["tokens"], s["trained"]) for s in dm.mixture_stats] == [(by_source[i], trained[i]) for i in range(3)]


def test_weight_rule_in_exact_fractions() -> None:
    """Weights 1/3 each over 30 / 30 / 30: floats would give 29 for some; the fractions give 30 each."""
    assert mixture_counts([30, 30, 30], [{"weight": 1}, {"weight": 1}, {"weight": 1}]) == [30, 30, 30]
    assert mixture_counts([100, 10], [{"weight": 0.9}, {"weight": 0.1}]) == [90, 10]
    assert mixture_counts([5, 10], [{"weight": 0.9}, {"weight": 0.1}]) == [5, 0]  # floor(0.1 * 5/0.9) = floor(0.55)


def test_counts_draw_a_subset_or_repeat_whole_passes(sources, tmp_path) -> None:
    """count 10 of a's 40: 10 distinct samples; count 70 of b's 25: each twice and 20 of them a third time; c, no count: all 60."""
    mixture = entries(sources, a={"count": 10}, b={"count": 70})
    dm = module(tmp_path, mixture)
    table = origin(tmp_path, mixture)
    seen = Counter(tuple(ids) for ids in dm.train_dataset["input_ids"])
    per_source = [Counter(n for ids, n in seen.items() if table[ids] == i) for i in range(3)]
    assert per_source[0] == Counter({1: 10})
    assert per_source[1] == Counter({2: 5, 3: 20})
    assert per_source[2] == Counter({1: 60})
    assert [s["drawn"] for s in dm.mixture_stats] == [10, 70, 60]


def test_same_seed_same_mixture_other_seed_other_draw(sources, tmp_path) -> None:
    mixture = entries(sources, a={"weight": 1}, b={"weight": 1}, c={"weight": 1})
    ids = [module(tmp_path, mixture, seed=seed).train_dataset["input_ids"] for seed in (7, 7, 8)]
    assert ids[0] == ids[1]
    assert sorted(map(tuple, ids[0])) != sorted(map(tuple, ids[2]))  # c (60 available, 25 drawn) gives other samples


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (0.45, 0.35, 0.2)])
def test_ranks_split_the_mixture_no_sample_twice_none_lost(sources, tmp_path, weights) -> None:
    """Each DDP rank builds its own data module (the same seed, so the same mixture, checked) and takes its share of the
    shuffled epoch: the ranks' samples together are the mixture; on two ranks only DistributedSampler's padding of an
    odd total (the first `total_size - len` indices of the epoch, repeated)."""
    mixture = entries(sources, **{name: {"weight": w} for name, w in zip(SIZES, weights)})
    shares, mixtures = [], []
    for rank in (0, 1):
        dm = module(tmp_path, mixture, val_size=5, seed=3)
        dm.data_parallel_rank = lambda rank=rank: (2, rank)
        mixtures.append(dm.train_dataset["input_ids"])
        shares.append(list(dm.train_dataloader().sampler))
    assert mixtures[0] == mixtures[1]
    total = len(mixtures[0])
    pad = (-total) % 2
    assert len(shares[0]) == len(shares[1]) == (total + pad) // 2
    assert sorted(set(shares[0]) | set(shares[1])) == list(range(total))  # none lost
    assert len(set(shares[0]) & set(shares[1])) == pad  # none twice, but for the padding
    assert total == {(0.5, 0.3, 0.2): 80, (0.45, 0.35, 0.2): 71}[weights] - 5  # 40+24+16; 32+25+14 (N = 25/0.35), less validation


def test_an_entry_of_another_format(sources, tmp_path) -> None:
    """Instructions mixed with conversations (`format: chat`): the chat entry's samples are ChatDataModule's on that source."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": f"hi {i}"}]}) + "\n" for i in range(12)))
    mixture = [{"source": str(sources["a"])}, {"source": str(chat), "format": "chat", "chat_template": "llama2", "check_samples": 0}]
    dm = module(tmp_path, mixture)
    reference = ChatDataModule(source=str(chat), chat_template="llama2", check_samples=0, tokenizer_path=str(DEMO_TOKENIZER), cache_dir=str(tmp_path / "cache"), shuffle=False)
    reference.setup("fit")
    got = set(map(tuple, dm.train_dataset["input_ids"]))
    assert len(dm.train_dataset) == 40 + 12
    assert set(map(tuple, reference.train_dataset["input_ids"])) <= got
    assert set(alone(tmp_path, {"source": str(sources["a"])})) <= got
    assert dm.chat_template_used == reference.chat_template_used


def test_bad_entries_are_one_line(sources, tmp_path) -> None:
    a = str(sources["a"])
    cases = [
        ([], "mixture: expected a list of sources"),
        ([{"weight": 1}], "mixture[0]: expected a mapping with a source"),
        (
            [{"source": a, "wieght": 1}],
            "mixture[0]: unknown key(s) ['wieght']; an entry takes column_map, count, data_files, format, name, revision, source, split, template, train_on_input, truncation, weight",
        ),
        ([{"source": a, "weight": 1, "count": 3}], "mixture[0]: give weight (a proportion) or count (a number of samples), not both"),
        ([{"source": a, "weight": 1}, {"source": a}], "mixture: entries [1] have no weight"),
        ([{"source": a, "weight": -1}], "mixture[0].weight: expected a positive number, got -1"),
        ([{"source": a, "count": 2.5}], "mixture[0].count: expected a whole number of samples, 1 or more, got 2.5"),
        ([{"source": a, "split": "train[:"}], "mixture[0].split: 'train[:' is not a split"),
        ([{"source": a, "format": "pairs"}], "mixture[0].format: unknown format 'pairs'; one of instruct, chat"),
        ([{"source": a}, {"source": a, "format": "chat", "template": "alpaca"}], "mixture[1]: unknown key(s) ['template']"),
    ]
    for mixture, expected in cases:
        with pytest.raises(DataError) as error:
            InstructDataModule(mixture=mixture, tokenizer_path=str(DEMO_TOKENIZER))
        assert "\n" not in str(error.value) and expected in str(error.value), mixture
    with pytest.raises(DataError) as error:  # a missing column of one entry names the entry's source
        module(tmp_path, [{"source": a}, {"source": str(sources["c"])}])
    assert str(error.value) == f"{sources['c']}: no column 'instruction' for field 'instruction' (columns: question, answer); set column_map to name it"


def test_config_round_trips_and_the_data_verb_prints_each_source(sources, tmp_path, capsys) -> None:
    """`--data.mixture` in a config: --print_config gives it back unchanged, the printed config parses to the same, and
    `data` prints one line per source."""
    mixture = entries(sources, a={"weight": 0.5}, b={"weight": 0.3}, c={"weight": 0.2})
    args = ["--config", "tiny_lora.yaml", "--data.mixture", json.dumps(mixture), "--data.cache_dir", str(tmp_path / "cache"), "--data.val_size", "0"]
    printed = yaml.safe_load(print_config(args))
    assert printed["data"]["mixture"] == mixture
    saved = tmp_path / "printed.yaml"
    saved.write_text(yaml.safe_dump(printed))
    assert yaml.safe_load(print_config(["--config", str(saved)])) == printed
    assert main(["data", *args, "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "mixture: 80 training samples" in out
    assert "mixture of 3 sources, 80 samples (before any validation split):" in out
    assert f"  [0] {sources['a']}: 40 of 40 samples (weight 0.5; 50.0% of the mixture)," in out
    assert f"  [1] {sources['b']}: 24 of 25 samples (weight 0.3; 30.0% of the mixture)," in out
    assert f"  [2] {sources['c']}: 16 of 60 samples (weight 0.2; 20.0% of the mixture)," in out


def test_preference_and_chat_mixtures_of_the_demo(tmp_path) -> None:
    """Mixtures of other modules: pairs get one pair_index each across the mixture (DPO's reference table is indexed
    by it); a chat mixture of demo entries finds the demo's tokenizer and template as the module alone does."""
    from lightning_tune.data import PreferenceDataModule

    pairs = PreferenceDataModule(mixture=[{"source": "demo", "count": 30}, {"source": "demo", "split": "train[:10]"}], cache_dir=str(tmp_path / "cache"))
    pairs.setup("fit")
    assert len(pairs.train_dataset) == 40 and pairs.train_dataset["pair_index"] == list(range(40))
    chat = ChatDataModule(mixture=[{"source": "demo", "split": "train[:6]"}, {"source": "demo", "split": "train[6:10]"}], cache_dir=str(tmp_path / "cache"), shuffle=False)
    chat.setup("fit")
    alone = ChatDataModule(source="demo", split="train[:10]", cache_dir=str(tmp_path / "cache"), shuffle=False)
    alone.setup("fit")
    assert sorted(chat.train_dataset["input_ids"]) == sorted(alone.train_dataset["input_ids"])


def test_a_count_from_an_empty_source_is_one_line(sources, tmp_path) -> None:
    """A source sliced to nothing cannot give a count: one line naming its file (`draw` would divide by zero)."""
    mixture = entries({"a": sources["a"], "b": sources["b"]}, a={"count": 10}, b={"count": 5, "split": "train[:0]"})
    with pytest.raises(DataError, match=r"b\.jsonl") as error:
        module(tmp_path, mixture)
    assert "\n" not in str(error.value)
