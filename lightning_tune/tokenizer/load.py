"""Open the tokenizer at a path (a .model, a tokenizer.json, a directory or a .gguf) and list its files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass
from lightning_tune.io.paths import resolve_path
from lightning_tune.tokenizer.base import TokenizerError
from lightning_tune.tokenizer.gguf import load_gguf_tokenizer
from lightning_tune.tokenizer.hf import HFTokenizer
from lightning_tune.tokenizer.sentencepiece import Tokenizer
from lightning_tune.tokenizer.tiktoken import TiktokenTokenizer, is_tiktoken_file


def load_tokenizer(path: str | Path) -> Tokenizer | HFTokenizer | TiktokenTokenizer:
    """The tokenizer at `path`: a SentencePiece `.model`, a `tokenizer.json`, or a directory holding
    either (`tokenizer.json` preferred: it is what transformers reads, and it carries the added tokens).
    A `tokenizer.model` that is Meta's tiktoken ranks file (Llama 3's original/ folder) is read as that
    (`tokenizer/tiktoken.py`), any other as SentencePiece.

    Returns an object with `encode(text, add_bos=, add_eos=)`, `encode_with_offsets`, `decode`,
    `bos_id`, `eos_id`, `eos_ids`, `pad_id`, `vocab_size`, `chat_template`, `special_tokens` and
    `apply_chat_template` (see `TokenizerProtocol`). A llama.cpp `.gguf` file gives the tokenizer its
    metadata describes (`tokenizer/gguf.py`); `pkg://PACKAGE/FILE` names a file inside a package.
    """
    path = resolve_path(path)
    if path.suffix.lower() == ".gguf":
        return load_gguf_tokenizer(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer.from_file(path / "tokenizer.json")
        if (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"
            return TiktokenTokenizer(path) if is_tiktoken_file(path) else Tokenizer(path)
        raise TokenizerError(f"tokenizer {path}: the directory holds neither tokenizer.json nor tokenizer.model")
    if not path.exists():
        raise TokenizerError(f"tokenizer {path}: no such file or directory (expected a SentencePiece .model, a tokenizer.json or a directory holding either)")
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    return TiktokenTokenizer(path) if is_tiktoken_file(path) else Tokenizer(path)


def tokenizer_files(path: str | Path) -> list[Path]:
    """The files that make up the tokenizer at `path` (for copying it into an export, or hashing it for a
    cache key), found as `load_tokenizer` finds them, without reading them: the model file and the
    config files beside it that exist."""
    path = resolve_path(path)
    main = next((path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()), path) if path.is_dir() else path
    if not main.is_file():
        raise TokenizerError(f"tokenizer {path}: no such file (expected a SentencePiece .model, a tokenizer.json or a directory holding either)")
    extra = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
    return [main, *(main.parent / name for name in extra if (main.parent / name).is_file())]
