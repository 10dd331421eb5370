"""Sample packing: a batch's samples concatenated into one row, so no compute goes to padding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_tune.data.instruct import IGNORE_INDEX


def collate_packed(samples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Tensor]:
    """Concatenate the samples into one row of S = sum of their lengths, with no padding.

    Each sample attends only to itself (a block-diagonal causal `attn_mask`) and has its own rotary
    `positions` (0..n-1), so every sample's hidden states, and so its loss, are what they are
    unpadded. The label at each sample's first token becomes -100: unpacked it is never a target
    (position t predicts t+1), packed it would be the target of the previous sample's last token.

    Returns: `input_ids`, `labels`, `positions` [1, S] (LongTensor) and `attn_mask` [1, 1, S, S]
    (bool, True where attention is allowed).
    """
    lengths = [len(sample["input_ids"]) for sample in samples]
    input_ids = torch.cat([torch.as_tensor(sample["input_ids"], dtype=torch.long) for sample in samples])
    labels = torch.cat([torch.as_tensor(sample["labels"], dtype=torch.long) for sample in samples])
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    labels[starts] = IGNORE_INDEX
    positions = torch.cat([torch.arange(n) for n in lengths])  # [S]
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [S]: sample of each token
    index = torch.arange(len(segment))
    mask = (segment[:, None] == segment[None, :]) & (index[None, :] <= index[:, None])  # [S, S]
    return {"input_ids": input_ids[None], "labels": labels[None], "positions": positions[None], "attn_mask": mask[None, None]}
