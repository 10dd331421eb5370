"""Conversations to training samples: one rendering of the whole chat, masks from its character offsets.

Why one rendering: templates are not prefix-stable (Qwen 3 drops earlier turns' reasoning), so masks
found by re-rendering growing prefixes of a conversation give ids the model never sees at inference.
Here the conversation is rendered once with its template, encoded once, and a token is trained when its
character span overlaps a trained span of the rendered text:

- templates with `{% generation %}` blocks: the blocks' spans (as transformers' assistant masks);
- otherwise: each assistant reply, found in order in the rendered text, through the first end-of-turn
  token after it (so the stop token is trained, and whatever the template writes between reply and
  stop token, e.g. Llama 2's " "), with any `<think>...</think>` block rendered right before it
  (train as rendered: Qwen 3 keeps only the last turn's reasoning). The header stays masked.

Record formats: OpenAI `messages: [{role, content}]` and ShareGPT `conversations: [{from, value}]`
(`human`/`gpt`/`system`), both normalised to OpenAI messages first, so they give identical samples.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal

import datasets

from lightning_tune.chat_template import ChatTemplateError, render, resolve_template
from lightning_tune.data.base import ASSETS, DEMO, TokenizedDataModule, json_records
from lightning_tune.data.errors import DataError
from lightning_tune.loss import IGNORE_INDEX
from lightning_tune.tokenizer import TokenizerProtocol

log = logging.getLogger(__name__)

TrainOn = Literal["assistant", "last_assistant", "all"]
# How a sample longer than max_seq_len is cut: "keep_start" keeps its first max_seq_len tokens (as
# torchtune, TRL and axolotl do), "keep_end" keeps BOS and the last tokens (the latest turns), "drop"
# leaves the sample out. Each is reported once with a count.
ChatTruncation = Literal["keep_start", "keep_end", "drop"]

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's role names (torchtune's ShareGPTToMessages, axolotl) and the OpenAI ones, to ours.
DEFAULT_ROLE_MAP = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "tool": "tool"}
# Record fields: where the message list is, and each message's role and text.
CHAT_FIELDS = ("messages", "role", "content")
OPENAI_COLUMNS = {"messages": "messages", "role": "role", "content": "content"}
SHAREGPT_COLUMNS = {"messages": "conversations", "role": "from", "content": "value"}
# End-of-turn tokens of common templates that are not always the tokenizer's EOS (ChatML's <|im_end|>
# under a tokenizer whose EOS is <|endoftext|>, Gemma's <end_of_turn>, Llama 3's <|eot_id|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


def normalize_messages(raw: Any, role_map: Mapping[str, str], columns: Mapping[str, str], where: str) -> list[dict]:
    """One record's message list as OpenAI messages [{role, content, ...}], checked.

    `where` names the record ("data.jsonl: record 3") in the one-line `DataError` a bad record raises:
    no messages, an unknown role, a non-string content, no assistant turn."""
    role_key, content_key = columns["role"], columns["content"]
    if raw is None or (isinstance(raw, (list, tuple)) and not raw):
        raise DataError(f"{where}: no messages (expected a non-empty list in column {columns['messages']!r})")
    if not isinstance(raw, (list, tuple)):
        raise DataError(f"{where}: column {columns['messages']!r} is a {type(raw).__name__}, expected a list of messages")
    messages = []
    for position, message in enumerate(raw):
        if not isinstance(message, Mapping):
            raise DataError(f"{where}, message {position}: expected an object with {role_key!r} and {content_key!r}, got {type(message).__name__}")
        role = message.get(role_key)
        if role not in role_map:
            known = ", ".join(sorted(role_map))
            raise DataError(f"{where}, message {position}: unknown role {role!r} (known: {known}; add it to role_map)")
        content = message.get(content_key)
        if not isinstance(content, str):
            raise DataError(f"{where}, message {position} ({role}): content must be a string, got {'nothing' if content is None else type(content).__name__}")
        extra = {key: value for key, value in message.items() if key not in (role_key, content_key, "role", "content") and value is not None}
        messages.append({**extra, "role": role_map[role], "content": content})
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to train on")
    return messages


def end_of_turn_ids(tokenizer: TokenizerProtocol) -> tuple[int, ...]:
    """Tokens that end a turn: the tokenizer's end tokens and the usual end-of-turn tokens it has."""
    known = [tokenizer.token_to_id(token) for token in END_OF_TURN_TOKENS]
    return tuple(dict.fromkeys([*tokenizer.eos_ids, *(i for i in known if i is not None)]))


def encode_conversation(
    tokenizer: TokenizerProtocol,
    messages: Sequence[Mapping[str, Any]],
    template: str,
    max_seq_len: int,
    train_on: TrainOn = "assistant",
    truncation: ChatTruncation = "keep_start",
    where: str = "conversation",
) -> dict:
    """Render, encode and mask one conversation; check it; cut it to `max_seq_len`.

    Returns `input_ids`, `labels` (aligned, -100 where masked), `truncated` (it was longer than
    `max_seq_len`) and `keep` (False only for `truncation="drop"` of a long sample, or when a cut left
    no trained token). Checks on the whole (uncut) sample, each failure a `DataError` naming `where`:
    exactly one BOS, at the start (where the tokenizer has one; see `_check_bos` for Llama 2's one per
    turn), and at least one trained end-of-turn token.
    """
    try:
        rendered = render(template, messages, special_tokens=tokenizer.special_tokens)
    except ChatTemplateError as error:
        raise DataError(f"{where}: {error}") from None
    text = rendered.text
    ids, offsets = tokenizer.encode_with_offsets(text, chat=True)
    if train_on == "all":
        labels = list(ids)
    else:
        spans = rendered.generation_spans or _reply_spans(text, messages, tokenizer, where)
        if train_on == "last_assistant":
            spans = spans[-1:]
        labels = _mask(ids, offsets, spans)
    eot = end_of_turn_ids(tokenizer)
    if tokenizer.bos_id is not None:
        _check_bos(ids, tokenizer.bos_id, text.count(tokenizer.special_tokens.get("bos_token") or "\0"), tokenizer.id_to_token(tokenizer.bos_id), where)
    if not any(label in eot for label in labels if label != IGNORE_INDEX):
        names = ", ".join(repr(tokenizer.id_to_token(i)) for i in eot)
        raise DataError(
            f"{where}: no end-of-turn token ({names}) is trained, so the model would not learn to stop; the template does not end assistant replies with one (choose another chat_template)"
        )
    truncated = len(ids) > max_seq_len
    keep = True
    if truncated:
        if truncation == "keep_start":
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        elif truncation == "keep_end":
            head = 1 if tokenizer.bos_id is not None else 0
            ids, labels = ids[:head] + ids[len(ids) - (max_seq_len - head) :], labels[:head] + labels[len(labels) - (max_seq_len - head) :]
        else:
            keep = False
        keep = keep and any(label != IGNORE_INDEX for label in labels)
    return {"input_ids": ids, "labels": labels, "truncated": truncated, "keep": keep}


def _check_bos(ids: Sequence[int], bos_id: int, written: int, name: str, where: str) -> None:
    """One BOS, at the start (litgpt #1682 trained Llama 3 on two); a template that opens every turn with
    BOS (Llama 2 chat, as Meta's own code) may have more, but never two in a row nor any it did not write."""
    count = ids.count(bos_id)
    if not ids or ids[0] != bos_id:
        raise DataError(f"{where}: the rendered conversation does not start with BOS ({name!r}); the template must write bos_token first")
    doubled = next((i for i in range(1, len(ids)) if ids[i] == bos_id and ids[i - 1] == bos_id), None)
    if doubled is not None:
        raise DataError(f"{where}: {count} BOS tokens ({name!r}), two in a row at token {doubled}; expected exactly one at the start")
    if count != max(written, 1):
        raise DataError(f"{where}: {count} BOS tokens ({name!r}) but the template wrote {written}; expected exactly one at the start")


def _mask(ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Labels: a token is trained when its character span overlaps a trained span (transformers' rule for
    assistant masks, so a token straddling a span edge is trained); one pass, both are in order."""
    labels = [IGNORE_INDEX] * len(ids)
    spans = sorted(spans)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0] and start < spans[k][1]:
            labels[i] = ids[i]
    return labels


def _reply_spans(text: str, messages: Sequence[Mapping[str, Any]], tokenizer: TokenizerProtocol, where: str) -> list[tuple[int, int]]:
    """Character spans of each assistant reply in the rendered `text`, through its end-of-turn token.

    Messages are found in order (a cursor moves past each one found), so a reply is never matched
    inside an earlier turn. Templates may trim a reply or drop an earlier turn's reasoning: the reply
    as given, then stripped, then its part after `</think>` is looked for; an occurrence followed by an
    end-of-turn token is preferred (a reply "user" is not the "user" of a later header)."""
    eot_strings = [tokenizer.id_to_token(i) for i in end_of_turn_ids(tokenizer)]
    spans: list[tuple[int, int]] = []
    cursor = 0
    for position, message in enumerate(messages):
        found = _find_reply(text, message["content"], cursor, eot_strings if message["role"] == "assistant" else [])
        if found is None:
            if message["role"] == "assistant":
                raise DataError(
                    f"{where}, message {position} (assistant): its text does not appear in the rendered conversation"
                    " (the template rewrites it), so its tokens cannot be found; use a chat_template with {% generation %} blocks"
                )
            continue
        start, end = found
        if message["role"] == "assistant":
            # Reasoning the template rendered just before the reply (Qwen 3's final turn, with an empty
            # <think></think> when there is none) is model output too: train it as rendered.
            think = re.search(r"<think>.*?</think>\s*$", text[cursor:start], re.S)
            if think is not None:
                start = cursor + think.start()
        cursor = end
        if message["role"] == "assistant":
            stops = [found_at + len(s) for s in eot_strings if (found_at := text.find(s, end)) >= 0]
            if stops:
                end = min(stops)
                cursor = end
            spans.append((start, end))
    return spans


def _find_reply(text: str, content: str, cursor: int, eot_strings: Sequence[str]) -> tuple[int, int] | None:
    """The first place at or after `cursor` where `content` (or its trimmed forms) is rendered."""
    candidates = [content, content.strip()]
    if "</think>" in content:
        candidates.append(content.split("</think>")[-1].strip())
    for candidate in dict.fromkeys(c for c in candidates if c):
        first = None
        start = text.find(candidate, cursor)
        while start >= 0:
            end = start + len(candidate)
            if first is None:
                first = (start, end)
            rest = text[end : end + 16].lstrip(" \n")
            if not eot_strings or any(rest.startswith(s) for s in eot_strings):
                return start, end
            start = text.find(candidate, start + 1)
        if first is not None:
            return first
    return None


class ChatDataModule(TokenizedDataModule):
    """Multi-turn conversations rendered with the model's own chat template, assistant replies trained.

    Each record (OpenAI `messages` or ShareGPT `conversations`, see `column_map` / `role_map`) is rendered
    once with the template and masked from that one rendering (`encode_conversation`); loading,
    caching, the validation split, packing and the resumable sampler are `TokenizedDataModule`'s, as for
    `InstructDataModule`. At setup the first `check_samples` conversations are compared with the
    tokenizer's own template (and with transformers' `apply_chat_template` when transformers can
    read the tokenizer): with the own template any difference is an error naming the record; with
    another template the difference is reported once. Every sample must train an end-of-turn token
    and hold exactly one BOS (`encode_conversation`). Use it in a config as
    `data: {class_path: lightning_tune.ChatDataModule, init_args: {...}}`.
    """

    record_kind = "conversations (records with a messages or conversations list)"
    demo_data = ASSETS / "chat_demo.jsonl"
    encoding_version = 1

    def __init__(
        self,
        source: str = "demo",
        split: str = "train",
        tokenizer_path: str | None = None,
        chat_template: str | None = None,
        train_on: TrainOn = "assistant",
        max_seq_len: int = 512,
        truncation: ChatTruncation = "keep_start",
        column_map: dict[str, str] | None = None,
        role_map: dict[str, str] | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 42,
        val_size: float = 0.0,
        cache_dir: str | None = None,
        group_by_length: bool = False,
        pack: bool = True,
        check_samples: int = 8,
    ) -> None:
        """
        Args:
            source: Hugging Face Hub data set name, a local .json/.jsonl/.parquet file, or "demo" for the bundled multi-turn demo.
            split: Split to load from a hub data set (local files have only "train").
            tokenizer_path: SentencePiece .model, tokenizer.json, or a directory holding either (a checkpoint's); left out, the CLI uses model.checkpoint_dir (its tokenizer); else only source "demo" may leave it out.
            chat_template: The tokenizer's own template if not given; else a built-in ("llama2", "chatml", "alpaca"), a Jinja file, or a Jinja string. Source "demo" defaults to "llama2".
            train_on: Train on "assistant" replies (default), the "last_assistant" reply only, or "all" tokens.
            max_seq_len: Longest sample in tokens; longer ones are cut as `truncation` says (a warning gives the count).
            truncation: "keep_start" (keep the first max_seq_len tokens), "keep_end" (BOS and the last tokens), or "drop" (leave the sample out).
            column_map: Where the fields are: {"messages": column, "role": key, "content": key}; default OpenAI (messages/role/content), or ShareGPT (conversations/from/value) when the data has a conversations column.
            role_map: The data's role names -> system/user/assistant/tool, added to the defaults (human -> user, gpt -> assistant).
            batch_size: Samples per batch.
            num_workers: DataLoader worker processes.
            shuffle: Shuffle the training samples (seeded by `seed`; the order is restored on resume).
            seed: Seed of the shuffle and of the validation split.
            val_size: Held out for validation: a fraction if below 1, a count of conversations if 1 or more, none if 0.
            cache_dir: Where `datasets` caches loaded and tokenised data (default: its own cache, ~/.cache/huggingface/datasets).
            group_by_length: Batch training samples of similar length (shuffled groups, seeded, resumable).
            pack: Concatenate each batch's samples into one unpadded row, attention within each sample (false: right-pad each batch).
            check_samples: How many conversations to compare at setup with the tokenizer's own template and transformers (0: none).
        """
        super().__init__(
            source=source,
            split=split,
            tokenizer_path=tokenizer_path,
            max_seq_len=max_seq_len,
            batch_size=batch_size,
            num_workers=num_workers,
            shuffle=shuffle,
            seed=seed,
            val_size=val_size,
            cache_dir=cache_dir,
            group_by_length=group_by_length,
            pack=pack,
        )
        if column_map is not None:
            unknown = sorted(set(column_map) - set(CHAT_FIELDS))
            if unknown:
                raise DataError(f"column_map: unknown field(s) {unknown}; the fields are {list(CHAT_FIELDS)} (map each to your data's column or key)")
            bad = [field for field, column in column_map.items() if not isinstance(column, str) or not column]
            if bad:
                raise DataError(f"column_map: field(s) {bad} must map to a column name (a non-empty string)")
        if role_map is not None:
            bad_roles = {name: role for name, role in role_map.items() if role not in ROLES}
            if bad_roles:
                raise DataError(f"role_map: {bad_roles} map to unknown roles; map each to one of {', '.join(ROLES)}")
        if check_samples < 0:
            raise DataError(f"check_samples must be 0 or more, got {check_samples}")
        self.chat_template = "llama2" if chat_template is None and source == DEMO and tokenizer_path is None else chat_template
        self.train_on = train_on
        self.truncation = truncation
        self.column_map = dict(column_map or {})
        self.role_map = {**DEFAULT_ROLE_MAP, **(role_map or {})}
        self.check_samples = check_samples
        self._template: tuple[str, str] | None = None

    @property
    def template(self) -> str:
        """The Jinja source of the chat template in use."""
        return self._resolved()[0]

    @property
    def template_name(self) -> str:
        """Which template that is, in words ("the tokenizer's own", "built-in 'chatml'", a file)."""
        return self._resolved()[1]

    def _resolved(self) -> tuple[str, str]:
        if self._template is None:
            try:
                self._template = resolve_template(self.chat_template, self.tokenizer.chat_template, where="data.chat_template")
            except ChatTemplateError as error:
                raise DataError(str(error)) from None
        return self._template

    def _columns(self, records: datasets.Dataset) -> dict[str, str]:
        """Where the messages, roles and texts are: the column_map over the format the data looks like."""
        names = records.column_names
        base = SHAREGPT_COLUMNS if "messages" not in names and "conversations" in names else OPENAI_COLUMNS
        columns = {**base, **self.column_map}
        if columns["messages"] not in names:
            raise DataError(f"{self.source}: no column {columns['messages']!r} of messages (columns: {', '.join(names)}); set column_map, e.g. {{messages: conversations, role: from, content: value}}")
        return columns

    def _cache_fields(self, records: datasets.Dataset) -> dict[str, Any]:
        return {"template": self.template, "train_on": self.train_on, "truncation": self.truncation, "columns": self._columns(records), "roles": self.role_map}

    def _encoder(self, records: datasets.Dataset):
        return partial(
            _encode_chat_record,
            source=self.source,
            columns=self._columns(records),
            role_map=self.role_map,
            tokenizer=self.tokenizer,
            template=self.template,
            max_seq_len=self.max_seq_len,
            train_on=self.train_on,
            truncation=self.truncation,
        )

    def _report_truncation(self, data: datasets.Dataset) -> str:
        what = {"keep_start": "kept their first", "keep_end": "kept BOS and their last", "drop": "left out, not cut to"}[self.truncation]
        truncated, total = self.num_truncated, len(data)
        return f"{self.source}: {truncated} of {total} conversations are longer than max_seq_len={self.max_seq_len} tokens: {what} {self.max_seq_len} tokens (truncation={self.truncation})"

    def _record_problem(self, text: str) -> str | None:
        records = json_records(text)
        if not records:
            return None
        columns = {**(SHAREGPT_COLUMNS if isinstance(records[0], Mapping) and "messages" not in records[0] and "conversations" in records[0] else OPENAI_COLUMNS), **self.column_map}
        for index, record in enumerate(records):
            try:
                normalize_messages(record.get(columns["messages"]) if isinstance(record, Mapping) else None, self.role_map, columns, f"record {index} (counting from 0)")
            except DataError as error:
                return str(error)
        return None

    def _check(self, data: datasets.Dataset, records: datasets.Dataset) -> None:
        """The first `check_samples` conversations against the tokenizer's own template and transformers."""
        count = min(self.check_samples, len(records))
        if count == 0:
            return
        columns = self._columns(records)
        own = self.tokenizer.chat_template
        reference = _transformers_tokenizer(self.tokenizer_path) if own is not None else None
        reported = False
        for index in range(count):
            where = f"{self.source}: record {index} (counting from 0)"
            messages = normalize_messages(records[index][columns["messages"]], self.role_map, columns, where)
            ids = data[index]["input_ids"]
            if data[index]["truncated"]:
                continue
            if own is None:
                break
            expected = self.tokenizer.apply_chat_template(messages)
            if own == self.template:
                if ids != expected:
                    raise DataError(f"{where}: the ids differ from the tokenizer's own chat template output at token {_first_difference(ids, expected)}")
                if reference is not None:
                    theirs = reference.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
                    if ids != theirs:
                        raise DataError(f"{where}: the ids differ from transformers' apply_chat_template at token {_first_difference(ids, theirs)}")
            elif ids != expected and not reported:
                k = _first_difference(ids, expected)
                log.warning(
                    f"{self.source}: chat_template {self.template_name} renders record {index} differently from the tokenizer's own template,"
                    f" from token {k}: {self.tokenizer.decode(ids[k : k + 12])!r} where the model's own has {self.tokenizer.decode(expected[k : k + 12])!r}"
                )
                reported = True


def _encode_chat_record(
    record: dict,
    index: int,
    *,
    source: str,
    columns: dict[str, str],
    role_map: dict[str, str],
    tokenizer: TokenizerProtocol,
    template: str,
    max_seq_len: int,
    train_on: TrainOn,
    truncation: ChatTruncation,
) -> dict:
    """One raw record -> `encode_conversation` output, its messages checked first."""
    where = f"{source}: record {index} (counting from 0)"
    messages = normalize_messages(record.get(columns["messages"]), role_map, columns, where)
    return encode_conversation(tokenizer, messages, template, max_seq_len, train_on, truncation, where)


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@lru_cache(maxsize=4)
def _transformers_tokenizer(path: str):
    """transformers' tokenizer for a tokenizer.json folder (the reference of the setup check), None
    when transformers is not installed or cannot read it offline (the check then uses ours alone)."""
    folder = Path(path)
    folder = folder if folder.is_dir() else folder.parent
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        import transformers
    except ImportError:
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # noqa: BLE001 - an optional cross-check: any failure to load means no reference
        log.info(f"{folder}: transformers cannot load this tokenizer; the setup check compares with our own rendering only")
        return None
