"""OLMo 2 (Allen AI, November 2024): no input norm; RMSNorm on the attention's and the MLP's outputs inside
the residual, q / k normed over the whole projection (`model/olmo2.py`); otherwise Llama (SwiGLU,
rotary base 500000, no bias, untied head).

`model_type: olmo2`. Sizes from allenai/OLMo-2-1124-{7B,13B}'s config.json (as litgpt's `config.py`
records them): a 100278-token tokenizer (cl100k-based) padded to 100352 rows.
"""

from __future__ import annotations

from lightning_tune.families.base import Family, HFMapping, Size

OLMO2_HF = HFMapping(
    model_type="olmo2",
    architecture="Olmo2ForCausalLM",
    # transformers' Olmo2Config defaults for keys a config.json may leave out
    defaults={"max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False, "head_dim": None},
    attention_bias="flag",
    qk_norm=True,
    block="olmo2",
)

_BASE = dict(vocab_size=100352, max_seq_len=4096, norm_eps=1e-6, rope_base=500000.0, qk_norm=True, model_type="olmo2", block="olmo2")

FAMILY = Family(
    name="olmo2",
    hf=OLMO2_HF,
    sizes={
        "olmo2_7b": Size({**_BASE, "num_layers": 32, "num_heads": 32, "num_kv_heads": 32, "embed_dim": 4096, "intermediate_dim": 11008}, 7_298_617_344, "allenai/OLMo-2-1124-7B"),
        "olmo2_13b": Size({**_BASE, "num_layers": 40, "num_heads": 40, "num_kv_heads": 40, "embed_dim": 5120, "intermediate_dim": 13824}, 13_716_198_400, "allenai/OLMo-2-1124-13B"),
    },
    # tokenizer_config.json of OLMo 2: <|endoftext|> 100257 is bos and eos, <|pad|> 100277.
    special_tokens={"bos": ("<|endoftext|>", 100257), "eos": ("<|endoftext|>", 100257), "pad": ("<|pad|>", 100277)},
    stop_tokens=("eos",),
    chat_template="olmo2",
)
