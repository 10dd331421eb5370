"""The attention kernels under `Attention`: packed rows (one sample each, varlen on a GPU), the fp32 CPU path,
masks, the sliding-window band and the KV cache."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class PackedRows:
    """Where the packed samples of a batch end, built once per forward and shared by every layer.

    `lengths`: one list of sample lengths per row (`collate_packed`'s `seq_lens`), or a single list
    for every row. `cu_seqlens` (int32 [N + 1], the samples' start offsets in the flattened
    [B * T] tokens, then the total) and `max_len` feed a variable-length attention kernel on CUDA;
    `cu_seqlens` is None where none is used (CPU). It is made from host ints and copied from pinned
    memory without blocking, so telling the kernel where samples end costs no host-device sync.
    """

    lengths: list[list[int]]
    cu_seqlens: Tensor | None = None
    # The longest sample, derived once here rather than in every layer. An init field (0 = derive it):
    # FSDP2 rebuilds dataclass arguments with dataclasses.replace, which passes every field.
    max_len: int = 0

    def __post_init__(self) -> None:
        if not self.max_len:
            object.__setattr__(self, "max_len", max(max(row) for row in self.lengths))

    @staticmethod
    def build(lengths: list[list[int]], batch_size: int, device: torch.device) -> PackedRows:
        if device.type != "cuda" or varlen_attention() is None:
            return PackedRows(lengths)
        cu_seqlens = torch.tensor(sample_offsets(lengths, batch_size), dtype=torch.int32).pin_memory().to(device, non_blocking=True)
        return PackedRows(lengths, cu_seqlens)


def sample_offsets(lengths: list[list[int]], batch_size: int) -> list[int]:
    """Start of every packed sample in the rows flattened to [B * T] tokens, then the total (varlen's `cu_seqlens`)."""
    offsets = [0]
    for row in lengths * batch_size if len(lengths) == 1 else lengths:
        for n in row:
            offsets.append(offsets[-1] + n)
    return offsets


@cache
def varlen_attention() -> Callable | None:
    """torch's variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`, CUDA), or None (looked up once)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def segment_attention(q: Tensor, k: Tensor, v: Tensor, packed: PackedRows, enable_gqa: bool, scale: float | None = None) -> Tensor:
    """Causal attention within each packed sample: q [B, H, T, D], k/v [B, K, T, D] -> [B, H, T, D].

    Equal to SDPA with the block-diagonal causal mask without building it. On CUDA in fp16/bf16, one
    variable-length flash attention call covers every sample of every row (`packed.cu_seqlens`
    says where each ends): no Python loop over samples, no host sync. Elsewhere (the CPU) each
    sample is its own causal SDPA call: the cost is sum(n_i^2) instead of T^2 and every call takes
    the fused kernel that `is_causal` allows; on a CPU the per-call overhead is small next to the work.
    `scale` multiplies the scores (None: head_dim ** -0.5).
    """
    if packed.cu_seqlens is not None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return _varlen_causal_attention(q, k, v, packed, enable_gqa, scale)
    dtype, fp32 = q.dtype, cpu_attention_in_fp32(q, v, packed.max_len)
    if fp32:
        q, k, v = q.float(), k.float(), v.float()
    with no_cpu_autocast() if fp32 else contextlib.nullcontext():
        if len(packed.lengths) == 1:
            out = _split_causal_attention(q, k, v, packed.lengths[0], enable_gqa, scale)
        else:
            out = torch.cat([_split_causal_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], lengths, enable_gqa, scale) for b, lengths in enumerate(packed.lengths)])
    return out.to(dtype)


# On a CPU, torch's bf16/fp16 flash attention is slower than its fp32 one for short sequences (fwd +
# bwd, 8 heads of 64, one thread, AVX512-BF16 CPU, torch 2.13: 60 tokens 1.48 vs 0.52 ms, 150 tokens
# 4.6 vs 2.4 ms; 400 tokens equal; 1024 tokens 99 vs 119 ms), so below this length a half-precision
# attention runs in fp32. Exact inputs (half values are fp32 values), the result rounded once to the
# half dtype: no less accurate than the half kernel, which accumulates in fp32 too.
CPU_FP32_ATTENTION_MAX_LEN = 512


def cpu_attention_in_fp32(q: Tensor, v: Tensor, longest: int) -> bool:
    """Whether to run this CPU attention in fp32 instead of a half dtype (see CPU_FP32_ATTENTION_MAX_LEN).

    Half precision: q or v in bf16/fp16, or CPU autocast on. Under bf16-mixed, q and k leave the
    rotary embedding in fp32 (its fp32 cos/sin promote them) while v comes from its linear layer in
    bf16, and autocast would cast all three to bf16 (SDPA is on its lower-precision list)."""
    half = (torch.bfloat16, torch.float16)
    return q.device.type == "cpu" and longest <= CPU_FP32_ATTENTION_MAX_LEN and (q.dtype in half or v.dtype in half or torch.is_autocast_enabled("cpu"))


def no_cpu_autocast() -> torch.autocast:
    """CPU autocast off, so the fp32 attention above stays fp32 (measured on SmolLM2-135M LoRA under
    bf16-mixed: the bf16 flash backward took 20% of the step, 2-4x the fp32 one at 60-200 tokens)."""
    return torch.autocast("cpu", enabled=False)


def _varlen_causal_attention(q: Tensor, k: Tensor, v: Tensor, packed: PackedRows, enable_gqa: bool, scale: float | None = None) -> Tensor:
    """All samples in one `varlen_attn` call on tokens flattened to [B * T, heads, D]; returned as
    a [B, H, T, D] view of [B, T, H, D] memory, so the caller's transpose(1, 2).reshape is free."""
    B, H, T, D = q.shape
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v)]  # [B*T, heads, D]
    out = varlen_attention()(*flat, packed.cu_seqlens, packed.cu_seqlens, packed.max_len, packed.max_len, scale=scale, window_size=(-1, 0), enable_gqa=enable_gqa)
    return out.view(B, T, H, D).transpose(1, 2)


def check_seq_lens(seq_lens: list[list[int]] | None, shape: tuple[int, ...] | torch.Size, attn_mask: Tensor | None, cache_pos: Tensor | None) -> list[list[int]] | None:
    """Validate packed sample lengths against tokens of `shape` [B, T]; None means plain causal rows.

    The lengths are host-side Python ints (the collate function knows them), so checking them and
    splitting attention by them needs no device sync. A wrong sum would silently attend across
    samples, hence the check.
    """
    if seq_lens is None:
        return None
    if attn_mask is not None or cache_pos is not None:
        raise ValueError("seq_lens (packed samples) cannot be combined with attn_mask or a KV cache")
    B, T = shape[0], shape[1]
    if len(seq_lens) not in (1, B) or any(sum(row) != T or min(row, default=0) <= 0 for row in seq_lens):
        raise ValueError(f"seq_lens must hold 1 or {B} lists of positive sample lengths summing to {T} each, got {seq_lens}")
    return seq_lens


def packed_positions(seq_lens: list[list[int]]) -> Tensor:
    """Rotary positions of packed rows, 0..n-1 for each sample: [T] for one list, else [B, T]."""
    rows = [torch.cat([torch.arange(n) for n in row]) for row in seq_lens]
    return rows[0] if len(rows) == 1 else torch.stack(rows)


def _split_causal_attention(q: Tensor, k: Tensor, v: Tensor, lengths: list[int], enable_gqa: bool, scale: float | None = None) -> Tensor:
    qs, ks, vs = (t.split(lengths, dim=2) for t in (q, k, v))
    # Joined as [B, T, H, D] and handed back as a transposed view: the caller's
    # transpose(1, 2).reshape is then free, as after a single SDPA call.
    parts = [F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(1, 2) for qi, ki, vi in zip(qs, ks, vs)]
    return torch.cat(parts, dim=1).transpose(1, 2)


class KVCache(nn.Module):
    """Preallocated key/value cache for one attention layer: [B, K, max_seq_len, D] each.

    Preallocation means decoding allocates nothing per token; `update` writes the new keys at
    `cache_pos` and returns views of the first `kv_len` slots, so attention costs grow with the
    sequence actually generated, not with the cache's capacity.
    """

    def __init__(self, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos: Tensor, k: Tensor, v: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Store k, v [B, K, T, D] at slots `cache_pos` [T]; return keys/values [B, K, kv_len, D]."""
        self.k.index_copy_(2, cache_pos, k)
        self.v.index_copy_(2, cache_pos, v)
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]


def packed_causal_mask(segments: list[list[int]], T: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean [B or 1, 1, T, T]: token i sees token j iff both are in the same packed sample and j <= i."""
    rows = []
    for lengths in segments:
        sample = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
        index = torch.arange(T, device=device)
        rows.append((sample[:, None] == sample[None, :]) & (index[None, :] <= index[:, None]))
    return torch.stack(rows)[:, None]


def sliding_window_band(query_slots: Tensor, kv_len: int, window: int) -> Tensor:
    """Boolean [T, kv_len]: query at slot q may see key slot k iff q - k < window (transformers'
    `sliding_window_overlay`: itself and the window - 1 slots before it; causality is the mask's job)."""
    return (query_slots[:, None] - torch.arange(kv_len, device=query_slots.device)[None, :]) < window


def softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, softcap: float) -> Tensor:
    """Attention whose scores pass through cap * tanh(s / cap) before the mask (Gemma 2's soft-capping).

    q [B, H, T, D], k/v [B, K, S, D], `mask` boolean [B or 1, 1, T, S] (True: may attend) -> [B, H, T, D].
    No fused kernel applies a function to the scores, so this is transformers' eager attention step
    for step: scores * scale, the cap, masked with the dtype's lowest value, softmax in fp32.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # GQA: each K/V head serves `groups` query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def sink_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, sinks: Tensor) -> Tensor:
    """Attention with a learned sink per head (gpt-oss): one more logit in each query's softmax, `sinks[h]`,
    that takes probability but has no value, so a head can attend to nothing.

    q [B, H, T, D], k/v [B, K, S, D], `mask` boolean [B or 1, 1, T, S], sinks [H] -> [B, H, T, D]. As
    transformers' eager gpt-oss attention: scores * scale, masked, the sink column appended, the row
    maximum subtracted, softmax in the scores' dtype, the sink column dropped. No fused kernel takes a
    sink, so the [T, S] scores are formed (memory O(T * S) per head, as transformers' eager path).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    combined = torch.cat([scores, sinks.to(scores.dtype).view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)
