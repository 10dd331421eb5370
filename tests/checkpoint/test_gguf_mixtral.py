"""GGUF export and read of Mixtral (llama.cpp's `llama` architecture with `llama.expert_count`).

References no one here wrote:
- transformers: the tiny reference is a random transformers `MixtralForCausalLM` checkpoint. Our export of it, read
  back by our reader, gives transformers' logits. (transformers' own GGUF loader reads a llama file as a dense
  Llama, so it is no reference here.)
- gguf / llama.cpp's converter (convert_hf_to_gguf's LlamaModel): the file holds exactly the tensors gguf's
  `TensorNameMap` names for transformers' state dict, q and k rows in Meta's rotary order (the converter's
  `LlamaModel.permute`, restated below), the stacked experts split into gate and up as for Qwen3-MoE, every value
  bit for bit in f32, and the metadata TextModel writes from config.json (`num_local_experts` as expert_count).
- llama.cpp itself (llama-cpp-python, skipped where it is not installed): greedy tokens equal ours, f32 and q8_0.

Tolerance: fp32, relative 1e-5 as in test_gguf_qwen.py (the same operations in another order: a few ulps per layer).
A wrong layout (q/k rows not permuted back, gate and up swapped, experts transposed) gives 1e-2 or more.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
import test_gguf_families as families  # noqa: E402
from test_gguf_families import copy_gguf, llama_cpp_greedy, rel_error, tokens  # noqa: E402
from test_gguf_qwen import _checkpoint, stored  # noqa: E402

from lightning_tune.checkpoint import from_pretrained, load_config  # noqa: E402
from lightning_tune.checkpoint.gguf import _unsupported, save_gguf  # noqa: E402
from lightning_tune.io.gguf import GGUFError  # noqa: E402

byte_tokenizer = families.byte_tokenizer
MIXTRAL = dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, byte_tokenizer):
    """(transformers' model, its directory, our model read from it, our f32 GGUF of that)."""
    folder = tmp_path_factory.mktemp("mixtral")
    return families.export_f32(_checkpoint("mixtral", MIXTRAL, folder / "hf"), folder, byte_tokenizer)


def test_our_reader_gives_transformers_logits_from_our_export(exported) -> None:
    hf, _, ours, path = exported
    back = from_pretrained(path)
    assert back.config == stored(ours.config)  # experts, their size and the router survive the file
    assert load_config(path).model_type == "mixtral" and back.config.num_experts == 6
    x = tokens()
    with torch.no_grad():
        assert rel_error(back(x), hf(x).logits) <= 1e-5


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute: HF's rotate-half rows to Meta's interleaved ones."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_the_file_holds_what_llama_cpps_converter_writes(exported) -> None:
    hf, folder, _, path = exported
    c = json.loads((folder / "config.json").read_text())
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "llama"
    expected_meta = {
        "llama.block_count": c["num_hidden_layers"],
        "llama.embedding_length": c["hidden_size"],
        "llama.feed_forward_length": c["intermediate_size"],
        "llama.attention.head_count": c["num_attention_heads"],
        "llama.attention.head_count_kv": c["num_key_value_heads"],
        "llama.expert_count": c["num_local_experts"],
        "llama.expert_used_count": c["num_experts_per_tok"],
        "llama.rope.dimension_count": c["hidden_size"] // c["num_attention_heads"],
        "llama.attention.layer_norm_rms_epsilon": c["rms_norm_eps"],
    }
    for key, value in expected_meta.items():
        assert meta[key] == pytest.approx(value, rel=1e-7), key
    assert "llama.expert_feed_forward_length" not in meta  # llama.cpp's llama takes the experts' size from feed_forward_length
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c["num_hidden_layers"])
    expected = {}
    for key, w in hf.state_dict().items():
        pieces = [(key, w)]
        if key.endswith("self_attn.q_proj.weight"):
            pieces = [(key, _permute(w, c["num_attention_heads"]))]
        elif key.endswith("self_attn.k_proj.weight"):
            pieces = [(key, _permute(w, c["num_key_value_heads"]))]
        elif key.endswith("mlp.experts.gate_up_proj"):
            n_ff, base = w.shape[-2] // 2, key.removesuffix(".gate_up_proj")
            pieces = [(f"{base}.gate_proj.weight", w[..., :n_ff, :]), (f"{base}.up_proj.weight", w[..., n_ff:, :])]
        elif key.endswith("mlp.experts.down_proj"):
            pieces = [(f"{key}.weight", w)]
        for name, t in pieces:
            expected[names.get_name(name.removesuffix(".weight")) + ".weight"] = t
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)
    for name, w in expected.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(reversed(t.shape.tolist())) == list(w.shape), name
        assert np.array_equal(np.asarray(t.data).reshape(w.shape), w.contiguous().numpy()), name
    E, I, X = c["hidden_size"], c["intermediate_size"], c["num_local_experts"]  # llama.cpp's shapes, fastest axis first
    assert tensors["blk.0.ffn_gate_exps.weight"].shape.tolist() == tensors["blk.0.ffn_up_exps.weight"].shape.tolist() == [E, I, X]
    assert tensors["blk.0.ffn_down_exps.weight"].shape.tolist() == [I, E, X] and tensors["blk.0.ffn_gate_inp.weight"].shape.tolist() == [E, X]


def test_q8_0_export_reads_back_as_gguf_dequantises_it(exported, tmp_path, byte_tokenizer) -> None:
    _, _, ours, _ = exported
    state = ours.state_dict()
    Q = gguf.GGMLQuantizationType
    path = save_gguf(state, ours.config, tmp_path / "q8" / "m.gguf", outtype="q8_0", tokenizer=byte_tokenizer)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == Q.F32  # the router stays F32, as the converter keeps it
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.0.ffn_up_exps.weight"] == types["blk.0.ffn_down_exps.weight"] == Q.Q8_0
    back = from_pretrained(path)
    for key, value in back.state_dict().items():
        w = state[key]
        if w.dim() == 1 or key.endswith("mlp.gate.weight"):
            assert torch.equal(value, w), key
        elif key.endswith(("q_proj.weight", "k_proj.weight")):
            continue  # quantised in Meta's row order, then permuted back: the same values, other rows per block
        else:
            assert np.array_equal(value.numpy(), gguf.dequantize(gguf.quantize(w.numpy(), Q.Q8_0), Q.Q8_0)), key


def test_what_llama_cpps_llama_cannot_hold_of_a_mixture_is_one_line(exported, tmp_path, byte_tokenizer) -> None:
    _, _, ours, _ = exported
    cases = [
        ({"norm_topk_prob": False}, r"'llama' architecture, which has no norm_topk_prob False \(it always renormalises"),
        ({"router": "topk_softmax"}, r"'llama' architecture, which has no router 'topk_softmax'"),
        ({"moe_intermediate_dim": 32}, r"'llama' architecture, which has no moe_intermediate_dim 32 other than intermediate_dim 64"),
        ({"mlp_only_layers": (1,)}, r"'llama' architecture, which has no dense layers \[1\]"),
    ]
    for change, message in cases:
        with pytest.raises(GGUFError, match=message) as err:
            save_gguf(ours.state_dict(), dataclasses.replace(ours.config, **change), tmp_path / "x.gguf", tokenizer=byte_tokenizer)
        assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_expert_count_on_an_architecture_without_experts_is_one_line(tmp_path, byte_tokenizer) -> None:
    """A qwen3 file that says it has experts (llama.cpp would not build it either): one line, before any tensor is read."""
    from lightning_tune.families.config import ModelConfig
    from lightning_tune.model import CausalLM

    config = ModelConfig(vocab_size=256, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64, qk_norm=True, model_type="qwen3")
    torch.manual_seed(0)
    model = CausalLM(config)
    model.init_weights()
    dense = save_gguf(model.state_dict(), config, tmp_path / "dense" / "m.gguf", outtype="f32", tokenizer=byte_tokenizer)
    copy_gguf(dense, tmp_path / "bad.gguf", add={"qwen3.expert_count": (6, gguf.GGUFValueType.UINT32)})
    with pytest.raises(GGUFError, match=r"bad\.gguf: qwen3\.expert_count = 6: mixture-of-experts GGUF files are supported for llama, qwen3moe, gpt-oss, not 'qwen3'$") as err:
        from_pretrained(tmp_path / "bad.gguf")
    assert "\n" not in str(err.value)


def test_every_named_mixtral_size_is_exportable() -> None:
    from lightning_tune.families import FAMILIES
    from lightning_tune.families.config import ModelConfig

    for name, size in FAMILIES["mixtral"].sizes.items():
        assert _unsupported(ModelConfig(**size.config), "llama") == [], name


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed (it builds llama.cpp from source)")
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpp_loads_the_export_and_generates_our_tokens(outtype: str, exported, tmp_path, byte_tokenizer) -> None:
    """llama.cpp builds Mixtral from our file and its 8 greedy tokens are ours (q8_0: against our reader of the same
    file, its dequantised weights; llama.cpp's Q8_0 kernels also round activations, so this holds at these shapes,
    not by construction)."""
    from lightning_tune.generate import generate

    _, _, ours, path = exported
    if outtype == "q8_0":
        path = save_gguf(ours.state_dict(), ours.config, tmp_path / "q8" / "m.gguf", outtype="q8_0", tokenizer=byte_tokenizer)
        ours = from_pretrained(path).eval()
    prompt = [5, 17, 42]
    assert generate(ours, [prompt], max_new_tokens=8, temperature=0.0)[0] == llama_cpp_greedy(path, prompt, 8)
