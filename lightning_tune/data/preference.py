"""Preference pairs (prompt, chosen, rejected) to DPO samples, and `PreferenceDataModule`.

A pair becomes two samples, prompt + chosen and prompt + rejected, each encoded as the SFT data
modules encode a sample, so a DPO run sees the ids an SFT run on the same text would: string pairs
through the prompt template and `encode_sample` (BOS + prompt + completion + EOS, as TRL appends EOS
to string completions), conversational pairs (the prompt a list of messages, chosen / rejected one
assistant reply each) through the chat template and `encode_conversation`, trained from where the prompt ends to the end of
the rendering as TRL 1.16 trains it (the reply, its end-of-turn token and whatever the template writes
after it, such as Qwen's "\n" after <|im_end|>). A conversational record's `tools` (function definitions, a
list or its JSON string) reach the template as transformers' `tools=`, as TRL 1.16's trainers pass them.
The prompt is masked (labels -100). A batch is [chosen rows; rejected rows], right-padded: one
forward scores both sides of every pair (`collate_pairs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import datasets

from lightning_tune.data.base import ASSETS, TokenizedDataModule
from lightning_tune.data.collate import IGNORE_INDEX, SIDES, collate_pairs
from lightning_tune.data.conversation import DEFAULT_ROLE_MAP, OPENAI_COLUMNS, encode_conversation, normalize_messages, record_tools
from lightning_tune.data.errors import DataError
from lightning_tune.data.instruct import InstructTruncation, encode_sample
from lightning_tune.data.templates import PromptTemplate, get_template
from lightning_tune.tokenizer import TokenizerProtocol
from lightning_tune.tokenizer.chat_template import ChatTemplateError, resolve_template

DEMO_PREFERENCES = ASSETS / "preference_demo.jsonl"
PAIR_FIELDS = ("prompt", "chosen", "rejected")
# Optional per-pair fields, used where a column holds them: `margin` (TRL's reward-model column), the
# amount by which chosen should out-score rejected, subtracted inside RewardModel's Bradley-Terry loss.
OPTIONAL_FIELDS = ("margin",)


def _assistant_reply(value: Any, where: str) -> list[dict]:
    """A conversational completion: one assistant message (a list of one {role: assistant, content}), or a plain string."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], Mapping) and value[0].get("role", "assistant") == "assistant":
        return [dict(value[0])]
    raise DataError(f"{where}: expected one assistant reply ([{{role: assistant, content: ...}}] or a string), got {str(value)[:60]!r}")


def _encode_pair(
    record: dict,
    index: int,
    *,
    source: str,
    columns: dict[str, str],
    conversational: bool,
    template: PromptTemplate,
    chat_template: str | None,
    tokenizer: TokenizerProtocol,
    max_seq_len: int,
    truncation: InstructTruncation,
) -> dict:
    """One record -> chosen_/rejected_ `input_ids` and `labels`, `truncated`, `pair_index` (the
    record's index, unique over train and validation); bad pairs raise naming the record."""
    where = f"{source}: record {index} (counting from 0)"
    values = {field: record[column] for field, column in columns.items()}
    if "margin" in values:
        margin = values["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise DataError(f"{where}: 'margin' (column {columns['margin']!r}) must be a finite number, got {margin!r}")
    for field in PAIR_FIELDS:
        if values[field] is None or (isinstance(values[field], (str, list)) and not values[field]):
            raise DataError(f"{where}: {field!r} is missing or empty (column {columns[field]!r}); a pair needs a prompt, a chosen and a rejected completion")
    if values["chosen"] == values["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a pair needs two different completions")
    out: dict[str, Any] = {"truncated": False, "pair_index": index}
    tools = record_tools(record, where) if conversational else None  # TRL 1.16 reads a record's `tools` the same way
    if "margin" in values:
        out["margin"] = float(values["margin"])
    for side in SIDES:
        if conversational:
            if not isinstance(values["prompt"], (list, tuple)):
                raise DataError(f"{where}: 'prompt' must be a list of messages like the other records' (conversational pairs), got {type(values['prompt']).__name__}")
            messages = normalize_messages([*values["prompt"], *_assistant_reply(values[side], f"{where}, {side!r}")], DEFAULT_ROLE_MAP, OPENAI_COLUMNS, where)
            sample = encode_conversation(tokenizer, messages, chat_template, max_seq_len, "completion", "keep_start", where, tools)
        else:
            if not all(isinstance(values[field], str) for field in ("prompt", side)):
                raise DataError(f"{where}: 'prompt' and {side!r} must both be strings, or the prompt a list of messages (conversational pairs)")
            sample = encode_sample(tokenizer, template.format(values["prompt"]), values[side], max_seq_len, False, truncation)
        if all(label == IGNORE_INDEX for label in sample["labels"]):
            raise DataError(f"{where}: the prompt fills all max_seq_len={max_seq_len} tokens, leaving nothing of {side!r}; raise max_seq_len or shorten the prompt")
        out[f"{side}_input_ids"], out[f"{side}_labels"] = sample["input_ids"], sample["labels"]
        out["truncated"] = out["truncated"] or sample["truncated"]
    if conversational:  # as TRL: the completion starts where the prompt stops matching either side
        start = min(next(i for i, label in enumerate(out[f"{side}_labels"]) if label != IGNORE_INDEX) for side in SIDES)
        for side in SIDES:
            ids = out[f"{side}_input_ids"]
            out[f"{side}_labels"] = [IGNORE_INDEX] * start + list(ids[start:])
    return out


class PreferenceDataModule(TokenizedDataModule):
    """Preference pairs for `DPOFinetune`: `prompt` / `chosen` / `rejected` records, strings or chat messages.

    String pairs are rendered with the prompt template (alpaca or none) as `InstructDataModule`
    renders instructions; conversational pairs (TRL's format: `prompt` a list of messages, `chosen`
    and `rejected` a list of one assistant message each, or a string) with the chat template as
    `ChatDataModule` does. Loading, the `datasets` cache, the validation split and the resumable
    seeded sampler are `TokenizedDataModule`'s. Batches are never packed: `collate_pairs` puts every
    chosen row before every rejected row.
    """

    record_kind = "prompt/chosen/rejected records"
    demo_data: Path = DEMO_PREFERENCES
    encoding_version = 4  # 2: each pair carries its pair_index; 3: conversational completions run to the end (TRL's rule); 4: a record's tools reach the template
    rows_per_sample = 2  # a pair is two rows of a batch (memory estimates count rows)

    def __init__(
        self,
        source: str = "trl-lib/ultrafeedback_binarized",
        column_map: dict[str, str] | None = None,
        template: str = "none",
        chat_template: str | None = None,
        max_seq_len: int = 1024,
        truncation: InstructTruncation = "keep_start",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            source: Hugging Face Hub data set name, a local .json/.jsonl/.csv/.parquet file, or "demo" for the bundled demo pairs.
            column_map: Our field name (prompt, chosen, rejected; optional margin, the per-pair margin `RewardModel` subtracts in its loss, read from a `margin` column when there is one) -> the data's column name.
            template: Prompt template of string pairs: "none" (the prompt as raw text) or "alpaca".
            chat_template: Chat template of conversational pairs: the tokenizer's own if not given, else a built-in ("llama2", "chatml", "alpaca"), a Jinja file or a Jinja string. Source "demo" (strings) does not use it.
            max_seq_len: Longest sample (prompt + one completion) in tokens; longer ones keep their first max_seq_len tokens (a warning gives the count); a prompt that fills it all is an error.
            truncation: String pairs: "keep_start" keeps the first max_seq_len tokens; "prompt_start" cuts the prompt from its start first.
            **kwargs: The shared settings of `TokenizedDataModule` (split, tokenizer_path, batch_size, ...); a batch of batch_size pairs has 2 x batch_size rows. Never packed nor grouped by length.
        """
        self.template: PromptTemplate = get_template(template)
        if column_map is not None:
            unknown = sorted(set(column_map) - set(PAIR_FIELDS) - set(OPTIONAL_FIELDS))
            if unknown:
                raise DataError(f"column_map: unknown field(s) {unknown}; the fields are {list(PAIR_FIELDS + OPTIONAL_FIELDS)}")
        super().__init__(source=source, max_seq_len=max_seq_len, group_by_length=False, pack=False, **kwargs)
        self.column_map = dict(column_map or {})
        self.chat_template = chat_template
        self.truncation = truncation

    def _columns(self, records: datasets.Dataset) -> dict[str, str]:
        columns = {field: self.column_map.get(field, field) for field in PAIR_FIELDS}
        # an optional field is read where its column is there, and must be there where column_map names it
        columns |= {field: self.column_map.get(field, field) for field in OPTIONAL_FIELDS if field in self.column_map or field in records.column_names}
        for field, column in columns.items():
            if column not in records.column_names:
                raise DataError(f"{self.source}: no column {column!r} for field {field!r} (columns: {', '.join(records.column_names)}); set column_map to name it")
        return columns

    def _conversational(self, records: datasets.Dataset) -> bool:
        """Conversational pairs: the prompt column holds message lists, not strings."""
        feature = records.features[self._columns(records)["prompt"]]
        return not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"))

    def _chat_template(self, records: datasets.Dataset) -> str | None:
        if not self._conversational(records):
            return None
        try:
            self.chat_template_used = resolve_template(self.chat_template, self.tokenizer.chat_template, where="data.chat_template")[0]
        except ChatTemplateError as error:
            raise DataError(str(error)) from None
        return self.chat_template_used

    def _cache_fields(self, records: datasets.Dataset) -> dict[str, Any]:
        return {"template": asdict(self.template), "chat_template": self._chat_template(records), "columns": self._columns(records), "truncation": self.truncation}

    def _encoder(self, records: datasets.Dataset):
        return partial(
            _encode_pair,
            source=self.source,
            columns=self._columns(records),
            conversational=self._conversational(records),
            template=self.template,
            chat_template=self._chat_template(records),
            tokenizer=self.tokenizer,
            max_seq_len=self.max_seq_len,
            truncation=self.truncation,
        )

    def _report_truncation(self, data: datasets.Dataset) -> str:
        return f"{self.source}: {self.num_truncated} of {len(data)} pairs have a side longer than max_seq_len={self.max_seq_len}; its first max_seq_len tokens are kept"

    def collate_fn(self):
        return partial(collate_pairs, pad_id=self.tokenizer.pad_id)
