"""`InstructDataModule`: instruction records (hub, local file or the bundled demo) to packed or padded training batches."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from typing import Any

import datasets

from lightning_tune.data.base import (  # noqa: F401 - re-exported: callers import these names from here
    ASSETS,
    DEMO,
    DEMO_TOKENIZER,
    JSON_TYPES,
    LOADERS,
    OTHER_FILE_SUFFIXES,
    TokenizedDataModule,
    _first_line,
    _json_problem,
)
from lightning_tune.data.errors import DataError
from lightning_tune.data.instruct import InstructTruncation, encode_sample
from lightning_tune.data.templates import PromptTemplate, get_template
from lightning_tune.loss import IGNORE_INDEX
from lightning_tune.tokenizer import TokenizerProtocol

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
        split: str = "train",
        column_map: dict[str, str] | None = None,
        template: str = "alpaca",
        tokenizer_path: str | None = None,
        max_seq_len: int = 512,
        train_on_input: bool = False,
        truncation: InstructTruncation = "keep_start",
        batch_size: int = 4,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 42,
        val_size: float = 0.0,
        cache_dir: str | None = None,
        group_by_length: bool = False,
        pack: bool = True,
    ) -> None:
        """
        Args:
            source: Hugging Face Hub data set name, a local .json/.jsonl/.csv/.parquet file, or "demo" for the bundled demo data.
            split: Split to load from a hub data set (local files have only "train").
            column_map: Our field name -> the data's column name, e.g. {"output": "response"}; fields not named keep their name; "input" is optional.
            template: Prompt template name: "alpaca" (Stanford Alpaca) or "none" (the instruction as raw text).
            tokenizer_path: SentencePiece .model, tokenizer.json, or a directory holding either (a checkpoint's); left out, the CLI uses model.checkpoint_dir (its tokenizer); else only source "demo" may leave it out (the bundled demo tokenizer).
            max_seq_len: Longest sample in tokens; longer ones are cut as `truncation` says (a warning gives the count).
            train_on_input: Also train on the prompt tokens, instead of only on the response.
            truncation: "keep_start" keeps the first max_seq_len tokens (the instruction survives); "prompt_start" cuts the prompt from its start first, keeping the whole response (the behaviour before; it can drop the instruction itself).
            batch_size: Samples per batch.
            num_workers: DataLoader worker processes.
            shuffle: Shuffle the training samples (seeded by `seed`; the order is restored on resume).
            seed: Seed of the shuffle and of the validation split.
            val_size: Held out for validation: a fraction if below 1, a count of records if 1 or more, none if 0.
            cache_dir: Where `datasets` caches loaded and tokenised data (default: its own cache, ~/.cache/huggingface/datasets).
            group_by_length: Batch training samples of similar length (shuffled groups, seeded, resumable) so less compute goes to padding; changes which samples share a batch, not what each contributes.
            pack: Concatenate each batch's samples into one unpadded row with per-sample positions; attention runs within each sample, so no compute goes to padding and each sample's loss is what it is padded (false: right-pad each batch to its longest sample).
        """
        self.template: PromptTemplate = get_template(template)
        if column_map is not None:
            unknown = sorted(set(column_map) - set(FIELDS))
            if unknown:
                raise DataError(f"column_map: unknown field(s) {unknown}; the fields are {list(FIELDS)} (map each to your data's column name)")
            bad = [field for field, column in column_map.items() if not isinstance(column, str) or not column]
            if bad:
                raise DataError(f"column_map: field(s) {bad} must map to a column name (a non-empty string)")
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
