"""Qwen 3 dense (Alibaba, 2025): per-head RMSNorm on q and k before the rotary embedding, head_dim 128
decoupled from embed_dim / num_heads, no attention bias, rotary base 1e6.

`model_type: qwen3`. 0.6B / 1.7B / 4B tie the output head to the embedding. Values from each
repository's config.json (linked per size; litgpt's `config.py` records the same). The `Qwen/Qwen3-*`
repositories hold the post-trained (hybrid thinking) models; `Qwen/Qwen3-*-Base` the base ones, same shapes.
"""

from __future__ import annotations

from lightning_tune.families.base import Family, HFMapping, Size
from lightning_tune.families.qwen2 import QWEN_TOKENS

QWEN3_HF = HFMapping(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    defaults={
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "head_dim": 128,
        "num_key_value_heads": 32,
        "use_sliding_window": False,
        "max_window_layers": 28,
    },
    attention_bias="flag",
    qk_norm=True,
    sliding_window="per_layer",
)

_BASE = dict(vocab_size=151936, max_seq_len=40960, norm_eps=1e-6, rope_base=1000000.0, head_dim=128, qk_norm=True, num_kv_heads=8, model_type="qwen3")
_TIED = {**_BASE, "tie_word_embeddings": True}

FAMILY = Family(
    name="qwen3",
    hf=QWEN3_HF,
    sizes={
        "qwen3_0_6b": Size({**_TIED, "num_layers": 28, "num_heads": 16, "embed_dim": 1024, "intermediate_dim": 3072}, 596_049_920, "Qwen/Qwen3-0.6B"),
        "qwen3_1_7b": Size({**_TIED, "num_layers": 28, "num_heads": 16, "embed_dim": 2048, "intermediate_dim": 6144}, 1_720_574_976, "Qwen/Qwen3-1.7B"),
        "qwen3_4b": Size({**_TIED, "num_layers": 36, "num_heads": 32, "embed_dim": 2560, "intermediate_dim": 9728}, 4_022_468_096, "Qwen/Qwen3-4B"),
        "qwen3_8b": Size({**_BASE, "num_layers": 36, "num_heads": 32, "embed_dim": 4096, "intermediate_dim": 12288}, 8_190_735_360, "Qwen/Qwen3-8B"),
        "qwen3_14b": Size({**_BASE, "num_layers": 40, "num_heads": 40, "embed_dim": 5120, "intermediate_dim": 17408}, 14_768_307_200, "Qwen/Qwen3-14B"),
        "qwen3_32b": Size({**_BASE, "num_layers": 64, "num_heads": 64, "embed_dim": 5120, "intermediate_dim": 25600}, 32_762_123_264, "Qwen/Qwen3-32B"),
    },
    special_tokens=QWEN_TOKENS,
    stop_tokens=("end_of_turn", "eos"),
    chat_template="qwen3",
)
