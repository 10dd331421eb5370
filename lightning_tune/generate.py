"""Text generation in plain PyTorch: one prefill pass, then one token per step with the KV cache.

In the spirit of gpt-fast: no Lightning, no generation framework, one loop that reads top to
bottom. Batches of prompts of different lengths run together with LEFT padding, so every row's
last prompt token sits in the same column and each decode step appends one column for all rows.
Greedy decoding equals Hugging Face `generate(do_sample=False)` token for token (tests/test_generate.py).

Shapes: B rows, T padded prompt length, N max new tokens, S = T + N cache slots, V vocab.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_tune.decode import activation_dtype_device, cache_length, decode_step, install_kv_caches, new_kv_caches
from lightning_tune.model import Llama


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise one clear line for sampling settings that have no meaning."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Temperature-scale logits [B, V] and set the tokens top-k / top-p exclude to -inf (float32).

    Same order and rules as Hugging Face's temperature, `TopKLogitsWarper` and `TopPLogitsWarper`:
    top-k keeps ties with the k-th logit; top-p keeps the smallest set of most likely tokens whose
    probability sums to >= top_p, and always the most likely token.
    """
    if temperature <= 0:
        raise ValueError(f"filter_logits needs temperature > 0, got {temperature} (0 means greedy: use argmax)")
    _check_sampling(temperature, top_k, top_p)
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
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _check_prompts(model: Llama, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Raise one clear line for prompts the model cannot run."""
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt (a list of token ids)")
    vocab = model.config.vocab_size
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} has no tokens: every prompt needs at least one (e.g. BOS)")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): min {min(prompt)}, max {max(prompt)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's max_seq_len ({model.config.max_seq_len}): shorten the prompt or ask for fewer tokens"
        )


@torch.no_grad()
def generate(
    model: Llama,
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
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; return only the new tokens per row.

    Each row is cut right after its first end token (any of `eos_id`), and that token is INCLUDED
    (as Hugging Face returns it), so a caller can tell "stopped" from "ran out of tokens"; strip it
    for display. Generation stops once every row has ended, or after `max_new_tokens`.

    Args:
        model: the Llama; any KV cache it has is replaced, and it has none on return (even on error).
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
        compile: decode with the static-shape step of `lightning_tune.decode`, compiled by
            `torch.compile` once per (model, batch, cache length rounded up to 256) and reused by
            later calls; the same greedy tokens as eager. The prefill stays eager.
        compile_backend: the `torch.compile` backend for `compile` (tests count compilations with one).
    """
    _check_sampling(temperature, top_k, top_p)
    _check_prompts(model, prompts, max_new_tokens)
    stop = end_tokens(eos_id)
    _, device = activation_dtype_device(model)  # not the head's: an int8 head holds codes
    B, T, N = len(prompts), max(len(p) for p in prompts), max_new_tokens
    # The compiled step attends over a fixed, rounded-up cache; eager over the slots in use only.
    S = cache_length(T + N, model.config.max_seq_len) if compile else T + N
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    # Left padding: row b's prompt fills the last len(prompt) columns of [B, T].
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    real = torch.zeros(B, S, dtype=torch.bool)  # key padding mask over every cache slot: True = real token
    real[:, T:] = True  # generated tokens are always attended to (ended rows' pads too, as HF does)
    for b, prompt in enumerate(prompts):
        tokens[b, T - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        real[b, T - len(prompt) : T] = True
    tokens, real = tokens.to(device), real.to(device)

    # Rotary positions count real tokens only (HF: cumsum(mask) - 1; pads get 0, they are never seen).
    positions = (real[:, :T].long().cumsum(dim=-1) - 1).clamp(min=0)  # [B, T]
    # Prefill mask [B, 1, T, T]: causal AND key is real. A pad query would see no key at all, and
    # SDPA turns a fully masked row into NaN whose K/V then poison real rows through 0 * NaN in the
    # next layer, so every query may also attend to itself (harmless: pad outputs are never used).
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=device)
    prefill_mask = (causal & real[:, None, None, :T]) | eye  # [B, 1, T, T]
    slots = torch.arange(S, device=device)  # cache slot ids; decode steps take [p : p + 1] views

    out = torch.full((B, N), pad_id, dtype=torch.long, device=device)  # new tokens, filled per step
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    step = decode_step(model, B, S, compile=True, backend=compile_backend) if compile else None
    try:
        if step is not None:
            step.install()  # the step's own caches: the same tensors every call, so its graph is reused
        else:
            install_kv_caches(model, new_kv_caches(model, B, S))
        hidden = model.model(tokens, positions, prefill_mask, slots[:T])  # [B, T, E]
        logits = model.lm_head(hidden[:, -1])  # [B, V]: the head only where the next token comes from
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


def end_tokens(eos_id: int | Iterable[int] | None) -> frozenset[int]:
    """The set of end-token ids of `eos_id` (one id, several, or None = none)."""
    if eos_id is None:
        return frozenset()
    if isinstance(eos_id, int):
        return frozenset((eos_id,))
    return frozenset(int(i) for i in eos_id)


def _cut_after_end(row: list[int], stop: frozenset[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stop:
            return row[: i + 1]
    return row


# Streaming and timing: on_tokens callbacks for one prompt (batch 1).


@dataclass
class GenerationStats:
    """Latency figures of one generation: time to first token (prefill) and decode throughput."""

    prefill_s: float  # from the start of `generate` until the first new token exists (time to first token)
    decode_s: float  # from the first new token to the last one
    new_tokens: int
    decode_tokens_per_s: float  # (new_tokens - 1) / decode_s: the first token belongs to prefill


class GenerationTimer:
    """An `on_tokens` callback that timestamps steps; create it right before calling `generate`.

    Timing from inside the callback measures what a streaming user sees. On a GPU the timestamps
    are only meaningful if the callback synchronises (TextStreamer does, through `.tolist()`).
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.new_tokens = 0

    def __call__(self, tokens: Tensor) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.new_tokens += 1

    def stats(self) -> GenerationStats:
        if self.first is None or self.last is None:
            raise RuntimeError("GenerationTimer saw no tokens: pass it to generate(on_tokens=...) first")
        decode_s = self.last - self.first
        rate = (self.new_tokens - 1) / decode_s if decode_s > 0 else float("nan")
        return GenerationStats(self.first - self.start, decode_s, self.new_tokens, rate)


class TokenizerLike(Protocol):
    """What text generation needs from a tokenizer (lightning_tune.tokenizer provides it)."""

    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class TextStreamer(GenerationTimer):
    """An `on_tokens` callback for batch 1 that prints only the newly decoded text, and times it.

    SentencePiece cannot decode tokens one by one ("▁the" decodes to "the" at the start of a text,
    and a multi-byte character may span several byte tokens), so it decodes the prompt plus every
    new token so far and prints the part after what was already printed. Text ending in U+FFFD (an
    unfinished UTF-8 character) is held back until the character is complete. Decoding grows
    O(n) per step; fine for the hundreds of tokens a person reads.
    """

    def __init__(self, tokenizer: TokenizerLike, prompt_ids: list[int] | None = None, print_fn: Callable[[str], Any] | None = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.end_ids = end_tokens(getattr(tokenizer, "eos_ids", None) or tokenizer.eos_id)
        self.ids: list[int] = list(prompt_ids or [])
        self.printed = tokenizer.decode(self.ids) if self.ids else ""
        self.skip = len(self.printed)  # the prompt's text is not printed
        self.print_fn = print_fn or _write

    def __call__(self, tokens: Tensor) -> None:
        super().__call__(tokens)
        if tokens.numel() != 1:
            raise ValueError(f"TextStreamer streams one prompt; got {tokens.numel()} rows")
        token = int(tokens.item())
        if token in self.end_ids:  # any end token (Llama 3 has three) is not text
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its other bytes
            return
        if text.startswith(self.printed):
            new = text[len(self.printed) :]
        else:  # decoding is not always prefix-stable (rare): print from where the texts diverge
            new = text[len(_common_prefix(text, self.printed)) :]
        if new:
            self.print_fn(new)
        self.printed = text

    def finish(self) -> None:
        """Print whatever was held back (an unfinished character at the very end) and a newline."""
        text = self.tokenizer.decode(self.ids)
        rest = text[len(_common_prefix(text, self.printed)) :]
        self.print_fn(rest + "\n")
        self.printed = text

    @property
    def text(self) -> str:
        """The generated text so far (without the prompt)."""
        return self.printed[self.skip :]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def generate_text(
    model: Llama,
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
