"""SmolLM2 (Hugging Face, 2024): 135M, 360M, 1.7B; plain Llama blocks with tied embeddings and a
49152-token byte-level BPE vocabulary.

`model_type: llama`. Values from each HuggingFaceTB/SmolLM2-* repository's config.json (linked per
size; litgpt's `config.py` and torchtune's `smol` builders record the same).
"""

from __future__ import annotations

from lightning_tune.families.base import Family, Size
from lightning_tune.families.llama2 import LLAMA_HF

_BASE = dict(vocab_size=49152, max_seq_len=8192, norm_eps=1e-5, tie_word_embeddings=True)

FAMILY = Family(
    name="smollm2",
    hf=LLAMA_HF,
    sizes={
        "smollm2_135m": Size(
            {**_BASE, "rope_base": 100000.0, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "embed_dim": 576, "intermediate_dim": 1536}, 134_515_008, "HuggingFaceTB/SmolLM2-135M"
        ),
        "smollm2_360m": Size(
            {**_BASE, "rope_base": 100000.0, "num_layers": 32, "num_heads": 15, "num_kv_heads": 5, "embed_dim": 960, "intermediate_dim": 2560}, 361_821_120, "HuggingFaceTB/SmolLM2-360M"
        ),
        "smollm2_1_7b": Size(
            {**_BASE, "rope_base": 130000.0, "num_layers": 24, "num_heads": 32, "num_kv_heads": 32, "embed_dim": 2048, "intermediate_dim": 8192}, 1_711_376_384, "HuggingFaceTB/SmolLM2-1.7B"
        ),
    },
    # The Instruct models' ids (<|endoftext|> 0 is also the base models' bos/eos).
    special_tokens={
        "bos": ("<|im_start|>", 1),
        "eos": ("<|im_end|>", 2),
        "pad": ("<|im_end|>", 2),
        "end_of_text": ("<|endoftext|>", 0),
        "start_of_turn": ("<|im_start|>", 1),
        "end_of_turn": ("<|im_end|>", 2),
    },
    stop_tokens=("end_of_turn", "end_of_text"),
    chat_template="chatml",
)
