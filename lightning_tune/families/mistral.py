"""Mistral 7B v0.3 (Mistral AI, 2024): Llama blocks with GQA, a 32768-token SentencePiece vocabulary,
rotary base 1e6, and no sliding window (v0.1 had 4096; transformers' MistralConfig assumes 4096
when config.json leaves the key out, so the reader does too, and the model applies it).

`model_type: mistral`. Values from mistralai/Mistral-7B-v0.3's config.json (litgpt's entry agrees).
"""

from __future__ import annotations

from lightning_tune.families.base import Family, HFMapping, Size

MISTRAL_HF = HFMapping(
    model_type="mistral",
    architecture="MistralForCausalLM",
    defaults={"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "head_dim": None, "num_key_value_heads": 8, "sliding_window": 4096},
    attention_bias="never",
    sliding_window="all",
)

FAMILY = Family(
    name="mistral",
    hf=MISTRAL_HF,
    sizes={
        "mistral_7b_v0_3": Size(
            dict(
                vocab_size=32768,
                num_layers=32,
                num_heads=32,
                num_kv_heads=8,
                embed_dim=4096,
                intermediate_dim=14336,
                max_seq_len=32768,
                norm_eps=1e-5,
                rope_base=1000000.0,
                sliding_window=None,
                model_type="mistral",
            ),
            7_248_023_552,
            "mistralai/Mistral-7B-v0.3",
        ),
        # v0.1 (2023): a 32000-token vocabulary, rotary base 1e4, a 4096-token sliding window on every layer.
        "mistral_7b_v0_1": Size(
            dict(
                vocab_size=32000,
                num_layers=32,
                num_heads=32,
                num_kv_heads=8,
                embed_dim=4096,
                intermediate_dim=14336,
                max_seq_len=32768,
                norm_eps=1e-5,
                rope_base=10000.0,
                sliding_window=4096,
                model_type="mistral",
            ),
            7_241_732_096,
            "mistralai/Mistral-7B-v0.1",
        ),
    },
    special_tokens={"bos": ("<s>", 1), "eos": ("</s>", 2)},
    stop_tokens=("eos",),
    chat_template="mistral",
)
