"""ModelConfig: the validated hyper-parameters of one decoder (every family's numbers are one of these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

RopeType = Literal["default", "llama3", "linear"]
AttentionBias = Literal["none", "qkv", "all"]


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
}


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
