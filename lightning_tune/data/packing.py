"""Sample packing: a batch's samples concatenated into one row, so no compute goes to padding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_tune.data.instruct import IGNORE_INDEX


def collate_packed(samples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Tensor]:
    """Concatenate the samples into one row of S = sum of their lengths, with no padding.

    Each sample has its own rotary `positions` (0..n-1); the model reads the sample boundaries off
    them (a restart at 0, see `model.packed_segments`) and runs causal attention within each sample
    only, so every sample's hidden states, and so its loss, are what they are unpadded, and
    attention costs sum(n_i^2), not S^2 (no [S, S] mask is built). The label at each sample's first
    token becomes -100: unpacked it is never a target (position t predicts t+1), packed it would be
    the target of the previous sample's last token.

    Returns: `input_ids`, `labels` and `positions`, each [1, S] (LongTensor).
    """
    lengths = [len(sample["input_ids"]) for sample in samples]
    input_ids = torch.cat([torch.as_tensor(sample["input_ids"], dtype=torch.long) for sample in samples])
    labels = torch.cat([torch.as_tensor(sample["labels"], dtype=torch.long) for sample in samples])
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    labels[starts] = IGNORE_INDEX
    positions = torch.cat([torch.arange(n) for n in lengths])  # [S]
    return {"input_ids": input_ids[None], "labels": labels[None], "positions": positions[None]}
