"""Tokenizer: ids equal the `sentencepiece` library's own, continuation encoding is exact, errors are one line."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from lightning_tune.data.templates import ALPACA
from lightning_tune.tokenizer import Tokenizer

DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "lightning_tune" / "data" / "assets" / "demo_tokenizer.model"

TEXTS = [
    "",
    "Hello world",
    " leading space",
    "   three leading spaces",
    "multiple   inner    spaces",
    "trailing space ",
    "line one\nline two\n\nafter a blank line\n",
    "\n starts with a newline",
    "tabs\tand\t\ttabs",
    "digits 0123456789 and 3.14159, 1e-5",
    "unicode: café naïve Ωmega — “quotes” ß",
    "emoji 😀🚀👍🏽 and CJK 日本語の文章 中文 한국어",
    "code: def f(x):\n    return x ** 2  # comment",
    "<s> not a control token </s>",
]


def test_special_ids_match_llama2(llama: Tokenizer, reference: spm.SentencePieceProcessor) -> None:
    assert (llama.bos_id, llama.eos_id, llama.pad_id, llama.vocab_size) == (1, 2, 0, 32000)
    assert reference.id_to_piece(llama.pad_id) == "<unk>"  # Llama 2 has no pad piece; see the class docstring


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_sentencepiece(llama: Tokenizer, reference: spm.SentencePieceProcessor, text: str) -> None:
    expected = reference.encode(text)
    assert llama.encode(text, add_bos=False) == expected
    assert llama.encode(text) == [reference.bos_id(), *expected]
    assert llama.encode(text, add_eos=True) == [reference.bos_id(), *expected, reference.eos_id()]
    assert llama.decode(llama.encode(text, add_eos=True)) == text


def test_newline_prefix_is_what_continuation_strips(reference: spm.SentencePieceProcessor) -> None:
    # Verified, not guessed: "\n" alone is the dummy-prefix piece and the newline byte.
    assert [reference.id_to_piece(i) for i in reference.encode("\n")] == ["▁", "<0x0A>"]


@pytest.mark.parametrize("text", TEXTS)
def test_continuation_equals_text_after_a_newline(llama: Tokenizer, reference: spm.SentencePieceProcessor, text: str) -> None:
    prefix = "Some prompt ending in a newline:\n"
    whole = reference.encode(prefix + text)
    head = reference.encode(prefix)
    assert whole[: len(head)] == head
    assert llama.encode(text, add_bos=False, prefix_space=False) == whole[len(head) :]


def test_prompt_plus_response_equals_whole_text_on_every_alpaca_record(llama: Tokenizer, alpaca_tiny_path: Path) -> None:
    records = json.loads(alpaca_tiny_path.read_text())
    assert len(records) == 100
    for record in records:
        prompt = ALPACA.format(record["instruction"], record["input"])
        response = record["output"]
        split = llama.encode(prompt) + llama.encode(response, add_bos=False, add_eos=True, prefix_space=False)
        assert split == llama.encode(prompt + response, add_eos=True), record["instruction"]


def test_demo_tokenizer_loads_and_is_llama_like() -> None:
    demo = Tokenizer(DEMO_TOKENIZER)
    assert (demo.bos_id, demo.eos_id, demo.pad_id) == (1, 2, 0)
    assert 500 <= demo.vocab_size <= 1000
    reference = spm.SentencePieceProcessor(model_file=str(DEMO_TOKENIZER))
    for text in TEXTS:  # byte fallback: any text round-trips, never <unk>
        ids = demo.encode(text, add_bos=False)
        assert ids == reference.encode(text)
        assert demo.pad_id not in ids
        assert demo.decode(ids) == text
    prompt = ALPACA.format("Add the two numbers.", "7 + 5")
    assert demo.encode(prompt) + demo.encode("12", add_bos=False, add_eos=True, prefix_space=False) == demo.encode(prompt + "12", add_eos=True)


def test_missing_and_invalid_files_give_one_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer .*nope\.model: no such file") as missing:
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(ValueError, match=r"tokenizer .*bad\.model: not a valid SentencePiece model") as invalid:
        Tokenizer(bad)
    for error in (missing, invalid):
        assert "\n" not in str(error.value)


# --- Hugging Face tokenizer.json (HFTokenizer) and load_tokenizer ------------------------------------------

HF_TEXTS = [
    *TEXTS,
    "<|begin_of_text|>special tokens in text<|eot_id|><|im_start|>user\nhi<|im_end|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\nok",
    "!!! id zero is an exclamation mark !",
    "  two leading spaces and a trailing newline\n",
    "Русский текст, العربية, हिन्दी, ελληνικά",
    "```python\nimport os\nprint(os.getcwd())\n```\n",
    "<think>\nreasoning\n</think>\n\nanswer",
]


@pytest.fixture(params=["llama3_1_tokenizer", "qwen3_tokenizer"])
def hf_pair(request):
    """(ours, transformers.AutoTokenizer) on one real tokenizer folder."""
    transformers = pytest.importorskip("transformers")
    from conftest import asset

    from lightning_tune.tokenizer import load_tokenizer

    folder = asset(request.param)
    return load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def test_hf_ids_equal_transformers(hf_pair) -> None:
    ours, reference = hf_pair
    for text in HF_TEXTS:
        assert ours.encode(text) == reference(text)["input_ids"], text  # add_special_tokens=True: BOS where the model has one
        plain = reference(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, add_bos=False) == plain
        assert ours.encode(text, add_bos=False, add_eos=True) == [*plain, reference.eos_token_id]
        ids, offsets = ours.encode_with_offsets(text)
        assert ids == plain and len(offsets) == len(ids)
        assert all(0 <= start <= end <= len(text) for start, end in offsets)
        # decode drops nothing and cleans nothing: the text comes back exactly
        assert ours.decode(plain) == text == reference.decode(plain, clean_up_tokenization_spaces=False)


def test_hf_special_ids_follow_the_configs(hf_pair) -> None:
    ours, reference = hf_pair
    assert ours.bos_id == reference.bos_token_id  # Llama 3.1: 128000; Qwen 3: None (no BOS)
    assert ours.eos_id == reference.eos_token_id and ours.eos_ids[0] == ours.eos_id
    assert ours.vocab_size == len(reference)
    assert ours.pad_id != 0 or reference.convert_ids_to_tokens(0) != "!"
    assert ours.pad_id == (reference.pad_token_id if reference.pad_token_id is not None else ours.eos_id)
    assert reference.convert_ids_to_tokens(ours.pad_id) in reference.all_special_tokens  # never a text token
    assert ours.chat_template == reference.chat_template
    assert ours.special_tokens == reference.special_tokens_map


def test_llama3_zero_is_a_real_token_and_survives_decoding() -> None:
    from conftest import asset

    from lightning_tune.tokenizer import load_tokenizer

    llama3 = load_tokenizer(asset("llama3_1_tokenizer"))
    assert llama3.encode("!", add_bos=False) == [0]
    assert llama3.pad_id != 0
    assert llama3.decode([128000, 0, 0, llama3.eos_id]) == "<|begin_of_text|>!!<|eot_id|>"


def test_eos_ids_come_from_generation_config_too(tmp_path: Path) -> None:
    from conftest import asset

    from lightning_tune.tokenizer import load_tokenizer

    folder = asset("llama3_1_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).symlink_to(folder / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.eos_id == 128009  # tokenizer_config's <|eot_id|> ends a sample
    assert tokenizer.eos_ids == (128009, 128001, 128008)  # every end token stops generation
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id must be an int or a list of ints"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_accepts_a_model_a_json_or_a_directory(tmp_path: Path, llama2_tokenizer_path: Path) -> None:
    from conftest import asset

    from lightning_tune.tokenizer import HFTokenizer, load_tokenizer

    folder = asset("qwen3_tokenizer")
    assert isinstance(load_tokenizer(folder), HFTokenizer)
    assert isinstance(load_tokenizer(folder / "tokenizer.json"), HFTokenizer)
    assert type(load_tokenizer(llama2_tokenizer_path)) is Tokenizer
    (tmp_path / "tokenizer.model").symlink_to(llama2_tokenizer_path)
    assert type(load_tokenizer(tmp_path)) is Tokenizer  # a directory with only a SentencePiece model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).symlink_to(folder / name)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)  # tokenizer.json wins, as in transformers


def test_hf_tokenizer_from_memory_equals_from_file() -> None:
    # helper path for GGUF: a tokenizers.Tokenizer built elsewhere, wrapped with ids and a template
    import tokenizers
    from conftest import asset

    from lightning_tune.tokenizer import HFTokenizer, load_tokenizer

    folder = asset("llama3_1_tokenizer")
    from_file = load_tokenizer(folder)
    in_memory = HFTokenizer(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")), bos_id=128000, eos_id=128009, eos_ids=[128001], chat_template=from_file.chat_template)
    assert in_memory.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert (in_memory.eos_ids, in_memory.pad_id) == ((128009, 128001), 128009)
    for text in HF_TEXTS:
        assert in_memory.encode(text, add_eos=True) == from_file.encode(text, add_eos=True)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert in_memory.apply_chat_template(messages) == from_file.apply_chat_template(messages)
    with pytest.raises(ValueError, match="eos_id=999999 is outside its vocabulary of 128256"):
        HFTokenizer(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")), eos_id=999999)


def test_sentencepiece_offsets_spell_the_text(llama: Tokenizer) -> None:
    for text in TEXTS:
        ids, offsets = llama.encode_with_offsets(text)
        assert ids == llama.encode(text, add_bos=False)
        # consecutive spans cover the text (byte pieces of one character share its span)
        covered = "".join(text[start:end] for (start, end), previous in zip(offsets, [(0, 0), *offsets]) if (start, end) != previous)
        assert covered == text, text
    ids, offsets = llama.encode_with_offsets("<s>[INST] hi [/INST] ok </s>", chat=True)
    assert ids[0] == 1 and ids[-1] == 2 and offsets[0] == (0, 3) and offsets[-1] == (24, 28)
    assert ids[1:-1] == llama.encode("[INST] hi [/INST] ok ", add_bos=False)  # the text between, with its dummy prefix


def test_sentencepiece_decode_keeps_every_id(llama: Tokenizer, reference: spm.SentencePieceProcessor) -> None:
    ids = [1, 0, *reference.encode("a b"), 2]
    assert llama.decode(ids) == reference.decode(ids)  # <unk> (the pad id) is decoded, not dropped


def test_bad_tokenizer_paths_give_one_line(tmp_path: Path) -> None:
    from lightning_tune.tokenizer import load_tokenizer

    cases = {
        tmp_path / "missing": "no such file or directory",
        tmp_path: "holds neither tokenizer.json nor tokenizer.model",
    }
    broken = tmp_path / "broken" / "tokenizer.json"
    broken.parent.mkdir()
    broken.write_text("{not json")
    cases[broken] = "not a valid tokenizer.json"
    tiktoken = tmp_path / "tiktoken.model"
    tiktoken.write_text("IQ== 0\nIg== 1\n")
    cases[tiktoken] = "tiktoken"
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            load_tokenizer(path)
        assert "\n" not in str(error.value)
