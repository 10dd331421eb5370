"""Llama 3.1 / 3.2 / 3.3 (Meta, 2024): GQA, a 128256-token byte-level BPE vocabulary, `llama3` rotary scaling.

Same blocks as Llama 2 (`model_type: llama`); Llama 3.1+ scales the rotary frequencies (factor 8, or
32 for 3.2, over an original context of 8192; see `model.rope_inv_freq`), and 3.2's 1B / 3B tie the
output head to the embedding. Values from each repository's config.json (linked per size) as
litgpt's `config.py` and torchtune's `llama3_1` / `llama3_2` builders also record them.
Meta's original folders (`original/consolidated.*.pth` + `params.json` + the tiktoken `tokenizer.model`)
load too (`checkpoint/meta.py`, `tokenizer/tiktoken.py`), as torchtune reads them.
"""

from __future__ import annotations

from lightning_tune.families.base import Family, Size
from lightning_tune.families.llama2 import LLAMA_HF, META_KEYS

_ROPE_3_1 = dict(rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_seq_len=8192)
_ROPE_3_2 = {**_ROPE_3_1, "rope_factor": 32.0}
_BASE = dict(vocab_size=128256, max_seq_len=131072, norm_eps=1e-5, rope_base=500000.0, num_kv_heads=8)

FAMILY = Family(
    name="llama3",
    hf=LLAMA_HF,
    sizes={
        # Llama 3 (April 2024): the same blocks without rotary scaling, an 8192-token context.
        "llama3_8b": Size({**_BASE, "max_seq_len": 8192, "num_layers": 32, "num_heads": 32, "embed_dim": 4096, "intermediate_dim": 14336}, 8_030_261_248, "meta-llama/Meta-Llama-3-8B"),
        "llama3_70b": Size({**_BASE, "max_seq_len": 8192, "num_layers": 80, "num_heads": 64, "embed_dim": 8192, "intermediate_dim": 28672}, 70_553_706_496, "meta-llama/Meta-Llama-3-70B"),
        "llama3_1_8b": Size({**_BASE, **_ROPE_3_1, "num_layers": 32, "num_heads": 32, "embed_dim": 4096, "intermediate_dim": 14336}, 8_030_261_248, "meta-llama/Llama-3.1-8B"),
        "llama3_1_70b": Size({**_BASE, **_ROPE_3_1, "num_layers": 80, "num_heads": 64, "embed_dim": 8192, "intermediate_dim": 28672}, 70_553_706_496, "meta-llama/Llama-3.1-70B"),
        "llama3_2_1b": Size(
            {**_BASE, **_ROPE_3_2, "num_layers": 16, "num_heads": 32, "embed_dim": 2048, "intermediate_dim": 8192, "head_dim": 64, "tie_word_embeddings": True},
            1_235_814_400,
            "meta-llama/Llama-3.2-1B",
        ),
        "llama3_2_3b": Size(
            {**_BASE, **_ROPE_3_2, "num_layers": 28, "num_heads": 24, "embed_dim": 3072, "intermediate_dim": 8192, "head_dim": 128, "tie_word_embeddings": True},
            3_212_749_824,
            "meta-llama/Llama-3.2-3B",
        ),
        # Instruction-tuned only (there is no base 3.3 release).
        "llama3_3_70b": Size({**_BASE, **_ROPE_3_1, "num_layers": 80, "num_heads": 64, "embed_dim": 8192, "intermediate_dim": 28672}, 70_553_706_496, "meta-llama/Llama-3.3-70B-Instruct"),
    },
    special_tokens={
        "bos": ("<|begin_of_text|>", 128000),
        "eos": ("<|end_of_text|>", 128001),
        "pad": ("<|finetune_right_pad_id|>", 128004),
        "start_header": ("<|start_header_id|>", 128006),
        "end_header": ("<|end_header_id|>", 128007),
        "end_of_message": ("<|eom_id|>", 128008),
        "end_of_turn": ("<|eot_id|>", 128009),
    },
    # generation_config.json of the 3.1 Instruct models: eos_token_id [128001, 128008, 128009].
    stop_tokens=("eos", "end_of_message", "end_of_turn"),
    chat_template="llama3",
    meta_keys=META_KEYS,  # the same names as Llama 2's
)
