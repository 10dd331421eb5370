"""DoRA against PEFT's `use_dora=True`: the layer bit for bit (at initialisation and trained, with and
without bias, with and without dropout), a few optimiser steps on a tiny Llama, the exported adapter
loaded by PEFT, and the merge.

Our layer runs PEFT's DoRA operations in PEFT's order, so one layer is equal to the bit. A whole
model is not (our attention and loss order fp32 sums differently: ~1e-6 relative, see test_qlora.py),
so the multi-step test derives its tolerance from Adam: each step moves a parameter by
lr * m_hat / (sqrt(v_hat) + eps), a ratio that carries the gradients' relative error r (<= 1e-5, the
project's fp32 bound) into the update, so after n steps the adapters differ by about n * lr * r
(3 * 1e-2 * 1e-5 = 3e-7); atol 1e-6 allows a factor 3 for the earlier steps' differences feeding the
later gradients, rtol 1e-5 the values' own fp32 rounding.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from hf_helpers import tiny_hf_llama
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from safetensors.torch import load_file
from torch import nn

from lightning_tune.checkpoint import from_pretrained, save_hf_checkpoint, save_peft_adapter
from lightning_tune.layers.lora import LoRALinear, apply_lora, is_lora_key, lora_modules, lora_state_dict, mark_only_lora_trainable, merged_state_dict

TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_dora(base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> PeftLoraLinear:
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["x"], use_dora=True)
    return PeftLoraLinear(base, "default", config, r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("bias", [False, True])
def test_initialisation_equals_peft_bit_for_bit(bias):
    """Same seed, same construction order: W, A, B and the magnitude ||W|| are PEFT's, and so are
    the output and every gradient."""
    torch.manual_seed(0)
    ours = LoRALinear(16, 24, rank=4, alpha=8.0, bias=bias, use_dora=True)
    torch.manual_seed(0)
    theirs = peft_dora(nn.Linear(16, 24, bias=bias), r=4, alpha=8)
    assert torch.equal(ours.weight, theirs.base_layer.weight)
    assert torch.equal(ours.lora_A.weight, theirs.lora_A["default"].weight)
    assert torch.equal(ours.lora_B.weight, theirs.lora_B["default"].weight)
    assert torch.equal(ours.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)
    assert torch.equal(ours.lora_magnitude_vector, torch.linalg.norm(ours.weight, dim=1))  # B = 0: m = ||W|| per row
    x = torch.randn(3, 5, 16, requires_grad=True)
    expected = theirs(x)
    assert torch.equal(ours(x), expected)
    if bias:
        assert torch.equal(ours(x), F.linear(x, ours.weight, ours.bias))  # a fresh adapter changes nothing, bias included


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("train", [False, True])
def test_trained_layer_equals_peft_bit_for_bit(bias, dropout, train):
    """With B != 0 (a trained adapter) the output and the gradients of A, B and m are PEFT's to the
    bit, in training (dropout: the correction term sees the dropped-out input) and in eval."""
    torch.manual_seed(1)
    theirs = peft_dora(nn.Linear(16, 24, bias=bias), r=4, alpha=16, dropout=dropout).train(train)
    nn.init.normal_(theirs.lora_B["default"].weight)
    ours = LoRALinear(16, 24, rank=4, alpha=16.0, dropout=dropout, bias=bias, use_dora=True).train(train)
    with torch.no_grad():
        ours.weight.copy_(theirs.base_layer.weight)
        if bias:
            ours.bias.copy_(theirs.base_layer.bias)
        ours.lora_A.weight.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.weight.copy_(theirs.lora_B["default"].weight)
        ours.lora_magnitude_vector.copy_(theirs.lora_magnitude_vector["default"].weight * 1.1)
        theirs.lora_magnitude_vector["default"].weight.mul_(1.1)  # m no longer ||W + s B A||
    x = torch.randn(3, 5, 16)
    torch.manual_seed(5)  # the same dropout mask
    expected = theirs(x)
    torch.manual_seed(5)
    out = ours(x)
    assert torch.equal(out, expected)
    (expected * torch.arange(24)).sum().backward()
    (out * torch.arange(24)).sum().backward()
    assert torch.equal(ours.lora_A.weight.grad, theirs.lora_A["default"].weight.grad)
    assert torch.equal(ours.lora_B.weight.grad, theirs.lora_B["default"].weight.grad)
    assert torch.equal(ours.lora_magnitude_vector.grad, theirs.lora_magnitude_vector["default"].weight.grad)


def test_merge_equals_peft_merge():
    torch.manual_seed(2)
    theirs = peft_dora(nn.Linear(16, 24, bias=True), r=4, alpha=8)
    nn.init.normal_(theirs.lora_B["default"].weight, std=0.3)
    ours = LoRALinear(16, 24, rank=4, alpha=8.0, bias=True, use_dora=True)
    ours.load_state_dict(
        {
            "weight": theirs.base_layer.weight,
            "bias": theirs.base_layer.bias,
            "lora_A.weight": theirs.lora_A["default"].weight,
            "lora_B.weight": theirs.lora_B["default"].weight,
            "lora_magnitude_vector": theirs.lora_magnitude_vector["default"].weight * 0.9,
        }
    )
    theirs.lora_magnitude_vector["default"].weight.data.mul_(0.9)
    x = torch.randn(4, 16)
    unmerged = ours(x)
    theirs.merge()
    ours.merge()
    torch.testing.assert_close(ours.weight, theirs.base_layer.weight, rtol=1e-6, atol=1e-7)  # PEFT merges in fp32 too; order differs
    torch.testing.assert_close(ours(x), unmerged, rtol=1e-5, atol=1e-6)


# ---- a tiny Llama: optimiser steps, the adapter in PEFT, merged -------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dora_base")
    tiny_hf_llama().save_pretrained(path)
    return path


def test_steps_equal_peft_and_the_adapter_loads_in_peft(base_dir, tmp_path):
    reference = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_dora=True)
    ).train()
    model = from_pretrained(base_dir).train()
    fresh = torch.randint(0, 96, (2, 9))
    before = model(fresh).detach()
    apply_lora(model, TARGETS, rank=4, alpha=8.0, use_dora=True)
    mark_only_lora_trainable(model)
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if ".lora_A." in name:
                key = name.removeprefix("base_model.model.").replace(".default", "")
                ours[key].copy_(param)
        for lora in lora_modules(model).values():
            lora.reset_magnitude()  # B = 0: ||W||, whatever A is
    torch.testing.assert_close(model(fresh), before, rtol=0, atol=0)  # a fresh DoRA adapter changes nothing
    pairs = []
    for name, param in reference.named_parameters():
        if param.requires_grad:
            key = name.removeprefix("base_model.model.").replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            pairs.append((ours[key], param))
            if "magnitude" in key:
                assert torch.equal(ours[key], param), key  # initialised as PEFT does
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(lora_state_dict(model)) and len(pairs) == 2 * 3 * 3

    steps, lr = 3, 1e-2
    opt_ours = torch.optim.AdamW([p for p, _ in pairs], lr=lr, weight_decay=0.0)
    opt_ref = torch.optim.AdamW([q for _, q in pairs], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 96, (2, 12), generator=g)
        loss = F.cross_entropy(model(ids)[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
        expected = reference(input_ids=ids, labels=ids).loss
        assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
        loss.backward()
        expected.backward()
        for opt in (opt_ours, opt_ref):
            opt.step()
            opt.zero_grad()
    for p, q in pairs:
        assert not torch.equal(q, q.new_zeros(q.shape))
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # n * lr * r, see the module docstring

    # The exported adapter: PEFT's DoRA format, loaded by PEFT over the base, gives our logits.
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert set(saved) == {f"base_model.model.{k}" for k in lora_state_dict(model)}
    assert len([k for k in saved if k.endswith(".lora_magnitude_vector")]) == 2 * 3
    model.eval()
    with torch.no_grad():
        logits = model(fresh)
        loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), tmp_path / "adapter").eval()
        assert rel_error(loaded(fresh).logits, logits) <= 1e-5
        assert rel_error(logits, before) > 1e-3, "training must have changed the model, or the test proves nothing"

        # merged/: W' = (m / ||W + s B A||) (W + s B A), what PEFT's merge_and_unload writes.
        save_hf_checkpoint(merged_state_dict(model), model.config, tmp_path / "merged")
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        assert rel_error(merged(fresh).logits, logits) <= 1e-5
        peft_merged = copy.deepcopy(loaded).merge_and_unload().state_dict()
        for key, value in load_file(tmp_path / "merged" / "model.safetensors").items():
            torch.testing.assert_close(value, peft_merged[key], rtol=1e-5, atol=1e-6, msg=key)


def test_magnitude_is_an_adapter_key():
    assert is_lora_key("model.layers.0.self_attn.q_proj.lora_magnitude_vector")
    assert is_lora_key("lora_magnitude_vector") and not is_lora_key("model.layers.0.self_attn.q_proj.weight")
