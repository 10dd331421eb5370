"""Mixture of experts (Qwen3-MoE, Mixtral) against transformers 5 and PEFT: logits and the router's choices,
the load-balancing loss and the training loss, the Hub's per-expert checkpoints both ways, LoRA on the experts
(adapter/ in PEFT's `target_parameters` form, merged/ in transformers), and the grouped dispatch against a
dense computation no one else wrote.

Tolerances: fp32 logits within relative 1e-5, as tests/model/test_families.py derives it (the same operations
in another order; a wrong operation gives 1e-2 or more). The router's top-k choices must be the same experts:
a choice that flips changes the output by a whole expert's contribution, far above 1e-5. Scalar losses: both
sides sum the same fp32 terms in another order, N terms of size ~1 (N <= 100 here): relative 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
from hf_helpers import tiny_hf  # noqa: E402
from tiny_helpers import batches  # noqa: E402

from lightning_tune.checkpoint import from_pretrained, save_hf_checkpoint  # noqa: E402
from lightning_tune.families.hf_config import config_from_hf  # noqa: E402
from lightning_tune.model import CausalLM  # noqa: E402
from lightning_tune.model.moe import SparseMoE, grouped_mm  # noqa: E402

# id -> (model_type, transformers config overrides). 6 experts, 2 per token over 2 x 20 tokens: every expert
# sees tokens; Qwen3-MoE with a dense layer (mlp_only_layers) and both renormalisations.
MOE_CASES = {
    "qwen3_moe": ("qwen3_moe", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1], num_hidden_layers=3, head_dim=32)),
    "qwen3_moe_unnormalised": ("qwen3_moe", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=48, norm_topk_prob=False, decoder_sparse_step=2, num_hidden_layers=4)),
    "mixtral": ("mixtral", dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=48, sliding_window=None)),
    # sinks, biases, the clamped SwiGLU, YaRN, sliding (8) and full layers: 20 tokens cross the window
    "gpt_oss": ("gpt_oss", dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=48, head_dim=16, sliding_window=8, num_hidden_layers=2)),
}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def saved(tmp_path: Path, case: str, **extra) -> tuple[transformers.PreTrainedModel, Path]:
    model_type, kwargs = MOE_CASES[case]
    hf = tiny_hf(model_type, **{**kwargs, **extra})
    with torch.no_grad():  # router weights (and gpt-oss's sinks) larger than the init's: the routing decided, not a near tie
        for name, p in hf.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight", "self_attn.sinks")):
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def tokens(length: int = 20, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(1))


def our_router_logits(model: CausalLM, x: torch.Tensor) -> list[torch.Tensor]:
    model.train()  # the sparse layers keep their router logits in training forwards (nothing else differs: no dropout)
    model(x)
    logits = [layer.mlp.router_logits for layer in model.model.layers if isinstance(layer.mlp, SparseMoE)]
    model.take_router_logits()
    return logits


@pytest.mark.parametrize("case", MOE_CASES, ids=list(MOE_CASES))
def test_logits_and_router_choices_equal_transformers(case: str, tmp_path: Path) -> None:
    hf, path = saved(tmp_path, case)
    ours = from_pretrained(path).eval()
    x = tokens()
    with torch.no_grad():
        theirs = hf(x, output_router_logits=True)
        assert rel_error(ours(x), theirs.logits) <= 1e-5
    k = ours.config.num_experts_per_tok
    mine = our_router_logits(ours, x)
    assert len(mine) == len(theirs.router_logits) == sum(ours.config.is_moe_layer(i) for i in range(ours.config.num_layers))
    for a, b in zip(mine, theirs.router_logits):
        assert torch.equal(a.topk(k).indices.sort().values, b.topk(k).indices.sort().values)  # the same experts per token


@pytest.mark.parametrize("case", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_load_balancing_loss_equals_transformers_with_and_without_padding(case: str, tmp_path: Path) -> None:
    hf, path = saved(tmp_path, case, output_router_logits=True)
    ours = from_pretrained(path)
    x = tokens()
    mask = torch.ones_like(x)
    mask[1, 13:] = 0  # the second row right-padded
    hf.train()
    for m in (None, mask):
        expected = hf(x, attention_mask=m).aux_loss
        ours.train()
        ours(x)
        assert abs(ours.router_aux_loss(None if m is None else m.bool()).item() - expected.item()) <= 1e-6 * expected.item()
    assert ours.router_aux_loss() is None  # taken back: nothing kept after it


def test_training_loss_adds_the_weighted_load_balancing_loss_as_transformers(tmp_path: Path) -> None:
    """One micro-batch: our summed loss / tokens = transformers' loss with output_router_logits (mean CE + coef * aux);
    its gradients too, after the recipe's division by the step's tokens."""
    from lightning_tune.recipes import FullFinetune

    hf, path = saved(tmp_path, "qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.5)  # large, so the term shows
    module = FullFinetune(checkpoint_dir=str(path))
    module.configure_model()
    batch = batches(1, masked_prompt=4)[0]
    batch["labels"][1, 9:] = -100  # the second row's last labels masked: an end earlier than the row's
    module.train()
    ours = module.training_step(batch, 0)
    tokens_ = int((batch["labels"][:, 1:] != -100).sum())
    ours.backward()
    hf.train()
    mask = torch.ones_like(batch["input_ids"])
    mask[1, 9:] = 0  # the recipe's padding rule: a row ends at its last labelled token (here token 8)
    theirs = hf(batch["input_ids"], attention_mask=mask, labels=batch["labels"])
    ce = hf(batch["input_ids"], labels=batch["labels"], output_router_logits=False).loss  # causal, right padding: the mask changes no labelled position
    assert abs(theirs.loss.item() - ce.item() - 0.5 * theirs.aux_loss.item()) <= 1e-5 * theirs.loss.item()
    expected = ce + 0.5 * theirs.aux_loss
    assert abs(ours.item() / tokens_ - expected.item()) <= 1e-6 * expected.item()
    expected.backward()
    for name, param in module.model.named_parameters():
        reference = hf.get_parameter(name).grad
        assert rel_error(param.grad / tokens_, reference) <= 1e-5, name


def test_per_expert_checkpoints_load_and_export_as_the_hub_stores_them(tmp_path: Path) -> None:
    for case in ("qwen3_moe", "mixtral"):
        hf, path = saved(tmp_path / case, case)
        with safe_open(path / "model.safetensors", "pt") as f:  # transformers 5 writes each expert apart
            keys = set(f.keys())
        hub = "block_sparse_moe" if case == "mixtral" else "mlp"
        assert f"model.layers.0.{hub}.experts.5.{'w2' if case == 'mixtral' else 'down_proj'}.weight" in keys
        ours = from_pretrained(path)
        save_hf_checkpoint(ours, ours.config, tmp_path / case / "ours")
        with safe_open(tmp_path / case / "ours" / "model.safetensors", "pt") as f:
            assert set(f.keys()) == keys  # the same names as transformers writes
        config = json.loads((tmp_path / case / "ours" / "config.json").read_text())
        assert config_from_hf(config) == ours.config
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / case / "ours").eval()
        x = tokens()
        with torch.no_grad():
            assert rel_error(reloaded(x).logits, ours.eval()(x)) <= 1e-5


def test_incomplete_experts_are_named_in_one_line(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from lightning_tune.io.files import CheckpointError

    _, path = saved(tmp_path, "qwen3_moe")
    state = load_file(path / "model.safetensors")
    del state["model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        from_pretrained(path)
    assert "model.layers.2.mlp.experts.0.gate_proj.weight" in str(error.value) and "\n" not in str(error.value)


def test_mxfp4_experts_load_dequantised_as_transformers_loads_them(tmp_path: Path) -> None:
    """gpt-oss's Hub format: experts as MXFP4 blocks and scales; transformers' Mxfp4Config(dequantize=True) is the reference."""
    from safetensors.torch import load_file, save_file

    hf, path = saved(tmp_path, "gpt_oss", intermediate_size=64)  # blocks of 32 along both inputs (64, 64)
    state = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        for name, (rows, cols) in (("gate_up_proj", (128, 64)), ("down_proj", (64, 64))):  # [X, out, in / 32, 16] blocks
            key = f"model.layers.{layer}.mlp.experts.{name}"
            del state[key]
            state[f"{key}_blocks"] = torch.randint(0, 256, (6, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
            state[f"{key}_scales"] = torch.randint(120, 130, (6, rows, cols // 32), dtype=torch.uint8, generator=g)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32).eval()
    ours = from_pretrained(path).eval()
    for layer in range(2):
        for name in ("gate_up_proj", "down_proj"):  # every MXFP4 value is a bf16 value: equal bits
            assert torch.equal(getattr(ours.model.layers[layer].mlp.experts, name), getattr(theirs.model.layers[layer].mlp.experts, name))
    x = tokens()
    with torch.no_grad():
        assert rel_error(ours(x), theirs(x).logits) <= 1e-5


def dense_reference(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the router's top-k weights (0 elsewhere): no sorting, no grouping."""
    flat = x.reshape(-1, x.shape[-1])
    _, weights, chosen = moe.gate(flat)
    experts = moe.experts
    dense = torch.zeros(flat.shape[0], experts.num_experts, dtype=flat.dtype).scatter(1, chosen, weights)
    out = torch.zeros_like(flat)
    for e in range(experts.num_experts):
        gate, up = (flat @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        out = out + dense[:, e : e + 1] * ((torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].T)
    return out.view_as(x)


def test_grouped_dispatch_equals_every_expert_on_every_token_with_gradients() -> None:
    from lightning_tune.families import model_config

    torch.manual_seed(0)
    model = CausalLM(model_config("tiny_qwen3_moe", vocab_size=64, num_layers=1))
    model.init_weights(std=0.2)
    moe = model.model.layers[0].mlp
    x = torch.randn(3, 7, 128, requires_grad=True)
    out = moe(x)
    ref_x = x.detach().clone().requires_grad_()
    ref = dense_reference(moe, ref_x)
    assert rel_error(out, ref) <= 1e-5
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight], g)
    ref_grads = torch.autograd.grad(ref, [ref_x, moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight], g)
    for a, b in zip(grads, ref_grads):
        assert rel_error(a, b) <= 1e-5
    moe(x).sum().backward()  # an expanded (stride 0) gradient, which torch._grouped_mm's backward refuses unless made contiguous


def test_grouped_mm_fused_and_looped_paths_agree() -> None:
    """The fused kernel (16-byte strides) and the per-group loop (an fp32 rank-2 adapter's strides) give the same rows."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(10, 8, generator=g), torch.randn(3, 8, 2, generator=g)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)  # an empty group in the middle
    looped = grouped_mm(x, w, offsets)  # [.., 2] fp32: 8-byte rows, the loop
    fused = grouped_mm(x, torch.nn.functional.pad(w, (0, 2)), offsets)[:, :2]  # 16-byte rows: the kernel
    expected = torch.cat([x[:4] @ w[0], x[4:4] @ w[1], x[4:] @ w[2]])
    assert torch.allclose(looped, expected, rtol=1e-6, atol=1e-6) and torch.allclose(fused, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["qwen3_moe", "gpt_oss"])  # [X, out, in] and gpt-oss's [X, in, out] (PEFT's is_transposed)
def test_lora_on_experts_exports_an_adapter_peft_loads_and_a_merged_model(case: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_tune.checkpoint.peft import load_peft_adapter
    from lightning_tune.recipes import LoRAFinetune

    hf, path = saved(tmp_path, case)
    torch.manual_seed(0)
    module = LoRAFinetune(checkpoint_dir=str(path), lr=1e-2, warmup_steps=0, lora_rank=4, lora_dropout=0.0, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_experts=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path / "run")
    trainer.fit(module, DataLoader(batches(2, masked_prompt=4), batch_size=None))
    ours = module.model.eval()
    adapted = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert any("experts.gate_up_lora" in n for n in adapted) and any("experts.down_lora" in n for n in adapted)
    x = tokens()
    with torch.no_grad():
        expected = ours(x)
        assert rel_error(expected, hf(x).logits) > 1e-4  # trained away from the base
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()
        assert rel_error(merged(x).logits, expected) <= 1e-5
        config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
        assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        reloaded = from_pretrained(path)  # our own --adapter path reads PEFT's form back into the stacked layout
        load_peft_adapter(reloaded, tmp_path / "run" / "adapter")
        assert rel_error(reloaded.eval()(x), expected) <= 1e-6
        adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "run" / "adapter").eval()
        # the experts' adapters are PEFT's: without them its logits would be the attention-only model's
        assert sum(p.numel() for n, p in adapter.named_parameters() if "experts" in n and "lora_" in n) == sum(p.numel() for n, p in ours.named_parameters() if "_lora." in n)
        assert rel_error(adapter(x).logits, expected) <= 1e-5


def test_lora_targets_are_refused_in_one_line_where_they_do_not_fit(tmp_path: Path) -> None:
    from lightning_tune.recipes import LoRAFinetune

    with pytest.raises(ValueError, match=r"^apply_lora_to_experts: PEFT's expert adapters .* set lora_dropout 0, got 0.05$"):
        LoRAFinetune(model_name="tiny_qwen3_moe", apply_lora_to_experts=True)
    dense = LoRAFinetune(model_name="tiny_llama2", lora_dropout=0.0, apply_lora_to_experts=True)
    with pytest.raises(ValueError, match=r"^apply_lora_to_experts: the model has no experts \(model_type 'llama', num_experts 0\); set it false$"):
        dense.configure_model()
    moe = LoRAFinetune(model_name="tiny_qwen3_moe", model_args={"vocab_size": 64}, lora_dropout=0.0, apply_lora_to_mlp=True)
    with pytest.raises(ValueError, match=r"^apply_lora_to_mlp: the MLPs of a mixture-of-experts model are its experts"):
        moe.configure_model()


def test_activation_checkpointing_keeps_the_load_balancing_gradient() -> None:
    from lightning_tune.families import model_config

    torch.manual_seed(0)
    model = CausalLM(model_config("tiny_qwen3_moe", vocab_size=64, num_layers=2))
    model.init_weights(std=0.2)
    model.train()
    x = torch.randint(0, 64, (2, 10))
    grads = []
    for checkpointing in (False, True):
        model.model.activation_checkpointing = checkpointing
        model.zero_grad()
        (model(x).float().pow(2).mean() + model.router_aux_loss()).backward()
        grads.append(model.model.layers[0].mlp.gate.weight.grad.clone())
    assert rel_error(grads[1], grads[0]) <= 1e-6


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_a_terse_config_json_reads_as_transformers_reads_it(model_type: str) -> None:
    terse = {"model_type": model_type, "vocab_size": 96, "hidden_size": 128, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 32}
    ours, theirs = config_from_hf(terse), transformers.AutoConfig.for_model(**terse)
    assert ours.num_experts == theirs.num_local_experts and ours.num_experts_per_tok == theirs.num_experts_per_tok
    assert ours.router_aux_loss_coef == theirs.router_aux_loss_coef and ours.max_seq_len == theirs.max_position_embeddings
    assert ours.norm_topk_prob == getattr(theirs, "norm_topk_prob", True)
    assert ours.moe_intermediate_dim == getattr(theirs, "moe_intermediate_size", theirs.intermediate_size)
    assert ours.num_kv_heads == theirs.num_key_value_heads and ours.rope_base == theirs.rope_parameters["rope_theta"]


def test_qlora_stores_the_experts_in_nf4_and_merges_into_the_original_weights(tmp_path: Path) -> None:
    """QLoRA on a mixture: every expert stack in NF4 (bitsandbytes), quantised as it loads. Forward = PEFT's
    adapter on transformers' model holding the dequantised NF4 weights; merged/ = PEFT's adapter on the
    original (unquantised) model, as for linear layers (`layers.lora.merged_state_dict`)."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from lightning_tune.checkpoint import load_weights, save_peft_adapter
    from lightning_tune.model.moe import Experts
    from lightning_tune.recipes.tuning import LoRA

    hf, path = saved(tmp_path, "qwen3_moe", intermediate_size=64, moe_intermediate_size=64)  # NF4 blocks of 64
    with torch.device("meta"):
        model = CausalLM(config_from_hf(json.loads((path / "config.json").read_text())))
    lora = LoRA(rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"], experts=True, quantize_base="nf4")
    with lora.loading(model, torch.device("cpu")):
        load_weights(model, path)
    lora.adapt(model, sharded=False)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(m.quantized and m.gate_up_proj.numel() == 0 for m in experts)  # no high-precision stack kept
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    x = tokens()
    with torch.no_grad():
        ours = model(x)
    save_peft_adapter(model, tmp_path / "adapter")
    save_hf_checkpoint(lora.export_state_dict(model, None, str(path)), model.config, tmp_path / "merged")
    original = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        expected_merged = peft.PeftModel.from_pretrained(original, tmp_path / "adapter").eval()(x).logits
        assert rel_error(merged(x).logits, expected_merged) <= 1e-5
        for ours_layer, layer in zip(model.model.layers, hf.model.layers):  # the NF4 base, dequantised, in transformers' model
            if isinstance(ours_layer.mlp, SparseMoE):
                layer.mlp.experts.gate_up_proj.copy_(ours_layer.mlp.experts.weight("gate_up_proj"))
                layer.mlp.experts.down_proj.copy_(ours_layer.mlp.experts.weight("down_proj"))
            else:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    getattr(layer.mlp, name).weight.copy_(getattr(ours_layer.mlp, name).base_weight())
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, name).weight.copy_(getattr(ours_layer.self_attn, name).base_weight())
        adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        assert rel_error(adapted(x).logits, ours) <= 1e-5
        assert rel_error(ours, expected_merged) > 1e-4  # NF4 rounding shows: the merge did use the original weights


@pytest.mark.parametrize("case", ["qwen3_moe", "gpt_oss"])  # gpt-oss: sinks and sliding layers over the KV cache
def test_greedy_generation_through_the_cli_equals_transformers(case: str, tmp_path: Path, capsys) -> None:
    from hf_helpers import write_tiny_tokenizer

    from lightning_tune.cli import main

    hf, path = saved(tmp_path, case)
    write_tiny_tokenizer(path)
    prompt = [1, 10, 11, 12, 13]  # <bos> w10 .. w13
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    capsys.readouterr()
    assert main(["generate", "--checkpoint_dir", str(path), "--prompt", "w10 w11 w12 w13", "--template", "none", "--max_new_tokens", "16", "--device", "cpu"]) == 0
    if 2 in expected:  # generation stops at <eos>, which is not printed
        expected = expected[: expected.index(2)]
    assert len(expected) >= 8 and all(i > 2 for i in expected)  # a real comparison: 8+ word tokens
    assert capsys.readouterr().out.split() == [f"w{i}" for i in expected]


def test_validate_counts_the_parameters_a_token_computes_with() -> None:
    """Qwen3-30B-A3B: 30.5B parameters, of which a token uses attention, embeddings, routers and 8 of the 128
    experts in each of 48 layers: the 3.35B its name rounds to "A3B"."""
    from lightning_tune.families import model_config
    from lightning_tune.training.memory import estimate_memory

    config = model_config("qwen3_30b_a3b")
    estimate = estimate_memory(config, lambda model: None, batch_size=1, seq_len=8)
    inactive = 48 * (128 - 8) * 3 * 2048 * 768  # per layer, 120 idle experts of gate, up and down (2048 x 768 each)
    assert estimate.parameters == 30_532_122_624 and estimate.active == 30_532_122_624 - inactive == 3_353_032_704
    assert "(3,353,032,704 active per token)" in estimate.lines()[0]


def test_load_balancing_loss_of_all_padding_is_zero_not_nan() -> None:
    from lightning_tune.model.moe import load_balancing_loss

    logits = [torch.randn(6, 4, requires_grad=True)]
    loss = load_balancing_loss(logits, num_experts=4, top_k=2, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits[0].grad).all()
