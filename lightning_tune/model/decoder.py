"""One decoder for every family, switched by its config: the embedding, a stack of layers, the final norm and
the output head (`CausalLM.logits`, the one place it is applied), with a KV cache.

Llama 2 / 3.x, Qwen 2.5, Qwen 3, Mistral and SmolLM2 differ only in data (`ModelConfig`): head_dim
decoupled from embed_dim / num_heads, tied input/output embeddings, bias on q/k/v or on every
projection, per-head RMSNorm on q and k before the rotary embedding (Qwen 3), the rotary type
(`default`, `llama3`, `linear`) and a sliding attention window (Mistral). Gemma 2 / 3 and OLMo 2
have their own layer class (`ModelConfig.block`: `gemma.py`, `olmo2.py`); sliding and full layers
may alternate, each kind with its own mask and rotary base (`layer_types`, `rope_local_base`).
Sizes and the Hugging Face config mapping of each family live in `lightning_tune/families/`.

Parameter names follow Hugging Face's `*ForCausalLM` exactly (`model.embed_tokens`,
`model.layers.N.self_attn.q_proj`, ..., `lm_head`), so a Hugging Face state dict loads with no
renaming and PEFT's `target_modules` are our LoRA targets. The rotary embedding uses Hugging Face's
"rotate half" layout; Meta's interleaved layout is converted when loading (see `checkpoint.py`).

Shapes in comments: B batch, T new tokens, S attended (cached) tokens, H query heads,
K key/value heads, D head dim, E embed dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_tune.families.config import ModelConfig
from lightning_tune.model.attention import KVCache, PackedRows, check_seq_lens, packed_causal_mask, packed_positions, sliding_window_band
from lightning_tune.model.gemma import GemmaDecoderLayer, GemmaRMSNorm
from lightning_tune.model.layers import Attention, DecoderLayer, FeedForward, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from lightning_tune.model.moe import Experts, Router, SparseMoE, load_balancing_loss
from lightning_tune.model.olmo2 import Olmo2DecoderLayer, Olmo2RMSNorm

__all__ = ["Attention", "CausalLM", "Decoder", "DecoderLayer", "FeedForward", "RMSNorm", "apply_rope", "rope_cos_sin", "rope_inv_freq"]

# `ModelConfig.block` -> (its layer class, its norm class: the final norm's).
BLOCKS: dict[str, tuple[type[nn.Module], type[RMSNorm]]] = {
    "llama": (DecoderLayer, RMSNorm),
    "gemma": (GemmaDecoderLayer, GemmaRMSNorm),
    "olmo2": (Olmo2DecoderLayer, Olmo2RMSNorm),
}


class Decoder(nn.Module):
    """Token embedding, the stack of decoder layers and the final norm: tokens -> hidden states."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        layer, norm = BLOCKS[config.block]
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.layers = nn.ModuleList(layer(config, index) for index in range(config.num_layers))
        self.norm = norm(config.embed_dim, config.norm_eps)
        # Recompute each layer's activations in backward instead of storing them: memory for time.
        self.activation_checkpointing = False

    def forward(self, tokens: Tensor, positions: Tensor | None = None, attn_mask: Tensor | None = None, cache_pos: Tensor | None = None, seq_lens: list[list[int]] | None = None) -> Tensor:
        """tokens [B, T] -> hidden states [B, T, E]; see `CausalLM.forward` for the arguments.

        The attention inputs (rotary tables, mask or packed lengths, window) are built once here
        for each kind of layer (its window and rotary base; one kind unless `layer_types` mixes
        sliding and full layers) and shared by every layer of that kind:

            seq_lens ─► segments ──► packed rows (one sample per attention call) ─┐
            cache_pos ─► kv_len, causal mask over the cache slots ────────────────┤ (+ sliding band past the window)
            positions (given, per packed sample from 0, cache_pos, or 0..T-1) ─► cos, sin (per rotary base)
            tokens ─► embed_tokens (× sqrt(E) for Gemma) ─► x ─► layer 0 ... layer N-1 (each: x + its kind's inputs) ─► norm ─► hidden
        """
        T = tokens.shape[1]
        device = tokens.device
        segments = check_seq_lens(seq_lens, tokens.shape, attn_mask, cache_pos)
        kv_len = 0
        if cache_pos is not None:
            # The new tokens occupy slots cache_pos; attention looks at every slot up to the last.
            # A given mask says how many (no GPU sync); else read it off cache_pos, causal.
            if attn_mask is not None:
                kv_len = attn_mask.shape[-1]
            else:
                kv_len = int(cache_pos[-1]) + 1
                attn_mask = (torch.arange(kv_len, device=device) <= cache_pos[:, None])[None, None]
        if positions is None:
            if segments is not None:  # each packed sample counts its positions from 0
                positions = packed_positions(segments).to(device)
            else:
                positions = cache_pos if cache_pos is not None else torch.arange(T, device=device)
        x = self.embed_tokens(tokens)
        if self.config.block == "gemma":  # sqrt(E) rounded to the weights' dtype first, as transformers
            x = x * torch.tensor(self.config.embed_dim**0.5, dtype=x.dtype, device=device)
        packed = None if segments is None else PackedRows.build(segments, tokens.shape[0], device)
        q_scale = None
        if self.config.query_scale_beta is not None:  # Ministral 3: 1 + beta * log(1 + floor(position / original context))
            scale = 1 + self.config.query_scale_beta * torch.log(1 + torch.floor(positions / self.config.rope_original_max_seq_len))
            q_scale = scale.view(-1, 1, positions.shape[-1], 1)  # [B or 1, 1, T, 1]
        rotary: dict[float | None, tuple[Tensor, Tensor]] = {}
        seq_len = 0
        if self.config.rope_type == "longrope":  # its factors depend on the largest position (a sync; on meta, estimates: the length)
            seq_len = positions.shape[-1] if positions.is_meta else int(positions.max()) + 1
        kinds: dict[tuple[int | None, float | None], dict] = {}
        for index, layer in enumerate(self.layers):
            window, base = self.config.layer_window(index), self.config.layer_rope_base(index)
            if base not in rotary:  # None: the config's rotary (type, scaling); else a sliding layer's own base, unscaled
                inv_freq = rope_inv_freq(self.config, device, seq_len) if base is None else None
                scale = self.config.rope_attention_factor if base is None else 1.0
                rotary[base] = rope_cos_sin(positions, self.config.rotary_dim, base or self.config.rope_base, x.dtype, inv_freq, scale)
            if (window, base) not in kinds:
                mask, rows = self._windowed(window, T, segments, packed, attn_mask, cache_pos, kv_len, device)
                cos, sin = rotary[base]
                kinds[window, base] = dict(cos=cos, sin=sin, attn_mask=mask, cache_pos=cache_pos, kv_len=kv_len, packed=rows, q_scale=q_scale)
            inputs = kinds[window, base]
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False, **inputs)
            else:
                x = layer(x, **inputs)
        return self.norm(x)

    @staticmethod
    def _windowed(
        window: int | None, T: int, segments: list[list[int]] | None, packed: PackedRows | None, attn_mask: Tensor | None, cache_pos: Tensor | None, kv_len: int, device: torch.device
    ) -> tuple[Tensor | None, PackedRows | None]:
        """(mask, packed rows) of a layer with attention `window` (None: full): the band is added only
        where some query could see past the window; then packed samples become one explicit mask."""
        if window is None:
            return attn_mask, packed
        if cache_pos is not None:
            # slots differ as positions do, padding or not
            return (attn_mask & sliding_window_band(cache_pos, kv_len, window) if kv_len > window else attn_mask), None
        if (T if segments is None else max(max(row) for row in segments)) <= window:
            return attn_mask, packed
        # Some sequence is longer than the window: an explicit mask (rare for Mistral's 4096+; Gemma's layers alternate).
        if segments is not None:
            attn_mask = packed_causal_mask(segments, T, device)
        elif attn_mask is None:
            attn_mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
        return attn_mask & sliding_window_band(torch.arange(T, device=device), T, window), None


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
        Gemma 2's final soft-cap: cap * tanh(logits / cap), as transformers computes it.
        """
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def plain_head_weight(self) -> Tensor | None:
        """The head's [V, E] weight W when `logits(h)` is exactly `h @ W.T` (a bias-free `nn.Linear`, no
        adapter, nothing applied after it), so a chunked kernel may compute the logits itself
        (`training/loss.py`); None when only `logits` computes them (e.g. a LoRA-adapted head, or a
        soft-capped one: Gemma 2)."""
        head = self.lm_head
        plain = type(head) is nn.Linear and head.bias is None and self.config.final_logit_softcap is None
        return head.weight if plain else None

    def capped_head(self) -> tuple[Tensor, float] | None:
        """(W, cap) when `logits(h)` is exactly cap * tanh(h @ W.T / cap): a plain head under a final soft-cap
        (Gemma 2), which the training loss's chunked kernel applies itself (`training/loss.py`); else None."""
        head, cap = self.lm_head, self.config.final_logit_softcap
        return (head.weight, cap) if cap is not None and type(head) is nn.Linear and head.bias is None else None

    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None, attn_mask: Tensor | None = None, seq_lens: list[list[int]] | None = None) -> Tensor:
        """tokens [B, T] -> the final norm's output [B, T, E], before the output head.

        Training computes the head only where there is a label (see `FinetuneModule.loss_sum`).
        Under FSDP2 this is registered as a forward method (`sharding.shard_model`), so the root
        unit's parameters (embeddings, norm, head) are gathered as for `forward`.
        """
        return self.model(tokens, positions, attn_mask, seq_lens=seq_lens)

    def router_aux_loss(self, mask: Tensor | None = None) -> Tensor | None:
        """The load-balancing loss of the router logits the sparse layers kept in the last training forward
        (`moe.load_balancing_loss`, transformers' `router_aux_loss`), unweighted; they are released.
        `mask` [B, T]: 1 for real tokens, 0 for padding. None for a dense model or after no training forward."""
        logits = self.take_router_logits()
        if not logits:
            return None
        return load_balancing_loss(logits, self.config.num_experts, self.config.num_experts_per_tok, mask)

    def take_router_logits(self) -> list[Tensor]:
        """The router logits the sparse layers kept in the last training forward, released from the layers
        (a recipe whose loss leaves the load-balancing term out just drops them)."""
        layers = [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoE)]
        logits = [moe.router_logits for moe in layers if moe.router_logits is not None]
        for moe in layers:
            moe.router_logits = None
        return logits

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
            elif isinstance(module, RMSNorm):  # 1, or 0 for a (1 + w) norm (Gemma), as transformers initialises them
                apply(module.weight, lambda w, value=module.init_value: nn.init.constant_(w, value))
            elif isinstance(module, Attention) and module.attention_sinks:  # gpt-oss's sink logits: normal, as transformers
                apply(module.sinks, lambda w: nn.init.normal_(w, mean=0.0, std=std))
            elif isinstance(module, (Experts, Router)):  # stacked expert weights and the router: normal, biases zero
                for name, param in module.named_parameters(recurse=False):
                    apply(param, nn.init.zeros_ if name.endswith("bias") else (lambda w: nn.init.normal_(w, mean=0.0, std=std)))
