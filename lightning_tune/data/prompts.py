"""Prompts for GRPO (`PromptDataModule`): records with a prompt and any other columns (a reference answer, test
cases), the prompt encoded for generation and the other columns kept for the reward functions.

A string prompt becomes `BOS + tokens(template(prompt))` (`template` none or alpaca, as the SFT modules
render instructions; or, with `as_chat`, one user message through the chat template); a prompt that is a list
of messages is rendered with the chat template and its generation prompt (the assistant turn's header), as
TRL renders conversational prompts. Batches are lists, not tensors: each row's prompt ids (ragged; the
rollout left-pads them), the raw prompts, and every other column as a list, passed to the reward functions
as keyword arguments exactly as TRL passes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import datasets

from lightning_tune.data.base import ASSETS, DEMO, TokenizedDataModule
from lightning_tune.data.errors import DataError
from lightning_tune.data.templates import PromptTemplate, get_template
from lightning_tune.tokenizer import TokenizerProtocol
from lightning_tune.tokenizer.chat_template import ChatTemplateError, render, resolve_template, with_defaults

DEMO_PROMPTS = ASSETS / "preference_demo.jsonl"  # the preference demo's prompts; its `chosen` reply holds the answer
PROMPT_COLUMNS = ("prompt", "question", "problem")  # where the prompt is when column_map does not say
RESERVED = ("prompt_ids", "input_ids", "truncated", "keep", "prompt_index")  # our columns in the tokenised data


def encode_prompt(
    tokenizer: TokenizerProtocol,
    prompt: Any,
    template: PromptTemplate,
    chat_template: str | None,
    as_chat: bool,
    system_prompt: str | None,
    where: str,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """The ids a completion of `prompt` follows: string prompts through `template` (or as one user message
    with `as_chat`), message lists through `chat_template` with the generation prompt (and `chat_template_kwargs`
    as template variables, e.g. Qwen 3's enable_thinking)."""
    if isinstance(prompt, str) and not as_chat:
        return tokenizer.encode(template.format(prompt), add_bos=True, add_eos=False)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(messages, Sequence) or not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError(f"{where}: the prompt must be a string or a list of {{role, content}} messages, got {str(prompt)[:60]!r}")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if chat_template is None:
        raise DataError(f"{where}: a chat prompt needs a chat template (data.chat_template)")
    try:
        text = render(chat_template, messages, special_tokens=tokenizer.special_tokens, add_generation_prompt=True, **(chat_template_kwargs or {})).text
    except ChatTemplateError as error:
        raise DataError(f"{where}: {error}") from None
    return tokenizer.encode_with_offsets(text, chat=True)[0]


def _encode_prompt_record(
    record: dict,
    index: int,
    *,
    source: str,
    column: str,
    renamed: dict[str, str],
    template: PromptTemplate,
    chat_template: str | None,
    as_chat: bool,
    system_prompt: str | None,
    chat_template_kwargs: dict[str, Any],
    tokenizer: TokenizerProtocol,
    max_seq_len: int,
) -> dict:
    """One record -> `prompt_ids` (kept only within max_seq_len), the raw `prompt`, its other columns (renamed)."""
    where = f"{source}: record {index} (counting from 0)"
    prompt = record[column]
    if prompt is None or (isinstance(prompt, (str, list)) and not prompt):
        raise DataError(f"{where}: 'prompt' is missing or empty (column {column!r})")
    ids = encode_prompt(tokenizer, prompt, template, chat_template, as_chat, system_prompt, where, chat_template_kwargs)
    too_long = len(ids) > max_seq_len
    out = {renamed.get(name, name): value for name, value in record.items() if name != column}
    out.update({"prompt": prompt, "prompt_ids": ids, "input_ids": ids, "truncated": too_long, "keep": not too_long, "prompt_index": index})
    return out


def collate_prompts(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch of prompts as lists: `prompt_ids` (ragged), `prompts` (raw), `prompt_index`, and `columns`
    (every other column as a list, for the reward functions)."""
    skip = {"prompt", "prompt_ids", "input_ids", "truncated", "keep", "prompt_index"}
    names = [name for name in samples[0] if name not in skip]
    return {
        "prompt_ids": [list(s["prompt_ids"]) for s in samples],
        "prompts": [s["prompt"] for s in samples],
        "prompt_index": [int(s["prompt_index"]) for s in samples],
        "columns": {name: [s[name] for s in samples] for name in names},
    }


class PromptDataModule(TokenizedDataModule):
    """Prompts for `GRPOFinetune`: a `prompt` column (text or chat messages) and any other columns.

    Loading (Hub names, local files, the demo), the `datasets` cache, the validation split and the resumable
    seeded sampler are `TokenizedDataModule`'s. A prompt longer than `max_seq_len` tokens is left out (a
    warning gives the count): a cut prompt would ask another question. `batch_size` counts prompts; each
    gives `num_generations` completions (TRL's per_device_train_batch_size counts completions).
    """

    record_kind = "records with a prompt"
    demo_data: Path = DEMO_PROMPTS
    encoding_version = 1

    def __init__(
        self,
        source: str = "openai/gsm8k",
        subset: str | None = None,
        column_map: dict[str, str] | None = None,
        template: str = "none",
        chat_template: str | None = None,
        as_chat: bool = False,
        system_prompt: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        max_seq_len: int = 512,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            source: Hugging Face Hub data set name (e.g. openai/gsm8k with subset main), a local .json/.jsonl/.csv/.parquet file, or "demo" (the bundled demo's prompts: sums of two digits and word tasks; the answer in column `answer`).
            subset: The Hub data set's configuration (openai/gsm8k: main or socratic); the same as `name` (kept for older configs).
            column_map: Our name -> the data's column: {prompt: text} reads prompts from `text` (default: the first of prompt, question, problem the data has); any other entry renames a column the reward functions receive (e.g. {answer: solution}).
            template: Prompt template of string prompts: "none" (the prompt as raw text) or "alpaca".
            chat_template: Chat template of message prompts (and of string prompts with as_chat): the tokenizer's own if not given, else a built-in ("llama2", "chatml", "alpaca"), a Jinja file or a Jinja string.
            as_chat: Render string prompts as one user message through the chat template, with its generation prompt.
            system_prompt: A system message put first in chat prompts that have none (e.g. the answer format asked for).
            chat_template_kwargs: More variables for the chat template, as transformers' apply_chat_template takes them (e.g. {enable_thinking: false} for Qwen 3).
            max_seq_len: Longest prompt in tokens (longer ones are left out); the recipe adds max_completion_len for the rollouts.
            **kwargs: The shared settings of `TokenizedDataModule` (split, tokenizer_path, batch_size in prompts, ...). Never packed nor grouped by length.
        """
        self.template: PromptTemplate = get_template(template)
        column_map = dict(column_map or ({"answer": "chosen"} if source == DEMO else {}))
        bad = [field for field, column in column_map.items() if not isinstance(column, str) or not column]
        if bad:
            raise DataError(f"column_map: field(s) {bad} must map to a column name (a non-empty string)")
        clash = sorted(set(column_map) & set(RESERVED))
        if clash:
            raise DataError(f"column_map: {clash} are names of our own columns; choose other names")
        if subset is not None and kwargs.get("name") not in (None, subset):
            raise DataError(f"subset {subset!r} and name {kwargs['name']!r}: both name the configuration; give name only")
        if subset is not None:
            kwargs["name"] = subset
        super().__init__(source=source, max_seq_len=max_seq_len, group_by_length=False, pack=False, **kwargs)
        self.subset = subset
        self.column_map = column_map
        self.chat_template = "llama2" if chat_template is None and source == DEMO and kwargs.get("tokenizer_path") is None else chat_template
        self.as_chat = as_chat
        self.system_prompt = system_prompt
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    def _prompt_column(self, records: datasets.Dataset) -> str:
        """column_map's prompt column, else the first of prompt, question (GSM8K), problem (MATH) the data has."""
        names = records.column_names
        column = self.column_map.get("prompt") or next((c for c in PROMPT_COLUMNS if c in names), "prompt")
        if column not in names:
            raise DataError(f"{self.source}: no column {column!r} for the prompt (columns: {', '.join(names)}); set column_map, e.g. {{prompt: question}}")
        clash = sorted(set(records.column_names) & set(RESERVED) - {column})
        if clash:
            raise DataError(f"{self.source}: columns {clash} have the names of our own; rename them (column_map)")
        return column

    def _renamed(self, records: datasets.Dataset) -> dict[str, str]:
        """Data column -> the name the reward functions receive it under."""
        renamed = {column: name for name, column in self.column_map.items() if name != "prompt"}
        missing = sorted(set(renamed) - set(records.column_names))
        if missing:
            raise DataError(f"{self.source}: column_map names columns {missing} the data lacks (columns: {', '.join(records.column_names)})")
        return renamed

    def _chat_template(self, records: datasets.Dataset) -> str | None:
        feature = records.features[self._prompt_column(records)]
        is_text = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
        if is_text and not self.as_chat:
            return None
        try:
            template = resolve_template(self.chat_template, self.tokenizer.chat_template, where="data.chat_template")[0]
            # Exported with the model: the system prompt and template variables the prompts were rendered with
            # become the template's defaults, so `chat` and every other consumer prompt the model as it was trained.
            self.chat_template_used = with_defaults(template, self.system_prompt, self.chat_template_kwargs)
        except ChatTemplateError as error:
            raise DataError(str(error)) from None
        return template

    def _cache_fields(self, records: datasets.Dataset) -> dict[str, Any]:
        return {
            "template": asdict(self.template),
            "chat_template": self._chat_template(records),
            "as_chat": self.as_chat,
            "system_prompt": self.system_prompt,
            "chat_template_kwargs": self.chat_template_kwargs,
            "prompt": self._prompt_column(records),
            "renamed": self._renamed(records),
        }

    def _encoder(self, records: datasets.Dataset):
        return partial(
            _encode_prompt_record,
            source=self.source,
            column=self._prompt_column(records),
            renamed=self._renamed(records),
            template=self.template,
            chat_template=self._chat_template(records),
            as_chat=self.as_chat,
            system_prompt=self.system_prompt,
            chat_template_kwargs=self.chat_template_kwargs,
            tokenizer=self.tokenizer,
            max_seq_len=self.max_seq_len,
        )

    def _report_truncation(self, data: datasets.Dataset) -> str:
        return f"{self.source}: {self.num_truncated} of {len(data)} prompts are longer than max_seq_len={self.max_seq_len} tokens and are left out"

    def collate_fn(self):
        return collate_prompts
