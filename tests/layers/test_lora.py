"""LoRA layer and helpers against PEFT's `lora.Linear`, and the invariants merging must keep."""

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from lightning_tune.layers.lora import (
    LoRALinear,
    apply_lora,
    lora_modules,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    merged_state_dict,
    resolve_targets,
)
from lightning_tune.model import llama2


def peft_linear(base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> PeftLoraLinear:
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["x"])
    return PeftLoraLinear(base, "default", config, r=r, lora_alpha=alpha, lora_dropout=dropout)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return llama2(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=48, max_seq_len=32)


def test_initialisation_equals_peft():
    """Same seed, same construction order: A and B are PEFT's, bit for bit (Kaiming a=sqrt(5), zeros)."""
    torch.manual_seed(0)
    ours = LoRALinear(16, 24, rank=4, alpha=8.0)
    torch.manual_seed(0)
    theirs = peft_linear(nn.Linear(16, 24, bias=False), r=4, alpha=8)
    assert torch.equal(ours.weight, theirs.base_layer.weight)
    assert torch.equal(ours.lora_A.weight, theirs.lora_A["default"].weight)
    assert torch.equal(ours.lora_B.weight, theirs.lora_B["default"].weight)
    assert not ours.lora_B.weight.any()


@pytest.mark.parametrize("bias", [False, True])
def test_output_equals_peft(bias):
    torch.manual_seed(1)
    theirs = peft_linear(nn.Linear(16, 24, bias=bias), r=4, alpha=16)
    nn.init.normal_(theirs.lora_B["default"].weight)  # a trained adapter, not the zero init
    ours = LoRALinear(16, 24, rank=4, alpha=16.0, bias=bias)
    ours.weight.data.copy_(theirs.base_layer.weight)
    if bias:
        ours.bias.data.copy_(theirs.base_layer.bias)
    ours.lora_A.weight.data.copy_(theirs.lora_A["default"].weight)
    ours.lora_B.weight.data.copy_(theirs.lora_B["default"].weight)
    x = torch.randn(3, 5, 16)
    expected = theirs(x)
    torch.testing.assert_close(ours(x), expected, rtol=1e-6, atol=1e-6)
    ours.merge()
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_fresh_adapters_leave_model_unchanged_and_only_adapters_train():
    model = tiny_model()
    tokens = torch.randint(0, 64, (2, 7))
    before = model(tokens)
    wrapped = apply_lora(model, resolve_targets(["q_proj", "v_proj"]), rank=4, alpha=8.0)
    assert wrapped == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)
    mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert len(trainable) == 8  # A and B for q and v in 2 layers
    model(tokens).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_base_state_dict_keys_unchanged_by_lora():
    """A base (Hugging Face) checkpoint loads into the LoRA model under the same keys."""
    model = tiny_model()
    base_keys = set(model.state_dict())
    apply_lora(model, resolve_targets(["q", "k", "v", "o"], apply_to_mlp=True, apply_to_output=True), rank=2, alpha=4.0)
    assert set(model.state_dict()) - set(lora_state_dict(model)) == base_keys
    assert len(lora_modules(model)) == 2 * 7 + 1


def test_merge_gives_same_logits_and_plain_linears():
    model = tiny_model()
    apply_lora(model, resolve_targets(["q_proj", "k_proj", "v_proj", "o_proj"], apply_to_mlp=True, apply_to_output=True), rank=4, alpha=8.0, dropout=0.1)
    for lora in lora_modules(model).values():
        nn.init.normal_(lora.lora_B.weight, std=0.05)
    model.eval()  # dropout off: merging is exact only for the deterministic forward
    tokens = torch.randint(0, 64, (2, 9))
    unmerged = model(tokens)

    exported = merged_state_dict(model)
    plain = tiny_model()
    plain.load_state_dict(exported, strict=True)
    torch.testing.assert_close(plain(tokens), unmerged, rtol=1e-5, atol=1e-5)
    assert lora_modules(model), "merged_state_dict must leave the model untouched"

    merge_lora(model)
    assert not lora_modules(model)
    assert set(model.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(model(tokens), unmerged, rtol=1e-5, atol=1e-5)


def test_target_validation():
    assert resolve_targets(["q", "v"], apply_to_mlp=True) == ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(ValueError, match="lora_attn_modules: unknown module 'query'"):
        resolve_targets(["query"])
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoRALinear(4, 4, rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(nn.Sequential(nn.ReLU()), ["q_proj"], rank=2, alpha=2.0)


def test_apply_on_meta_keeps_the_base_weight_object():
    with torch.device("meta"):
        model = tiny_model()
    q = model.model.layers[0].self_attn.q_proj.weight
    apply_lora(model, ["q_proj"], rank=2, alpha=2.0)
    assert model.model.layers[0].self_attn.q_proj.weight is q
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.is_meta
