"""Phi-3 (Microsoft, 2024): Llama blocks whose checkpoints fuse q/k/v into `qkv_proj` and gate/up into
`gate_up_proj` (split on load, fused on export: `checkpoint/tensors.py`), with optional partial rotary
(`partial_rotary_factor`, Phi-4-mini) and LongRoPE scaling (the 128k variants), a window of 2047 on the 4k
model. `model_type: phi3`, shared by Phi-4 (`phi4.py`).

Phi-3-mini-4k from microsoft/Phi-3-mini-4k-instruct's config.json (litgpt's `config.py` agrees on
the shapes; its window is 2048, the file's 2047).
"""

from __future__ import annotations

from lightning_tune.families.base import Family, HFMapping, Size

PHI3_HF = HFMapping(
    model_type="phi3",
    architecture="Phi3ForCausalLM",
    # transformers' Phi3Config defaults for keys a config.json may leave out
    defaults={"max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "head_dim": None, "sliding_window": None, "pad_token_id": 32000},
    attention_bias="never",
    sliding_window="all",
    rope_types=("default", "longrope"),
    partial_rotary=True,
    fused_projections=True,
)

FAMILY = Family(
    name="phi3",
    hf=PHI3_HF,
    sizes={
        "phi3_mini_4k": Size(
            dict(vocab_size=32064, num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=3072, intermediate_dim=8192, max_seq_len=4096, sliding_window=2047, model_type="phi3"),
            3_821_079_552,
            "microsoft/Phi-3-mini-4k-instruct",
        ),
    },
    # tokenizer_config.json / generation_config.json of Phi-3-mini-4k-instruct: eos [32000, 32001, 32007].
    special_tokens={"bos": ("<s>", 1), "eos": ("<|endoftext|>", 32000), "pad": ("<|endoftext|>", 32000), "assistant": ("<|assistant|>", 32001), "end_of_turn": ("<|end|>", 32007)},
    stop_tokens=("eos", "assistant", "end_of_turn"),
    chat_template="phi3",
)
