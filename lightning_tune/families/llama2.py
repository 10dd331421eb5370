"""Llama 2 (Meta, 2023): 7B, 13B, 70B; plain Llama blocks, SentencePiece vocabulary of 32000.

Sizes from Meta's `params.json` files (https://github.com/meta-llama/llama, MODEL_CARD.md) and the
`config.json` of meta-llama/Llama-2-{7b,13b,70b}-hf. The Hugging Face mapping `LLAMA_HF` is shared by
every family whose config.json says `model_type: llama` (Llama 3.x, SmolLM2).
"""

from __future__ import annotations

from lightning_tune.families.base import Family, HFMapping, Size

# transformers' LlamaConfig defaults for keys a config.json may leave out (head_dim None and
# num_key_value_heads None mean hidden_size // num_attention_heads and num_attention_heads).
LLAMA_HF = HFMapping(
    model_type="llama",
    architecture="LlamaForCausalLM",
    defaults={"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "head_dim": None},
    attention_bias="flag",
    mlp_bias=True,
)

# Meta name (for `layers.N.<name>`, the part after the layer index) -> (our / Hugging Face name, the dim
# along which Meta's fairscale layers split the tensor across model-parallel shards; None = replicated).
# ColumnParallelLinear splits its output rows (dim 0), RowParallelLinear its input columns (dim 1), and
# ParallelEmbedding the embedding dim (dim 1). Source: meta-llama/llama, llama/model.py.
META_KEYS: dict[str, tuple[str, int | None]] = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}

_BASE = dict(vocab_size=32000, max_seq_len=4096, norm_eps=1e-5, rope_base=10000.0)

FAMILY = Family(
    name="llama2",
    hf=LLAMA_HF,
    sizes={
        # 32 layers, 32 heads, dim 4096, MLP 11008
        "llama2_7b": Size({**_BASE, "num_layers": 32, "num_heads": 32, "num_kv_heads": 32, "embed_dim": 4096, "intermediate_dim": 11008}, 6_738_415_616, "meta-llama/Llama-2-7b-hf"),
        # 40 layers, 40 heads, dim 5120, MLP 13824
        "llama2_13b": Size({**_BASE, "num_layers": 40, "num_heads": 40, "num_kv_heads": 40, "embed_dim": 5120, "intermediate_dim": 13824}, 13_015_864_320, "meta-llama/Llama-2-13b-hf"),
        # 80 layers, 64 query heads sharing 8 KV heads (GQA), dim 8192, MLP 28672
        "llama2_70b": Size({**_BASE, "num_layers": 80, "num_heads": 64, "num_kv_heads": 8, "embed_dim": 8192, "intermediate_dim": 28672}, 68_976_648_192, "meta-llama/Llama-2-70b-hf"),
        # Not a Meta size: a few-MB model with GQA for CPU demos and tests (vocabulary of the demo tokenizer set by the recipe).
        # Code Llama 7B (2023): Llama 2 7B with rotary base 1e6, a 16384-token context and 16 more (infilling) tokens.
        "code_llama2_7b": Size(
            {**_BASE, "vocab_size": 32016, "rope_base": 1000000.0, "max_seq_len": 16384, "num_layers": 32, "num_heads": 32, "num_kv_heads": 32, "embed_dim": 4096, "intermediate_dim": 11008},
            6_738_546_688,
            "codellama/CodeLlama-7b-hf",
        ),
        "tiny_llama2": Size({**_BASE, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 128, "intermediate_dim": 352, "max_seq_len": 1024}, 8_930_432, None),
    },
    special_tokens={"bos": ("<s>", 1), "eos": ("</s>", 2)},
    stop_tokens=("eos",),
    chat_template="llama2",
    meta_keys=META_KEYS,
)
