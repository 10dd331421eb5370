"""Samples to batches: the ignored label and where the loss reads its targets, right padding (`collate`),
packing into one row (`collate_packed`) and preference pairs (`collate_pairs`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

# Label of positions the loss ignores (torch.nn.functional.cross_entropy's default ignore_index):
# prompt tokens unless trained on, padding, and each packed sample's first token.
IGNORE_INDEX = -100
# The two sides of a preference pair, in the order `collate_pairs` stacks them.
SIDES = ("chosen", "rejected")


def label_index(labels: Tensor) -> Tensor:
    """[N] flat indices into the [B, T] grid of the positions that predict a label: b * T + t for
    every labels[b, t + 1] != IGNORE_INDEX (position t predicts token t + 1).

    The collate functions compute it on the host, so the training loss gathers its N rows with an
    index of known length; selecting them with a boolean mask on a GPU makes the host wait for
    the device to count them, every step."""
    has_target = torch.zeros_like(labels, dtype=torch.bool)
    has_target[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return has_target.flatten().nonzero().squeeze(1)


def collate(samples: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a list of samples to the longest one: `input_ids` with `pad_id`, `labels` with -100.

    No attention mask is returned because none is needed: with right padding and causal attention every
    real token sits before the padding and so never attends to it, and the -100 labels keep pad
    positions out of the loss. (Pad positions do attend to real tokens, but their outputs are unused.)
    Padding goes to the batch's longest sequence, not `max_seq_len`, to waste as little compute as possible.

    Returns: `input_ids` and `labels`, both LongTensor of shape [batch, longest], and `label_index`
    (`label_index`: where the loss reads its targets, computed here on the host).
    """
    length = max(len(sample["input_ids"]) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "label_index": label_index(labels)}


def collate_packed(samples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Tensor | list[list[int]]]:
    """Concatenate the samples into one row of S = sum of their lengths, with no padding.

    Each sample has its own rotary `positions` (0..n-1), and the batch says where each sample ends
    (`seq_lens`): the model runs causal attention within each sample only, because it is told to,
    so every sample's hidden states, and so its loss, are what they are unpadded, and attention
    costs sum(n_i^2), not S^2 (no [S, S] mask is built). `seq_lens` is a plain Python list, so
    Lightning leaves it on the host and splitting attention by it needs no device sync. The label
    at each sample's first token becomes -100: unpacked it is never a target (position t predicts
    t+1), packed it would be the target of the previous sample's last token.

    Returns: `input_ids`, `labels` and `positions`, each [1, S] (LongTensor), `seq_lens`, one
    list of sample lengths per row (`[[n_1, n_2, ...]]`), and `label_index` (`label_index`).
    """
    lengths = [len(sample["input_ids"]) for sample in samples]
    input_ids = torch.cat([torch.as_tensor(sample["input_ids"], dtype=torch.long) for sample in samples])
    labels = torch.cat([torch.as_tensor(sample["labels"], dtype=torch.long) for sample in samples])
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    labels[starts] = IGNORE_INDEX
    positions = torch.cat([torch.arange(n) for n in lengths])  # [S]
    return {"input_ids": input_ids[None], "labels": labels[None], "positions": positions[None], "seq_lens": [lengths], "label_index": label_index(labels[None])}


def collate_pairs(samples: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """[chosen of every pair; rejected of every pair] as one right-padded batch of 2 x len(samples) rows,
    with each pair's `pair_index` ([len(samples)], its record's index in the source) when the samples
    have one: the key of a precomputed reference (`DPOFinetune(precompute_reference=True)`), and each
    pair's `margin` ([len(samples)], float32) when the data has that column (`RewardModel`'s loss)."""
    rows = [{"input_ids": s[f"{side}_input_ids"], "labels": s[f"{side}_labels"]} for side in SIDES for s in samples]
    batch = collate(rows, pad_id)
    if samples and all("pair_index" in s for s in samples):
        batch["pair_index"] = torch.tensor([s["pair_index"] for s in samples], dtype=torch.long)
    if samples and all("margin" in s for s in samples):
        batch["margin"] = torch.tensor([s["margin"] for s in samples], dtype=torch.float32)
    return batch
