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

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_tune.families.config import ModelConfig
from lightning_tune.model.attention import KVCache, PackedRows, check_seq_lens, cpu_attention_in_fp32, packed_causal_mask, packed_positions, segment_attention, sliding_window_band


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

    def forward(self, x: Tensor, *, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None, cache_pos: Tensor | None = None, kv_len: int = 0, packed: PackedRows | None = None) -> Tensor:
        """x [B, T, E] -> [B, T, E]; the attention inputs by keyword (`Attention.forward`), so a family's
        own layer class can take more without shifting anyone's arguments.

            x ──┬─► input_layernorm ─► self_attn ─► (+) ─► h ──┬─► post_attention_layernorm ─► mlp ─► (+) ─► out
                └────────────────────────────────────┘          └───────────────────────────────────────┘
        """
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
        and shared by every layer:

            seq_lens ─► segments ──► packed rows (one sample per attention call) ─┐
            cache_pos ─► kv_len, causal mask over the cache slots ────────────────┤ (+ sliding band past the window)
            positions (given, per packed sample from 0, cache_pos, or 0..T-1) ─► cos, sin
            tokens ─► embed_tokens ─► x ─► layer 0 ... layer N-1 (each: x, cos, sin, mask, packed) ─► norm ─► hidden
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
                x = checkpoint(layer, x, use_reentrant=False, cos=cos, sin=sin, attn_mask=attn_mask, cache_pos=cache_pos, kv_len=kv_len, packed=packed)
            else:
                x = layer(x, cos=cos, sin=sin, attn_mask=attn_mask, cache_pos=cache_pos, kv_len=kv_len, packed=packed)
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
        return self.logits(self.model(tokens, positions, attn_mask, cache_pos, seq_lens))

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., E] (the final norm's output) -> logits [..., V]: the one place the output head is applied.

        Whatever a family does after the head (a logit soft-cap, a scale) goes here, so training,
        DPO, evaluation and generation all compute it; none of them touches `lm_head` itself.
        """
        return self.lm_head(hidden)

    def plain_head_weight(self) -> Tensor | None:
        """The head's [V, E] weight W when `logits(h)` is exactly `h @ W.T` (a bias-free `nn.Linear`, no
        adapter, nothing applied after it), so a chunked kernel may compute the logits itself
        (`training/loss.py`); None when only `logits` computes them (e.g. a LoRA-adapted head)."""
        head = self.lm_head
        return head.weight if type(head) is nn.Linear and head.bias is None else None

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
