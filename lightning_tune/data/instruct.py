"""Instruction records to training samples (`input_ids`, `labels`), and the collate function that batches them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_tune.tokenizer import Tokenizer

# Label of positions the loss ignores (torch.nn.functional.cross_entropy's default ignore_index).
IGNORE_INDEX = -100


def encode_sample(tokenizer: Tokenizer, prompt: str, response: str, max_seq_len: int, train_on_input: bool = False) -> dict:
    """`BOS + tokens(prompt) + tokens(response) + EOS` with labels aligned to `input_ids` (not shifted).

    Prompt and response are encoded separately (the response as a continuation, `prefix_space=False`)
    so the boundary between masked and trained tokens is exact; for a prompt ending in a newline the
    ids equal those of encoding the whole text at once. With `train_on_input=False` BOS and prompt
    labels are -100, so only the response and EOS are trained.

    Longer than `max_seq_len`: the prompt is cut from its START (keeping BOS, the prompt's end, i.e. the
    `### Response:` header, and the whole response); only if BOS + response + EOS alone do not fit is the
    prompt dropped and the response cut at its END, keeping EOS. `truncated` says whether either happened.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (BOS and EOS), got {max_seq_len}")
    prompt_ids = tokenizer.encode(prompt, add_bos=False)
    response_ids = tokenizer.encode(response, add_bos=False, prefix_space=False)
    room = max_seq_len - 2  # everything but BOS and EOS
    truncated = len(prompt_ids) + len(response_ids) > room
    if truncated:
        if len(response_ids) <= room:
            keep = room - len(response_ids)
            prompt_ids = prompt_ids[len(prompt_ids) - keep :]
        else:
            prompt_ids = []
            response_ids = response_ids[:room]
    input_ids = [tokenizer.bos_id, *prompt_ids, *response_ids, tokenizer.eos_id]
    if train_on_input:
        labels = list(input_ids)
    else:
        labels = [IGNORE_INDEX] * (1 + len(prompt_ids)) + [*response_ids, tokenizer.eos_id]
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def collate(samples: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a list of samples to the longest one: `input_ids` with `pad_id`, `labels` with -100.

    No attention mask is returned because none is needed: with right padding and causal attention every
    real token sits before the padding and so never attends to it, and the -100 labels keep pad
    positions out of the loss. (Pad positions do attend to real tokens, but their outputs are unused.)
    Padding goes to the batch's longest sequence, not `max_seq_len`, to waste as little compute as possible.

    Returns: `input_ids` and `labels`, both LongTensor of shape [batch, longest].
    """
    length = max(len(sample["input_ids"]) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}
