"""A static-shape decode step that `torch.compile` compiles once and every token reuses.

The eager decode loop attends over a cache view that grows by one slot per token, so every step has
new shapes. Here every step has the same: the new token's K/V are written at slot `slot` of a
preallocated cache of `cache_len` slots, and attention covers all of them through a fixed-size
boolean mask [B, 1, 1, cache_len] = (key is a real token) AND (key slot <= slot), built with tensor
ops inside the step. Slots after `slot` hold stale or zero K/V; the mask gives them weight 0.
Nothing is allocated per token outside the graph, and there is no Python per layer once compiled.

`cache_len` is rounded up (to a multiple of 256) so prompts of different lengths share one graph;
the price is attention over up to 255 masked slots, small next to the weights a step reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tune.model import KVCache

CACHE_MULTIPLE = 256


def cache_length(needed: int, max_seq_len: int, multiple: int = CACHE_MULTIPLE) -> int:
    """`needed` slots rounded up to a multiple of `multiple`, but no more than the model's context."""
    return max(needed, min(-(-needed // multiple) * multiple, max_seq_len))


def activation_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device activations (and so the KV cache) have: the embedding table's.

    Not the head's: an int8-quantised head (`lightning_tune.layers.int8`) holds int8 codes."""
    weight = model.model.embed_tokens.weight
    return weight.dtype, weight.device


def new_kv_caches(model: nn.Module, batch_size: int, cache_len: int) -> list[KVCache]:
    """One preallocated `KVCache` per layer, in the activations' dtype and device."""
    config = model.config
    dtype, device = activation_dtype_device(model)
    return [KVCache(batch_size, cache_len, config.num_kv_heads, config.head_dim, dtype, device) for _ in model.model.layers]


def install_kv_caches(model: nn.Module, caches: list[KVCache]) -> None:
    """Give each attention layer its cache (`model.reset_kv_cache()` takes them away again)."""
    for layer, cache in zip(model.model.layers, caches, strict=True):
        layer.self_attn.kv_cache = cache


class DecodeStep:
    """One token per row through the model at cache slot `slot`, with fixed shapes every call.

    Owns its caches, so a later `generate` with the same (model, batch, cache length) reinstalls the
    very same tensors and the compiled graph's guards still hold: it is compiled once, then reused.

    Call `install()` before the prefill (which fills slots 0..T-1 eagerly), then
    `step(tokens [B], positions [B, 1], slot [1], real [B, cache_len]) -> logits [B, V]` per token.
    """

    def __init__(self, model: nn.Module, batch_size: int, cache_len: int, compile: bool = False, backend: str | Callable[..., Any] = "inductor") -> None:
        self.model, self.batch_size, self.cache_len = model, batch_size, cache_len
        self.caches = new_kv_caches(model, batch_size, cache_len)
        self.slots = torch.arange(cache_len, device=activation_dtype_device(model)[1])
        self.compiled = compile
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False, backend=backend) if compile else self._step

    def install(self) -> None:
        install_kv_caches(self.model, self.caches)

    def _step(self, tokens: Tensor, positions: Tensor, slot: Tensor, real: Tensor) -> Tensor:
        mask = (real & (self.slots <= slot))[:, None, None, :]  # [B, 1, 1, S]: real keys up to this slot
        return self.model(tokens[:, None], positions, mask, slot)[:, -1]


class _Steps(dict):
    """A model's decode steps. A copy of the model (`copy.deepcopy`, pickling) starts without any:
    a copied step would still run the original model through its compiled function."""

    def __deepcopy__(self, memo: dict) -> _Steps:
        return _Steps()

    def __reduce__(self):
        return (_Steps, ())


def decode_step(model: nn.Module, batch_size: int, cache_len: int, compile: bool = False, backend: str | Callable[..., Any] = "inductor") -> DecodeStep:
    """The `DecodeStep` of (model, batch, cache length), built (and compiled on first use) once.

    Dynamo keys compiled code on the step function's code object and guards on shapes and module
    structure, so models of one architecture share a graph per (batch, cache length). With its
    default recompile limit (8), a process that decodes with more than 8 different shapes or
    architectures runs the rest eagerly: slower, the same tokens.
    """
    # Kept on the model itself ({(batch, cache_len, compile, backend): step}), so the steps and their
    # caches go when the model goes (a step refers to its model: a global registry would keep both).
    steps = model.__dict__.setdefault("_decode_steps", _Steps())
    key = (batch_size, cache_len, compile, backend if compile else None)
    if key not in steps:
        steps[key] = DecodeStep(model, batch_size, cache_len, compile, backend)
    return steps[key]
