"""Ministral 3 / Mistral 3 text decoder (Mistral AI, December 2025; `model_type: ministral3`): Mistral's blocks
with YaRN rotary scaling (factor 16 over an original context of 16384, base 1e6) and Llama 4's
position-dependent query scaling, q * (1 + 0.1 * log(1 + floor(position / 16384))), after the rotary
embedding. head_dim 128, a 131072-token Tekken vocabulary.

The 8B is transformers' `Ministral3Config` defaults, which its docstring ties to
mistralai/Ministral-3-8B-Base-2512 [unconfirmed against the Hub file]. The 3B (hidden 3072, 26 layers,
intermediate 9216, tied head, the same rotary) is the text_config that three independent public copies
of the 3B's config agree on [not read from the Hub file]; its count, 3.43B, is the model card's "3.4B
Language Model". No 14B: no public copy of its text_config was found. The released repositories are
multimodal (`Mistral3ForConditionalGeneration`, `text_config` + `language_model.` weights; their text
decoder loads, the vision tower is left out: `checkpoint/hf.py`); the Instruct ones ship the decoder's
projections in FP8, one scale per tensor, dequantised as they load (`checkpoint/fp8.py`).
"""

from __future__ import annotations

from lightning_tune.families.base import Family, HFMapping, Size

# Ministral3Config's rotary parameters when config.json gives none
_DEFAULT_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 1000000.0,
    "factor": 16.0,
    "original_max_position_embeddings": 16384,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale_all_dim": 1.0,
    "mscale": 1.0,
    "llama_4_scaling_beta": 0.1,
}

MINISTRAL3_HF = HFMapping(
    model_type="ministral3",
    architecture="Ministral3ForCausalLM",
    # transformers' Ministral3Config defaults for keys a config.json may leave out
    defaults={
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "head_dim": 128,
        "num_key_value_heads": 8,
        "sliding_window": None,
        "pad_token_id": 11,
        "rope_parameters": _DEFAULT_ROPE,
    },
    attention_bias="never",
    sliding_window="all",
    rope_types=("default", "yarn"),
    query_scale=True,
)

_YARN = dict(rope_type="yarn", rope_factor=16.0, rope_original_max_seq_len=16384, rope_beta_fast=32.0, rope_beta_slow=1.0, rope_attention_factor=1.0, query_scale_beta=0.1)

FAMILY = Family(
    name="ministral3",
    hf=MINISTRAL3_HF,
    sizes={
        "ministral3_8b": Size(
            dict(
                vocab_size=131072,
                num_layers=34,
                num_heads=32,
                num_kv_heads=8,
                head_dim=128,
                embed_dim=4096,
                intermediate_dim=14336,
                max_seq_len=262144,
                norm_eps=1e-5,
                rope_base=1000000.0,
                model_type="ministral3",
                **_YARN,
            ),
            8_489_553_920,
            "mistralai/Ministral-3-8B-Base-2512",
        ),
        "ministral3_3b": Size(
            dict(
                vocab_size=131072,
                num_layers=26,
                num_heads=32,
                num_kv_heads=8,
                head_dim=128,
                embed_dim=3072,
                intermediate_dim=9216,
                max_seq_len=262144,
                norm_eps=1e-5,
                rope_base=1000000.0,
                tie_word_embeddings=True,
                model_type="ministral3",
                **_YARN,
            ),
            3_429_006_336,
            "mistralai/Ministral-3-3B-Instruct-2512",
        ),
    },
    # Tekken: <s> 1, </s> 2, [INST] 3, [/INST] 4, <pad> 11
    special_tokens={"bos": ("<s>", 1), "eos": ("</s>", 2), "pad": ("<pad>", 11), "start_of_turn": ("[INST]", 3), "end_of_turn": ("[/INST]", 4)},
    stop_tokens=("eos",),
    chat_template="mistral",
)
