"""Phi-4 (Microsoft, 2024): Phi-3's decoder (`model_type: phi3`, fused projections) at 14B, GQA 40/10 heads,
rotary base 250000, a 100352-row vocabulary (cl100k-based, ChatML turns).

From microsoft/phi-4's config.json (litgpt's `config.py` records the same).
"""

from __future__ import annotations

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
