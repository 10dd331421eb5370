"""ModelConfig: the validated hyper-parameters of one decoder (every family's numbers are one of these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

RopeType = Literal["default", "llama3", "linear", "longrope", "yarn"]
ROPE_TYPES = ("default", "llama3", "linear", "longrope", "yarn")
AttentionBias = Literal["none", "qkv", "all"]
Block = Literal["llama", "gemma", "olmo2"]
Activation = Literal["silu", "gelu_pytorch_tanh"]
LayerType = Literal["full_attention", "sliding_attention"]
BLOCKS = ("llama", "gemma", "olmo2")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
Router = Literal["softmax_topk", "topk_softmax"]
ROUTERS = ("softmax_topk", "topk_softmax")


# Upper bounds, far above every released model (the largest today: 126 layers, embed 16384, MLP 53248, a
# 262144-token vocabulary, 10M positions), so that numbers read from a file (config.json, params.json, GGUF
# metadata) cannot make the model skeleton, or the rotary tables sized from it, take the machine.
LIMITS = {
    "vocab_size": 2**22,
    "num_layers": 1024,
    "num_heads": 1024,
    "num_kv_heads": 1024,
    "embed_dim": 2**17,
    "intermediate_dim": 2**20,
    "max_seq_len": 2**24,
    "head_dim": 2048,
    "num_experts": 4096,
}


def repeat_pattern(layer_types: tuple[str, ...], num_layers: int) -> tuple[str, ...]:
    """`layer_types` continued (or cut) to `num_layers` by its shortest period (Gemma 3: 5 sliding, 1 full)."""
    period = next(p for p in range(1, len(layer_types) + 1) if all(t == layer_types[i % p] for i, t in enumerate(layer_types)))
    return layer_types if len(layer_types) == num_layers else tuple(layer_types[i % period] for i in range(num_layers))


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

    The block switches (transformers' names in brackets):
    `block` picks the layer class: "llama" (pre-norm), "gemma" (Gemma 2 / 3: (1 + w) RMSNorm with
    zero-initialised weights, embedding times sqrt(embed_dim), four norms per layer) or "olmo2"
    (OLMo 2: norms after attention and MLP inside the residual, q/k norm over the whole projection).
    `hidden_act` [hidden_act / hidden_activation]: the gated MLP's activation.
    `query_pre_attn_scalar`: attention scores scaled by its -1/2 power instead of head_dim's.
    `attn_logit_softcap` / `final_logit_softcap` [attn_logit_softcapping / final_logit_softcapping]:
    scores, or the output logits, become cap * tanh(x / cap) (Gemma 2).
    `layer_types`: one "full_attention" / "sliding_attention" per layer (a list of another length is
    continued by its shortest period); None means every layer uses `sliding_window` (None: none). `rope_local_base`: the rotary base of the sliding layers,
    with the default (unscaled) rotary type (Gemma 3's two bases); None: the same rotary as the
    full layers. `rope_partial_factor` [partial_rotary_factor]: the rotary embedding turns the first
    int(head_dim * factor) features of each head, the rest pass through (Phi-4-mini: 0.75).
    `longrope` (Phi-3 / 4 long-context): the frequencies are divided per frequency by
    `rope_short_factor`, or by `rope_long_factor` in a forward whose largest position reaches
    `rope_original_max_seq_len`; cos and sin are multiplied by `rope_attention_factor` (resolved
    from config.json as transformers resolves it). `yarn` (Ministral 3): transformers'
    `_compute_yarn_parameters` with `rope_factor`, `rope_original_max_seq_len`, `rope_beta_fast` /
    `rope_beta_slow` and `rope_truncate`; cos and sin times `rope_attention_factor` too.
    `query_scale_beta` [rope_parameters.llama_4_scaling_beta]: after the rotary embedding, q is
    multiplied by 1 + beta * log(1 + floor(position / rope_original_max_seq_len)) (Ministral 3).

    `attention_sinks`: each head has a learned logit in its softmax that attends to nothing (gpt-oss).

    Mixture of experts (`model/moe.py`; 0 experts: every MLP dense):
    `num_experts` [num_experts / num_local_experts] experts of `moe_intermediate_dim`
    [moe_intermediate_size; Mixtral: intermediate_size] per sparse layer, `num_experts_per_tok` of them
    per token. `router`: "softmax_topk" (Qwen3-MoE, Mixtral: softmax over every expert, the top k
    kept, renormalised to sum 1 when `norm_topk_prob`) or "topk_softmax" (gpt-oss: the top k logits,
    then a softmax over them). `router_aux_loss_coef`: the load-balancing loss's weight in training.
    A layer is sparse unless listed in `mlp_only_layers`, and only every `decoder_sparse_step`-th
    (Qwen3-MoE's rule); the others keep a dense MLP of `intermediate_dim`.
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
    block: Block = "llama"
    hidden_act: Activation = "silu"
    query_pre_attn_scalar: int | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    layer_types: tuple[LayerType, ...] | None = None
    rope_local_base: float | None = None
    rope_partial_factor: float = 1.0
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    rope_attention_factor: float = 1.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    query_scale_beta: float | None = None
    attention_sinks: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_dim: int = 0
    router: Router = "softmax_topk"
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {getattr(self, name)}")
            if getattr(self, name) > LIMITS[name]:  # a config read from a file must not build a skeleton without end
                raise ValueError(f"ModelConfig.{name} must be at most {LIMITS[name]:,}, got {getattr(self, name):,}")
        if self.head_dim > LIMITS["head_dim"]:
            raise ValueError(f"ModelConfig.head_dim must be at most {LIMITS['head_dim']:,}, got {self.head_dim:,}")
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
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"ModelConfig.rope_type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if not 0 < self.rope_partial_factor <= 1 or self.rotary_dim % 2 or not self.rotary_dim:
            raise ValueError(f"ModelConfig.rope_partial_factor must be in (0, 1] and turn an even number of features, got {self.rope_partial_factor} of {self.head_dim}")
        for name in ("rope_short_factor", "rope_long_factor"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(f) for f in getattr(self, name)))
        if self.rope_type == "longrope":
            for name in ("rope_short_factor", "rope_long_factor"):
                factors = getattr(self, name)
                if factors is None or len(factors) != self.rotary_dim // 2 or not all(f > 0 for f in factors):
                    raise ValueError(f"ModelConfig.{name} must hold {self.rotary_dim // 2} positive factors for longrope, got {factors}")
        if self.rope_type in ("linear", "llama3", "yarn") and self.rope_factor <= 0:
            raise ValueError(f"ModelConfig.rope_factor must be > 0, got {self.rope_factor}")
        if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(f"ModelConfig.rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed rope_low_freq_factor ({self.rope_low_freq_factor})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be a positive integer or None, got {self.sliding_window}")
        if self.block not in BLOCKS:
            raise ValueError(f"ModelConfig.block must be one of {', '.join(BLOCKS)}, got {self.block!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.hidden_act must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "rope_local_base"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0 or None, got {getattr(self, name)}")
        if self.layer_types is not None:
            if not self.layer_types or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ValueError(f"ModelConfig.layer_types must list {', '.join(LAYER_TYPES)} per layer, got {list(self.layer_types)}")
            # a tuple (a list from YAML / JSON: hashable, comparable); another length than num_layers (a size
            # with fewer layers for a demo, one layer measured) continues its shortest period (Gemma 3: 6)
            object.__setattr__(self, "layer_types", repeat_pattern(tuple(self.layer_types), self.num_layers))
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("ModelConfig.layer_types has sliding_attention layers but sliding_window is None")
        self._check_experts()

    def _check_experts(self) -> None:
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if not self.num_experts:
            return
        if not 0 < self.num_experts <= LIMITS["num_experts"]:
            raise ValueError(f"ModelConfig.num_experts must be between 0 (dense) and {LIMITS['num_experts']:,}, got {self.num_experts}")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"ModelConfig.num_experts_per_tok must be between 1 and num_experts ({self.num_experts}), got {self.num_experts_per_tok}")
        if not 0 <= self.moe_intermediate_dim <= LIMITS["intermediate_dim"]:
            raise ValueError(f"ModelConfig.moe_intermediate_dim must be between 0 (= intermediate_dim) and {LIMITS['intermediate_dim']:,}, got {self.moe_intermediate_dim}")
        if not self.moe_intermediate_dim:
            object.__setattr__(self, "moe_intermediate_dim", self.intermediate_dim)
        if self.router not in ROUTERS:
            raise ValueError(f"ModelConfig.router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.decoder_sparse_step <= 0:
            raise ValueError(f"ModelConfig.decoder_sparse_step must be a positive integer, got {self.decoder_sparse_step}")
        if not self.router_aux_loss_coef >= 0:
            raise ValueError(f"ModelConfig.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if self.block != "llama" or self.hidden_act != "silu":
            raise ValueError(f"ModelConfig: experts (num_experts {self.num_experts}) are built for the llama block with silu, got block {self.block!r}, hidden_act {self.hidden_act!r}")

    @property
    def rotary_dim(self) -> int:
        """How many features of each head the rotary embedding turns."""
        return int(self.head_dim * self.rope_partial_factor)

    def layer_window(self, index: int) -> int | None:
        """The attention window of layer `index` (None: full causal attention)."""
        if self.layer_types is None or self.layer_types[index] == "sliding_attention":
            return self.sliding_window
        return None

    def layer_rope_base(self, index: int) -> float | None:
        """The rotary base of layer `index` when it is `rope_local_base` (a sliding layer's own), else None."""
        if self.rope_local_base is not None and self.layer_window(index) is not None:
            return self.rope_local_base
        return None

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` has experts (else a dense MLP): transformers' Qwen3-MoE rule."""
        return self.num_experts > 0 and index not in self.mlp_only_layers and (index + 1) % self.decoder_sparse_step == 0

    def to_dict(self) -> dict:
        return asdict(self)
