"""Text generation in plain PyTorch: one prefill pass, then one token per step with the KV cache.

In the spirit of gpt-fast: no Lightning, no generation framework, one loop that reads top to
bottom. Batches of prompts of different lengths run together with LEFT padding, so every row's
last prompt token sits in the same column and each decode step appends one column for all rows.
Greedy decoding equals Hugging Face `generate(do_sample=False)` token for token (tests/generate/test_generate.py).

Shapes: B rows, T padded prompt length, N max new tokens, S = T + N cache slots, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_tune.generate.decode import activation_dtype_device, cache_length, decode_step, install_kv_caches, new_kv_caches
from lightning_tune.generate.errors import GenerationError
from lightning_tune.generate.sampling import check_sampling, end_tokens, sample_next
from lightning_tune.generate.streaming import GenerationStats, TextStreamer, TokenizerLike
from lightning_tune.model import CausalLM


def _check_prompts(model: CausalLM, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Raise one clear line for prompts the model cannot run."""
    if not prompts:
        raise GenerationError("prompts is empty: pass at least one prompt (a list of token ids)")
    vocab = model.config.vocab_size
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} has no tokens: every prompt needs at least one (e.g. BOS)")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise GenerationError(f"prompt {i} has token ids outside [0, {vocab}): min {min(prompt)}, max {max(prompt)}")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.max_seq_len:
        raise GenerationError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's max_seq_len ({model.config.max_seq_len}): shorten the prompt or ask for fewer tokens"
        )


@torch.no_grad()
def generate(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Iterable[int] | None = None,
    pad_id: int = 0,
    seed: int | None = None,
    on_tokens: Callable[[Tensor], None] | None = None,
    compile: bool = False,
    compile_backend: str | Callable[..., Any] = "inductor",
    num_samples: int = 1,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; return only the new tokens per row.

    Each row is cut right after its first end token (any of `eos_id`), and that token is INCLUDED
    (as Hugging Face returns it), so a caller can tell "stopped" from "ran out of tokens"; strip it
    for display. Generation stops once every row has ended, or after `max_new_tokens`.

    Args:
        model: the CausalLM; any KV cache it has is replaced, and it has none on return (even on error).
        prompts: token ids per row (lengths may differ: rows are left-padded with `pad_id`).
        max_new_tokens: the most new tokens per row (>= 1).
        temperature: 0 for greedy decoding, > 0 to sample from softmax(logits / temperature).
        top_k: sample among the k most likely tokens only (None: all).
        top_p: nucleus sampling; keep the smallest set of likely tokens with total probability >= top_p.
        eos_id: the token, or tokens (a list or set: Llama 3 ends on <|eot_id|>, <|eom_id|> and
            <|end_of_text|>), that end a row (None: always generate `max_new_tokens`).
        pad_id: the id used for left padding and, like HF, as the token of rows that already ended.
        seed: seeds a private generator, so sampling is reproducible and leaves the global RNG alone.
        on_tokens: called with each step's new tokens [B] (for streaming; finished rows show `pad_id`).
        compile: decode with the static-shape step of `lightning_tune.generate.decode`, compiled by
            `torch.compile` once per (model, batch, cache length rounded up to 256) and reused by
            later calls; the same greedy tokens as eager. The prefill stays eager.
        compile_backend: the `torch.compile` backend for `compile` (tests count compilations with one).
        num_samples: continue each prompt this many times (GRPO's completions of a prompt): the returned
            rows are prompt-major, row r continues prompt r // num_samples. Each prompt is prefilled once and
            its keys and values are copied to its rows' caches, not computed num_samples times.
    """
    check_sampling(temperature, top_k, top_p)
    _check_prompts(model, prompts, max_new_tokens)
    stop = end_tokens(eos_id)
    _, device = activation_dtype_device(model)  # not the head's: an int8 head holds codes
    if num_samples < 1:
        raise GenerationError(f"num_samples must be >= 1, got {num_samples}")
    U, T, N = len(prompts), max(len(p) for p in prompts), max_new_tokens  # U prompts -> B rows
    B = U * num_samples
    # The compiled step attends over a fixed, rounded-up cache; eager over the slots in use only.
    S = cache_length(T + N, model.config.max_seq_len) if compile else T + N
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    # Left padding: prompt u fills the last len(prompt) columns of row u of [U, T].
    tokens = torch.full((U, T), pad_id, dtype=torch.long)
    real = torch.zeros(U, S, dtype=torch.bool)  # key padding mask over every cache slot: True = real token
    real[:, T:] = True  # generated tokens are always attended to (ended rows' pads too, as HF does)
    for u, prompt in enumerate(prompts):
        tokens[u, T - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        real[u, T - len(prompt) : T] = True
    tokens, real = tokens.to(device), real.to(device)

    # Rotary positions count real tokens only (HF: cumsum(mask) - 1; pads get 0, they are never seen).
    positions = (real[:, :T].long().cumsum(dim=-1) - 1).clamp(min=0)  # [B, T]
    # Prefill mask [B, 1, T, T]: causal AND key is real. A pad query would see no key at all, and
    # SDPA turns a fully masked row into NaN whose K/V then poison real rows through 0 * NaN in the
    # next layer, so every query may also attend to itself (harmless: pad outputs are never used).
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=device)
    prefill_mask = (causal & real[:, None, None, :T]) | eye  # [U, 1, T, T]
    slots = torch.arange(S, device=device)  # cache slot ids; decode steps take [p : p + 1] views

    out = torch.full((B, N), pad_id, dtype=torch.long, device=device)  # new tokens, filled per step
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    step = decode_step(model, B, S, compile=True, backend=compile_backend) if compile else None
    try:
        caches = step.caches if step is not None else new_kv_caches(model, B, S)  # the step's own: the same tensors every call, so its graph is reused
        prefill_caches = caches if num_samples == 1 else new_kv_caches(model, U, T)
        install_kv_caches(model, prefill_caches)
        hidden = model.model(tokens, positions, prefill_mask, slots[:T])  # [U, T, E]
        logits = model.logits(hidden[:, -1])  # [U, V]: the head only where the next token comes from
        if num_samples > 1:  # each prompt's keys and values to its num_samples rows
            for cache, prefilled in zip(caches, prefill_caches, strict=True):
                cache.k[:, :, :T].copy_(prefilled.k.repeat_interleave(num_samples, dim=0))
                cache.v[:, :, :T].copy_(prefilled.v.repeat_interleave(num_samples, dim=0))
            del prefill_caches
            install_kv_caches(model, caches)
            logits, real, positions = (t.repeat_interleave(num_samples, dim=0) for t in (logits, real, positions))
        pos = positions[:, -1:] + 1  # [B, 1]: rotary position of the next token of each row
        steps = 0
        for i in range(N):
            tok = sample_next(logits, temperature, top_k, top_p, generator)  # [B]
            if stop:
                tok = tok.masked_fill(done, pad_id)  # rows that ended keep emitting padding, like HF
                done |= torch.isin(tok, stop_ids) & ~done
            out[:, i] = tok
            steps = i + 1
            if on_tokens is not None:
                on_tokens(tok)
            if i == N - 1 or (stop and bool(done.all())):  # one tiny sync per step, only with EOS
                break
            p = T + i  # the cache slot of `tok`
            if step is not None:  # fixed shapes: the whole cache, masked to real slots <= p inside the step
                logits = step.step(tok, pos, slots[p : p + 1], real)
            else:
                # Decode mask [B, 1, 1, p + 1]: a view of the padding mask; causality is implicit
                # because the cache holds nothing after slot p yet.
                logits = model(tok[:, None], pos, real[:, None, None, : p + 1], slots[p : p + 1])[:, -1]  # [B, V]
            pos += 1
    finally:
        model.reset_kv_cache()

    rows = out[:, :steps].tolist()
    if stop:
        rows = [_cut_after_end(row, stop) for row in rows]
    return rows


def _cut_after_end(row: list[int], stop: frozenset[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stop:
            return row[: i + 1]
    return row


def generate_text(
    model: CausalLM,
    tokenizer: TokenizerLike,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stream: bool = True,
) -> tuple[str, GenerationStats]:
    """Generate a continuation of one text prompt; print it as it appears when `stream` is True.

    Returns the new text (without EOS) and its timing.
    """
    prompt_ids = tokenizer.encode(prompt, add_bos=True, add_eos=False)
    streamer = TextStreamer(tokenizer, prompt_ids, print_fn=None if stream else (lambda s: None))
    generate(
        model,
        [prompt_ids],
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=getattr(tokenizer, "eos_ids", None) or tokenizer.eos_id,
        pad_id=tokenizer.pad_id if tokenizer.pad_id >= 0 else 0,
        seed=seed,
        on_tokens=streamer,
    )
    streamer.finish()
    return streamer.text, streamer.stats()
