"""The blocks of the Llama-like decoder: RMSNorm, rotary embeddings, grouped-query attention, the gated MLP and
the pre-norm layer. Families whose block differs bring their own layer class beside this one (`gemma.py`,
`olmo2.py`) built from these parts; `decoder.py` stacks them.

Shapes in comments: B batch, T new tokens, S attended (cached) tokens, H query heads,
K key/value heads, D head dim, E embed dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tune.families.config import ModelConfig
from lightning_tune.model.attention import KVCache, PackedRows, cpu_attention_in_fp32, packed_causal_mask, segment_attention, sink_attention, softcapped_attention
from lightning_tune.model.moe import SparseMoE


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 like Meta's and Hugging Face's reference.

    `init_value` is what `reset_parameters` and `CausalLM.init_weights` set the weight to (1 here;
    a subclass whose forward uses 1 + weight starts from 0)."""

    init_value = 1.0

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.init_value)


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None, seq_len: int = 0) -> Tensor:
    """The rotary inverse frequencies [D/2] of `config.rope_type`, as transformers computes them.

    `default`: 1 / base^(2i/D). `linear`: those divided by `rope_factor` (positions stretched).
    `llama3`: Llama 3.1's per-frequency rule, step for step as transformers'
    `_compute_llama3_parameters` (long wavelengths divided by the factor, short ones kept, the band
    between interpolated), so the fp32 results are the same bits. `longrope`: 1 / (factor_i * base^(2i/D))
    with the long factors when `seq_len` (the forward's largest position + 1) passes the original
    context, else the short ones (transformers' `_compute_longrope_parameters`); it alone rescales
    cos/sin (`ModelConfig.rope_attention_factor`). D is the rotary part of the head (`rotary_dim`).
    """
    dim = config.rotary_dim
    if config.rope_type == "yarn":
        return yarn_inv_freq(config, device)
    if config.rope_type == "longrope":
        long = seq_len > config.rope_original_max_seq_len
        factors = torch.tensor(config.rope_long_factor if long else config.rope_short_factor, dtype=torch.float32, device=device)
        return 1.0 / (factors * config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
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


def yarn_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """YaRN's frequencies, step for step as transformers' `_compute_yarn_parameters`: interpolated (divided
    by the factor) below the correction range, extrapolated (kept) above it, a linear ramp between."""
    dim, base, factor, original = config.rotary_dim, config.rope_base, config.rope_factor, config.rope_original_max_seq_len

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_cos_sin(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype, inv_freq: Tensor | None = None, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Rotary cos/sin tables for `positions` ([T] or [B, T]) -> two tensors [..., T, D].

    Computed per call from the positions rather than cached in a buffer: it costs O(T * D), keeps
    meta-device construction free of buffers to re-materialise, and lets every row of a batch use
    its own positions (left-padded generation, packed samples). The arithmetic mirrors Hugging
    Face's rotary embedding in fp32 so logits agree to the last bit that fp32 allows. `inv_freq`
    (from `rope_inv_freq`, for a scaled rotary type) replaces the default frequencies of `base`;
    `scale` multiplies cos and sin in fp32 (longrope's attention factor). `head_dim`: the rotary part.
    """
    if inv_freq is None:
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # [..., T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [..., T, D]: "rotate half" layout
    if scale != 1.0:
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, T, D] by position; cos/sin are [T, R] or [B, T, R], R <= D: with R < D (partial
    rotary, Phi-4-mini) only the first R features turn, the rest pass through."""
    if cos.dim() == 3:  # per-row positions: add the heads axis
        cos, sin = cos[:, None], sin[:, None]
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        turned, kept = x[..., :rotary], x[..., rotary:]
        return torch.cat((turned * cos + _rotate_half(turned) * sin, kept), dim=-1)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Causal self-attention with grouped-query attention (K key/value heads shared by H query heads).

    Switches (`ModelConfig`): bias on q/k/v (`attention_bias` "qkv", Qwen 2.5) or on o too ("all");
    `qk_norm`: an RMSNorm over each head's D features of q and of k, before the rotary embedding
    (Qwen 3; the order matters: rotating first would give other numbers), of class `norm` (Gemma 3
    passes its own); `query_pre_attn_scalar` replaces head_dim in the score scale (Gemma);
    `attn_logit_softcap` caps the scores (Gemma 2: no fused kernel then, `softcapped_attention`);
    `attention_sinks`: a learned logit per head, `sinks` (gpt-oss: `sink_attention`).
    A family whose projections differ overrides `project` (OLMo 2).
    """

    def __init__(self, config: ModelConfig, norm: type[RMSNorm] = RMSNorm) -> None:
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
            self.q_norm = norm(config.head_dim, config.norm_eps)
            self.k_norm = norm(config.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = None if config.query_pre_attn_scalar is None else config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcap
        if config.attention_sinks:
            self.sinks = nn.Parameter(torch.empty(config.num_heads))
        self.attention_sinks = config.attention_sinks
        self.kv_cache: KVCache | None = None

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, E] -> q [B, T, H, D], k and v [B, T, K, D], q and k normed where the family norms them."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # per head, over D; before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None, cache_pos: Tensor | None = None, kv_len: int = 0, packed: PackedRows | None = None, q_scale: Tensor | None = None
    ) -> Tensor:
        """x [B, T, E] -> [B, T, E].

        Without a cache and without `attn_mask`, attention is causal over x itself (training with
        right padding: real tokens precede the padding, so they never see it), or with `packed`
        (packed samples: where each row's samples end, from `collate_packed`'s `seq_lens`) causal
        within each sample. With a cache, the caller passes `cache_pos` [T], `kv_len` and a boolean
        `attn_mask` [B or 1, 1, T, kv_len]. `enable_gqa` lets SDPA share each K/V head across its
        query heads without copying. `q_scale` [B or 1, 1, T, 1] multiplies the rotated queries
        (Ministral 3's position-dependent scaling).
        """
        B, T, _ = x.shape
        q, k, v = self.project(x)
        v = v.transpose(1, 2)  # [B, K, T, D]
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)  # [B, H or K, T, D]
        if q_scale is not None:
            q = q * q_scale.to(q.dtype)
        if self.kv_cache is not None:
            if cache_pos is None:
                raise ValueError("Attention has a KV cache: pass cache_pos (the cache slots of the new tokens)")
            k, v = self.kv_cache.update(cache_pos, k, v, kv_len)  # [B, K, S, D]
        # GQA: each K/V head serves H/K query heads; SDPA broadcasts them without copying K/V.
        gqa = self.num_kv_heads != self.num_heads
        if self.softcap is not None or self.attention_sinks:  # no fused kernel: the scores formed, an explicit mask
            if packed is not None:
                attn_mask = packed_causal_mask(packed.lengths, T, x.device)
            elif attn_mask is None:
                attn_mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
            scale = self.scale or self.head_dim**-0.5
            if self.attention_sinks:
                out = sink_attention(q, k, v, attn_mask, scale, self.sinks)
            else:
                out = softcapped_attention(q, k, v, attn_mask, scale, self.softcap)
        elif packed is not None:
            out = segment_attention(q, k, v, packed, gqa, self.scale)
        elif attn_mask is None and cpu_attention_in_fp32(q, v, T):  # training's causal rows (generation keeps its dtype)
            out = segment_attention(q, k, v, PackedRows([[T]]), gqa, self.scale)  # each row one sample: the same fp32 path
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, scale=self.scale, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


def gelu_tanh(x: Tensor) -> Tensor:
    """transformers' `gelu_pytorch_tanh`."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": gelu_tanh}


class FeedForward(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU with silu (Meta calls these w1 (gate), w3 (up), w2
    (down)), GeGLU with Gemma's tanh-approximated gelu (`activation` "gelu_pytorch_tanh")."""

    def __init__(self, embed_dim: int, intermediate_dim: int, bias: bool = False, activation: str = "silu") -> None:
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.gate_proj = nn.Linear(embed_dim, intermediate_dim, bias=bias)
        self.up_proj = nn.Linear(embed_dim, intermediate_dim, bias=bias)
        self.down_proj = nn.Linear(intermediate_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h)); the MLP of layer `index` is the
    sparse mixture of experts (`moe.py`) where the config says so (`ModelConfig.is_moe_layer`)."""

    def __init__(self, config: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.embed_dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.embed_dim, config.norm_eps)
        if config.is_moe_layer(index):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = FeedForward(config.embed_dim, config.intermediate_dim, config.mlp_bias, config.hidden_act)

    def forward(
        self, x: Tensor, *, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None, cache_pos: Tensor | None = None, kv_len: int = 0, packed: PackedRows | None = None, q_scale: Tensor | None = None
    ) -> Tensor:
        """x [B, T, E] -> [B, T, E]; the attention inputs by keyword (`Attention.forward`), so a family's
        own layer class can take more without shifting anyone's arguments.

            x ──┬─► input_layernorm ─► self_attn ─► (+) ─► h ──┬─► post_attention_layernorm ─► mlp ─► (+) ─► out
                └────────────────────────────────────┘          └───────────────────────────────────────┘
        """
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache_pos, kv_len, packed, q_scale)
        return h + self.mlp(self.post_attention_layernorm(h))
