"""The network: the decoder every family shares (`CausalLM`, whose `logits` is the one place the head is\napplied), its layers (the Llama block\nand the families' own: `gemma`, `olmo2`), its attention kernels, and the builders by name."""

from lightning_tune.families.config import AttentionBias, ModelConfig, RopeType
from lightning_tune.model import builders
from lightning_tune.model.attention import (
    CPU_FP32_ATTENTION_MAX_LEN,
    KVCache,
    PackedRows,
    check_seq_lens,
    cpu_attention_in_fp32,
    no_cpu_autocast,
    packed_causal_mask,
    packed_positions,
    sample_offsets,
    segment_attention,
    sliding_window_band,
    varlen_attention,
)
from lightning_tune.model.builders import Llama, LlamaConfig, llama2, llama2_7b, llama2_13b, llama2_70b, llama2_config, model_config, tiny_llama2
from lightning_tune.model.decoder import BLOCKS, CausalLM, Decoder
from lightning_tune.model.gemma import GemmaDecoderLayer, GemmaRMSNorm
from lightning_tune.model.layers import Attention, DecoderLayer, FeedForward, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from lightning_tune.model.olmo2 import Olmo2Attention, Olmo2DecoderLayer, Olmo2RMSNorm

__all__ = [
    "Attention",
    "AttentionBias",
    "BLOCKS",
    "CPU_FP32_ATTENTION_MAX_LEN",
    "CausalLM",
    "Decoder",
    "DecoderLayer",
    "FeedForward",
    "GemmaDecoderLayer",
    "GemmaRMSNorm",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "ModelConfig",
    "Olmo2Attention",
    "Olmo2DecoderLayer",
    "Olmo2RMSNorm",
    "PackedRows",
    "RMSNorm",
    "RopeType",
    "apply_rope",
    "check_seq_lens",
    "cpu_attention_in_fp32",
    "llama2",
    "llama2_13b",
    "llama2_70b",
    "llama2_7b",
    "llama2_config",
    "model_config",
    "no_cpu_autocast",
    "packed_causal_mask",
    "packed_positions",
    "rope_cos_sin",
    "rope_inv_freq",
    "sample_offsets",
    "segment_attention",
    "sliding_window_band",
    "tiny_llama2",
    "varlen_attention",
]


def __getattr__(name: str):
    return builders.__getattr__(name)  # LLAMA2_SIZES, the old name of every size's fields
