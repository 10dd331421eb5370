"""QLoRA: the NF4 base against bitsandbytes, a training step against PEFT + bitsandbytes `Linear4bit`,
loading layer by layer, the exports (adapter in PEFT on a 4-bit base; merged/ from the original
weights), and the one-line errors.

Tolerances: fp32 throughout. The NF4 codes and dequantised weights are bitsandbytes' own, so they
must be equal; what differs from the reference is only the order of fp32 operations (our attention,
LoRA scaled on the rank-r intermediate, a chunked loss), each product rounded to 2^-24 relative and
summed over <= 192 terms per layer, two layers deep: about 1e-6 relative (measured 5e-7). The
project's bound for fp32 logits, 1e-5 relative, holds that with a 10x margin, and a real mismatch
(a wrong code, a layer left unquantised, a scale) shows up at 1e-3 and above.
"""

from __future__ import annotations

import json
import math
import re
import sys

import bitsandbytes
import bitsandbytes.functional as bnb_functional
import lightning.pytorch as pl
import peft
import pytest
import torch
import transformers
from hf_helpers import tiny_hf_llama
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lightning_tune.layers.lora import QLinear, lora_modules
from lightning_tune.layers.nf4 import NF4Weight, QuantizationError, nf4_nbytes
from lightning_tune.recipes import LoRAFinetune

TARGETS = ["q_proj", "v_proj", "down_proj"]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers (fp32 safetensors)."""
    path = tmp_path_factory.mktemp("qlora_base")
    tiny_hf_llama().save_pretrained(path)
    return path


def bnb_config() -> transformers.BitsAndBytesConfig:
    """QLoRA's settings: NF4, double-quantised absmax, compute in fp32 (the CPU tests' dtype)."""
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)


def peft_qlora(base_dir, use_dora: bool = False) -> peft.PeftModel:
    """The reference: transformers' 4-bit loading + PEFT, in train mode (eval mode on a CPU with
    AVX512-BF16 switches bitsandbytes to a bf16 inference kernel)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config(), device_map="cpu", dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_dora=use_dora)
    return peft.get_peft_model(model, config).train()


def our_qlora(base_dir, use_dora: bool = False) -> LoRAFinetune:
    module = LoRAFinetune(
        checkpoint_dir=str(base_dir), lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, quantize_base="nf4", use_dora=use_dora
    )
    module.tuning.targets = TARGETS  # q, v and down only: the mlp switch would add gate and up too
    module.configure_model()
    return module


def peft_key(name: str) -> str:
    """PEFT's parameter name -> ours (no adapter name, the magnitude a parameter of the layer)."""
    return name.removeprefix("base_model.model.").replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


# ---- NF4 against bitsandbytes ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 64), (96, 200), (3, 700)])  # 200 * 96 / 64 = 300 absmax blocks: a partial block of 256; 2100 elements: a partial block of 64
def test_nf4_codes_and_dequantised_weights_equal_bitsandbytes(dtype, shape):
    torch.manual_seed(0)
    weight = (torch.randn(shape) * torch.logspace(-2, 1, shape[1])).to(dtype)  # blocks of very different scales
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = NF4Weight(*shape, device="cpu").quantize_(weight)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)  # the double-quantised absmax codes
    assert torch.equal(ours.absmax_scale.view(torch.float32), state.state2.absmax)
    assert torch.equal(ours.absmax_offset.view(torch.float32), state.offset)
    for out_dtype in (torch.float32, torch.bfloat16):
        state.dtype = out_dtype
        expected = bnb_functional.dequantize_4bit(packed, state)
        assert ours.dequantize(out_dtype).dtype == out_dtype and torch.equal(ours.dequantize(out_dtype), expected)
    # bf16-true casts every floating tensor of the model: the statistics are integers and survive it.
    dequantized = ours.dequantize(torch.float32)
    assert torch.equal(ours.to(torch.bfloat16).dequantize(torch.float32), dequantized)
    assert ours.nbytes == nf4_nbytes(math.prod(shape))
    assert not list(ours.buffers()) and not ours.state_dict()  # plain tensors: DDP does not broadcast them every step


def test_nf4_codes_are_the_nearest_level_of_each_block():
    """Independent of bitsandbytes' code: each 4-bit code is the NF4 level nearest to w / absmax of
    its block of 64 (the exact float32 absmax; double quantisation only compresses its storage)."""
    torch.manual_seed(1)
    weight = torch.randn(32, 128)
    ours = NF4Weight(32, 128, device="cpu").quantize_(weight)
    levels = ours.code.view(torch.float32)
    codes = torch.stack([ours.packed.view(-1) >> 4, ours.packed.view(-1) & 15], dim=1).view(-1).long()  # high nibble first
    blocks = weight.view(-1, 64)
    scaled = blocks / blocks.abs().amax(dim=1, keepdim=True)
    nearest = (scaled.view(-1, 1) - levels.view(1, -1)).abs().argmin(dim=1)
    assert torch.equal(codes, nearest)


# ---- a training step against PEFT + bitsandbytes ----------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_step_equals_peft_with_bitsandbytes_linear4bit(base_dir, use_dora):
    reference = peft_qlora(base_dir, use_dora)
    module = our_qlora(base_dir, use_dora)
    model = module.model
    # Every linear layer but lm_head is 4-bit in both, with the same codes.
    quantized = {name.removesuffix(".base_layer"): m for name, m in reference.base_model.model.named_modules() if isinstance(m, bitsandbytes.nn.Linear4bit)}
    assert len(quantized) == 2 * 7
    for name, layer in quantized.items():
        ours = model.get_submodule(name)
        assert isinstance(ours, QLinear) and ours.quantized and ours.weight.numel() == 0
        assert torch.equal(ours.base_nf4.packed.view(-1), layer.weight.data.view(-1)), name
    assert type(model.lm_head) is torch.nn.Linear

    # The same trained-looking adapters on both sides (B != 0, so A gets a gradient too).
    g = torch.Generator().manual_seed(0)
    ours_params = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        if param.requires_grad:
            if ".lora_B." in name:
                torch.nn.init.normal_(param, std=0.1, generator=g)
            if "lora_magnitude_vector" in name:  # initialised from the dequantised weight, as PEFT does
                assert torch.equal(ours_params[peft_key(name)], param), name
            ours_params[peft_key(name)].data.copy_(param)
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained == sorted(peft_key(n) for n, p in reference.named_parameters() if p.requires_grad)
    assert len(trained) == 2 * 3 * (3 if use_dora else 2)

    ids = torch.randint(0, 96, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    expected = reference(input_ids=ids, labels=labels).loss
    expected.backward()
    loss_sum, tokens = module.loss_sum({"input_ids": ids, "labels": labels})
    loss = loss_sum / tokens
    loss.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    for name, param in reference.named_parameters():
        if param.requires_grad:
            assert rel_error(ours_params[peft_key(name)].grad, param.grad) <= 1e-5, name


def test_loading_quantises_layer_by_layer(base_dir, monkeypatch):
    """Each base weight is quantised as it is read: after every tensor put into the model, no
    quantised layer holds a high-precision weight, and the model's real parameters are only the
    unquantised ones (embeddings, norms, lm_head) loaded so far."""
    from lightning_tune.checkpoint import load as checkpoint

    assign, live, quantised = checkpoint.assign_tensor, [], []

    def spy_assign(model, key, tensor, dtype, device):
        assign(model, key, tensor, dtype, device)
        layers = [m for m in model.modules() if isinstance(m, QLinear)]
        assert layers and all(m.quantized and m.weight.numel() == 0 for m in layers), f"after {key}: a high-precision base weight"
        quantised.append(sum(not m.base_nf4.is_meta for m in layers))
        live.append(sum(p.numel() for p in model.parameters() if not p.is_meta))

    monkeypatch.setattr(checkpoint, "assign_tensor", spy_assign)
    module = LoRAFinetune(checkpoint_dir=str(base_dir), lora_rank=4, lora_alpha=8, quantize_base="nf4")
    module.configure_model()
    assert quantised[-1] == 2 * 7 and quantised == sorted(quantised)  # one more layer at a time
    unquantised = sum(p.numel() for n, p in module.model.named_parameters() if "lora_" not in n)
    assert unquantised == 2 * 96 * 64 + 5 * 64  # embeddings, lm_head, 2 x 2 norms + final norm
    assert max(live) == unquantised  # the adapters were still on meta; no base weight ever in full


# ---- exports -----------------------------------------------------------------------------------


def fit(module: LoRAFinetune, out_dir, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        ids = torch.randint(3, 96, (2, 12), generator=g)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=out_dir, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))


@pytest.mark.parametrize("use_dora", [False, True])
def test_exports_adapter_for_peft_on_4bit_and_merged_from_the_original_weights(base_dir, tmp_path, use_dora):
    pl.seed_everything(0)
    module = LoRAFinetune(checkpoint_dir=str(base_dir), lr=1e-2, warmup_steps=0, lora_rank=4, lora_alpha=8, lora_dropout=0.0, quantize_base="nf4", use_dora=use_dora)
    fit(module, tmp_path)
    model = module.model.train()  # train mode: see peft_qlora
    tokens = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        ours = model(tokens)

    # adapter/: PEFT's format for QLoRA; loads on a 4-bit base and gives our logits.
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is use_dora and config["target_modules"] == ["q_proj", "v_proj"]
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys) is use_dora
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config(), device_map="cpu", dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").train()
    with torch.no_grad():
        assert rel_error(reference(tokens).logits, ours) <= 1e-5

    # merged/: the adapters folded into the original fp32 weights, not the dequantised NF4 ones.
    original = load_file(base_dir / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    k_proj = "model.layers.0.self_attn.k_proj.weight"  # no adapter: exactly the original
    assert torch.equal(merged[k_proj], original[k_proj])
    assert not torch.equal(merged[k_proj], model.get_submodule("model.layers.0.self_attn.k_proj").base_weight())
    lora = lora_modules(model)["model.layers.0.self_attn.q_proj"]
    w = original["model.layers.0.self_attn.q_proj.weight"] + lora.scaling * lora.lora_B.weight.detach() @ lora.lora_A.weight.detach()
    if use_dora:  # (m / ||W + s B A||) (W + s B A), row by row
        w = (lora.lora_magnitude_vector.detach() / w.norm(dim=1)).view(-1, 1) * w
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], w, rtol=1e-6, atol=1e-7)  # fp32 rounding of one product and sum
    # ... which is what PEFT's merge_and_unload gives on the original (unquantised) base.
    full = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_merged = peft.PeftModel.from_pretrained(full, tmp_path / "adapter").merge_and_unload().state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(value, peft_merged[key], rtol=1e-5, atol=1e-6, msg=key)


def test_phi3_merged_export_fuses_the_merged_weights_as_peft_does(tmp_path):
    """Phi-3 holds q/k/v and gate/up fused. QLoRA's merged/ reads each original part from the checkpoint,
    merges its adapter and fuses the parts again, lazily (one weight in memory at a time): the result equals
    PEFT's merge_and_unload of our adapter/ (fused adapters) on the unquantised base."""
    from hf_helpers import tiny_hf

    base = tmp_path / "base"
    tiny_hf("phi3", vocab_size=96, pad_token_id=0, eos_token_id=2).save_pretrained(base)
    pl.seed_everything(0)
    module = LoRAFinetune(
        checkpoint_dir=str(base),
        lr=1e-2,
        warmup_steps=0,
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        apply_lora_to_mlp=True,
        quantize_base="nf4",
    )
    fit(module, tmp_path / "run")
    merged, original = load_file(tmp_path / "run" / "merged" / "model.safetensors"), load_file(base / "model.safetensors")
    fused = ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"]
    assert all(not torch.equal(merged[k], original[k]) for k in fused)  # the adapters moved them
    full = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_merged = peft.PeftModel.from_pretrained(full, tmp_path / "run" / "adapter").merge_and_unload().state_dict()
    assert set(merged) <= set(peft_merged)
    for key, value in merged.items():
        torch.testing.assert_close(value, peft_merged[key], rtol=1e-5, atol=1e-6, msg=key)


# ---- memory ------------------------------------------------------------------------------------


def test_memory_estimate_within_25_percent_of_measured_peak_for_qlora(tmp_path):
    """tiny_lora.yaml with an NF4 base loaded from a checkpoint (the measurement of test_validate)."""
    import os
    import subprocess

    from test_validate import MEASURE

    # Load before the peak is reset: reading the checkpoint maps its file, and those file-backed
    # pages count in RSS (page cache, not training memory, and not device memory on a GPU). That
    # loading holds one layer at a time is test_loading_quantises_layer_by_layer's job.
    reset = 'with open("/proc/self/clear_refs", "w") as f:'
    assert reset in MEASURE
    measure = MEASURE.replace(reset, "cli.model.configure_model()\n" + reset, 1)
    # Wide layers and short sequences, so the weights (0.52 byte per element in NF4, 4 in fp32)
    # are most of the peak: an estimate that counted them as fp32 would be 2x off.
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    extra = [
        "--model.init_args.quantize_base=nf4",
        "--model.init_args.model_name=null",
        "--model.init_args.model_args=null",
        f"--model.init_args.checkpoint_dir={tmp_path / 'base'}",
        "--model.init_args.apply_lora_to_output=false",
        "--data.batch_size=2",
        "--data.max_seq_len=64",
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", measure, "tiny_lora.yaml", str(tmp_path), *extra], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    estimate, measured = map(int, proc.stdout.split("RESULT")[-1].split())
    assert measured > 20 * 2**20, "the run allocated too little to compare"
    assert abs(estimate - measured) <= 0.25 * measured, f"estimate {estimate / 2**20:.1f} MiB vs measured {measured / 2**20:.1f} MiB"


def test_memory_estimate_counts_nf4_weights():
    from lightning_tune.training.memory import estimate_memory

    lora = LoRAFinetune(model_name="llama2_7b", quantize_base="nf4")
    config = lora.model_config()
    plain = LoRAFinetune(model_name="llama2_7b")
    settings = dict(batch_size=1, seq_len=512, precision="bf16-mixed", activation_checkpointing=True, loss_chunk_size=1024)
    q, p = estimate_memory(config, lora.adapt_model, **settings), estimate_memory(config, plain.adapt_model, **settings)
    assert q.parameters == p.parameters and q.trainable == p.trainable
    linear = 32 * 202_383_360 - 32 * 2 * 4096  # the decoder layers' linear weights (not their norms)
    # NF4: 0.5 byte per element + 1/64 (absmax codes) + 4/16384 (their scales), per layer.
    assert q.weights - p.weights == pytest.approx(linear * (0.5 + 1 / 64 + 4 / 16384) - linear * 2, rel=1e-3)


# ---- bad input ---------------------------------------------------------------------------------


def test_without_bitsandbytes_one_line_names_the_extra(monkeypatch, capsys):
    from lightning_tune.cli import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(QuantizationError, match=re.escape("pip install bitsandbytes (in a checkout: pip install -e '.[qlora]')")):
        LoRAFinetune(model_name="tiny_llama2", quantize_base="nf4")
    assert main(["validate", "--config", "tiny_lora.yaml", "--model.init_args.quantize_base=nf4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pip install bitsandbytes (in a checkout: pip install -e '.[qlora]')" in err[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", "tiny_full.yaml", "--model.init_args.quantize_base=nf4"], "quantize_base"),  # full fine-tuning has no such parameter
        (["--config", "tiny_lora.yaml", "--model.init_args.quantize_base=nf8"], "quantize_base"),
    ],
)
def test_bad_quantize_base_settings_are_one_line(args, expected, capsys, tmp_path, monkeypatch):
    from lightning_tune.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["validate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_unsupported_dtype_is_one_line(base_dir):
    module = LoRAFinetune(checkpoint_dir=str(base_dir), quantize_base="nf4")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # what precision 64-true builds in
    try:
        with pytest.raises(QuantizationError, match="compute dtype is torch.float64") as info:
            module.configure_model()
    finally:
        torch.set_default_dtype(previous)
    assert "\n" not in str(info.value)


QLORA_CONFIGS = [
    "alpaca_llama2_7b_qlora.yaml",
    "alpaca_llama2_70b_qlora.yaml",
    "alpaca_llama3_1_8b_qlora.yaml",
    *(f"chat_{family}_qlora.yaml" for family in ("gemma3_4b", "gemma2_9b", "phi3_mini", "phi4_14b", "phi4_mini", "olmo2_7b", "ministral3_8b", "qwen3_30b_a3b")),
]


@pytest.mark.parametrize("name", QLORA_CONFIGS)
def test_qlora_config_fits_the_gpu_its_header_names(name, tmp_path, monkeypatch):
    """The header's "one GPU with G GB": validate's estimate plus 1 GiB (CUDA context, allocator slack) fits G GB
    on one device, with the base in NF4 (a bf16 base alone would not: 7B 13.5 GB, 70B 138 GB)."""
    import re

    from lightning_tune.cli import CONFIG_DIR
    from lightning_tune.cli.validate import check

    monkeypatch.chdir(tmp_path)
    gb = int(re.search(r"one GPU with (\d+) GB", (CONFIG_DIR / name).read_text().splitlines()[0]).group(1))
    result = check(["--config", name])
    assert result.settings["devices"] * result.settings["num_nodes"] == 1 and result.model.tuning.quantize_base == "nf4"
    assert [p for p in result.problems if "does not exist" not in p] == []  # only the not-yet-downloaded checkpoint
    assert result.estimate.total + 2**30 <= gb * 10**9, f"{name}: {result.estimate.total / 2**30:.1f} GiB"
    plain = check(["--config", name, "--model.init_args.quantize_base=null"]).estimate
    assert plain.total + 2**30 > gb * 10**9  # the same run with a bf16 base would not fit: NF4 is what makes it
