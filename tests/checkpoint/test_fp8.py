"""FP8 checkpoints (`checkpoint/fp8.py`): E4M3 weights with their `weight_scale_inv`, per tensor (Ministral 3
Instruct) or per 128 x 128 block (Qwen3-FP8, DeepSeek-V3), dequantised as they are read, equal to what
transformers loads from the same directory on a CPU (where it dequantises: `dequantize=True`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from hf_helpers import tiny_hf  # noqa: E402

from lightning_tune.checkpoint import from_pretrained, save_hf_checkpoint  # noqa: E402
from lightning_tune.checkpoint.fp8 import dequantize_fp8  # noqa: E402
from lightning_tune.checkpoint.hf import text_decoder_key  # noqa: E402
from lightning_tune.io.files import CheckpointError  # noqa: E402

# The quantization_config transformers' convert_ministral3_weights_to_hf.py writes for the FP8 Instruct releases
MINISTRAL3_FP8 = {
    "activation_scheme": "static",
    "dequantize": False,
    "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    "quant_method": "fp8",
    "weight_block_size": None,
}
# Qwen3-FP8's (block-wise, dynamic activations: no activation scales)
QWEN3_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
MINISTRAL3_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 8,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}
TEXT = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    pad_token_id=0,
    rope_parameters=MINISTRAL3_YARN,
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantise(w: torch.Tensor, block: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weight and its float32 weight_scale_inv, as transformers' Fp8Quantize (amax / 448 per
    tensor or per block); a block grid that overhangs the weight is padded with zeros."""
    w = w.float()
    if block is None:
        inv = (w.abs().amax() / 448).clamp(min=1e-12)
        return (w / inv).clamp(-448, 448).to(torch.float8_e4m3fn), inv.reshape(())
    (out, inp), (b0, b1) = w.shape, block
    g0, g1 = math.ceil(out / b0), math.ceil(inp / b1)
    padded = torch.zeros(g0 * b0, g1 * b1)
    padded[:out, :inp] = w
    tiles = padded.reshape(g0, b0, g1, b1)
    inv = (tiles.abs().amax(dim=(1, 3)) / 448).clamp(min=1e-12)
    q = (tiles / inv[:, None, :, None]).clamp(-448, 448).reshape(g0 * b0, g1 * b1)[:out, :inp]
    return q.to(torch.float8_e4m3fn), inv


def write_fp8(model: transformers.PreTrainedModel, path: Path, quant: dict, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`model` saved by transformers, then its decoder projections rewritten as FP8 (+ activation scales for a
    static scheme) and `quant` put in config.json; returns each projection's exact dequantised float32 value."""
    model.to(dtype).save_pretrained(path)
    state = load_file(path / "model.safetensors")
    exact = {}
    for key in list(state):
        if key.endswith("proj.weight") and key.rpartition(".")[0].rpartition(".")[2] in PROJECTIONS and "vision" not in key and "projector" not in key:
            q, inv = quantise(state[key], quant["weight_block_size"])
            state[key], state[key.replace(".weight", ".weight_scale_inv")] = q, inv
            if quant["activation_scheme"] == "static":
                state[key.replace(".weight", ".activation_scale")] = torch.tensor(0.05)
            b0, b1 = quant["weight_block_size"] or q.shape
            exact[key] = q.float() * (inv if inv.dim() == 0 else inv.repeat_interleave(b0, 0)[: q.shape[0]].repeat_interleave(b1, 1)[:, : q.shape[1]])
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"quantization_config": quant}, indent=2))
    return exact


def theirs(path: Path, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """transformers' own reading of the FP8 directory: on a CPU it dequantises (FineGrainedFP8 dequantize=True)."""
    wrapped = json.loads((path / "config.json").read_text())["model_type"] == "mistral3"
    auto = transformers.Mistral3ForConditionalGeneration if wrapped else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    assert not any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
    return model


def ids() -> torch.Tensor:
    return torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(1))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def tiny_mistral3(tied: bool = False) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14, head_dim=8)
    config = transformers.Mistral3Config(text_config=dict(TEXT, model_type="ministral3"), vision_config=vision, image_token_index=95, tie_word_embeddings=tied)
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("wrapped", [False, True], ids=["Ministral3ForCausalLM", "Mistral3ForConditionalGeneration"])
def test_a_per_tensor_fp8_ministral3_loads_as_transformers_dequantises_it(wrapped: bool, tmp_path: Path) -> None:
    """Ministral 3 Instruct's form: per-tensor scales, static activation scales, vision and head unquantised."""
    hf = tiny_mistral3() if wrapped else tiny_hf("ministral3", **{k: v for k, v in TEXT.items()})
    exact = write_fp8(hf, tmp_path, MINISTRAL3_FP8)
    reference = theirs(tmp_path)
    ours = from_pretrained(tmp_path)
    x = ids()
    with torch.no_grad():
        assert rel_error(ours(x), reference(input_ids=x).logits) <= 1e-5
    mine = ours.state_dict()
    for key, value in exact.items():  # bit for bit: float32(fp8) * float32(scale), as transformers computes it
        assert torch.equal(mine[text_decoder_key(key)], value), key
    for key, value in reference.state_dict().items():
        if text_decoder_key(key) in mine:
            assert torch.equal(mine[text_decoder_key(key)], value), key


def test_an_fp8_pytorch_bin_reads_as_its_safetensors(tmp_path: Path) -> None:
    """The same FP8 tensors in pytorch_model.bin: the same model, and a float8 weight without its scale is
    still refused before any read (its dtype comes from the memory-mapped file)."""
    write_fp8(tiny_hf("ministral3", **TEXT), tmp_path, MINISTRAL3_FP8)
    expected = from_pretrained(tmp_path).state_dict()
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert all(torch.equal(v, expected[k]) for k, v in from_pretrained(tmp_path).state_dict().items())
    del state["model.layers.1.mlp.up_proj.weight_scale_inv"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: model.layers.1.mlp.up_proj.weight is F8_E4M3 but has no"):
        from_pretrained(tmp_path)


def test_bf16_fp8_checkpoint_dequantises_to_bf16_as_transformers_does(tmp_path: Path) -> None:
    """config.json's dtype bfloat16 (the real checkpoints'): each weight float32(fp8) * scale rounded once to
    bf16, by us with dtype None and by transformers with dtype 'auto': the same bf16 tensors."""
    exact = write_fp8(tiny_mistral3(), tmp_path, MINISTRAL3_FP8, dtype=torch.bfloat16)
    reference = theirs(tmp_path, dtype="auto")
    ours = from_pretrained(tmp_path)
    mine = ours.state_dict()
    assert {t.dtype for t in mine.values()} == {torch.bfloat16}
    for key, value in reference.state_dict().items():
        if text_decoder_key(key) in mine:
            assert torch.equal(mine[text_decoder_key(key)], value), key
    for key, value in exact.items():
        assert torch.equal(mine[text_decoder_key(key)], value.to(torch.bfloat16)), key
    # A float32 load of the same bf16 checkpoint keeps the float32 products, as transformers with dtype=float32.
    wide = from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    reference = theirs(tmp_path, dtype=torch.float32)
    for key, value in reference.state_dict().items():
        if text_decoder_key(key) in wide:
            assert value.dtype == torch.float32 and torch.equal(wide[text_decoder_key(key)], value), key
    assert any(not torch.equal(wide[k], mine[k].float()) for k in mine)  # the bf16 rounding was real


def test_a_block_fp8_qwen3_and_llama_load_as_transformers_dequantises_them(tmp_path: Path) -> None:
    """Qwen3-FP8's form: one scale per 128 x 128 block, dynamic activations (no activation scales)."""
    for model_type in ("qwen3", "llama"):
        hf = tiny_hf(model_type, hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
        exact = write_fp8(hf, tmp_path / model_type, QWEN3_FP8)
        assert any(v.numel() > 128 * 128 for v in exact.values())  # several blocks per weight
        reference, ours = theirs(tmp_path / model_type), from_pretrained(tmp_path / model_type)
        x = ids()
        with torch.no_grad():
            assert rel_error(ours(x), reference(input_ids=x).logits) <= 1e-5
        for key, value in exact.items():
            assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("block", [None, (128, 128)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_transformers_fp8_dequantize(block, scale_dtype, dtype) -> None:
    """Bit for bit transformers' `Fp8Dequantize` (its load-time op), every stored scalar shape included."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    torch.manual_seed(0)
    q, inv = quantise(torch.randn(256, 384), list(block) if block else None)
    for scale in [inv.to(scale_dtype)] if block else [inv.to(scale_dtype).reshape(shape) for shape in ((), (1,), (1, 1))]:
        expected = Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=dtype)
        assert torch.equal(dequantize_fp8(q, scale, block, dtype), expected), list(scale.shape)


def test_blocks_cut_at_the_weight_edge_dequantise_by_the_ceil_grid() -> None:
    """A weight of 200 x 300 in 128-blocks: a [2, 3] grid whose last row and column of blocks are cut short
    (DeepSeek-V3's `weight_dequant`). transformers 5.25 derives the block from the grid (200 / 2 = 100 rows)
    and reads such a weight otherwise; the released checkpoints' shapes are multiples of the block."""
    torch.manual_seed(0)
    w = torch.randn(200, 300)
    q, inv = quantise(w, [128, 128])
    assert inv.shape == (2, 3)
    rows, cols = torch.arange(200)[:, None] // 128, torch.arange(300)[None, :] // 128
    expected = q.float() * inv[rows, cols]  # each element times its own block's scale
    assert torch.equal(dequantize_fp8(q, inv, (128, 128), torch.float32), expected)
    assert rel_error(dequantize_fp8(q, inv, (128, 128), torch.float32), w) < 0.05


def test_fp8_loads_into_qlora_and_exports_plain(tmp_path: Path) -> None:
    """QLoRA quantises the dequantised weights to NF4 as they arrive; an export writes bf16 / fp32 tensors and
    no quantization_config, and transformers reads it back as the model we loaded."""
    from lightning_tune.layers.lora import QLinear

    write_fp8(tiny_mistral3(), tmp_path / "fp8", MINISTRAL3_FP8)
    ours = from_pretrained(tmp_path / "fp8")
    save_hf_checkpoint(ours, ours.config, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "float32"
    assert {t.dtype for t in load_file(tmp_path / "merged" / "model.safetensors").values()} == {torch.float32}
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        assert rel_error(ours(x), back(x).logits) <= 1e-5

    from lightning_tune.recipes import LoRAFinetune

    module = LoRAFinetune(checkpoint_dir=str(tmp_path / "fp8"), lora_rank=4, lora_alpha=8, quantize_base="nf4")
    module.configure_model()
    dense = dict(ours.named_modules())
    layers = {name: m for name, m in module.model.named_modules() if isinstance(m, QLinear)}
    assert len(layers) == 2 * 7 and all(m.quantized for m in layers.values())
    for name, layer in layers.items():  # NF4 codes of exactly the weight the FP8 tensor dequantises to
        plain = QLinear(layer.in_features, layer.out_features)
        plain.quantize_base_(dense[name.replace(".base_layer", "")].weight.detach().clone())
        assert torch.equal(layer.base_nf4.packed, plain.base_nf4.packed), name


def test_a_qlora_fit_on_fp8_merges_into_the_dequantised_weights_and_exports_plain(tmp_path: Path) -> None:
    """QLoRA's merged/ reads each original weight from the FP8 checkpoint again (`weight_reader`), dequantised:
    a layer without an adapter is written exactly as the FP8 tensor dequantises, in float32, with no
    quantization_config, and transformers reads merged/ with the trained model's logits."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_tune.recipes import LoRAFinetune

    write_fp8(tiny_hf("ministral3", **TEXT), tmp_path / "fp8", MINISTRAL3_FP8)
    pl.seed_everything(0)
    module = LoRAFinetune(checkpoint_dir=str(tmp_path / "fp8"), lr=1e-2, warmup_steps=0, lora_rank=4, lora_alpha=8, lora_dropout=0.0, quantize_base="nf4")
    x = ids()
    batches = [{"input_ids": x, "labels": x.clone()}] * 2
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, default_root_dir=tmp_path / "run", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    merged = tmp_path / "run" / "merged"
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    tensors = load_file(merged / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    k_proj = "model.layers.0.self_attn.k_proj.weight"  # no adapter: the FP8 weight as it dequantises
    assert torch.equal(tensors[k_proj], from_pretrained(tmp_path / "fp8").state_dict()[k_proj])
    back = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_error(from_pretrained(merged)(x), back(x).logits) <= 1e-5


def broken(tmp_path: Path, change) -> Path:
    write_fp8(tiny_hf("llama"), tmp_path, QWEN3_FP8 | {"weight_block_size": [32, 32]})
    state = load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    change(state, config)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


KEY = "model.layers.0.self_attn.q_proj"
CASES = {
    "block grid": (
        lambda s, c: s.update({f"{KEY}.weight_scale_inv": torch.ones(3, 2)}),
        r"q_proj.weight_scale_inv has shape \[3, 2\] for a weight of shape \[64, 64\]; weight_block_size \[32, 32\] needs \[2, 2\]",
    ),
    "per tensor": (
        lambda s, c: c["quantization_config"].update(weight_block_size=None),
        r"weight_scale_inv has shape \[2, 5\] for a weight of shape \[64, 160\]; one scale per tensor \(weight_block_size null\) needs \[\] or \[1\] or \[1, 1\]",
    ),
    "missing scale": (lambda s, c: s.pop(f"{KEY}.weight_scale_inv"), r"q_proj.weight is F8_E4M3 but has no model.layers.0.self_attn.q_proj.weight_scale_inv"),
    "scale without weight": (lambda s, c: s.update({"model.layers.0.mlp.gate.weight_scale_inv": torch.ones(1)}), r"gate.weight_scale_inv has no weight"),
    "uint8 scale": (lambda s, c: s.update({f"{KEY}.weight_scale_inv": torch.ones(2, 2, dtype=torch.uint8)}), r"weight_scale_inv is U8, expected an F32, BF16 or F16 scale"),
    "not converted": (
        lambda s, c: c["quantization_config"].update(modules_to_not_convert=["model.layers.*.self_attn"]),
        r"self_attn.k_proj is in quantization_config.modules_to_not_convert but has an FP8 scale",
    ),
    "method": (lambda s, c: c["quantization_config"].update(quant_method="gptq"), r"quant_method 'gptq' is not supported"),
    "ue8m0": (lambda s, c: c["quantization_config"].update(scale_fmt="ue8m0"), r"scale_fmt 'ue8m0' is not supported"),
    "block size": (lambda s, c: c["quantization_config"].update(weight_block_size=[128]), r"weight_block_size must be null or two positive integers"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_fp8_checkpoints_are_refused_in_one_line_before_any_read(case: str, tmp_path: Path, monkeypatch) -> None:
    from lightning_tune.checkpoint import load

    change, message = CASES[case]
    path = broken(tmp_path, change)
    monkeypatch.setattr(load, "assign_tensor", lambda *args: pytest.fail("a tensor was read before the checkpoint was refused"))
    with pytest.raises(CheckpointError, match=message) as err:
        from_pretrained(path)
    assert "\n" not in str(err.value)
