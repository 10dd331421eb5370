"""What every tokenizer is: TokenizerProtocol and TokenizerError, apply_chat_template shared by the backends,
and the files read beside a tokenizer (tokenizer_config.json's chat template, generation_config.json's end ids)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lightning_tune.tokenizer.chat_template import render

if TYPE_CHECKING:
    pass


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


class ChatTemplateMixin:
    """`apply_chat_template` shared by both backends (the rendering lives in lightning_tune.tokenizer.chat_template)."""

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
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise TokenizerError(f"tokenizer {self.path}: has no chat template; pass chat_template (a Jinja string or a built-in name)")  # type: ignore[attr-defined]
        text = render(template, messages, special_tokens=self.special_tokens, add_generation_prompt=add_generation_prompt, **kwargs).text
        if not tokenize:
            return text
        return self.encode_with_offsets(text, chat=True)[0]  # type: ignore[attr-defined]


def read_config_json(path: Path) -> dict:
    """A JSON object file beside a tokenizer, {} when absent; an unreadable one, or one whose `auto_map` names
    code to run, is an error naming it."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path}: not valid JSON ({first_line(error)})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    if "auto_map" in value:  # transformers would offer to import and run the .py files it names
        raise TokenizerError(
            f"{path}: has auto_map (Python code shipped with the tokenizer, which transformers would import and run); lightning_tune never runs a checkpoint's code: use a tokenizer without custom code"
        )
    return value


def find_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
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


def generation_eos_ids(folder: Path) -> list[int]:
    """generation_config.json's `eos_token_id` (an int or a list, as Llama 3's is), [] when absent."""
    value = read_config_json(folder / "generation_config.json").get("eos_token_id")
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{folder / 'generation_config.json'}: eos_token_id must be an int or a list of ints, got {value!r}")
    return values


def unique_ids(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(v) for v in values))


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# End-of-turn tokens of common templates that are not always the tokenizer's EOS (ChatML's <|im_end|>
# under a tokenizer whose EOS is <|endoftext|>, Gemma's <end_of_turn>, Llama 3's <|eot_id|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


def end_of_turn_ids(tokenizer: TokenizerProtocol) -> tuple[int, ...]:
    """Tokens that end a turn: the tokenizer's end tokens and the usual end-of-turn tokens it has."""
    known = [tokenizer.token_to_id(token) for token in END_OF_TURN_TOKENS]
    return tuple(dict.fromkeys([*tokenizer.eos_ids, *(i for i in known if i is not None)]))
