"""A tiny Llama shape and random token batches, for tests that train a recipe a few steps in-process."""

import torch

TINY = {"vocab_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 32, "intermediate_dim": 48, "max_seq_len": 64}


def batches(n: int, masked_prompt: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` seeded batches of 2 x 12 tokens; the first `masked_prompt` labels of each row are -100."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (2, 12), generator=g)
        labels = ids.clone()
        labels[:, :masked_prompt] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out
