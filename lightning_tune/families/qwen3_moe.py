"""Qwen3-MoE (Alibaba, 2025): Qwen 3's attention (q/k RMSNorm before the rotary embedding, head_dim 128) with
a sparse mixture of 128 experts in every layer, 8 per token, chosen by softmax over all experts then top-k,
renormalised (`norm_topk_prob`, true in the released models); no shared expert.

`model_type: qwen3_moe`. Values from each repository's config.json (linked per size); the same numbers
are in slime's `scripts/models/qwen3-30B-A3B.sh` and `qwen3-235B-A22B.sh`. The Hub stores each expert's
`gate_proj` / `up_proj` / `down_proj` separately; transformers 5 (and we) stack them (`model/moe.py`).
"""

from __future__ import annotations

from lightning_tune.families.base import Family, HFMapping, Size
from lightning_tune.families.qwen2 import QWEN_TOKENS

QWEN3_MOE_HF = HFMapping(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    defaults={
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "head_dim": None,
        "num_key_value_heads": 4,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": False,
        "router_aux_loss_coef": 0.001,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    attention_bias="flag",
    qk_norm=True,
    sliding_window="per_layer",
    experts="qwen3_moe",
)

_BASE = dict(
    vocab_size=151936,
    max_seq_len=40960,
    norm_eps=1e-6,
    rope_base=1000000.0,
    head_dim=128,
    qk_norm=True,
    num_kv_heads=4,
    model_type="qwen3_moe",
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    router_aux_loss_coef=0.001,
)

FAMILY = Family(
    name="qwen3_moe",
    hf=QWEN3_MOE_HF,
    sizes={
        # 3.3B of the 30.5B parameters compute per token
        "qwen3_30b_a3b": Size({**_BASE, "num_layers": 48, "num_heads": 32, "embed_dim": 2048, "intermediate_dim": 6144, "moe_intermediate_dim": 768}, 30_532_122_624, "Qwen/Qwen3-30B-A3B"),
        "qwen3_235b_a22b": Size({**_BASE, "num_layers": 94, "num_heads": 64, "embed_dim": 4096, "intermediate_dim": 12288, "moe_intermediate_dim": 1536}, 235_093_634_560, "Qwen/Qwen3-235B-A22B"),
        # CPU demos and tests (tiny_moe.yaml): 4 sparse layers of 8 experts, 2 per token
        "tiny_qwen3_moe": Size(
            {
                **_BASE,
                "num_layers": 4,
                "num_heads": 4,
                "num_kv_heads": 2,
                "head_dim": 32,
                "embed_dim": 128,
                "intermediate_dim": 352,
                "moe_intermediate_dim": 96,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "max_seq_len": 1024,
            },
            40_277_376,
            None,
        ),
    },
    special_tokens=QWEN_TOKENS,
    stop_tokens=("end_of_turn", "eos"),
    chat_template="qwen3",
)
