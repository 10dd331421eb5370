"""Streaming and timing: `on_tokens` callbacks for one prompt (batch 1) that print the new text as it
is decoded (`TextStreamer`) and time the prefill and the decode (`GenerationTimer`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from lightning_tune.generate.errors import GenerationError
from lightning_tune.generate.sampling import end_tokens


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
            raise GenerationError(f"TextStreamer streams one prompt; got {tokens.numel()} rows")
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
