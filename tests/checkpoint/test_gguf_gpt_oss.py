"""GGUF export and read of gpt-oss (llama.cpp's `gpt-oss` architecture, its "openai-moe" graph).

References no one here wrote:
- transformers: the tiny reference is a random transformers `GptOssForCausalLM` checkpoint (biases, sinks, sliding and
  full layers, YaRN, the clamped SwiGLU experts). Our export of it, read back by our reader, gives transformers'
  logits. (transformers' GGUF loader does not know gpt-oss.)
- gguf / llama.cpp's converter (convert_hf_to_gguf's GptOssModel, for experts not in MXFP4): the file holds the
  tensors it writes, restated here from its code: TensorNameMap's names, the expert weights transposed to
  [X, out, in] with the gate the even rows and the up the odd ones of gate_up_proj (their biases likewise),
  `attn_sinks.weight`, biases in F32; and the metadata of TextModel / GptOssModel (sliding window, expert size, YaRN).
- llama.cpp itself (llama-cpp-python, skipped where it is not installed): greedy tokens equal ours, f32 and q8_0.

llama.cpp turns YaRN with the correction range rounded outwards (ggml_rope_yarn_corr_dims: floor / ceil, and
transformers' `truncate: true`), where gpt-oss's config.json says `truncate: false`. The exact comparisons use a
model with `truncate: true`; a `truncate: false` model exports with one warning line and reads back as llama.cpp
runs it (truncated).

Tolerance: fp32, relative 1e-5 as in test_gguf_qwen.py. A wrong layout (gate and up not interleaved back, experts
not transposed, a missing sink or bias) gives 1e-2 or more.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
import test_gguf_families as families  # noqa: E402
from hf_helpers import tiny_hf  # noqa: E402
from test_gguf_families import copy_gguf, llama_cpp_greedy, rel_error, tokens  # noqa: E402
from test_gguf_qwen import stored  # noqa: E402

from lightning_tune.checkpoint import from_pretrained, load_config  # noqa: E402
from lightning_tune.checkpoint.gguf import _unsupported, save_gguf  # noqa: E402
from lightning_tune.io.gguf import GGUFError, parse_gguf  # noqa: E402

byte_tokenizer = families.byte_tokenizer
YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
OSS = dict(
    vocab_size=256,
    num_local_experts=6,
    num_experts_per_tok=2,
    intermediate_size=64,
    head_dim=16,
    max_position_embeddings=131072,  # 32 x the original 4096, as gpt-oss's config.json (transformers checks the ratio)
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    num_hidden_layers=4,
)


# A tiny gpt-oss of our own (no transformers checkpoint needed), for the tokenizer test.
FAMILIES_GPT_OSS_TINY = dict(
    vocab_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    embed_dim=32,
    intermediate_dim=32,
    max_seq_len=4096,
    attention_bias="all",
    attention_sinks=True,
    sliding_window=8,
    layer_types=("sliding_attention", "full_attention"),
    model_type="gpt_oss",
    num_experts=4,
    num_experts_per_tok=2,
    router="topk_softmax",
)


def _checkpoint(folder, truncate: bool):
    hf = tiny_hf("gpt_oss", rope_parameters={**YARN, "truncate": truncate}, **OSS)
    with torch.no_grad():  # routing decided (not near ties) and sinks that matter
        for name, p in hf.named_parameters():
            if name.endswith("mlp.router.weight"):
                p.normal_(0, 0.5)
            elif name.endswith("self_attn.sinks"):
                p.normal_(0, 1.0)
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope="module")
def exported(tmp_path_factory, byte_tokenizer):
    """(transformers' model with truncate true, its directory, our model read from it, our f32 GGUF of that)."""
    folder = tmp_path_factory.mktemp("gpt_oss")
    return families.export_f32(_checkpoint(folder / "hf", truncate=True), folder, byte_tokenizer)


def test_our_reader_gives_transformers_logits_from_our_export(exported) -> None:
    hf, _, ours, path = exported
    back = from_pretrained(path)
    # sinks, biases, windows, YaRN, experts survive the file (floats as float32; YaRN's scale derived from the factor)
    assert back.config == dataclasses.replace(stored(ours.config), rope_attention_factor=ours.config.rope_attention_factor)
    assert load_config(path).model_type == "gpt_oss"
    x = tokens(length=24)  # crosses the sliding window (8)
    with torch.no_grad():
        assert rel_error(back(x), hf(x).logits) <= 1e-5


def _converter_tensors(hf) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor as GptOssModel.modify_tensors writes a checkpoint whose experts are not MXFP4 (restated)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, hf.config.num_hidden_layers)

    def mapped(name: str) -> str:
        for suffix in (".weight", ".bias"):
            if name.endswith(suffix):
                return names.get_name(name.removesuffix(suffix)) + suffix
        raise AssertionError(name)

    out = {}
    for name, t in hf.state_dict().items():
        if "sinks" in name:
            name += ".weight"
        if "down_proj" in name:
            if name.endswith("_bias"):
                name = name.replace("down_proj_bias", "down_proj.bias")
            else:
                name, t = name.replace("down_proj", "down_proj.weight"), t.transpose(-1, -2)
        if "gate_up_proj" in name:
            if name.endswith("_bias"):
                out[mapped(name.replace("gate_up_proj_bias", "gate_proj.bias"))] = t[..., ::2]
                out[mapped(name.replace("gate_up_proj_bias", "up_proj.bias"))] = t[..., 1::2]
            else:
                t = t.transpose(-1, -2)
                out[mapped(name.replace("gate_up_proj", "gate_proj.weight"))] = t[:, ::2, :]
                out[mapped(name.replace("gate_up_proj", "up_proj.weight"))] = t[:, 1::2, :]
            continue
        out[mapped(name)] = t
    return out


def test_the_file_holds_what_llama_cpps_converter_writes(exported) -> None:
    hf, folder, _, path = exported
    c = json.loads((folder / "config.json").read_text())
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "gpt-oss"
    expected_meta = {  # TextModel.set_gguf_parameters, then GptOssModel's
        "gpt-oss.block_count": c["num_hidden_layers"],
        "gpt-oss.context_length": c["max_position_embeddings"],
        "gpt-oss.embedding_length": c["hidden_size"],
        "gpt-oss.feed_forward_length": c["intermediate_size"],
        "gpt-oss.attention.head_count": c["num_attention_heads"],
        "gpt-oss.attention.head_count_kv": c["num_key_value_heads"],
        "gpt-oss.attention.key_length": c["head_dim"],
        "gpt-oss.attention.value_length": c["head_dim"],
        "gpt-oss.attention.layer_norm_rms_epsilon": c["rms_norm_eps"],
        "gpt-oss.rope.freq_base": c["rope_parameters"]["rope_theta"],
        "gpt-oss.expert_count": c["num_local_experts"],
        "gpt-oss.expert_used_count": c["num_experts_per_tok"],
        "gpt-oss.attention.sliding_window": c["sliding_window"],
        "gpt-oss.expert_feed_forward_length": c["intermediate_size"],
        "gpt-oss.rope.scaling.type": "yarn",
        "gpt-oss.rope.scaling.factor": c["rope_parameters"]["factor"],
        "gpt-oss.rope.scaling.original_context_length": c["rope_parameters"]["original_max_position_embeddings"],
    }
    for key, value in expected_meta.items():
        assert meta[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-7)), key
    expected = _converter_tensors(hf)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)
    for name, w in expected.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(reversed(t.shape.tolist())) == list(w.shape), name
        assert np.array_equal(np.asarray(t.data).reshape(w.shape), w.contiguous().numpy()), name
    E, I, X = c["hidden_size"], c["intermediate_size"], c["num_local_experts"]  # llama.cpp's shapes, fastest axis first
    assert tensors["blk.0.ffn_gate_exps.weight"].shape.tolist() == [E, I, X] and tensors["blk.0.ffn_down_exps.weight"].shape.tolist() == [I, E, X]
    assert tensors["blk.0.ffn_gate_exps.bias"].shape.tolist() == [I, X] and tensors["blk.0.attn_sinks.weight"].shape.tolist() == [c["num_attention_heads"]]


def test_q8_0_keeps_biases_sinks_and_router_in_f32_and_reads_back_as_gguf_dequantises(exported, tmp_path, byte_tokenizer) -> None:
    _, _, ours, _ = exported
    Q = gguf.GGMLQuantizationType
    path = save_gguf(ours.state_dict(), ours.config, tmp_path / "q8" / "m.gguf", outtype="q8_0", tokenizer=byte_tokenizer)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    for name in ("blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_inp.bias", "blk.0.ffn_gate_exps.bias", "blk.0.ffn_down_exps.bias", "blk.0.attn_sinks.weight", "blk.0.attn_q.bias"):
        assert types[name] == Q.F32, name
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.0.ffn_down_exps.weight"] == types["blk.0.attn_q.weight"] == Q.Q8_0
    back = from_pretrained(path).state_dict()
    state = ours.state_dict()
    down = state["model.layers.0.mlp.experts.down_proj"].transpose(1, 2).contiguous().numpy()  # quantised along the file's rows
    assert np.array_equal(back["model.layers.0.mlp.experts.down_proj"].transpose(1, 2).numpy(), gguf.dequantize(gguf.quantize(down, Q.Q8_0), Q.Q8_0))
    for key in ("model.layers.0.mlp.experts.gate_up_proj_bias", "model.layers.0.self_attn.sinks", "model.layers.0.mlp.router.weight"):
        assert torch.equal(back[key], state[key]), key


def test_a_truncate_false_model_exports_with_one_warning_and_reads_back_as_llama_cpp_turns_it(tmp_path, byte_tokenizer, caplog) -> None:
    """gpt-oss's own config (truncate false): the file is what the converter writes for it; the warning says what
    llama.cpp does differently; read back, it is the same model with YaRN's range rounded (llama.cpp's rotary)."""
    hf = _checkpoint(tmp_path / "hf", truncate=False)
    ours = from_pretrained(tmp_path / "hf")
    assert ours.config.rope_truncate is False
    with caplog.at_level(logging.WARNING, logger="lightning_tune.checkpoint.gguf"):
        path = save_gguf(ours.state_dict(), ours.config, tmp_path / "gguf" / "m.gguf", outtype="f32", tokenizer=byte_tokenizer)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rounds YaRN's correction range outwards" in warnings[0] and "\n" not in warnings[0]
    back = from_pretrained(path)
    assert back.config == dataclasses.replace(stored(ours.config), rope_truncate=True, rope_attention_factor=ours.config.rope_attention_factor)
    truncated = _checkpoint(tmp_path / "truncated", truncate=True)  # the same seed: the same weights, YaRN rounded
    assert all(torch.equal(a, b) for a, b in zip(truncated.state_dict().values(), hf.state_dict().values(), strict=True))
    x = tokens(length=24)
    with torch.no_grad():
        assert rel_error(back(x), truncated(x).logits) <= 1e-5
        assert rel_error(back(x), hf(x).logits) > 1e-5  # the rounding is visible at this head size


def test_what_llama_cpps_gpt_oss_cannot_hold_is_one_line(exported, tmp_path, byte_tokenizer) -> None:
    _, _, ours, _ = exported
    cases = [
        ({"rope_beta_fast": 16.0}, r"which has no rope_beta_fast / rope_beta_slow 16\.0 / 1\.0 \(it uses 32 / 1\)"),
        ({"rope_attention_factor": 1.0}, r"which has no rope_attention_factor 1\.0 \(it scales by 0\.1 \* ln\(factor\) \+ 1\)"),
        ({"layer_types": ("full_attention", "sliding_attention")}, r"which has no layer_types \['full_attention', 'sliding_attention'"),
        ({"router": "softmax_topk"}, r"which has no router 'softmax_topk'"),
        ({"attention_sinks": False}, r"which has no model without attention sinks"),
        ({"attention_bias": "qkv"}, r"which has no attention_bias 'qkv'"),
    ]
    for change, message in cases:
        with pytest.raises(GGUFError, match=rf"'gpt-oss' architecture, {message}") as err:
            save_gguf(ours.state_dict(), dataclasses.replace(ours.config, **change), tmp_path / "x.gguf", tokenizer=byte_tokenizer)
        assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_every_named_gpt_oss_size_is_exportable() -> None:
    from lightning_tune.families import FAMILIES
    from lightning_tune.families.config import ModelConfig

    for name, size in FAMILIES["gpt_oss"].sizes.items():
        config = ModelConfig(**size.config)
        assert _unsupported(config, "gpt-oss") == [], name
        assert math.isclose(config.rope_attention_factor, 1 + 0.1 * math.log(config.rope_factor), rel_tol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed (it builds llama.cpp from source)")
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpp_loads_the_export_and_generates_our_tokens(outtype: str, exported, tmp_path, byte_tokenizer) -> None:
    """llama.cpp builds gpt-oss from our file and its greedy tokens are ours, 12 of them past the sliding window.
    q8_0: against our reader of the same file (its dequantised weights); llama.cpp's Q8_0 kernels also round the
    activations to 8 bits, so only the first tokens are compared (measured with llama-cpp-python 0.3.16: the 9th
    differs), which still shows llama.cpp takes Q8_0 experts with F32 biases, sinks and router."""
    from lightning_tune.generate import generate

    _, _, ours, path = exported
    if outtype == "q8_0":
        path = save_gguf(ours.state_dict(), ours.config, tmp_path / "q8" / "m.gguf", outtype="q8_0", tokenizer=byte_tokenizer)
        ours = from_pretrained(path).eval()
    prompt, count = [5, 17, 42, 9, 77, 3], 12 if outtype == "f32" else 6
    assert generate(ours, [prompt], max_new_tokens=count, temperature=0.0)[0] == llama_cpp_greedy(path, prompt, count, n_ctx=64)


def _gguf_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """OpenAI's MXFP4 ([..., G, 16] bytes, element 2j in byte j's low nibble and 2j + 1 in its high one, [..., G]
    E8M0 scales) as GGUF's MXFP4 blocks of 17 bytes: the scale, then byte j holding element j (low nibble) and
    element j + 16 (high nibble), as ggml's block_mxfp4 and the converter's repack_mxfp4 lay them out."""
    b = blocks.to(torch.int32)
    values = torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(*blocks.shape[:-1], 32)  # the 32 nibbles in order
    packed = (values[..., :16] | (values[..., 16:] << 4)).to(torch.uint8)
    out = torch.cat([scales.unsqueeze(-1), packed], dim=-1)  # [..., G, 17]
    return out.reshape(*out.shape[:-2], -1).numpy()


@pytest.fixture(scope="module")
def mxfp4(exported, tmp_path_factory, byte_tokenizer):
    """(our model of an MXFP4 gpt-oss checkpoint, a GGUF of it whose experts are that MXFP4 as the converter repacks it)."""
    from safetensors.torch import load_file, save_file

    _, folder, _, _ = exported
    out = tmp_path_factory.mktemp("mxfp4")
    hf_dir = out / "hf"
    hf_dir.mkdir()
    state = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    quantised = {}
    for layer in range(OSS["num_hidden_layers"]):
        for name, (rows, cols) in (("gate_up_proj", (128, 64)), ("down_proj", (64, 64))):  # the Hub's [X, out, in / 32, 16]
            key = f"model.layers.{layer}.mlp.experts.{name}"
            del state[key]
            blocks = torch.randint(0, 256, (6, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
            scales = torch.randint(120, 130, (6, rows, cols // 32), dtype=torch.uint8, generator=g)
            state[f"{key}_blocks"], state[f"{key}_scales"] = blocks, scales
            quantised[(layer, name)] = (blocks, scales)
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (hf_dir / "config.json").write_text(json.dumps(config))
    reference = from_pretrained(hf_dir).eval()  # dequantised as transformers' Mxfp4Config(dequantize=True) (tests/model/test_moe.py)
    dense = save_gguf(reference.state_dict(), reference.config, out / "f32" / "m.gguf", outtype="f32", tokenizer=byte_tokenizer)
    MXFP4 = gguf.GGMLQuantizationType.MXFP4
    replace = {}
    for layer in range(OSS["num_hidden_layers"]):
        blocks, scales = quantised[(layer, "gate_up_proj")]  # the converter: the gate the even rows, the up the odd
        replace[f"blk.{layer}.ffn_gate_exps.weight"] = (_gguf_mxfp4(blocks[:, 0::2], scales[:, 0::2]), MXFP4)
        replace[f"blk.{layer}.ffn_up_exps.weight"] = (_gguf_mxfp4(blocks[:, 1::2], scales[:, 1::2]), MXFP4)
        replace[f"blk.{layer}.ffn_down_exps.weight"] = (_gguf_mxfp4(*quantised[(layer, "down_proj")]), MXFP4)
    path = out / "mxfp4" / "m.gguf"
    path.parent.mkdir()
    copy_gguf(dense, path, replace=replace)
    return reference, path


def test_a_gguf_with_mxfp4_experts_reads_as_the_mxfp4_checkpoint(mxfp4) -> None:
    """A gpt-oss GGUF as llama.cpp's converter writes OpenAI's MXFP4 checkpoints (experts left in MXFP4): the gguf
    package dequantises them, and every expert is bit for bit the checkpoint's (each MXFP4 value is exact in fp32)."""
    reference, path = mxfp4
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if "_exps.weight" in t.name} == {"MXFP4"}
    back = from_pretrained(path).eval()
    expected = reference.state_dict()
    for key, value in back.state_dict().items():
        assert torch.equal(value, expected[key]), key
    x = tokens(length=24)
    with torch.no_grad():
        assert rel_error(back(x), reference(x)) == 0.0


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed (it builds llama.cpp from source)")
def test_llama_cpp_runs_the_mxfp4_file_with_our_greedy_tokens(mxfp4) -> None:
    """llama.cpp's MXFP4 kernels round activations (to 8 bits, as Q8_0's), so the first tokens are compared, as for q8_0."""
    from lightning_tune.generate import generate

    reference, path = mxfp4
    prompt = [5, 17, 42, 9, 77, 3]
    assert generate(reference, [prompt], max_new_tokens=6, temperature=0.0)[0] == llama_cpp_greedy(path, prompt, 6, n_ctx=64)


def test_gpt_oss_tokenizer_exports_as_llama_cpps_gpt_4o_vocabulary(tmp_path) -> None:
    """The real o200k_harmony tokenizer (npm, scripts/fetch_test_tokenizers.sh): written as llama.cpp's gpt2 model with
    pre-tokenizer "gpt-4o" (what the converter names this split), <|return|> the EOS; read back from the file it encodes
    as transformers' tokenizer of the folder, and so does llama.cpp's (where installed)."""
    from conftest import fetched_tokenizer

    from lightning_tune.families.config import ModelConfig
    from lightning_tune.model import CausalLM
    from lightning_tune.tokenizer import load_tokenizer

    folder = fetched_tokenizer("gptoss_tokenizer")
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    config = ModelConfig(
        **{**FAMILIES_GPT_OSS_TINY, "vocab_size": 201088}  # gpt-oss's embedding rows (the tokenizer's 200,019 ids, padded)
    )
    torch.manual_seed(0)
    model = CausalLM(config)
    model.init_weights()
    out = save_gguf(model.state_dict(), config, tmp_path / "out" / "m.gguf", outtype="f16", tokenizer=folder)
    meta = parse_gguf(out).metadata  # GGUFReader's values (tests/io/test_gguf_parse.py), ~40x faster on this vocabulary
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-4o")
    assert meta["tokenizer.ggml.tokens"][meta["tokenizer.ggml.eos_token_id"]] == "<|return|>" == reference.eos_token
    modelfile = (out.parent / "Modelfile").read_text()
    assert all(f'PARAMETER stop "{t}"' in modelfile for t in ("<|return|>", "<|endoftext|>", "<|call|>"))  # the family's stops
    back = load_tokenizer(out)
    texts = ["Hello world", "def f(x):\n    return x ** 2  # 12345678", "<|start|>user<|message|>你好, don't<|end|>", "  spaces\n\n\tand CAPS'll"]
    for text in texts:
        assert back.encode(text) == reference.encode(text, add_special_tokens=True), text
    if importlib.util.find_spec("llama_cpp") is not None:
        from llama_cpp import Llama as LlamaCpp

        llm = LlamaCpp(model_path=str(out), n_ctx=32, verbose=False, vocab_only=True)
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == reference.encode(text, add_special_tokens=False), text


def test_mxfp4_export_writes_the_experts_in_mxfp4_and_the_rest_as_llama_quantize_does(exported, tmp_path, byte_tokenizer) -> None:
    """`--outtype mxfp4` (llama-quantize's MXFP4_MOE): the experts' 3-D weights MXFP4, every other matrix Q8_0, biases,
    sinks, norms and the router F32; read back, each expert is gguf's dequantisation of gguf's MXFP4 of ours, in the
    file's layout. A model without experts is refused in one line."""
    _, _, ours, _ = exported
    Q = gguf.GGMLQuantizationType
    path = save_gguf(ours.state_dict(), ours.config, tmp_path / "mx" / "m.gguf", outtype="mxfp4", tokenizer=byte_tokenizer)
    parsed = parse_gguf(path)
    types = {t.name: t.tensor_type for t in parsed.tensors}
    assert parsed.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.0.ffn_up_exps.weight"] == types["blk.0.ffn_down_exps.weight"] == Q.MXFP4
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == Q.Q8_0
    assert {types[n] for n in ("blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_exps.bias", "blk.0.attn_sinks.weight", "blk.0.attn_norm.weight")} == {Q.F32}
    back = from_pretrained(path).state_dict()
    down = ours.state_dict()["model.layers.0.mlp.experts.down_proj"].transpose(1, 2).contiguous().numpy()  # [X, out, in] as written
    assert np.array_equal(back["model.layers.0.mlp.experts.down_proj"].transpose(1, 2).numpy(), gguf.dequantize(gguf.quantize(down, Q.MXFP4), Q.MXFP4))
    from lightning_tune.families.config import ModelConfig
    from lightning_tune.model import CausalLM

    dense = ModelConfig(vocab_size=256, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64)
    with pytest.raises(GGUFError, match=r"--outtype mxfp4 writes a mixture's experts in MXFP4 .*this model has no experts: use q8_0$"):
        save_gguf(CausalLM(dense).state_dict(), dense, tmp_path / "dense" / "m.gguf", outtype="mxfp4", tokenizer=byte_tokenizer)
    assert not (tmp_path / "dense").exists()
    if importlib.util.find_spec("llama_cpp") is not None:  # llama.cpp runs the file: its first greedy tokens are our reader's
        from lightning_tune.generate import generate

        prompt = [5, 17, 42, 9, 77, 3]
        assert generate(from_pretrained(path).eval(), [prompt], max_new_tokens=4, temperature=0.0)[0] == llama_cpp_greedy(path, prompt, 4, n_ctx=64)
