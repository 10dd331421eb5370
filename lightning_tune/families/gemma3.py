"""Gemma 3 (Google, 2025), the text decoder (`Gemma3ForCausalLM`, model_type `gemma3_text`).

Gemma's block (`model/gemma.py`): (1 + w) RMSNorm, the embedding times sqrt(embed_dim), GeGLU
(`gelu_pytorch_tanh`), four norms per layer; plus q/k norm (Gemma-style), scores scaled by
`query_pre_attn_scalar` ** -0.5, five sliding-window layers to one full layer, and two rotary bases:
1e6 on the full layers (linearly scaled by 8 from 4B up), 1e4 on the sliding ones. Tied embeddings.
Sizes from litgpt's `config.py` (which cites each repository's config.json) and the 270M's
config.json; the 4B / 12B / 27B repositories are multimodal (`Gemma3ForConditionalGeneration`,
vision tower and `language_model.` prefixes), whose text decoder these sizes describe; their
vocabulary is 262208 (262144 + image tokens) in `text_config` [unconfirmed against the Hub files].
"""

from __future__ import annotations

from lightning_tune.families.base import Family, HFMapping, Size

GEMMA3_HF = HFMapping(
    model_type="gemma3_text",
    architecture="Gemma3ForCausalLM",
    # transformers' Gemma3TextConfig defaults for keys a config.json may leave out
    defaults={
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "head_dim": 256,
        "num_key_value_heads": 4,
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": 4096,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    },
    attention_bias="flag",
    qk_norm=True,
    sliding_window="layer_types",
    block="gemma",
    activation_key="hidden_activation",
    rope_types=("default", "linear"),
    rope_per_layer_type=True,
    gemma_scores=True,
)


def gemma3_layer_types(num_layers: int) -> tuple[str, ...]:
    """Five sliding layers, then one full (transformers' `sliding_window_pattern` 6)."""
    return tuple("sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers))


def _size(num_layers: int, **fields) -> dict:
    base = dict(
        max_seq_len=131072,
        norm_eps=1e-6,
        rope_base=1000000.0,
        rope_local_base=10000.0,
        tie_word_embeddings=True,
        qk_norm=True,
        model_type="gemma3_text",
        block="gemma",
        hidden_act="gelu_pytorch_tanh",
        query_pre_attn_scalar=256,
        sliding_window=1024,
        head_dim=256,
    )
    return base | {"num_layers": num_layers, "layer_types": gemma3_layer_types(num_layers)} | fields


_LINEAR_8 = dict(rope_type="linear", rope_factor=8.0)

FAMILY = Family(
    name="gemma3",
    hf=GEMMA3_HF,
    sizes={
        "gemma3_270m": Size(
            _size(18, vocab_size=262144, num_heads=4, num_kv_heads=1, embed_dim=640, intermediate_dim=2048, max_seq_len=32768, sliding_window=512),
            268_098_176,
            "google/gemma-3-270m",
        ),
        "gemma3_1b": Size(
            _size(26, vocab_size=262144, num_heads=4, num_kv_heads=1, embed_dim=1152, intermediate_dim=6912, max_seq_len=32768, sliding_window=512),
            999_885_952,
            "google/gemma-3-1b-pt",
        ),
        "gemma3_4b": Size(_size(34, vocab_size=262208, num_heads=8, num_kv_heads=4, embed_dim=2560, intermediate_dim=10240, **_LINEAR_8), 3_880_263_168, "google/gemma-3-4b-pt"),
        "gemma3_12b": Size(_size(48, vocab_size=262208, num_heads=16, num_kv_heads=8, embed_dim=3840, intermediate_dim=15360, **_LINEAR_8), 11_766_034_176, "google/gemma-3-12b-pt"),
        "gemma3_27b": Size(
            _size(62, vocab_size=262208, num_heads=32, num_kv_heads=16, embed_dim=5376, intermediate_dim=21504, head_dim=128, query_pre_attn_scalar=168, **_LINEAR_8),
            27_009_346_304,
            "google/gemma-3-27b-pt",
        ),
    },
    # tokenizer_config.json of the Gemma 3 models; generation_config.json of the -it models ends on <end_of_turn> too.
    special_tokens={
        "pad": ("<pad>", 0),
        "eos": ("<eos>", 1),
        "bos": ("<bos>", 2),
        "start_of_turn": ("<start_of_turn>", 105),
        "end_of_turn": ("<end_of_turn>", 106),
    },
    stop_tokens=("eos", "end_of_turn"),
    chat_template="gemma",
)
