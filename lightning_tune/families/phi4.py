"""Phi-4 (Microsoft, 2024): Phi-3's decoder (`model_type: phi3`, fused projections) at 14B, GQA 40/10 heads,
rotary base 250000, a 100352-row vocabulary (cl100k-based, ChatML turns).

From microsoft/phi-4's config.json (litgpt's `config.py` records the same). Phi-4-mini is `MINI_FAMILY` below.
"""

from __future__ import annotations

import math

from lightning_tune.families.base import Family, Size
from lightning_tune.families.phi3 import PHI3_HF

FAMILY = Family(
    name="phi4",
    hf=PHI3_HF,
    sizes={
        "phi4_14b": Size(
            dict(vocab_size=100352, num_layers=40, num_heads=40, num_kv_heads=10, embed_dim=5120, intermediate_dim=17920, max_seq_len=16384, rope_base=250000.0, model_type="phi3"),
            14_659_507_200,
            "microsoft/phi-4",
        ),
    },
    # tokenizer_config.json of microsoft/phi-4: <|endoftext|> 100257, <|im_start|> 100264, <|im_end|> 100265, <|dummy_85|> 100349 (pad).
    special_tokens={"bos": ("<|endoftext|>", 100257), "eos": ("<|im_end|>", 100265), "pad": ("<|dummy_85|>", 100349), "start_of_turn": ("<|im_start|>", 100264)},
    stop_tokens=("eos",),
    chat_template="phi4",
)


# microsoft/Phi-4-mini-instruct's LongRoPE factors (config.json `rope_scaling`, 48 = 96 rotary features / 2):
# short all 1, long as below; from a copy of that config.json in a public repository [unconfirmed against the Hub file].
PHI4_MINI_LONG_FACTOR = (
    1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898, 2.735880826,
    3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318,
    9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418,
    28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
)  # fmt: skip

# Phi-4-mini (Microsoft, February 2025): Phi-3's decoder at 3.8B with GQA 24/8 heads, three quarters of each
# 128-wide head turned by the rotary embedding (partial_rotary_factor 0.75: 96 features), LongRoPE from 4096
# to 131072 positions, a tied head and an o200k-based vocabulary of 200064 rows; its window (262144) is longer
# than its context, so attention is full. Its own family: its tokens are not Phi-4's (<|endoftext|> 199999,
# <|end|> 200020 ends a turn), and its chat template (Phi-3-like turns without newlines) ships with its tokenizer.
MINI_FAMILY = Family(
    name="phi4_mini",
    hf=PHI3_HF,
    sizes={
        "phi4_mini": Size(
            dict(
                vocab_size=200064,
                num_layers=32,
                num_heads=24,
                num_kv_heads=8,
                embed_dim=3072,
                intermediate_dim=8192,
                max_seq_len=131072,
                rope_base=10000.0,
                tie_word_embeddings=True,
                rope_partial_factor=0.75,
                sliding_window=262144,
                model_type="phi3",
                rope_type="longrope",
                rope_original_max_seq_len=4096,
                rope_short_factor=(1.0,) * 48,
                rope_long_factor=PHI4_MINI_LONG_FACTOR,
                rope_attention_factor=math.sqrt(1 + math.log(131072 / 4096) / math.log(4096)),  # transformers' longrope default
            ),  # fmt: skip
            3_836_021_760,
            "microsoft/Phi-4-mini-instruct",
        ),
    },
    special_tokens={"bos": ("<|endoftext|>", 199999), "eos": ("<|endoftext|>", 199999), "pad": ("<|endoftext|>", 199999), "end_of_turn": ("<|end|>", 200020)},
    stop_tokens=("eos", "end_of_turn"),
    chat_template=None,
)
