"""Tokenizers: SentencePiece, Hugging Face tokenizer.json and GGUF vocabularies behind one protocol, and chat\ntemplates rendered in Jinja's sandbox as transformers renders them."""

from lightning_tune.tokenizer.base import (
    END_OF_TURN_TOKENS,
    SPECIAL_TOKEN_NAMES,
    ChatTemplateMixin,
    Offsets,
    TokenizerError,
    TokenizerProtocol,
    end_of_turn_ids,
    find_chat_template,
    first_line,
    generation_eos_ids,
    read_config_json,
    unique_ids,
)
from lightning_tune.tokenizer.hf import HFTokenizer
from lightning_tune.tokenizer.load import load_tokenizer, tokenizer_files
from lightning_tune.tokenizer.sentencepiece import Tokenizer

__all__ = [
    "ChatTemplateMixin",
    "END_OF_TURN_TOKENS",
    "HFTokenizer",
    "Offsets",
    "SPECIAL_TOKEN_NAMES",
    "Tokenizer",
    "TokenizerError",
    "TokenizerProtocol",
    "end_of_turn_ids",
    "find_chat_template",
    "first_line",
    "generation_eos_ids",
    "load_tokenizer",
    "read_config_json",
    "tokenizer_files",
    "unique_ids",
]
