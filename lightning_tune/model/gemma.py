"""Gemma 2 / 3's block: (1 + w) RMSNorm and four norms per layer ("sandwich": each sub-block's output is normed
before it joins the residual), built from the shared attention and gated MLP (`layers.py`).

The rest of Gemma is data the shared parts read from `ModelConfig`: GeGLU (`hidden_act`), the score
scale (`query_pre_attn_scalar`), q/k norm (Gemma 3), soft-capped scores (Gemma 2), sliding / full
layers and two rotary bases (`layer_types`, `rope_local_base`); the embedding's sqrt(E) scale is
applied by `Decoder`, the final logit cap by `CausalLM.logits`. As transformers'
`models/gemma3/modeling_gemma3.py` and `models/gemma2/modeling_gemma2.py` compute them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_tune.families.config import ModelConfig
from lightning_tune.model.attention import PackedRows
from lightning_tune.model.layers import Attention, FeedForward, RMSNorm


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + w), in fp32 and cast back once at the end (w starts at 0: the identity scale)."""

    init_value = 0.0

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class GemmaDecoderLayer(nn.Module):
    """x + post_attn_norm(attn(input_norm(x))), then h + post_ffn_norm(mlp(pre_ffn_norm(h))).

    `post_attention_layernorm` keeps transformers' name but norms the attention's output (in Llama the
    same name is the MLP's input norm), so checkpoints load with no renaming.
    """

    def __init__(self, config: ModelConfig, index: int = 0) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.norm_eps
        self.input_layernorm = GemmaRMSNorm(dim, eps)
        self.self_attn = Attention(config, norm=GemmaRMSNorm)
        self.post_attention_layernorm = GemmaRMSNorm(dim, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(dim, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(dim, eps)
        self.mlp = FeedForward(dim, config.intermediate_dim, config.mlp_bias, config.hidden_act)

    def forward(
        self, x: Tensor, *, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None, cache_pos: Tensor | None = None, kv_len: int = 0, packed: PackedRows | None = None, q_scale: Tensor | None = None
    ) -> Tensor:
        """x [B, T, E] -> [B, T, E] (arguments as `DecoderLayer.forward`)."""
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache_pos, kv_len, packed, q_scale))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
