"""Tokenizer: ids equal the `sentencepiece` library's own, continuation encoding is exact, errors are one line."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from lightning_tune.data.templates import ALPACA
from lightning_tune.tokenizer import Tokenizer

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "lightning_tune" / "data" / "assets" / "demo_tokenizer.model"

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
