"""Decoding on a CausalLM, one engine for generate, chat and eval: batched prefill, KV-cache decode, sampling,
a compiled step, multi-turn sessions; nothing of training."""

from lightning_tune.generate.chat import ChatSession, ContextFullError
from lightning_tune.generate.errors import GenerationError
from lightning_tune.generate.loop import generate, generate_text
from lightning_tune.generate.rollout import Rollouts, rollout
from lightning_tune.generate.sampling import end_tokens, filter_logits, sample_next
from lightning_tune.generate.streaming import GenerationStats, GenerationTimer, TextStreamer, TokenizerLike

__all__ = [
    "ChatSession",
    "ContextFullError",
    "GenerationError",
    "GenerationStats",
    "GenerationTimer",
    "Rollouts",
    "TextStreamer",
    "TokenizerLike",
    "end_tokens",
    "filter_logits",
    "generate",
    "generate_text",
    "rollout",
    "sample_next",
]
