"""Conversational preference pairs are tokenised as TRL 1.16's DPOTrainer tokenises them: the prompt
rendered with the generation prompt, prompt + chosen / rejected rendered whole, and the completion
every token after their common prefix, so what a template writes after the last end-of-turn token
(Qwen 3's "\\n" after <|im_end|>) is trained as TRL trains it (issue 29: TRL's loss differed by 4.6e-3
relative and LoRA gradients by up to 27% while we masked it)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import asset

from lightning_tune.data import PreferenceDataModule
from lightning_tune.data.collate import IGNORE_INDEX

transformers = pytest.importorskip("transformers")
trl_data = pytest.importorskip("trl.data_utils")

PAIRS = [
    {"prompt": [{"role": "user", "content": "Add 2 and 3."}], "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "I do not know."}]},
    {
        "prompt": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Another one?"},
        ],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
]


def trl_tokenized(tokenizer, pair: dict) -> dict[str, list[int]]:
    """TRL 1.16 DPOTrainer's `tokenize_fn` for a conversational pair (dpo_trainer.py), with TRL's own helpers,
    a pair's `tools` (a list or its JSON string) passed to the template as it passes them."""
    tools = pair.get("tools")
    kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools}
    prompt_ids = trl_data._tokenize(tokenizer, pair["prompt"], add_generation_prompt=True, **kwargs)["input_ids"]
    chosen = trl_data._tokenize(tokenizer, pair["prompt"] + pair["chosen"], **kwargs)["input_ids"]
    rejected = trl_data._tokenize(tokenizer, pair["prompt"] + pair["rejected"], **kwargs)["input_ids"]
    start = min(trl_data.common_prefix_length(prompt_ids, chosen), trl_data.common_prefix_length(prompt_ids, rejected))
    return {"prompt": prompt_ids[:start], "chosen": chosen[start:], "rejected": rejected[start:]}


def assert_trains_what_trl_trains(pairs: list[dict], folder: Path, tmp_path: Path, max_seq_len: int) -> tuple[list[dict], object]:
    """Our module's rows for `pairs` equal TRL's tokenisation, ids and trained labels, both sides; returns TRL's
    pieces per pair and the reference tokenizer."""
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    data = PreferenceDataModule(source=str(source), tokenizer_path=str(folder), max_seq_len=max_seq_len, val_size=0, cache_dir=str(tmp_path / "cache"))
    data.setup("fit")
    reference = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    rows = {int(sample["pair_index"]): sample for sample in data.train_dataset}
    assert sorted(rows) == list(range(len(pairs)))
    expected = [trl_tokenized(reference, pair) for pair in pairs]
    for index, theirs in enumerate(expected):
        for side in ("chosen", "rejected"):
            assert list(rows[index][f"{side}_input_ids"]) == theirs["prompt"] + theirs[side], (folder.name, index, side)
            assert list(rows[index][f"{side}_labels"]) == [IGNORE_INDEX] * len(theirs["prompt"]) + theirs[side], (folder.name, index, side)
    return expected, reference


@pytest.mark.parametrize("name", ["qwen3_tokenizer", "llama3_1_tokenizer"])
def test_conversational_pairs_train_what_trl_trains(name: str, tmp_path: Path) -> None:
    expected, reference = assert_trains_what_trl_trains(PAIRS, asset(name), tmp_path, 256)
    trailing = sum(reference.decode(theirs[side]).endswith("<|im_end|>\n") for theirs in expected for side in ("chosen", "rejected"))
    # Qwen 3's template ends every turn with "<|im_end|>\n": the test covers the case that differed.
    assert trailing == (2 * len(PAIRS) if name == "qwen3_tokenizer" else 0)


TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    }
]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}


@pytest.mark.parametrize("stored", ["json", "list"])
def test_a_pairs_tools_reach_the_template_as_trl_passes_them(stored: str, tmp_path: Path) -> None:
    """A pair's `tools` (a JSON string, as Hub data sets often store them, or a list) reach the template as TRL 1.16's
    DPOTrainer passes them (`tools=` to `apply_chat_template`): Qwen 3 lists them in its system turn, and the chosen
    side may be a turn of tool calls. Ids and trained labels equal TRL's for both sides."""
    tools = json.dumps(TOOLS) if stored == "json" else TOOLS
    pairs = [
        {"prompt": WEATHER, "chosen": [CALL], "rejected": [{"role": "assistant", "content": "It is always sunny there."}], "tools": tools},
        {"prompt": WEATHER, "chosen": [{"role": "assistant", "content": "Let me look that up."}], "rejected": [CALL], "tools": tools},
    ]
    expected, reference = assert_trains_what_trl_trains(pairs, asset("qwen3_tokenizer"), tmp_path, 512)
    assert all("get_weather" in reference.decode(theirs["prompt"]) for theirs in expected)  # the tools are listed in the prompt
    assert "<tool_call>" in reference.decode(expected[0]["chosen"])  # the call itself is trained


def test_the_chat_template_the_pairs_used_is_known_for_the_export(tmp_path: Path) -> None:
    """A fit exports the template its data was rendered with (#30): conversational pairs name theirs once set
    up, string pairs (no chat template) none."""
    from lightning_tune.data.base import DEMO_TOKENIZER
    from lightning_tune.tokenizer.chat_template import resolve_template

    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    chat = PreferenceDataModule(source=str(source), tokenizer_path=str(DEMO_TOKENIZER), chat_template="llama2", max_seq_len=128, val_size=0, cache_dir=str(tmp_path / "c"))
    assert chat.chat_template_used is None  # known once set up
    chat.setup("fit")
    assert chat.chat_template_used == resolve_template("llama2", None)[0]
    strings = PreferenceDataModule(source="demo", max_seq_len=64, val_size=0, cache_dir=str(tmp_path / "c"))
    strings.setup("fit")
    assert strings.chat_template_used is None


def test_a_margin_column_reaches_the_reward_models_batch(tmp_path: Path) -> None:
    """TRL's optional per-pair `margin` column (RewardTrainer subtracts it inside the sigmoid) is read where
    the data has it, or where column_map names it, and each batch carries its pairs' margins in their order."""
    from lightning_tune.data.base import DEMO_TOKENIZER
    from lightning_tune.data.errors import DataError

    tokenizer = str(DEMO_TOKENIZER)

    pairs = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}.", "score_gap": i / 4} for i in range(6)]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    data = PreferenceDataModule(source=str(source), column_map={"margin": "score_gap"}, tokenizer_path=tokenizer, max_seq_len=64, val_size=0, batch_size=3, shuffle=True, cache_dir=str(tmp_path / "c"))
    data.setup("fit")
    seen = 0
    for batch in data.train_dataloader():
        assert batch["margin"].dtype == torch.float32 and batch["input_ids"].shape[0] == 2 * len(batch["margin"])
        assert batch["margin"].tolist() == [pairs[i]["score_gap"] for i in batch["pair_index"].tolist()]
        seen += len(batch["margin"])
    assert seen == len(pairs)

    plain = PreferenceDataModule(source="demo", max_seq_len=64, val_size=0, batch_size=2, cache_dir=str(tmp_path / "c"))
    plain.setup("fit")
    assert "margin" not in next(iter(plain.train_dataloader()))  # no column: no margin, DPO's batches as before

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({**pair, "margin": "large" if i == 4 else 1.0}) + "\n" for i, pair in enumerate(pairs)))
    with pytest.raises(DataError, match=r"bad.jsonl: record 4 \(counting from 0\): 'margin' \(column 'margin'\) must be a finite number, got 'large'"):
        PreferenceDataModule(source=str(bad), tokenizer_path=tokenizer, max_seq_len=64, val_size=0, cache_dir=str(tmp_path / "c")).setup("fit")
    with pytest.raises(DataError, match="no column 'gap' for field 'margin'"):
        PreferenceDataModule(source=str(source), column_map={"margin": "gap"}, tokenizer_path=tokenizer, max_seq_len=64, val_size=0, cache_dir=str(tmp_path / "c")).setup("fit")
