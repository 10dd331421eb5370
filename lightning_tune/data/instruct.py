"""Instruction records to training samples: `encode_sample` (prompt masked, truncation) and
`InstructDataModule` (instruction / input / output records through a prompt template)."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from typing import Any, Literal

import datasets

from lightning_tune.data.base import ASSETS, TokenizedDataModule
from lightning_tune.data.collate import IGNORE_INDEX
from lightning_tune.data.errors import DataError
from lightning_tune.data.templates import PromptTemplate, get_template
from lightning_tune.tokenizer import TokenizerProtocol

# How a sample longer than max_seq_len is cut: "keep_start" keeps its first max_seq_len tokens (as
# torchtune, litgpt and axolotl do: the instruction always survives); "prompt_start" is the older
# behaviour, which cuts the prompt from its start first (keeping the "### Response:" header and the
# whole response, but possibly dropping the instruction itself).
InstructTruncation = Literal["keep_start", "prompt_start"]


def encode_sample(
    tokenizer: TokenizerProtocol,
    prompt: str,
    response: str,
    max_seq_len: int,
    train_on_input: bool = False,
    truncation: InstructTruncation = "keep_start",
) -> dict:
    """`BOS + tokens(prompt + response) + EOS` with labels aligned to `input_ids` (not shifted).

    The whole text is encoded ONCE, so the ids are exactly those of tokenizing it (byte-level BPE
    merges across the prompt/response boundary are kept), and the boundary comes from the tokens'
    character offsets: the first token that ends past the prompt is the first trained one (a token
    straddling the boundary is trained: the model has to produce it). BOS only where the tokenizer has
    one. With `train_on_input=False` BOS and prompt labels are -100, so only the response and EOS are trained.

    Longer than `max_seq_len` (see `InstructTruncation`): "keep_start" keeps the first `max_seq_len`
    tokens (no EOS is added after a cut response: the model should not learn to stop mid-sentence);
    "prompt_start" cuts the prompt from its START (keeping BOS, the prompt's end and the whole
    response), and only if BOS + response + EOS alone do not fit drops the prompt and cuts the
    response at its END, keeping EOS. `truncated` says whether anything was cut.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (BOS and EOS), got {max_seq_len}")
    ids, offsets = tokenizer.encode_with_offsets(prompt + response)
    boundary = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
    prompt_ids, response_ids = ids[:boundary], ids[boundary:]
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    room = max_seq_len - len(bos) - 1  # everything but BOS and EOS
    truncated = len(prompt_ids) + len(response_ids) > room
    input_ids = [*bos, *prompt_ids, *response_ids, tokenizer.eos_id]
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + [*response_ids, tokenizer.eos_id]
    if truncated and truncation == "keep_start":
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    elif truncated:
        if len(response_ids) <= room:
            keep = room - len(response_ids)
            prompt_ids = prompt_ids[len(prompt_ids) - keep :]
        else:
            prompt_ids = []
            response_ids = response_ids[:room]
        input_ids = [*bos, *prompt_ids, *response_ids, tokenizer.eos_id]
        labels = [IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + [*response_ids, tokenizer.eos_id]
    if train_on_input:
        labels = list(input_ids)
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


DEMO_DATA = ASSETS / "demo.jsonl"
FIELDS = ("instruction", "input", "output")
# Bump when `encode_sample` changes meaning, so caches written by older code are not reused.
# 2: one encoding of the whole text split by offsets; truncation keeps the start by default.
ENCODING_VERSION = 2


class InstructDataModule(TokenizedDataModule):
    """Instruction data (instruction / optional input / output records) rendered with a prompt template.

    Each record becomes `BOS + prompt + response + EOS` with the prompt masked from the loss (see
    `encode_sample`); each batch is packed into one unpadded row by `collate_packed` (or, with
    `pack: false`, right-padded by `collate`). Loading, the `datasets` cache (keyed by the data,
    tokenizer files, template, columns, `max_seq_len`, `train_on_input` and `truncation`, so a second
    run does not re-tokenise), the validation split and the resumable seeded sampler are
    `TokenizedDataModule`'s, shared with `ChatDataModule`.
    """

    record_kind = "instruction/output records"
    demo_data = DEMO_DATA
    encoding_version = ENCODING_VERSION

    def __init__(
        self,
        source: str = "tatsu-lab/alpaca",
        column_map: dict[str, str] | None = None,
        template: str = "alpaca",
        train_on_input: bool = False,
        truncation: InstructTruncation = "keep_start",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            source: Hugging Face Hub data set name, a local .json/.jsonl/.csv/.parquet file, or "demo" for the bundled demo data.
            column_map: Our field name -> the data's column name, e.g. {"output": "response"}; fields not named keep their name; "input" is optional.
            template: Prompt template name: "alpaca" (Stanford Alpaca) or "none" (the instruction as raw text).
            train_on_input: Also train on the prompt tokens, instead of only on the response.
            truncation: "keep_start" keeps the first max_seq_len tokens (the instruction survives); "prompt_start" cuts the prompt from its start first, keeping the whole response (the behaviour before; it can drop the instruction itself).
            **kwargs: The shared settings of `TokenizedDataModule` (split, tokenizer_path, max_seq_len, batch_size, ..., pack).
        """
        self.template: PromptTemplate = get_template(template)
        if column_map is not None:
            unknown = sorted(set(column_map) - set(FIELDS))
            if unknown:
                raise DataError(f"column_map: unknown field(s) {unknown}; the fields are {list(FIELDS)} (map each to your data's column name)")
            bad = [field for field, column in column_map.items() if not isinstance(column, str) or not column]
            if bad:
                raise DataError(f"column_map: field(s) {bad} must map to a column name (a non-empty string)")
        super().__init__(source=source, **kwargs)
        self.column_map = dict(column_map or {})
        self.train_on_input = train_on_input
        self.truncation = truncation

    def _cache_fields(self, records: datasets.Dataset) -> dict[str, Any]:
        return {"template": asdict(self.template), "columns": self._columns(records), "train_on_input": self.train_on_input, "truncation": self.truncation}

    def _encoder(self, records: datasets.Dataset):
        return partial(
            _encode_record,
            source=self.source,
            columns=self._columns(records),
            template=self.template,
            tokenizer=self.tokenizer,
            max_seq_len=self.max_seq_len,
            train_on_input=self.train_on_input,
            truncation=self.truncation,
        )

    def _report_truncation(self, data: datasets.Dataset) -> str:
        if self.truncation == "prompt_start":
            how = "prompt start first, then response end; truncation=prompt_start"
        else:
            untrained = sum(all(label == IGNORE_INDEX for label in labels) for labels in data["labels"])
            how = "their first max_seq_len tokens kept; truncation=keep_start" + (
                f"; in {untrained} of them no response token is left to train: raise max_seq_len, or set truncation: prompt_start" if untrained else ""
            )
        return f"{self.source}: {self.num_truncated} of {len(data)} records are longer than max_seq_len={self.max_seq_len} and were truncated ({how})"

    def _columns(self, records: datasets.Dataset) -> dict[str, str | None]:
        """Our field -> the data's column (None: an absent optional `input`); a missing column is an error."""
        columns: dict[str, str | None] = {}
        for field in FIELDS:
            column = self.column_map.get(field, field)
            if column in records.column_names:
                columns[field] = column
            elif field == "input" and "input" not in self.column_map:
                columns[field] = None
            else:
                raise DataError(f"{self.source}: no column {column!r} for field {field!r} (columns: {', '.join(records.column_names)}); set column_map to name it")
        return columns


def _encode_record(
    record: dict,
    index: int,
    *,
    source: str,
    columns: dict[str, str | None],
    template: PromptTemplate,
    tokenizer: TokenizerProtocol,
    max_seq_len: int,
    train_on_input: bool,
    truncation: InstructTruncation = "keep_start",
) -> dict:
    """One raw record -> `encode_sample` output, after checking each field is a string."""
    values: dict[str, str] = {}
    for field, column in columns.items():
        value = "" if column is None else record[column]
        if value is None and field == "input":
            value = ""  # records without an input in a file where others have one
        if not isinstance(value, str):
            where = f"{source}: record {index} (counting from 0), field {field!r}" + (f" (column {column!r})" if column != field else "")
            if value is None:
                raise DataError(f"{where}: missing, expected a string")
            raise DataError(f"{where}: expected a string, got {type(value).__name__} {str(value)[:40]!r}")
        values[field] = value
    prompt = template.format(values["instruction"], values["input"])
    return encode_sample(tokenizer, prompt, values["output"], max_seq_len, train_on_input, truncation)
