"""The Llama 2 decoder in one file: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, KV cache.

Parameter names follow Hugging Face's `LlamaForCausalLM` exactly (`model.embed_tokens`,
`model.layers.N.self_attn.q_proj`, ..., `lm_head`), so a Hugging Face state dict loads with no
renaming and PEFT's `target_modules` are our LoRA targets. The rotary embedding uses Hugging Face's
"rotate half" layout; Meta's interleaved layout is converted when loading (see `checkpoint.py`).

Shapes in comments: B batch, T new tokens, S attended (cached) tokens, H query heads,
K key/value heads, D head dim, E embed dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama 2 model; names follow Meta's paper, values its `params.json`."""

    vocab_size: int = 32000
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    embed_dim: int = 4096
    intermediate_dim: int = 11008
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"LlamaConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if (self.embed_dim // self.num_heads) % 2:
            raise ValueError(f"LlamaConfig head dim ({self.embed_dim // self.num_heads}) must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


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


def rope_cos_sin(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rotary cos/sin tables for `positions` ([T] or [B, T]) -> two tensors [..., T, D].

    Computed per call from the positions rather than cached in a buffer: it costs O(T * D), keeps
    meta-device construction free of buffers to re-materialise, and lets every row of a batch use
    its own positions (left-padded generation, packed samples). The arithmetic mirrors Hugging
    Face's `LlamaRotaryEmbedding` in fp32 so logits agree to the last bit that fp32 allows.
    """
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


def segment_attention(q: Tensor, k: Tensor, v: Tensor, segments: list[list[int]], enable_gqa: bool) -> Tensor:
    """Causal attention within each packed sample: q [B, H, T, D], k/v [B, K, T, D] -> [B, H, T, D].

    Equal to SDPA with the block-diagonal causal mask, but each sample is its own causal SDPA
    call: the cost is sum(n_i^2) instead of T^2, no [T, T] mask exists, and every call takes the
    fused kernel that `is_causal` allows. `segments` holds one list of sample lengths per row
    (`collate_packed`'s `seq_lens`), or a single list that applies to every row.
    """
    if len(segments) == 1:
        return _split_causal_attention(q, k, v, segments[0], enable_gqa)
    return torch.cat([_split_causal_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], lengths, enable_gqa) for b, lengths in enumerate(segments)])


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


class Attention(nn.Module):
    """Causal self-attention with grouped-query attention (K key/value heads shared by H query heads)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.embed_dim, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.embed_dim, config.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.embed_dim, config.num_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.embed_dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None, cache_pos: Tensor | None = None, kv_len: int = 0, segments: list[list[int]] | None = None) -> Tensor:
        """x [B, T, E] -> [B, T, E].

        Without a cache and without `attn_mask`, attention is causal over x itself (training with
        right padding: real tokens precede the padding, so they never see it), or with `segments`
        (packed samples: the lengths of each row's samples, `collate_packed`'s `seq_lens`) causal
        within each sample. With a cache, the
        caller passes `cache_pos` [T], `kv_len` and a boolean `attn_mask` [B or 1, 1, T, kv_len].
        `enable_gqa` lets SDPA share each K/V head across its query heads without copying.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            if cache_pos is None:
                raise ValueError("Attention has a KV cache: pass cache_pos (the cache slots of the new tokens)")
            k, v = self.kv_cache.update(cache_pos, k, v, kv_len)  # [B, K, S, D]
        # GQA: each K/V head serves H/K query heads; SDPA broadcasts them without copying K/V.
        gqa = self.num_kv_heads != self.num_heads
        if segments is not None:
            out = segment_attention(q, k, v, segments, gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)). Meta calls these w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, embed_dim: int, intermediate_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(embed_dim, intermediate_dim, bias=False)
        self.up_proj = nn.Linear(embed_dim, intermediate_dim, bias=False)
        self.down_proj = nn.Linear(intermediate_dim, embed_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.embed_dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.embed_dim, config.norm_eps)
        self.mlp = FeedForward(config.embed_dim, config.intermediate_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None, cache_pos: Tensor | None = None, kv_len: int = 0, segments: list[list[int]] | None = None) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache_pos, kv_len, segments)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """Token embedding, the stack of decoder layers and the final norm: tokens -> hidden states."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.embed_dim, config.norm_eps)
        # Recompute each layer's activations in backward instead of storing them: memory for time.
        self.activation_checkpointing = False

    def forward(self, tokens: Tensor, positions: Tensor | None = None, attn_mask: Tensor | None = None, cache_pos: Tensor | None = None, seq_lens: list[list[int]] | None = None) -> Tensor:
        """tokens [B, T] -> hidden states [B, T, E]; see `Llama.forward` for the arguments."""
        T = tokens.shape[1]
        kv_len = 0
        if cache_pos is not None:
            # The new tokens occupy slots cache_pos; attention looks at every slot up to the last.
            # A given mask says how many (no GPU sync); else read it off cache_pos, causal.
            if attn_mask is not None:
                kv_len = attn_mask.shape[-1]
            else:
                kv_len = int(cache_pos[-1]) + 1
                attn_mask = (torch.arange(kv_len, device=tokens.device) <= cache_pos[:, None])[None, None]
        segments = check_seq_lens(seq_lens, tokens.shape, attn_mask, cache_pos)
        if positions is None:
            if segments is not None:  # each packed sample counts its positions from 0
                positions = packed_positions(segments).to(tokens.device)
            else:
                positions = cache_pos if cache_pos is not None else torch.arange(T, device=tokens.device)
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_base, x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attn_mask, cache_pos, kv_len, segments, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, cache_pos, kv_len, segments)
        return self.norm(x)


class Llama(nn.Module):
    """Llama 2 causal language model with Hugging Face's module tree (`model.*`, `lm_head`).

    Example (two lines from a notebook):
        model = lightning_tune.from_pretrained("meta-llama/Llama-2-7b-hf directory")
        logits = model(tokens)  # tokens LongTensor [B, T] -> logits [B, T, vocab]
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)

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
                batch_size, max_seq_len or self.config.max_seq_len, self.config.num_kv_heads, self.config.head_dim,
                dtype or ref.dtype, device or ref.device,
            )

    def reset_kv_cache(self) -> None:
        """Drop the caches: the model goes back to plain (training) forward passes."""
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, apply: Callable[[Tensor, Callable[[Tensor], object]], None] | None = None) -> None:
        """Random init as Hugging Face's `LlamaPreTrainedModel`: normal(0, std) weights, unit norms.

        Used for `checkpoint_dir: null` demos, and after building on the meta device + `to_empty`.
        `apply(weight, init)` runs each initialiser, in module order; the default calls `init(weight)`.
        FSDP2 passes one that draws each weight whole and keeps this rank's shard
        (`sharding.init_like_unsharded_`), so a sharded model starts as an unsharded one does.
        """
        apply = apply or (lambda weight, init: init(weight))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                apply(module.weight, lambda w: nn.init.normal_(w, mean=0.0, std=std))
            elif isinstance(module, RMSNorm):
                apply(module.weight, nn.init.ones_)


# Builders. Sizes from Meta's `params.json` files (https://github.com/meta-llama/llama, MODEL_CARD.md)
# and Hugging Face's `config.json` of meta-llama/Llama-2-{7b,13b,70b}-hf.
LLAMA2_SIZES: dict[str, dict] = {
    # 32 layers, 32 heads, dim 4096, MLP 11008: 6,738,415,616 parameters
    "llama2_7b": dict(num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=4096, intermediate_dim=11008),
    # 40 layers, 40 heads, dim 5120, MLP 13824: 13,015,864,320 parameters
    "llama2_13b": dict(num_layers=40, num_heads=40, num_kv_heads=40, embed_dim=5120, intermediate_dim=13824),
    # 80 layers, 64 query heads sharing 8 KV heads (GQA), dim 8192, MLP 28672: 68,976,648,192 parameters
    "llama2_70b": dict(num_layers=80, num_heads=64, num_kv_heads=8, embed_dim=8192, intermediate_dim=28672),
    # Not a Meta size: a few-MB model with GQA for CPU demos and tests.
    "tiny_llama2": dict(num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=128, intermediate_dim=352, max_seq_len=1024),
}


def llama2_config(name: str, **overrides) -> LlamaConfig:
    """The `LlamaConfig` of a named size, with any field overridden (e.g. `vocab_size=1000`)."""
    if name not in LLAMA2_SIZES:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(LLAMA2_SIZES)}")
    unknown = set(overrides) - set(LlamaConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown model argument(s) {sorted(unknown)}; expected some of {list(LlamaConfig.__dataclass_fields__)}")
    return LlamaConfig(**{**LLAMA2_SIZES[name], **overrides})


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
) -> Llama:
    """Any Llama 2 shaped model; `num_kv_heads=None` means multi-head attention (= num_heads)."""
    return Llama(LlamaConfig(vocab_size, num_layers, num_heads, num_kv_heads or num_heads, embed_dim, intermediate_dim, max_seq_len, norm_eps, rope_base))


def llama2_7b() -> Llama:
    """Llama 2 7B (6,738,415,616 parameters)."""
    return Llama(llama2_config("llama2_7b"))


def llama2_13b() -> Llama:
    """Llama 2 13B (13,015,864,320 parameters)."""
    return Llama(llama2_config("llama2_13b"))


def llama2_70b() -> Llama:
    """Llama 2 70B (68,976,648,192 parameters)."""
    return Llama(llama2_config("llama2_70b"))


def tiny_llama2(vocab_size: int = 32000) -> Llama:
    """A tiny Llama 2 shaped model for CPU demos and tests: 4 layers, dim 128, GQA 4/2 heads."""
    return Llama(llama2_config("tiny_llama2", vocab_size=vocab_size))
