"""Qwen 2.5 (Alibaba, 2024): bias on q/k/v (not on o), rotary base 1e6, a 151k byte-level BPE vocabulary.

`model_type: qwen2`. The 0.5B / 1.5B / 3B models tie the output head to the embedding. Values from each
repository's config.json (linked per size; litgpt's `config.py` records the same). The optional
sliding window (`use_sliding_window`, off in every release) is refused when a config turns it on.
"""

from __future__ import annotations

from lightning_tune.families.base import Family, HFMapping, Size

QWEN2_HF = HFMapping(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    defaults={
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "head_dim": None,
        "num_key_value_heads": 32,
        "use_sliding_window": False,
        "max_window_layers": 28,
    },
    attention_bias="qkv",
    sliding_window="per_layer",
)

_BASE = dict(rope_base=1000000.0, attention_bias="qkv", model_type="qwen2")
_SMALL = {**_BASE, "vocab_size": 151936, "norm_eps": 1e-6, "tie_word_embeddings": True}
_LARGE = {**_BASE, "vocab_size": 152064, "max_seq_len": 131072}

QWEN_TOKENS = {
    "eos": ("<|endoftext|>", 151643),  # the base models' end of text, and the pad token
    "pad": ("<|endoftext|>", 151643),
    "start_of_turn": ("<|im_start|>", 151644),
    "end_of_turn": ("<|im_end|>", 151645),
}

FAMILY = Family(
    name="qwen2",
    hf=QWEN2_HF,
    sizes={
        "qwen2_5_0_5b": Size({**_SMALL, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2, "embed_dim": 896, "intermediate_dim": 4864, "max_seq_len": 32768}, 494_032_768, "Qwen/Qwen2.5-0.5B"),
        "qwen2_5_1_5b": Size({**_SMALL, "num_layers": 28, "num_heads": 12, "num_kv_heads": 2, "embed_dim": 1536, "intermediate_dim": 8960, "max_seq_len": 131072}, 1_543_714_304, "Qwen/Qwen2.5-1.5B"),
        "qwen2_5_3b": Size({**_SMALL, "num_layers": 36, "num_heads": 16, "num_kv_heads": 2, "embed_dim": 2048, "intermediate_dim": 11008, "max_seq_len": 32768}, 3_085_938_688, "Qwen/Qwen2.5-3B"),
        "qwen2_5_7b": Size({**_LARGE, "norm_eps": 1e-6, "num_layers": 28, "num_heads": 28, "num_kv_heads": 4, "embed_dim": 3584, "intermediate_dim": 18944}, 7_615_616_512, "Qwen/Qwen2.5-7B"),
        "qwen2_5_14b": Size({**_LARGE, "norm_eps": 1e-5, "num_layers": 48, "num_heads": 40, "num_kv_heads": 8, "embed_dim": 5120, "intermediate_dim": 13824}, 14_770_033_664, "Qwen/Qwen2.5-14B"),
        "qwen2_5_32b": Size({**_LARGE, "norm_eps": 1e-5, "num_layers": 64, "num_heads": 40, "num_kv_heads": 8, "embed_dim": 5120, "intermediate_dim": 27648}, 32_763_876_352, "Qwen/Qwen2.5-32B"),
        "qwen2_5_72b": Size({**_LARGE, "norm_eps": 1e-5, "num_layers": 80, "num_heads": 64, "num_kv_heads": 8, "embed_dim": 8192, "intermediate_dim": 29568}, 72_706_203_648, "Qwen/Qwen2.5-72B"),
        # Qwen 2 (June 2024): the same blocks and vocabularies as 2.5.
        "qwen2_0_5b": Size({**_SMALL, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2, "embed_dim": 896, "intermediate_dim": 4864, "max_seq_len": 131072}, 494_032_768, "Qwen/Qwen2-0.5B"),
        "qwen2_1_5b": Size({**_SMALL, "num_layers": 28, "num_heads": 12, "num_kv_heads": 2, "embed_dim": 1536, "intermediate_dim": 8960, "max_seq_len": 131072}, 1_543_714_304, "Qwen/Qwen2-1.5B"),
        "qwen2_7b": Size({**_LARGE, "norm_eps": 1e-6, "num_layers": 28, "num_heads": 28, "num_kv_heads": 4, "embed_dim": 3584, "intermediate_dim": 18944}, 7_615_616_512, "Qwen/Qwen2-7B"),
    },
    special_tokens=QWEN_TOKENS,
    # generation_config.json of the Instruct models: eos_token_id [151645, 151643].
    stop_tokens=("end_of_turn", "eos"),
    chat_template="chatml",
)
