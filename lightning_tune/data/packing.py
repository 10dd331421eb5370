"""Sample packing: a batch's samples concatenated into one row, so no compute goes to padding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_tune.loss import IGNORE_INDEX, label_index


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
    list of sample lengths per row (`[[n_1, n_2, ...]]`), and `label_index` (`loss.label_index`).
    """
    lengths = [len(sample["input_ids"]) for sample in samples]
    input_ids = torch.cat([torch.as_tensor(sample["input_ids"], dtype=torch.long) for sample in samples])
    labels = torch.cat([torch.as_tensor(sample["labels"], dtype=torch.long) for sample in samples])
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    labels[starts] = IGNORE_INDEX
    positions = torch.cat([torch.arange(n) for n in lengths])  # [S]
    return {"input_ids": input_ids[None], "labels": labels[None], "positions": positions[None], "seq_lens": [lengths], "label_index": label_index(labels[None])}
