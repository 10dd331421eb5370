"""GRPO's rollouts: G sampled completions of every prompt, through the one decoding engine (`loop.generate`:
batched prefill, then one token per step with the KV cache), on the policy itself (no second model, no vLLM).

Each prompt's G completions are consecutive rows (TRL's order: `RepeatSampler` repeats a prompt G times in a
row). Each completion ends right after its first end token, which it keeps (the loss scores it);
one without an end token ran out of `max_new_tokens` and is `truncated`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lightning_tune.generate.loop import generate
from lightning_tune.generate.sampling import end_tokens
from lightning_tune.model import CausalLM


@dataclass
class Rollouts:
    """B = prompts x G completions, prompt-major: row i is a completion of prompt i // G."""

    prompt_ids: list[list[int]]  # [B]: each row's prompt (repeated G times)
    completion_ids: list[list[int]]  # [B]: the sampled tokens, the end token included when there is one
    truncated: list[bool]  # [B]: no end token within max_new_tokens


@torch.no_grad()
def rollout(
    model: CausalLM,
    prompts: list[list[int]],
    num_generations: int,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    eos_id: int | Iterable[int] | None = None,
    pad_id: int = 0,
    seed: int | None = None,
) -> Rollouts:
    """Sample `num_generations` completions of each prompt (temperature 0: greedy, the same G times).

    The model runs in eval mode (no dropout) and is put back in its mode after; `seed` seeds a private
    generator, so the same seed samples the same completions (a resumed run re-samples its step's rollouts).
    """
    if num_generations < 1:
        raise ValueError(f"num_generations: must be >= 1, got {num_generations}")
    rows = [list(p) for p in prompts for _ in range(num_generations)]
    was_training = model.training
    model.eval()
    try:
        # Each prompt prefilled once, its cache copied to its G rows (`num_samples`).
        completions = generate(
            model, [list(p) for p in prompts], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id, seed=seed, num_samples=num_generations
        )
    finally:
        model.train(was_training)
    stop = end_tokens(eos_id)
    truncated = [not (c and c[-1] in stop) for c in completions]
    return Rollouts(rows, completions, truncated)
