"""A scalar score per sequence from a decoder's hidden states: the reward model's head, as transformers'
`*ForSequenceClassification` (num_labels 1) computes it, read at the last token that is not padding."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def last_token_positions(input_ids: Tensor, pad_id: int) -> Tensor:
    """Each row's rightmost position whose token is not `pad_id`, [B] (0 for a row of padding only):
    transformers' rule for sequence classification (`(arange * (ids != pad)).argmax(-1)`), so a model
    padded with its EOS (no pad token) is read at the token before the trailing EOS, as there."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(dim=-1)


class ScoreHead(nn.Module):
    """`score`: a bias-free [1, E] linear layer read at each row's last non-pad token (transformers' `score.weight`).

    Args:
        embed_dim: The decoder's hidden size E.
        pad_id: The padding token id (the exported config's pad_token_id).
    """

    def __init__(self, embed_dim: int, pad_id: int) -> None:
        super().__init__()
        self.score = nn.Linear(embed_dim, 1, bias=False)
        self.pad_id = pad_id

    def forward(self, hidden: Tensor, input_ids: Tensor) -> Tensor:
        """hidden [B, T, E] (the final norm's output), input_ids [B, T] -> float32 scores [B]."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_positions(input_ids, self.pad_id)]  # [B, E]
        return self.score(last).squeeze(-1).float()
