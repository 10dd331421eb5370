"""Reference models for the parity tests: tiny random transformers Llamas."""

import torch
import transformers


def tiny_hf_llama(num_kv_heads: int = 2, intermediate_size: int = 192, seed: int = 0, **kwargs) -> transformers.LlamaForCausalLM:
    """A tiny random HF Llama; weights and norms randomised enough that a layout bug cannot hide."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.1,
        attn_implementation="eager",
        **kwargs,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


TINY_HF = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
)


def tiny_hf(model_type: str = "llama", seed: int = 0, **kwargs) -> transformers.PreTrainedModel:
    """A tiny random transformers model of any `model_type`, GQA 4/2 heads unless overridden.

    Norm weights and biases are randomised too (transformers initialises them to 1 and 0, where a
    missing or misplaced norm or bias would not change the logits).
    """
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **{**TINY_HF, **kwargs})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def write_tiny_tokenizer(directory, vocab_size: int = 96, eos_ids: list[int] | None = None) -> None:
    """A word-level tokenizer.json of `vocab_size` tokens built with the `tokenizers` library, plus
    tokenizer_config.json and generation_config.json: <pad> 0, <bos> 1, <eos> 2, then w3, w4, ...;
    `eos_ids` (default [2]) are the end tokens generation_config.json lists."""
    import json
    from pathlib import Path

    import tokenizers

    directory = Path(directory)
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": eos_ids or [2], "pad_token_id": 0}))


def trained_peft_model(base: transformers.PreTrainedModel, seed: int, b_std: float = 0.1, magnitude_spread: float = 0.2, **lora_config):
    """PEFT's LoRA (or DoRA, `use_dora=True`) over a copy of `base`, looking trained: B ~ N(0,
    b_std) (B = 0 would leave the model unchanged) and DoRA's magnitudes scaled by 1 + U(0,
    magnitude_spread) (else m = ||W + sBA|| and DoRA is plain LoRA)."""
    import copy

    import peft

    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **lora_config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + magnitude_spread * torch.rand_like(p))
    return model
