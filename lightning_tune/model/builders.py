"""Builders by name (llama2_7b(), tiny_llama2(), model_config) and the names from before the families work
(Llama, LlamaConfig, llama2_config, LLAMA2_SIZES), kept for existing code and configs: the one compatibility module."""

from __future__ import annotations

from lightning_tune.families import SIZES
from lightning_tune.families import model_config as registry_config
from lightning_tune.families.config import ModelConfig
from lightning_tune.model.decoder import CausalLM

LlamaConfig = ModelConfig  # the name before the families work; kept so existing code and configs run


Llama = CausalLM  # the name before the families work; kept so existing code runs


# Builders. The named sizes of every family, with their sources, live in `lightning_tune.families`.


def model_config(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of a named size of any family (e.g. "llama3_1_8b"), with fields overridden."""
    return registry_config(name, **overrides)


llama2_config = model_config  # the name before the families work


def __getattr__(name: str):
    # LLAMA2_SIZES: every named size's ModelConfig fields (all families, not only Llama 2, despite the
    # old name), as plain dicts.
    if name == "LLAMA2_SIZES":
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
