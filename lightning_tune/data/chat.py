"""`ChatDataModule`: conversation records (OpenAI `messages` or ShareGPT `conversations`) to training
samples through `conversation.encode_conversation`, checked at setup against the tokenizer's own template."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import datasets

from lightning_tune.data.base import ASSETS, DEMO, TokenizedDataModule, json_records
from lightning_tune.data.conversation import (
    CHAT_FIELDS,
    DEFAULT_ROLE_MAP,
    OPENAI_COLUMNS,
    ROLES,
    SHAREGPT_COLUMNS,
    ChatTruncation,
    TrainOn,
    encode_conversation,
    normalize_messages,
    record_tools,
)
from lightning_tune.data.errors import DataError
from lightning_tune.tokenizer import TokenizerProtocol
from lightning_tune.tokenizer.chat_template import ChatTemplateError, resolve_template

log = logging.getLogger(__name__)


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
    encoding_version = 2  # 2: a record's `tools` reach the template; turns of tool calls train; gpt-oss's channel header trains

    def __init__(
        self,
        source: str = "demo",
        chat_template: str | None = None,
        train_on: TrainOn = "assistant",
        truncation: ChatTruncation = "keep_start",
        column_map: dict[str, str] | None = None,
        role_map: dict[str, str] | None = None,
        check_samples: int = 8,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            source: Hugging Face Hub data set name, a local .json/.jsonl/.parquet file, or "demo" for the bundled multi-turn demo.
            chat_template: The tokenizer's own template if not given; else a built-in ("llama2", "chatml", "alpaca"), a Jinja file, or a Jinja string. Source "demo" defaults to "llama2".
            train_on: Train on "assistant" replies (default), the "last_assistant" reply only, the "completion" (every token after the prompt, i.e. the last reply and whatever the template writes after it, as TRL trains prompt/completion data), or "all" tokens.
            truncation: "keep_start" (keep the first max_seq_len tokens), "keep_end" (BOS and the last tokens), or "drop" (leave the sample out).
            column_map: Where the fields are: {"messages": column, "role": key, "content": key}; default OpenAI (messages/role/content), or ShareGPT (conversations/from/value) when the data has a conversations column.
            role_map: The data's role names -> system/user/assistant/tool, added to the defaults (human -> user, gpt -> assistant).
            check_samples: How many conversations to compare at setup with the tokenizer's own template and transformers (0: none).
            **kwargs: The shared settings of `TokenizedDataModule` (split, tokenizer_path, max_seq_len, batch_size, ...).
        """
        super().__init__(source=source, **kwargs)
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
        self.chat_template = "llama2" if chat_template is None and source == DEMO and kwargs.get("tokenizer_path") is None else chat_template
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
    def chat_template_used(self) -> str:  # TokenizedDataModule's attribute: known before setup here
        return self.template

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
            tools = record_tools(records[index], where)
            ids = data[index]["input_ids"]
            if data[index]["truncated"]:
                continue
            if own is None:
                break
            expected = self.tokenizer.apply_chat_template(messages, tools=tools)
            if own == self.template:
                if ids != expected:
                    raise DataError(f"{where}: the ids differ from the tokenizer's own chat template output at token {_first_difference(ids, expected)}")
                if reference is not None:
                    theirs = reference.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"]
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
    return encode_conversation(tokenizer, messages, template, max_seq_len, train_on, truncation, where, record_tools(record, where))


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
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)  # never the folder's own code
    except Exception:  # noqa: BLE001 - an optional cross-check: any failure to load means no reference
        log.info(f"{folder}: transformers cannot load this tokenizer; the setup check compares with our own rendering only")
        return None
