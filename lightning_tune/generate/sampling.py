"""Choosing the next token from logits: greedy, or sampled with temperature / top-k / top-p as Hugging
Face samples; and the set of tokens that end a row."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from lightning_tune.generate.errors import GenerationError


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise one clear line for sampling settings that have no meaning."""
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1] or None, got {top_p}")


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Temperature-scale logits [B, V] and set the tokens top-k / top-p exclude to -inf (float32).

    Same order and rules as Hugging Face's temperature, `TopKLogitsWarper` and `TopPLogitsWarper`:
    top-k keeps ties with the k-th logit; top-p keeps the smallest set of most likely tokens whose
    probability sums to >= top_p, and always the most likely token.
    """
    if temperature <= 0:
        raise GenerationError(f"filter_logits needs temperature > 0, got {temperature} (0 means greedy: use argmax)")
    check_sampling(temperature, top_k, top_p)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [B, 1]: the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # HF's formulation (ascending sort): drop a token when the total probability of it and every
        # less likely token is <= 1 - top_p. Same set as "smallest head with mass >= top_p", but
        # written this way it also agrees with HF at float rounding boundaries.
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
        tail_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
        drop_sorted = tail_mass <= 1 - top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row from logits [B, V] -> [B].

    temperature 0 is greedy (argmax; top_k / top_p are then irrelevant). Otherwise one token is drawn
    with `torch.multinomial` (from `generator`) from softmax(`filter_logits(...)`), as HF samples.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def end_tokens(eos_id: int | Iterable[int] | None) -> frozenset[int]:
    """The set of end-token ids of `eos_id` (one id, several, or None = none)."""
    if eos_id is None:
        return frozenset()
    if isinstance(eos_id, int):
        return frozenset((eos_id,))
    return frozenset(int(i) for i in eos_id)
