"""Hugging Face `tokenizer.json` tokenizers (Llama 3, Qwen, SmolLM2), read with the `tokenizers` library."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers
from lightning_tune.tokenizer.base import SPECIAL_TOKEN_NAMES, ChatTemplateMixin, Offsets, TokenizerError, find_chat_template, first_line, generation_eos_ids, read_config_json, unique_ids


class HFTokenizer(ChatTemplateMixin):
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
        self.eos_ids: tuple[int, ...] = unique_ids([eos_id, *eos_ids])
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
            raise TokenizerError(f"tokenizer {file}: not a valid tokenizer.json ({first_line(error)})") from None
        folder = file.parent
        config = read_config_json(folder / "tokenizer_config.json")
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
        generation_eos = generation_eos_ids(folder)
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
            chat_template=find_chat_template(folder, config),
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


def _pad_token_id(tokenizer: tokenizers.Tokenizer) -> int | None:
    """An added special token made for padding (Llama 3.1's `<|finetune_right_pad_id|>`, `<pad>`, `[PAD]`),
    None if there is none (then EOS pads: labels come from the samples, never from `ids == pad_id`, so a
    trained EOS is never mistaken for padding)."""
    for index, token in sorted(tokenizer.get_added_tokens_decoder().items()):
        if token.special and "pad" in token.content.lower() and not token.content.lower().startswith(("<|vision", "<|image", "<|video")):
            return index
    return None
