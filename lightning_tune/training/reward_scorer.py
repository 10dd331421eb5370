"""A reward-model directory (a `RewardModel` export, or any one-label transformers `*ForSequenceClassification`)
as a GRPO reward function with TRL's signature `f(prompts, completions, completion_ids, **columns) -> list[float]`.

Each (prompt, completion) is encoded as the reward model's training data was: string prompts as
`PreferenceDataModule` encodes a string pair's side with template "none" (BOS + prompt + completion + EOS),
chat prompts (a list of messages) through the chat template with the completion as the assistant's reply.
The score is read at each row's last non-pad token, as transformers reads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_tune.checkpoint.sequence_classification import load_sequence_classification
from lightning_tune.data.collate import collate
from lightning_tune.data.conversation import encode_conversation
from lightning_tune.data.instruct import encode_sample
from lightning_tune.tokenizer import load_tokenizer
from lightning_tune.tokenizer.chat_template import resolve_template


class RewardModelScorer:
    """Scores completions with a reward model directory; call it as a GRPO reward function.

    Args:
        directory: The reward model (config.json with a pad_token_id, weights with score.weight).
        tokenizer_path: Its tokenizer; default: the one in `directory` (a `RewardModel` export copies it there).
        chat_template: For chat prompts: the tokenizer's own if not given, else a built-in name, a Jinja file or string.
        max_seq_len: Longest scored row (longer ones keep their start); default: the model's context length.
        batch_size: Rows scored per forward.
        device: Where the model runs (default: the CPU); dtype: its weights' dtype (default: the checkpoint's).
    """

    def __init__(
        self,
        directory: str | Path,
        tokenizer_path: str | Path | None = None,
        chat_template: str | None = None,
        max_seq_len: int | None = None,
        batch_size: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
        self.decoder, self.head = load_sequence_classification(directory, dtype=dtype, device=device)
        self.tokenizer = load_tokenizer(tokenizer_path or directory)
        self.chat_template = chat_template
        self.max_seq_len = max_seq_len or self.decoder.config.max_seq_len
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.__name__ = Path(directory).name  # the name logs give the reward

    def encode(self, prompt: Any, completion: Any) -> list[int]:
        """The token ids of one (prompt, completion) row, as the reward model's training data encoded it."""
        if isinstance(prompt, str):
            text = completion if isinstance(completion, str) else str(completion[-1].get("content") or "")
            return encode_sample(self.tokenizer, prompt, text, self.max_seq_len)["input_ids"]
        reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else [dict(m) for m in completion]
        messages = [dict(m) for m in prompt if isinstance(m, Mapping)] + reply
        template = resolve_template(self.chat_template, self.tokenizer.chat_template, where="reward model chat_template")[0]
        return encode_conversation(self.tokenizer, messages, template, self.max_seq_len, "last_assistant", "keep_start", "reward model row")["input_ids"]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Any] | None = None, **columns: Any) -> list[float]:
        rows = [self.encode(prompt, completion) for prompt, completion in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                ids = collate([{"input_ids": r, "labels": r} for r in rows[start : start + self.batch_size]], self.head.pad_id)["input_ids"].to(self.device)
                scores += self.head(self.decoder.hidden_states(ids), ids).tolist()
        return scores
