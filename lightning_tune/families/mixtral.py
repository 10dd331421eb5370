"""Mixtral (Mistral AI, 2023-24): Mistral's decoder with a sparse mixture of 8 experts of `intermediate_size` in
every layer, 2 per token, chosen by softmax over the 8 then top-2, renormalised.

`model_type: mixtral`. Values from each repository's config.json (linked per size). The Hub stores the
layer as `block_sparse_moe` with each expert's `w1` (gate), `w3` (up), `w2` (down) separately;
transformers 5 (and we) name it `mlp` and stack the experts (`model/moe.py`).
"""

from __future__ import annotations

from lightning_tune.families.base import Family, HFMapping, Size

MIXTRAL_HF = HFMapping(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    defaults={
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "head_dim": None,
        "num_key_value_heads": 8,
        "sliding_window": None,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
    },
    attention_bias="never",
    sliding_window="all",
    experts="mixtral",
)

_BASE = dict(vocab_size=32000, num_kv_heads=8, max_seq_len=32768, norm_eps=1e-5, rope_base=1000000.0, model_type="mixtral", num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02)

FAMILY = Family(
    name="mixtral",
    hf=MIXTRAL_HF,
    sizes={
        "mixtral_8x7b": Size({**_BASE, "num_layers": 32, "num_heads": 32, "embed_dim": 4096, "intermediate_dim": 14336}, 46_702_792_704, "mistralai/Mixtral-8x7B-Instruct-v0.1"),
        # Instruct v0.1 of 8x22B has the v3 (32768-token) vocabulary; the base v0.1 has 32000
        "mixtral_8x22b": Size(
            {**_BASE, "vocab_size": 32768, "num_layers": 56, "num_heads": 48, "embed_dim": 6144, "intermediate_dim": 16384, "max_seq_len": 65536},
            140_630_071_296,
            "mistralai/Mixtral-8x22B-Instruct-v0.1",
        ),
    },
    special_tokens={"bos": ("<s>", 1), "eos": ("</s>", 2)},
    stop_tokens=("eos",),
    chat_template="mistral",
)
