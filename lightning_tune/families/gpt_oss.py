"""gpt-oss (OpenAI, 2025): a mixture of experts in every layer (32 or 128 experts, 4 per token: the top 4 router
logits, a bias added, then a softmax over those 4), experts with biases and a clamped SwiGLU, attention with
biases and a learned sink logit per head, sliding (128 tokens) and full layers alternating, YaRN rotary.

`model_type: gpt_oss`. Values from each repository's config.json (linked per size) and transformers'
`GptOssConfig`. The Hub's `openai/gpt-oss-*` store the experts in MXFP4 (`*_blocks`, `*_scales`), which
load dequantised (`checkpoint/mxfp4.py`); bf16 copies store them as transformers holds them.
"""

from __future__ import annotations

from lightning_tune.families.base import Family, HFMapping, Size

GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096, "rope_theta": 150000.0}

GPT_OSS_HF = HFMapping(
    model_type="gpt_oss",
    architecture="GptOssForCausalLM",
    defaults={
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000.0,
        "rope_parameters": GPT_OSS_YARN,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "head_dim": 64,
        "num_key_value_heads": 8,
        "sliding_window": 128,
        "sliding_window_pattern": 2,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "router_aux_loss_coef": 0.001,
    },
    attention_bias="flag",
    sliding_window="layer_types",
    rope_types=("default", "yarn"),
    experts="gpt_oss",
    attention_sinks=True,
)

_BASE = dict(
    vocab_size=201088,
    embed_dim=2880,
    intermediate_dim=2880,
    num_heads=64,
    num_kv_heads=8,
    head_dim=64,
    max_seq_len=131072,
    norm_eps=1e-5,
    attention_bias="all",
    attention_sinks=True,
    sliding_window=128,
    layer_types=("sliding_attention", "full_attention"),
    rope_type="yarn",
    rope_base=150000.0,
    rope_factor=32.0,
    rope_original_max_seq_len=4096,
    rope_beta_fast=32.0,
    rope_beta_slow=1.0,
    rope_truncate=False,
    rope_attention_factor=1.3465735902799727,  # YaRN's 0.1 * ln(32) + 1
    model_type="gpt_oss",
    num_experts_per_tok=4,
    router="topk_softmax",
    router_aux_loss_coef=0.9,
)

FAMILY = Family(
    name="gpt_oss",
    hf=GPT_OSS_HF,
    sizes={
        "gpt_oss_20b": Size({**_BASE, "num_layers": 24, "num_experts": 32}, 20_914_757_184, "openai/gpt-oss-20b"),
        "gpt_oss_120b": Size({**_BASE, "num_layers": 36, "num_experts": 128}, 116_829_156_672, "openai/gpt-oss-120b"),
    },
    special_tokens={"bos": ("<|startoftext|>", 199998), "eos": ("<|return|>", 200002), "pad": ("<|endoftext|>", 199999), "end_of_turn": ("<|end|>", 200007), "call": ("<|call|>", 200012)},
    stop_tokens=("eos", "pad", "call"),  # generation_config.json: <|return|>, <|endoftext|>, <|call|>
    chat_template=None,
)
