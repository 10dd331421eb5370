"""A multi-turn conversation with a model on its chat template, keeping the KV cache across turns.

The whole conversation is rendered with the template every turn (so the model sees exactly what it
was trained on), and only the tokens after the longest prefix already in the cache are computed.
Templates that rewrite earlier turns (Qwen 3 drops past reasoning) just reuse less. Greedy replies
equal `generate` on the whole rendered conversation (tests/cli/test_chat_cli.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_tune.generate.decode import DecodeStep, activation_dtype_device, decode_step, install_kv_caches, new_kv_caches
from lightning_tune.generate.errors import GenerationError
from lightning_tune.generate.sampling import sample_next
from lightning_tune.generate.streaming import TextStreamer
from lightning_tune.model import CausalLM
from lightning_tune.tokenizer import TokenizerProtocol, end_of_turn_ids
from lightning_tune.tokenizer.chat_template import render


class ContextFullError(GenerationError):
    """The conversation plus a reply no longer fits the KV cache; the session is unchanged and goes on (or resets)."""


# Chat caches grow in blocks of this many slots (and at least double: few sizes, few compiled graphs).
CACHE_BLOCK = 1024


class ChatSession:
    """One conversation with a model: the messages so far and the token ids whose K/V the cache holds."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: TokenizerProtocol,
        template: str,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        max_context: int | None = None,
        compile: bool = False,
        compile_backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        self.model, self.tokenizer, self.template, self.system = model, tokenizer, template, system
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.stop = set(end_of_turn_ids(tokenizer))
        self.device = activation_dtype_device(model)[1]  # not the head's: an int8 head holds codes
        self.generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        self.max_context = min(max_context or model.config.max_seq_len, model.config.max_seq_len)
        # The cache holds what the conversation needs (`reserve`), not max_context: a model's context
        # (128k for Llama 3.1) would take tens of GB for a chat of a few hundred tokens.
        self.compile, self.compile_backend = compile, compile_backend
        self.capacity = 0
        self.step: DecodeStep | None = None
        self.cached: list[int] = []  # ids whose keys/values sit in cache slots 0..len-1
        self.reused = 0  # tokens of the last turn's prompt that came from the cache
        self.reply_ids: list[int] = []  # the last reply's tokens (without the end-of-turn token)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the cache is overwritten from slot 0 on the next turn)."""
        self.messages: list[dict[str, str]] = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.cached = []

    def close(self) -> None:
        self.model.reset_kv_cache()
        self.capacity, self.cached = 0, []

    def prompt_ids(self) -> list[int]:
        """The conversation so far rendered with the generation prompt, as ids."""
        text = render(self.template, self.messages, special_tokens=self.tokenizer.special_tokens, add_generation_prompt=True).text
        return self.tokenizer.encode_with_offsets(text, chat=True)[0]

    def respond(self, user: str, print_fn: Callable[[str], Any] | None = None) -> str:
        """Add the user's message, generate the reply (streamed through `print_fn`), add it; return its text.

        A conversation that no longer fits `max_context` raises `ContextFullError` and leaves the
        messages as they were."""
        self.messages.append({"role": "user", "content": user})
        ids = self.prompt_ids()
        if len(ids) + self.max_new_tokens > self.max_context:
            self.messages.pop()
            raise ContextFullError(f"chat: the conversation ({len(ids)} tokens) plus max_new_tokens ({self.max_new_tokens}) exceeds the context of {self.max_context}; /reset to start over")
        self.reserve(len(ids) + self.max_new_tokens)
        common = 0
        while common < min(len(ids), len(self.cached)) and ids[common] == self.cached[common]:
            common += 1
        common = min(common, len(ids) - 1)  # at least one new token gives the next logits
        self.reused = common
        streamer = TextStreamer(self.tokenizer, ids, print_fn=print_fn or (lambda text: None))
        new: list[int] = []
        with torch.no_grad():
            logits = self._forward(ids[common:], common)
            position = len(ids)
            self.cached = list(ids)
            for _ in range(self.max_new_tokens):
                token = int(sample_next(logits, self.temperature, self.top_k, self.top_p, self.generator).item())
                if token in self.stop:
                    break
                new.append(token)
                streamer(torch.tensor([token]))
                logits = self._forward([token], position)
                self.cached.append(token)
                position += 1
        streamer.finish()
        self.reply_ids = new
        reply = self.tokenizer.decode(new)
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def reserve(self, needed: int) -> None:
        """Cache slots for `needed` tokens. The cache grows with the conversation, at least doubling and in
        blocks of `CACHE_BLOCK` up to `max_context`, keeping the cached turns' keys and values; with
        `compile`, the static-shape step of each size (one graph per size, a handful in all)."""
        if needed <= self.capacity:
            return
        capacity = min(self.max_context, max(2 * self.capacity, -(-needed // CACHE_BLOCK) * CACHE_BLOCK))
        old = [layer.self_attn.kv_cache for layer in self.model.model.layers] if self.capacity else []
        if self.compile:
            # one-token steps run the static-shape step (attention over all `capacity` slots, compiled
            # once per size); prompts still run eagerly, causal over the slots in use
            self.step = decode_step(self.model, 1, capacity, compile=True, backend=self.compile_backend)
            caches = self.step.caches
            self.real = torch.ones(1, capacity, dtype=torch.bool, device=self.device)  # no padding in a chat
        else:
            caches = new_kv_caches(self.model, 1, capacity)
        used = len(self.cached)
        for before, after in zip(old, caches):
            after.k[:, :, :used] = before.k[:, :, :used]
            after.v[:, :, :used] = before.v[:, :, :used]
        install_kv_caches(self.model, caches)
        self.capacity = capacity

    def _forward(self, tokens: list[int], start: int) -> torch.Tensor:
        """Logits [1, V] after feeding `tokens` into cache slots start, start + 1, ... (causal over the cache)."""
        slots = torch.arange(start, start + len(tokens), device=self.device)
        if self.step is not None and len(tokens) == 1:
            return self.step.step(torch.tensor(tokens, device=self.device), slots[None], slots, self.real)
        return self.model(torch.tensor([tokens], device=self.device), cache_pos=slots)[:, -1]
