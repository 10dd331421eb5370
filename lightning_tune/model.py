"""One decoder for the Llama-like families, switched by its config: RMSNorm, rotary embeddings,
grouped-query attention, SwiGLU, KV cache.

Llama 2 / 3.x, Qwen 2.5, Qwen 3, Mistral and SmolLM2 differ only in data (`ModelConfig`): head_dim
decoupled from embed_dim / num_heads, tied input/output embeddings, bias on q/k/v or on every
projection, per-head RMSNorm on q and k before the rotary embedding (Qwen 3), the rotary type
(`default`, `llama3`, `linear`) and a sliding attention window (Mistral). Sizes and the Hugging Face
config mapping of each family live in `lightning_tune/families/`.

Parameter names follow Hugging Face's `*ForCausalLM` exactly (`model.embed_tokens`,
`model.layers.N.self_attn.q_proj`, ..., `lm_head`), so a Hugging Face state dict loads with no
renaming and PEFT's `target_modules` are our LoRA targets. The rotary embedding uses Hugging Face's
"rotate half" layout; Meta's interleaved layout is converted when loading (see `checkpoint.py`).

Shapes in comments: B batch, T new tokens, S attended (cached) tokens, H query heads,
K key/value heads, D head dim, E embed dim.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

RopeType = Literal["default", "llama3", "linear"]
AttentionBias = Literal["none", "qkv", "all"]


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one decoder; the first nine are Llama 2's (Meta's names), the rest switches.

    Fields after `rope_base` default to Llama 2, so a Llama 2 config reads as before.
    `head_dim` 0 means embed_dim // num_heads (it is filled in, so `config.head_dim` is always the
    real value). The `rope_*` scaling fields are read only by their rotary type: `rope_factor` by
    `linear` and `llama3`; the low/high frequency factors and the original context by `llama3`
    (transformers' `_compute_llama3_parameters`). `sliding_window` None: full causal attention;
    else each token attends to itself and the `sliding_window - 1` tokens before it (Mistral).
    `model_type` is the Hugging Face `model_type` exports write (families/ maps it).
    """

    vocab_size: int = 32000
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    embed_dim: int = 4096
    intermediate_dim: int = 11008
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    head_dim: int = 0
    tie_word_embeddings: bool = False
    attention_bias: AttentionBias = "none"
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_type: RopeType = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    sliding_window: int | None = None
    model_type: str = "llama"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.head_dim < 0:
            raise ValueError(f"ModelConfig.head_dim must be a positive integer (0 = embed_dim // num_heads), got {self.head_dim}")
        if not self.head_dim:
            if self.embed_dim % self.num_heads:
                raise ValueError(f"ModelConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads}), or give head_dim")
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)  # frozen: set once, here
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig head dim ({self.head_dim}) must be even for rotary embeddings")
        if self.attention_bias not in ("none", "qkv", "all"):
            raise ValueError(f"ModelConfig.attention_bias must be 'none', 'qkv' or 'all', got {self.attention_bias!r}")
        if self.rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"ModelConfig.rope_type {self.rope_type!r} is not supported; supported: default, llama3, linear")
        if self.rope_type != "default" and self.rope_factor <= 0:
            raise ValueError(f"ModelConfig.rope_factor must be > 0, got {self.rope_factor}")
        if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(f"ModelConfig.rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed rope_low_freq_factor ({self.rope_low_freq_factor})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be a positive integer or None, got {self.sliding_window}")

    def to_dict(self) -> dict:
        return asdict(self)


LlamaConfig = ModelConfig  # the name before the families work; kept so existing code and configs run


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 like Meta's and Hugging Face's reference."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """The rotary inverse frequencies [D/2] of `config.rope_type`, as transformers computes them.

    `default`: 1 / base^(2i/D). `linear`: those divided by `rope_factor` (positions stretched).
    `llama3`: Llama 3.1's per-frequency rule, step for step as transformers'
    `_compute_llama3_parameters` (long wavelengths divided by the factor, short ones kept, the band
    between interpolated), so the fp32 results are the same bits. No type rescales cos/sin.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if config.rope_type == "linear":
        return inv_freq / config.rope_factor
    if config.rope_type == "llama3":
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_context_len = config.rope_original_max_seq_len
        low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low) / (high - low)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    return inv_freq


def rope_cos_sin(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype, inv_freq: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rotary cos/sin tables for `positions` ([T] or [B, T]) -> two tensors [..., T, D].

    Computed per call from the positions rather than cached in a buffer: it costs O(T * D), keeps
    meta-device construction free of buffers to re-materialise, and lets every row of a batch use
    its own positions (left-padded generation, packed samples). The arithmetic mirrors Hugging
    Face's rotary embedding in fp32 so logits agree to the last bit that fp32 allows. `inv_freq`
    (from `rope_inv_freq`, for a scaled rotary type) replaces the default frequencies of `base`.
    """
    if inv_freq is None:
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # [..., T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [..., T, D]: "rotate half" layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, T, D] by position; cos/sin are [T, D] or [B, T, D]."""
    if cos.dim() == 3:  # per-row positions: add the heads axis
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


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


def segment_attention(q: Tensor, k: Tensor, v: Tensor, packed: PackedRows, enable_gqa: bool) -> Tensor:
    """Causal attention within each packed sample: q [B, H, T, D], k/v [B, K, T, D] -> [B, H, T, D].

    Equal to SDPA with the block-diagonal causal mask without building it. On CUDA in fp16/bf16, one
    variable-length flash attention call covers every sample of every row (`packed.cu_seqlens`
    says where each ends): no Python loop over samples, no host sync. Elsewhere (the CPU) each
    sample is its own causal SDPA call: the cost is sum(n_i^2) instead of T^2 and every call takes
    the fused kernel that `is_causal` allows; on a CPU the per-call overhead is small next to the work.
    """
    if packed.cu_seqlens is not None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return _varlen_causal_attention(q, k, v, packed, enable_gqa)
    dtype, fp32 = q.dtype, cpu_attention_in_fp32(q, v, packed.max_len)
    if fp32:
        q, k, v = q.float(), k.float(), v.float()
    with no_cpu_autocast() if fp32 else contextlib.nullcontext():
        if len(packed.lengths) == 1:
            out = _split_causal_attention(q, k, v, packed.lengths[0], enable_gqa)
        else:
            out = torch.cat([_split_causal_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], lengths, enable_gqa) for b, lengths in enumerate(packed.lengths)])
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


def _varlen_causal_attention(q: Tensor, k: Tensor, v: Tensor, packed: PackedRows, enable_gqa: bool) -> Tensor:
    """All samples in one `varlen_attn` call on tokens flattened to [B * T, heads, D]; returned as
    a [B, H, T, D] view of [B, T, H, D] memory, so the caller's transpose(1, 2).reshape is free."""
    B, H, T, D = q.shape
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v)]  # [B*T, heads, D]
    out = varlen_attention()(*flat, packed.cu_seqlens, packed.cu_seqlens, packed.max_len, packed.max_len, window_size=(-1, 0), enable_gqa=enable_gqa)
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


def _split_causal_attention(q: Tensor, k: Tensor, v: Tensor, lengths: list[int], enable_gqa: bool) -> Tensor:
    qs, ks, vs = (t.split(lengths, dim=2) for t in (q, k, v))
    # Joined as [B, T, H, D] and handed back as a transposed view: the caller's
    # transpose(1, 2).reshape is then free, as after a single SDPA call.
    parts = [F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=enable_gqa).transpose(1, 2) for qi, ki, vi in zip(qs, ks, vs)]
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


class Attention(nn.Module):
    """Causal self-attention with grouped-query attention (K key/value heads shared by H query heads).

    Switches (`ModelConfig`): bias on q/k/v (`attention_bias` "qkv", Qwen 2.5) or on o too ("all");
    `qk_norm`: an RMSNorm over each head's D features of q and of k, before the rotary embedding
    (Qwen 3; the order matters: rotating first would give other numbers).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        qkv_bias, o_bias = config.attention_bias in ("qkv", "all"), config.attention_bias == "all"
        self.q_proj = nn.Linear(config.embed_dim, config.num_heads * config.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.embed_dim, config.num_kv_heads * config.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.embed_dim, config.num_kv_heads * config.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.embed_dim, bias=o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None, cache_pos: Tensor | None = None, kv_len: int = 0, packed: PackedRows | None = None) -> Tensor:
        """x [B, T, E] -> [B, T, E].

        Without a cache and without `attn_mask`, attention is causal over x itself (training with
        right padding: real tokens precede the padding, so they never see it), or with `packed`
        (packed samples: where each row's samples end, from `collate_packed`'s `seq_lens`) causal
        within each sample. With a cache, the caller passes `cache_pos` [T], `kv_len` and a boolean
        `attn_mask` [B or 1, 1, T, kv_len]. `enable_gqa` lets SDPA share each K/V head across its
        query heads without copying.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # [B, T, K, D]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        if self.qk_norm:  # per head, over D; before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)  # [B, H or K, T, D]
        if self.kv_cache is not None:
            if cache_pos is None:
                raise ValueError("Attention has a KV cache: pass cache_pos (the cache slots of the new tokens)")
            k, v = self.kv_cache.update(cache_pos, k, v, kv_len)  # [B, K, S, D]
        # GQA: each K/V head serves H/K query heads; SDPA broadcasts them without copying K/V.
        gqa = self.num_kv_heads != self.num_heads
        if packed is not None:
            out = segment_attention(q, k, v, packed, gqa)
        elif attn_mask is None and cpu_attention_in_fp32(q, v, T):  # training's causal rows (generation keeps its dtype)
            out = segment_attention(q, k, v, PackedRows([[T]]), gqa)  # each row one sample: the same fp32 path
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)). Meta calls these w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, embed_dim: int, intermediate_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(embed_dim, intermediate_dim, bias=bias)
        self.up_proj = nn.Linear(embed_dim, intermediate_dim, bias=bias)
        self.down_proj = nn.Linear(intermediate_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.embed_dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.embed_dim, config.norm_eps)
        self.mlp = FeedForward(config.embed_dim, config.intermediate_dim, config.mlp_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None, cache_pos: Tensor | None = None, kv_len: int = 0, packed: PackedRows | None = None) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache_pos, kv_len, packed)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """Token embedding, the stack of decoder layers and the final norm: tokens -> hidden states."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.embed_dim, config.norm_eps)
        # Recompute each layer's activations in backward instead of storing them: memory for time.
        self.activation_checkpointing = False

    def forward(self, tokens: Tensor, positions: Tensor | None = None, attn_mask: Tensor | None = None, cache_pos: Tensor | None = None, seq_lens: list[list[int]] | None = None) -> Tensor:
        """tokens [B, T] -> hidden states [B, T, E]; see `CausalLM.forward` for the arguments.

        The attention inputs (rotary tables, mask or packed lengths, window) are built once here
        and shared by every layer.
        """
        T = tokens.shape[1]
        device = tokens.device
        segments = check_seq_lens(seq_lens, tokens.shape, attn_mask, cache_pos)
        kv_len = 0
        window = self.config.sliding_window
        if cache_pos is not None:
            # The new tokens occupy slots cache_pos; attention looks at every slot up to the last.
            # A given mask says how many (no GPU sync); else read it off cache_pos, causal.
            if attn_mask is not None:
                kv_len = attn_mask.shape[-1]
            else:
                kv_len = int(cache_pos[-1]) + 1
                attn_mask = (torch.arange(kv_len, device=device) <= cache_pos[:, None])[None, None]
            if window is not None and kv_len > window:  # slots differ as positions do, padding or not
                attn_mask = attn_mask & sliding_window_band(cache_pos, kv_len, window)
        elif window is not None and (T if segments is None else max(max(row) for row in segments)) > window:
            # Some sequence is longer than the window: an explicit mask (rare; the window is 4096+).
            if segments is not None:
                attn_mask, segments = packed_causal_mask(segments, T, device), None
            elif attn_mask is None:
                attn_mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
            attn_mask = attn_mask & sliding_window_band(torch.arange(T, device=device), T, window)
        if positions is None:
            if segments is not None:  # each packed sample counts its positions from 0
                positions = packed_positions(segments).to(device)
            else:
                positions = cache_pos if cache_pos is not None else torch.arange(T, device=device)
        packed = None if segments is None else PackedRows.build(segments, tokens.shape[0], device)
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_base, x.dtype, rope_inv_freq(self.config, device))
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attn_mask, cache_pos, kv_len, packed, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, cache_pos, kv_len, packed)
        return self.norm(x)


class CausalLM(nn.Module):
    """A causal language model of any family in `families/`, with Hugging Face's module tree (`model.*`, `lm_head`).

    With `tie_word_embeddings` the output head *is* the input embedding (one tensor; checkpoints
    hold only `model.embed_tokens.weight`), as in Llama 3.2, small Qwen and SmolLM2 models.

    Example (two lines from a notebook):
        model = lightning_tune.from_pretrained("Qwen/Qwen3-0.6B directory")
        logits = model(tokens)  # tokens LongTensor [B, T] -> logits [B, T, vocab]
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make `lm_head.weight` the embedding's tensor again (tied configs only).

        Needed after anything that replaces parameters one module at a time (`to_empty`, `.to`
        across devices, loading into a meta model), which would silently untie them.
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens: Tensor, positions: Tensor | None = None, attn_mask: Tensor | None = None, cache_pos: Tensor | None = None, seq_lens: list[list[int]] | None = None) -> Tensor:
        """tokens [B, T] -> logits [B, T, vocab].

        Args:
            tokens: token ids [B, T].
            positions: rotary positions [T] or [B, T]; default 0..T-1 (or `cache_pos` with a cache,
                or 0..n-1 per sample with `seq_lens`).
            attn_mask: boolean [B or 1, 1, T, S], True where attention is allowed; default causal.
            cache_pos: with a KV cache (`setup_kv_cache`), the cache slots [T] of these tokens.
            seq_lens: packed samples (`collate_packed`): per row, the lengths of the samples laid
                end to end (or one list for every row); each sample attends only to itself, as if
                alone. Positions alone never switch this on.
        """
        return self.lm_head(self.model(tokens, positions, attn_mask, cache_pos, seq_lens))

    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None, attn_mask: Tensor | None = None, seq_lens: list[list[int]] | None = None) -> Tensor:
        """tokens [B, T] -> the final norm's output [B, T, E], before the output head.

        Training computes the head only where there is a label (see `FinetuneModule.loss_sum`).
        Under FSDP2 this is registered as a forward method (`sharding.shard_model`), so the root
        unit's parameters (embeddings, norm, head) are gathered as for `forward`.
        """
        return self.model(tokens, positions, attn_mask, seq_lens=seq_lens)

    def setup_kv_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Give every attention layer a preallocated cache for `batch_size` rows of `max_seq_len` tokens."""
        ref = self.lm_head.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(
                batch_size,
                max_seq_len or self.config.max_seq_len,
                self.config.num_kv_heads,
                self.config.head_dim,
                dtype or ref.dtype,
                device or ref.device,
            )

    def reset_kv_cache(self) -> None:
        """Drop the caches: the model goes back to plain (training) forward passes."""
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, apply: Callable[[Tensor, Callable[[Tensor], object]], None] | None = None) -> None:
        """Random init as Hugging Face's `PreTrainedModel`: normal(0, std) weights, zero biases, unit norms.

        Used for `checkpoint_dir: null` demos, and after building on the meta device + `to_empty`
        (which unties tied embeddings: they are tied again first, so the one tensor is drawn once).
        `apply(weight, init)` runs each initialiser, in module order; the default calls `init(weight)`.
        FSDP2 passes one that draws each weight whole and keeps this rank's shard
        (`sharding.init_like_unsharded_`), so a sharded model starts as an unsharded one does.
        """
        self.tie_weights()
        apply = apply or (lambda weight, init: init(weight))
        seen: set[int] = set()
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if id(module.weight) not in seen:  # a tied head is the embedding: drawn once
                    seen.add(id(module.weight))
                    apply(module.weight, lambda w: nn.init.normal_(w, mean=0.0, std=std))
                if getattr(module, "bias", None) is not None:
                    apply(module.bias, nn.init.zeros_)
            elif isinstance(module, RMSNorm):
                apply(module.weight, nn.init.ones_)


Llama = CausalLM  # the name before the families work; kept so existing code runs


# Builders. The named sizes of every family, with their sources, live in `lightning_tune.families`.


def model_config(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of a named size of any family (e.g. "llama3_1_8b"), with fields overridden."""
    from lightning_tune.families import model_config as registry_config

    return registry_config(name, **overrides)


llama2_config = model_config  # the name before the families work


def __getattr__(name: str):
    # LLAMA2_SIZES: every named size's ModelConfig fields (all families, not only Llama 2, despite the
    # old name), read lazily from the registry so that families/ can import this module.
    if name == "LLAMA2_SIZES":
        from lightning_tune.families import SIZES

        return {size: dict(entry.config) for size, entry in SIZES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def llama2(
    vocab_size: int = 32000,
    num_layers: int = 32,
    num_heads: int = 32,
    num_kv_heads: int | None = None,
    embed_dim: int = 4096,
    intermediate_dim: int = 11008,
    max_seq_len: int = 4096,
    norm_eps: float = 1e-5,
    rope_base: float = 10000.0,
) -> CausalLM:
    """Any Llama 2 shaped model; `num_kv_heads=None` means multi-head attention (= num_heads)."""
    return CausalLM(ModelConfig(vocab_size, num_layers, num_heads, num_kv_heads or num_heads, embed_dim, intermediate_dim, max_seq_len, norm_eps, rope_base))


def llama2_7b() -> CausalLM:
    """Llama 2 7B (6,738,415,616 parameters)."""
    return CausalLM(model_config("llama2_7b"))


def llama2_13b() -> CausalLM:
    """Llama 2 13B (13,015,864,320 parameters)."""
    return CausalLM(model_config("llama2_13b"))


def llama2_70b() -> CausalLM:
    """Llama 2 70B (68,976,648,192 parameters)."""
    return CausalLM(model_config("llama2_70b"))


def tiny_llama2(vocab_size: int = 32000) -> CausalLM:
    """A tiny Llama 2 shaped model for CPU demos and tests: 4 layers, dim 128, GQA 4/2 heads."""
    return CausalLM(model_config("tiny_llama2", vocab_size=vocab_size))
