"""Unpaired preference records (prompt, completion, label true/false) to KTO samples, and `UnpairedDataModule`.

A record becomes one sample, prompt + completion, encoded as `PreferenceDataModule` encodes one side of a
pair (string records through the prompt template and `encode_sample`, conversational ones through the chat
template and `encode_conversation`, a record's `tools` passed to the template and the completion trained from where
the prompt stops matching to the end of the rendering, as TRL 1.16's KTOTrainer does both), the prompt masked, plus
its `label` (desirable or not). A batch also
carries KTO's mismatched rows for the KL estimate (`collate_unpaired`): each sample's prompt followed by the
completion of the sample before it in the batch (the first by the last's), as TRL 1.16's `KTOTrainer`
rotates completions within a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import Tensor

from lightning_tune.data.base import ASSETS, TokenizedDataModule
from lightning_tune.data.collate import IGNORE_INDEX, collate
from lightning_tune.data.conversation import DEFAULT_ROLE_MAP, OPENAI_COLUMNS, encode_conversation, normalize_messages, record_tools
from lightning_tune.data.errors import DataError
from lightning_tune.data.instruct import InstructTruncation, encode_sample
from lightning_tune.data.templates import PromptTemplate, get_template
from lightning_tune.tokenizer import TokenizerProtocol
from lightning_tune.tokenizer.chat_template import ChatTemplateError, resolve_template

DEMO_UNPAIRED = ASSETS / "unpaired_demo.jsonl"
UNPAIRED_FIELDS = ("prompt", "completion", "label")


def _reply(value: Any, where: str) -> list[dict]:
    """A conversational completion: one assistant message (a list of one {role: assistant, content}), or a plain string."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], Mapping) and value[0].get("role", "assistant") == "assistant":
        return [dict(value[0])]
    raise DataError(f"{where}: 'completion': expected one assistant reply ([{{role: assistant, content: ...}}] or a string), got {str(value)[:60]!r}")


def _encode_record(
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
    """One record -> `input_ids`, `labels`, `prompt_len` (the masked prefix: BOS and prompt), `label`,
    `truncated`; a bad record raises naming it."""
    where = f"{source}: record {index} (counting from 0)"
    values = {field: record[column] for field, column in columns.items()}
    for field in ("prompt", "completion"):
        if values[field] is None or (isinstance(values[field], (str, list)) and not values[field]):
            raise DataError(f"{where}: {field!r} is missing or empty (column {columns[field]!r}); a record needs a prompt, a completion and a label")
    label = values["label"]
    if not isinstance(label, bool) and label not in (0, 1):
        raise DataError(f"{where}: 'label' must be true (desirable) or false (undesirable), got {label!r} (column {columns['label']!r})")
    if conversational:
        if not isinstance(values["prompt"], (list, tuple)):
            raise DataError(f"{where}: 'prompt' must be a list of messages like the other records' (conversational records), got {type(values['prompt']).__name__}")
        messages = normalize_messages([*values["prompt"], *_reply(values["completion"], where)], DEFAULT_ROLE_MAP, OPENAI_COLUMNS, where)
        # trained from where the prompt stops matching to the end of the rendering, as TRL 1.16's KTOTrainer (Qwen's "\n" after <|im_end|> too)
        sample = encode_conversation(tokenizer, messages, chat_template, max_seq_len, "completion", "keep_start", where, record_tools(record, where))
    else:
        if not all(isinstance(values[field], str) for field in ("prompt", "completion")):
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings, or the prompt a list of messages (conversational records)")
        sample = encode_sample(tokenizer, template.format(values["prompt"]), values["completion"], max_seq_len, False, truncation)
    labels = sample["labels"]
    prompt_len = next((i for i, label_id in enumerate(labels) if label_id != IGNORE_INDEX), None)
    if prompt_len is None:
        raise DataError(f"{where}: the prompt fills all max_seq_len={max_seq_len} tokens, leaving nothing of the completion; raise max_seq_len or shorten the prompt")
    return {"input_ids": sample["input_ids"], "labels": labels, "prompt_len": prompt_len, "label": bool(label), "truncated": sample["truncated"]}


def collate_unpaired(samples: Sequence[Mapping[str, Any]], pad_id: int, max_seq_len: int) -> dict[str, Tensor]:
    """Right-padded samples (`collate`: `input_ids`, `labels`, `label_index`), their `label` (bool [B]),
    and the KL rows as `kl_input_ids`, `kl_labels`, `kl_label_index`: sample i's prompt followed by
    sample i-1's completion (sample 0's by the last's), its first `max_seq_len` tokens, the completion trained."""
    batch = collate(samples, pad_id)
    batch["label"] = torch.tensor([bool(s["label"]) for s in samples], dtype=torch.bool)
    rows = []
    for i, sample in enumerate(samples):
        other = samples[i - 1]  # i = 0: the last sample
        n, m = sample["prompt_len"], other["prompt_len"]
        input_ids = [*sample["input_ids"][:n], *other["input_ids"][m:]][:max_seq_len]
        labels = [*([IGNORE_INDEX] * n), *other["labels"][m:]][:max_seq_len]
        rows.append({"input_ids": input_ids, "labels": labels})
    kl = collate(rows, pad_id)
    batch.update(kl_input_ids=kl["input_ids"], kl_labels=kl["labels"], kl_label_index=kl["label_index"])
    return batch


class UnpairedDataModule(TokenizedDataModule):
    """Unpaired preference records for `KTOFinetune`: `prompt` / `completion` / `label` (true: desirable), strings or chat messages.

    TRL's unpaired format: string records are rendered with the prompt template (alpaca or none),
    conversational ones (`prompt` a list of messages, `completion` a list of one assistant message, or a
    string) with the chat template. Loading, the `datasets` cache, the validation split and the resumable
    seeded sampler are `TokenizedDataModule`'s. Never packed: each batch also holds its KL rows
    (`collate_unpaired`), so batch_size should be 2 or more (one sample's KL row is itself).
    """

    encoding_version = 2  # 2: a conversational record's tools reach the template; its completion trains to the end of the rendering (TRL's rule)
    record_kind = "prompt/completion/label records"
    demo_data: Path = DEMO_UNPAIRED

    def __init__(
        self,
        source: str = "trl-lib/kto-mix-14k",
        column_map: dict[str, str] | None = None,
        template: str = "none",
        chat_template: str | None = None,
        max_seq_len: int = 1024,
        truncation: InstructTruncation = "keep_start",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            source: Hugging Face Hub data set name, a local .json/.jsonl/.csv/.parquet file, or "demo" for the bundled demo records.
            column_map: Our field name (prompt, completion, label) -> the data's column name.
            template: Prompt template of string records: "none" (the prompt as raw text) or "alpaca".
            chat_template: Chat template of conversational records: the tokenizer's own if not given, else a built-in ("llama2", "chatml", "alpaca"), a Jinja file or a Jinja string.
            max_seq_len: Longest sample (prompt + completion) in tokens, KL rows too; longer ones keep their first max_seq_len tokens (a warning gives the count); a prompt that fills it all is an error.
            truncation: String records: "keep_start" keeps the first max_seq_len tokens; "prompt_start" cuts the prompt from its start first.
            **kwargs: The shared settings of `TokenizedDataModule` (split, tokenizer_path, batch_size, ...). Never packed nor grouped by length.
        """
        self.template: PromptTemplate = get_template(template)
        if column_map is not None:
            unknown = sorted(set(column_map) - set(UNPAIRED_FIELDS))
            if unknown:
                raise DataError(f"column_map: unknown field(s) {unknown}; the fields are {list(UNPAIRED_FIELDS)}")
        super().__init__(source=source, max_seq_len=max_seq_len, group_by_length=False, pack=False, **kwargs)
        self.column_map = dict(column_map or {})
        self.chat_template = chat_template
        self.truncation = truncation

    def _columns(self, records: datasets.Dataset) -> dict[str, str]:
        columns = {field: self.column_map.get(field, field) for field in UNPAIRED_FIELDS}
        for field, column in columns.items():
            if column not in records.column_names:
                raise DataError(f"{self.source}: no column {column!r} for field {field!r} (columns: {', '.join(records.column_names)}); set column_map to name it")
        return columns

    def _conversational(self, records: datasets.Dataset) -> bool:
        """Conversational records: the prompt column holds message lists, not strings."""
        feature = records.features[self._columns(records)["prompt"]]
        return not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"))

    def _chat_template(self, records: datasets.Dataset) -> str | None:
        if not self._conversational(records):
            return None
        try:
            return resolve_template(self.chat_template, self.tokenizer.chat_template, where="data.chat_template")[0]
        except ChatTemplateError as error:
            raise DataError(str(error)) from None

    def _cache_fields(self, records: datasets.Dataset) -> dict[str, Any]:
        return {"template": asdict(self.template), "chat_template": self._chat_template(records), "columns": self._columns(records), "truncation": self.truncation}

    def _encoder(self, records: datasets.Dataset):
        return partial(
            _encode_record,
            source=self.source,
            columns=self._columns(records),
            conversational=self._conversational(records),
            template=self.template,
            chat_template=self._chat_template(records),
            tokenizer=self.tokenizer,
            max_seq_len=self.max_seq_len,
            truncation=self.truncation,
        )

    def collate_fn(self):
        return partial(collate_unpaired, pad_id=self.tokenizer.pad_id, max_seq_len=self.max_seq_len)
