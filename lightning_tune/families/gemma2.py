"""Gemma 2 (Google, 2024): Gemma's block (`model/gemma.py`) with soft-capped attention scores (50) and
final logits (30), sliding-window (4096) and full layers alternating, no q/k norm, one rotary base.

`model_type: gemma2`, tied embeddings, a 256000-token vocabulary. Sizes from litgpt's `config.py`
(citing google/gemma-2-{2b,9b,27b}'s config.json); 27B scales scores by 144 ** -0.5 (embed_dim /
num_heads), not head_dim's.
"""

from __future__ import annotations

from lightning_tune.families.base import Family, HFMapping, Size

GEMMA2_HF = HFMapping(
    model_type="gemma2",
    architecture="Gemma2ForCausalLM",
    # transformers' Gemma2Config defaults for keys a config.json may leave out
    defaults={
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "head_dim": 256,
        "num_key_value_heads": 4,
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": 4096,
        "sliding_window_pattern": 2,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    attention_bias="flag",
    sliding_window="layer_types",
    block="gemma",
    activation_key="hidden_activation",
    rope_types=("default",),
    gemma_scores=True,
)


def _size(num_layers: int, **fields) -> dict:
    base = dict(
        vocab_size=256000,
        max_seq_len=8192,
        norm_eps=1e-6,
        rope_base=10000.0,
        tie_word_embeddings=True,
        model_type="gemma2",
        block="gemma",
        hidden_act="gelu_pytorch_tanh",
        query_pre_attn_scalar=256,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        sliding_window=4096,
        head_dim=256,
    )
    layer_types = tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers))  # 0 sliding, 1 full, ...
    return base | {"num_layers": num_layers, "layer_types": layer_types} | fields


FAMILY = Family(
    name="gemma2",
    hf=GEMMA2_HF,
    sizes={
        "gemma2_2b": Size(_size(26, num_heads=8, num_kv_heads=4, embed_dim=2304, intermediate_dim=9216), 2_614_341_888, "google/gemma-2-2b"),
        "gemma2_9b": Size(_size(42, num_heads=16, num_kv_heads=8, embed_dim=3584, intermediate_dim=14336), 9_241_705_984, "google/gemma-2-9b"),
        "gemma2_27b": Size(_size(46, num_heads=32, num_kv_heads=16, embed_dim=4608, intermediate_dim=36864, head_dim=128, query_pre_attn_scalar=144), 27_227_128_320, "google/gemma-2-27b"),
    },
    # tokenizer_config.json of the Gemma 2 models; generation_config.json of the -it models: eos [1, 107].
    special_tokens={
        "pad": ("<pad>", 0),
        "eos": ("<eos>", 1),
        "bos": ("<bos>", 2),
        "start_of_turn": ("<start_of_turn>", 106),
        "end_of_turn": ("<end_of_turn>", 107),
    },
    stop_tokens=("eos", "end_of_turn"),
    chat_template="gemma",
)
