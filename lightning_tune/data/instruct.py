"""Instruction records to training samples (`input_ids`, `labels`), and the collate function that batches them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_tune.loss import IGNORE_INDEX, label_index
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


def collate(samples: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a list of samples to the longest one: `input_ids` with `pad_id`, `labels` with -100.

    No attention mask is returned because none is needed: with right padding and causal attention every
    real token sits before the padding and so never attends to it, and the -100 labels keep pad
    positions out of the loss. (Pad positions do attend to real tokens, but their outputs are unused.)
    Padding goes to the batch's longest sequence, not `max_seq_len`, to waste as little compute as possible.

    Returns: `input_ids` and `labels`, both LongTensor of shape [batch, longest], and `label_index`
    (`loss.label_index`: where the loss reads its targets, computed here on the host).
    """
    length = max(len(sample["input_ids"]) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "label_index": label_index(labels)}
