"""Reference models for the parity tests: tiny random transformers Llamas."""

import torch
import transformers


def tiny_hf_llama(num_kv_heads: int = 2, intermediate_size: int = 192, seed: int = 0, **kwargs) -> transformers.LlamaForCausalLM:
    """A tiny random HF Llama; weights and norms randomised enough that a layout bug cannot hide."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        initializer_range=0.1, attn_implementation="eager", **kwargs,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model
