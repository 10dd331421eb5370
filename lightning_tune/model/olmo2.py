"""OLMo 2's block: no input norm; the attention's and the MLP's outputs are normed inside the residual, and
q / k are normed over the whole projection (all heads together) before the head split and the rotary
embedding. As transformers' `models/olmo2/modular_olmo2.py` computes it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from lightning_tune.families.config import ModelConfig
from lightning_tune.model.attention import PackedRows
from lightning_tune.model.layers import Attention, FeedForward, RMSNorm


class Olmo2RMSNorm(RMSNorm):
    """RMSNorm whose weight multiplies in fp32, cast back after (Llama's casts first; equal in fp32)."""

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


class Olmo2Attention(Attention):
    """`Attention` with q_norm over H * D and k_norm over K * D features, applied to the projections."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(replace(config, qk_norm=False))  # its own norms, below
        self.qk_norm = True
        self.q_norm = Olmo2RMSNorm(config.num_heads * config.head_dim, config.norm_eps)
        self.k_norm = Olmo2RMSNorm(config.num_kv_heads * config.head_dim, config.norm_eps)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(B, T, self.num_heads, self.head_dim)
        k = self.k_norm(self.k_proj(x)).view(B, T, self.num_kv_heads, self.head_dim)
        return q, k, self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)


class Olmo2DecoderLayer(nn.Module):
    """h = x + post_attention_layernorm(attn(x)); out = h + post_feedforward_layernorm(mlp(h))."""

    def __init__(self, config: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(config)
        self.post_attention_layernorm = Olmo2RMSNorm(config.embed_dim, config.norm_eps)
        self.mlp = FeedForward(config.embed_dim, config.intermediate_dim, config.mlp_bias, config.hidden_act)
        self.post_feedforward_layernorm = Olmo2RMSNorm(config.embed_dim, config.norm_eps)

    def forward(
        self, x: Tensor, *, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None, cache_pos: Tensor | None = None, kv_len: int = 0, packed: PackedRows | None = None, q_scale: Tensor | None = None
    ) -> Tensor:
        """x [B, T, E] -> [B, T, E] (arguments as `DecoderLayer.forward`)."""
        h = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, attn_mask, cache_pos, kv_len, packed, q_scale))
        return h + self.post_feedforward_layernorm(self.mlp(h))
