"""Tokenizers: SentencePiece (Llama 2, the demo) and Hugging Face `tokenizer.json` behind one interface.

`load_tokenizer(path)` picks the backend from what it is given: a SentencePiece `.model`, a
`tokenizer.json`, or a directory holding either (`tokenizer.json` wins, as in litgpt and transformers).
Ids come from the `sentencepiece` / `tokenizers` libraries themselves (tests compare them against
sentencepiece and `transformers.AutoTokenizer`); this file only decides which special ids go where:

- `bos_id` is the BOS the tokenizer PREPENDS (what transformers adds with `add_special_tokens=True`),
  None when it prepends none (Qwen 3, SmolLM2), even if its config names a `bos_token`.
- `eos_id` ends a sample; `eos_ids` is every token that ends a turn or a text (tokenizer_config.json's
  `eos_token` plus generation_config.json's `eos_token_id`, e.g. Llama 3's `<|eot_id|>` and
  `<|end_of_text|>`): generation stops on any of them.
- `pad_id` only fills positions that are masked anyway (labels -100, keys masked or behind causal
  attention), so any valid embedding row would be correct; it is the configured pad token, else a
  special token made for padding, else EOS: never an ordinary text token (Llama 3's id 0 is "!"), so nothing that looks for padding by id can
  confuse it with text. `decode` drops nothing: every id, pad included, is decoded as what it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import tokenizers

# The named special tokens transformers passes to a chat template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
Offsets = list[tuple[int, int]]


class TokenizerError(ValueError):
    """A tokenizer file that is missing, unreadable or inconsistent; the message names the file."""


@runtime_checkable
class TokenizerProtocol(Protocol):
    """What recipes, data modules and generation need from a tokenizer, whichever library implements it."""

    path: str
    bos_id: int | None
    eos_id: int
    eos_ids: tuple[int, ...]
    pad_id: int
    vocab_size: int
    chat_template: str | None
    special_tokens: dict[str, str]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def encode_with_offsets(self, text: str, chat: bool = False) -> tuple[list[int], Offsets]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def id_to_token(self, index: int) -> str: ...


class _ChatMixin:
    """`apply_chat_template` shared by both backends (the rendering lives in lightning_tune.chat_template)."""

    chat_template: str | None
    special_tokens: dict[str, str]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int] | str:
        """The conversation rendered with the chat template (the tokenizer's own unless given), as
        transformers' `apply_chat_template`: text, or its ids (`tokenize=True`, no BOS added beyond
        what the template writes)."""
        from lightning_tune.chat_template import render

        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise TokenizerError(f"tokenizer {self.path}: has no chat template; pass chat_template (a Jinja string or a built-in name)")  # type: ignore[attr-defined]
        text = render(template, messages, special_tokens=self.special_tokens, add_generation_prompt=add_generation_prompt, **kwargs).text
        if not tokenize:
            return text
        return self.encode_with_offsets(text, chat=True)[0]  # type: ignore[attr-defined]


class Tokenizer(_ChatMixin):
    """A SentencePiece model (Llama 2's, or the bundled demo one) with the ids a fine-tuning recipe needs.

    `pad_id` is 0, Llama's `<unk>`: Llama 2 has no pad piece and its byte-fallback model never emits
    `<unk>` (unknown characters become `<0x..>` byte pieces). Reusing it for padding is safe because
    padded positions are masked (labels -100; right padding behind causal attention, left padding by
    generation's key mask), so they never influence real tokens or the loss. A `tokenizer_config.json`
    or `chat_template.jinja` beside the model supplies a chat template (HF Llama 2 chat repos ship one).
    """

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path}: no such file (expected a SentencePiece .model file)")
        self.path = str(path)
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as error:
            hint = ""
            if re.match(rb"[A-Za-z0-9+/=]+ \d+\n", path.read_bytes()[:200]):  # base64 token, space, rank: tiktoken
                hint = "; it looks like Meta's tiktoken tokenizer.model (Llama 3 original/): use the Hugging Face repository's tokenizer.json instead"
            raise TokenizerError(f"tokenizer {path}: not a valid SentencePiece model ({error}){hint}") from None
        self.bos_id: int | None = self.processor.bos_id()
        self.eos_id: int = self.processor.eos_id()
        self.pad_id: int = 0
        self.vocab_size: int = self.processor.vocab_size()
        if self.bos_id is None or self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"tokenizer {path}: the model defines no BOS/EOS pieces (bos={self.bos_id}, eos={self.eos_id})")
        self.special_tokens: dict[str, str] = {
            "bos_token": self.processor.id_to_piece(self.bos_id),
            "eos_token": self.processor.id_to_piece(self.eos_id),
        }
        if self.processor.unk_id() >= 0:
            self.special_tokens["unk_token"] = self.processor.id_to_piece(self.processor.unk_id())
        config = _read_json(path.parent / "tokenizer_config.json")
        self.chat_template: str | None = _chat_template(path.parent, config)
        self.eos_ids: tuple[int, ...] = _unique([self.eos_id, *_generation_eos_ids(path.parent)])
        # SentencePiece prepends a dummy "▁" to every input, so "\n" alone encodes as ["▁", "<0x0A>"]
        # for Llama 2. Those leading ids are what `encode(..., prefix_space=False)` strips off.
        self._newline_ids: list[int] = self.processor.encode("\n")
        self._dummy_prefix = self.processor.id_to_piece(self.processor.encode("a")[0]).startswith("▁")
        self._control = {self.processor.id_to_piece(i): i for i in (self.bos_id, self.eos_id)}

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False, prefix_space: bool = True) -> list[int]:
        """Token ids of `text`, optionally framed by BOS/EOS; exactly sentencepiece's (`<s>` in text is text).

        `prefix_space=False` encodes a continuation: the ids `text` gets when it follows other text that
        ends in a newline (e.g. a response after the Alpaca prompt), without the "▁" SentencePiece would
        otherwise put in front. It encodes "\\n" + text and drops the ids of "\\n" alone; this is exact
        because "\\n" is a byte-fallback piece that no merge crosses.
        """
        if prefix_space:
            ids = self.processor.encode(text)
        else:
            ids = self.processor.encode("\n" + text)
            prefix = self._newline_ids
            if ids[: len(prefix)] != prefix:  # would mean a model whose pieces merge across "\n"
                raise TokenizerError(f"tokenizer {self.path}: cannot encode a continuation, '\\n' merges with the text that follows it")
            ids = ids[len(prefix) :]
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def encode_with_offsets(self, text: str, chat: bool = False) -> tuple[list[int], Offsets]:
        """`encode(text, add_bos=False)` and each token's (start, end) character span in `text`.

        `chat=True` reads text a chat template rendered: the BOS/EOS piece strings in it (`<s>`, `</s>`)
        are those tokens, and the text between them is encoded piece by piece, each with SentencePiece's
        dummy prefix, which is how Meta's Llama 2 chat format (and transformers' legacy Llama tokenizer) encode it.
        """
        if not chat:
            return self._encode_offsets(text, 0)
        ids: list[int] = []
        offsets: Offsets = []
        start = 0
        for position, token in _find_all(text, self._control):
            if position > start:
                chunk_ids, chunk_offsets = self._encode_offsets(text[start:position], start)
                ids += chunk_ids
                offsets += chunk_offsets
            ids.append(self._control[token])
            offsets.append((position, position + len(token)))
            start = position + len(token)
        if start < len(text):
            chunk_ids, chunk_offsets = self._encode_offsets(text[start:], start)
            ids += chunk_ids
            offsets += chunk_offsets
        return ids, offsets

    def _encode_offsets(self, text: str, base: int) -> tuple[list[int], Offsets]:
        """Ids of `text` and their character spans (shifted by `base`), from the pieces' bytes.

        The Llama models' normalizer is the identity (spaces become "▁", nothing else changes), so the
        pieces' bytes concatenate to the dummy-prefixed text; anything else is refused, not guessed."""
        ids = self.processor.encode(text)
        prefixed = (" " if self._dummy_prefix else "") + text
        data = prefixed.encode("utf-8")
        shift = 1 if self._dummy_prefix else 0  # the dummy prefix is character -1 of `text`, clamped to 0
        char_of_byte: list[int] = []  # byte index in `data` -> character index in `text`
        for index, character in enumerate(prefixed):
            char_of_byte += [index - shift] * len(character.encode("utf-8"))
        char_of_byte.append(len(text))
        offsets: Offsets = []
        position = 0
        for token in ids:
            piece = self.processor.id_to_piece(token)
            if self.processor.is_byte(token):
                raw = bytes([int(piece[3:5], 16)])
            elif self.processor.is_control(token):
                raw = b""
            else:
                raw = piece.replace("\u2581", " ").encode("utf-8")
            if data[position : position + len(raw)] != raw:
                raise TokenizerError(f"tokenizer {self.path}: pieces do not spell the text back (a normalizing model?); cannot compute offsets")
            start = char_of_byte[position]
            # a byte piece inside a multi-byte character spans that whole character
            end = char_of_byte[position + len(raw) - 1] + 1 if raw else start
            position += len(raw)
            offsets.append((max(start, 0) + base, max(end, 0) + base))
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; sentencepiece itself renders BOS/EOS (control pieces) as nothing. No id is dropped."""
        return self.processor.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        """The id of piece `token`, None if the model has no such piece."""
        index = self.processor.piece_to_id(token)
        return index if self.processor.id_to_piece(index) == token else None

    def id_to_token(self, index: int) -> str:
        """The piece of `index` as the model spells it ("▁the", "<0x0A>", "</s>")."""
        return self.processor.id_to_piece(int(index))


class HFTokenizer(_ChatMixin):
    """A Hugging Face `tokenizers.Tokenizer` (a `tokenizer.json`) with its special tokens and chat template.

    Two ways to build one:
    - `HFTokenizer.from_file(path)` (or `load_tokenizer`) reads `tokenizer.json` and, beside it,
      `tokenizer_config.json` (bos/eos/pad token, chat template), `chat_template.jinja` and
      `generation_config.json` (the full list of end tokens).
    - `HFTokenizer(tokenizer, bos_id=..., eos_id=..., ...)` wraps a `tokenizers.Tokenizer` already in
      memory, e.g. one built from a GGUF file's metadata: pass the ids the metadata names and the chat
      template string; `special_tokens` (the template's `bos_token`/`eos_token` strings) default to
      the tokens of those ids.

    Ids of `encode(text)` equal `transformers.AutoTokenizer(text)` (special-token strings in the text
    become their ids, as there); `decode` keeps every token, special ones included, and applies no
    "clean up tokenization spaces", so `decode(encode(text, add_bos=False)) == text`.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        eos_id: int,
        bos_id: int | None = None,
        eos_ids: Iterable[int] = (),
        pad_id: int | None = None,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        path: str = "<in memory>",
    ) -> None:
        """
        Args:
            tokenizer: The `tokenizers.Tokenizer` (its added tokens must include the special tokens).
            eos_id: The token that ends a sample (appended by `encode(..., add_eos=True)`).
            bos_id: The token `encode(..., add_bos=True)` prepends; None if the model uses no BOS.
            eos_ids: Further end-of-turn / end-of-text tokens generation stops on (eos_id is always one).
            pad_id: Padding id; default eos_id (padding is always masked, see the module docstring).
            chat_template: The Jinja chat template, if the model has one.
            special_tokens: Template variables such as {"bos_token": "<|begin_of_text|>"}; default: the tokens of bos_id/eos_id/pad_id.
            path: Where it came from, for messages.
        """
        self.tokenizer = tokenizer
        self.path = path
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, value in (("eos_id", eos_id), ("bos_id", bos_id), ("pad_id", pad_id), *((f"eos_ids[{i}]", v) for i, v in enumerate(eos_ids))):
            if value is not None and not 0 <= value < self.vocab_size:
                raise TokenizerError(f"tokenizer {path}: {name}={value} is outside its vocabulary of {self.vocab_size}")
        self.bos_id: int | None = bos_id
        self.eos_id: int = eos_id
        self.eos_ids: tuple[int, ...] = _unique([eos_id, *eos_ids])
        self.pad_id: int = eos_id if pad_id is None else pad_id
        self.chat_template: str | None = chat_template
        if special_tokens is None:
            special_tokens = {name: tokenizer.id_to_token(i) for name, i in (("bos_token", bos_id), ("eos_token", eos_id), ("pad_token", pad_id)) if i is not None}
        self.special_tokens: dict[str, str] = dict(special_tokens)

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """Read `tokenizer.json` (or a directory holding it) and the config files beside it."""
        import tokenizers

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"tokenizer {file}: no such file (expected a Hugging Face tokenizer.json)")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"tokenizer {file}: not a valid tokenizer.json ({_first_line(error)})") from None
        folder = file.parent
        config = _read_json(folder / "tokenizer_config.json")
        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = config.get(name)
            if isinstance(value, Mapping):  # {"content": "<s>", "lstrip": ..., "__type": "AddedToken"}
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value

        def id_of(name: str) -> int | None:
            if name not in special:
                return None
            index = tokenizer.token_to_id(special[name])
            if index is None:
                raise TokenizerError(f"{folder / 'tokenizer_config.json'}: {name} {special[name]!r} is not a token of {file}")
            return index

        # BOS: what the post-processor prepends (transformers' add_special_tokens=True), unless the
        # config explicitly says add_bos_token; the config's bos_token string still goes to templates.
        framed = tokenizer.encode("", add_special_tokens=True).ids
        prepends = framed[0] if framed else None
        add_bos = config.get("add_bos_token")
        bos_id = id_of("bos_token") if add_bos else (None if add_bos is False else prepends)
        generation_eos = _generation_eos_ids(folder)
        eos_id = id_of("eos_token")
        if eos_id is None:
            if not generation_eos:
                raise TokenizerError(f"tokenizer {file}: no eos_token in tokenizer_config.json and no eos_token_id in generation_config.json")
            eos_id = generation_eos[0]
        return cls(
            tokenizer,
            eos_id=eos_id,
            bos_id=bos_id,
            eos_ids=generation_eos,
            pad_id=id_of("pad_token") if "pad_token" in special else _pad_token_id(tokenizer),
            chat_template=_chat_template(folder, config),
            special_tokens=special,
            path=str(file),
        )

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; `add_bos` prepends BOS only where the tokenizer has one (`bos_id`)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def encode_with_offsets(self, text: str, chat: bool = False) -> tuple[list[int], Offsets]:
        """`encode(text, add_bos=False)` and each token's (start, end) character span in `text`
        (special-token strings are their tokens either way, so `chat` changes nothing here)."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(span) for span in encoding.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, every token kept (special tokens as their strings)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        """The id of `token` (a vocabulary or added token), None if there is none."""
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, index: int) -> str:
        """The token of `index` as the vocabulary spells it (byte-level BPE: "Ġthe"; special: "<|eot_id|>")."""
        token = self.tokenizer.id_to_token(int(index))
        if token is None:
            raise TokenizerError(f"tokenizer {self.path}: id {index} is outside its vocabulary of {self.vocab_size}")
        return token


def load_tokenizer(path: str | Path) -> Tokenizer | HFTokenizer:
    """The tokenizer at `path`: a SentencePiece `.model`, a `tokenizer.json`, or a directory holding
    either (`tokenizer.json` preferred: it is what transformers reads, and it carries the added tokens).

    Returns an object with `encode(text, add_bos=, add_eos=)`, `encode_with_offsets`, `decode`,
    `bos_id`, `eos_id`, `eos_ids`, `pad_id`, `vocab_size`, `chat_template`, `special_tokens` and
    `apply_chat_template` (see `TokenizerProtocol`). A llama.cpp `.gguf` file gives the tokenizer its
    metadata describes (`lightning_tune.gguf`); `pkg://PACKAGE/FILE` names a file inside a package.
    """
    from lightning_tune.paths import resolve_path

    path = resolve_path(path)
    if path.suffix.lower() == ".gguf":
        from lightning_tune.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer.from_file(path / "tokenizer.json")
        if (path / "tokenizer.model").is_file():
            return Tokenizer(path / "tokenizer.model")
        raise TokenizerError(f"tokenizer {path}: the directory holds neither tokenizer.json nor tokenizer.model")
    if not path.exists():
        raise TokenizerError(f"tokenizer {path}: no such file or directory (expected a SentencePiece .model, a tokenizer.json or a directory holding either)")
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    return Tokenizer(path)


def tokenizer_files(path: str | Path) -> list[Path]:
    """The files that make up the tokenizer at `path` (for copying it into an export, or hashing it for a
    cache key), found as `load_tokenizer` finds them, without reading them: the model file and the
    config files beside it that exist."""
    from lightning_tune.paths import resolve_path

    path = resolve_path(path)
    main = next((path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()), path) if path.is_dir() else path
    if not main.is_file():
        raise TokenizerError(f"tokenizer {path}: no such file (expected a SentencePiece .model, a tokenizer.json or a directory holding either)")
    extra = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
    return [main, *(main.parent / name for name in extra if (main.parent / name).is_file())]


def _pad_token_id(tokenizer: tokenizers.Tokenizer) -> int | None:
    """An added special token made for padding (Llama 3.1's `<|finetune_right_pad_id|>`, `<pad>`, `[PAD]`),
    None if there is none (then EOS pads: labels come from the samples, never from `ids == pad_id`, so a
    trained EOS is never mistaken for padding)."""
    for index, token in sorted(tokenizer.get_added_tokens_decoder().items()):
        if token.special and "pad" in token.content.lower() and not token.content.lower().startswith(("<|vision", "<|image", "<|video")):
            return index
    return None


def _read_json(path: Path) -> dict:
    """A JSON object file, {} when absent; an unreadable one is an error naming it."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path}: not valid JSON ({_first_line(error)})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """The chat template as transformers finds it: `chat_template.jinja` (new saves), else the
    tokenizer_config.json `chat_template` (a string, or a list of named templates: "default")."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _generation_eos_ids(folder: Path) -> list[int]:
    """generation_config.json's `eos_token_id` (an int or a list, as Llama 3's is), [] when absent."""
    value = _read_json(folder / "generation_config.json").get("eos_token_id")
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{folder / 'generation_config.json'}: eos_token_id must be an int or a list of ints, got {value!r}")
    return values


def _find_all(text: str, tokens: Iterable[str]) -> list[tuple[int, str]]:
    """Non-overlapping occurrences of any of `tokens` in `text`, left to right (longest first at a tie)."""
    ordered = sorted(tokens, key=len, reverse=True)
    if not ordered:
        return []
    return [(match.start(), match.group()) for match in re.finditer("|".join(map(re.escape, ordered)), text)]


def _unique(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(v) for v in values))


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
