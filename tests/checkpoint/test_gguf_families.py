"""GGUF export and read of Gemma 2, Gemma 3, Phi-3 / Phi-4-mini and OLMo 2 (llama.cpp's gemma2, gemma3, phi3, olmo2).

References no one here wrote:
- transformers: each tiny reference is a random transformers checkpoint (`save_pretrained`). Our export of
  it, read back by our reader, gives transformers' logits; transformers' own GGUF loader
  (`from_pretrained(..., gguf_file=)`, which knows gemma2, gemma3 and phi3, not olmo2) gives ours.
- gguf / llama.cpp's converter: the file holds exactly the tensors that gguf's `TensorNameMap` names for
  transformers' own state dict (Phi-3's fused `qkv_proj` / `gate_up_proj` as the checkpoint stores them),
  the checkpoint's values bit for bit in f32 (Gemma's norms plus 1, as convert_hf_to_gguf adds), and the
  metadata its model classes derive from config.json (the formulas restated here from the converter).
- llama.cpp itself (llama-cpp-python, skipped where it is not installed): greedy tokens equal ours.

Tolerance: fp32, relative 1e-5 as in test_families_2026.py (the same operations in another order: a few
ulps per layer; Gemma's norms go through w + 1 - 1, one more rounding of 2^-24 relative to 1 per weight,
~1e-7 on the logits). A wrong operation (a norm without its 1, a swapped q/k, a missing cap) gives 1e-2 or more.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from hf_helpers import tiny_hf  # noqa: E402

from lightning_tune.checkpoint import from_pretrained, load_config  # noqa: E402
from lightning_tune.checkpoint.gguf import gguf_config, save_gguf  # noqa: E402
from lightning_tune.io.gguf import GGUFError  # noqa: E402
from lightning_tune.tokenizer.gguf import bytes_to_unicode  # noqa: E402

VOCAB = 256  # the byte tokenizer's 253 tokens + 3 specials
LENGTH = 24  # crosses the sliding windows (8) and Phi-3's original context (16)
PHI3_LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0]}
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
# family -> (model_type, llama.cpp architecture, transformers config overrides), every switch on that llama.cpp
# can hold. query_pre_attn_scalar = head_dim: llama.cpp scales by head_dim ** -0.5 below the 27B's layer count.
CASES = {
    "gemma2": ("gemma2", "gemma2", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("gemma3_text", "gemma3", dict(num_hidden_layers=6, hidden_size=32, head_dim=16, intermediate_size=64, query_pre_attn_scalar=16, sliding_window=8, rope_parameters=GEMMA3_ROPE)),
    # Phi-4-mini's switches: a quarter of the head turns, LongRoPE past an original context of 16 (of 64), tied head.
    "phi3": ("phi3", "phi3", dict(partial_rotary_factor=0.5, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, original_max_position_embeddings=16, rope_scaling=PHI3_LONGROPE)),
    "phi3_window": ("phi3", "phi3", dict(sliding_window=8, pad_token_id=0, eos_token_id=2)),
    "olmo2": ("olmo2", "olmo2", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
}
# Configs whose every value transformers' GGUF loader reads or defaults to (it reads no soft-caps, no
# query_pre_attn_scalar, no rotary scaling or partial rotary, no Phi-3 window): 256 = Gemma's default scalar.
TRANSFORMERS_CASES = {
    "gemma2": ("gemma2", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": ("gemma3_text", dict(num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=8)),
    "phi3": ("phi3", dict(pad_token_id=0, eos_token_id=2)),
}


def as_stored(config):
    """`config` with its float hyper-parameters rounded to float32, as GGUF metadata holds them (llama.cpp's f32)."""
    import dataclasses

    f32 = {k: float(np.float32(v)) for k, v in dataclasses.asdict(config).items() if isinstance(v, float)}
    tuples = {k: tuple(float(np.float32(f)) for f in v) for k, v in dataclasses.asdict(config).items() if k.startswith("rope_") and isinstance(v, tuple)}
    return dataclasses.replace(config, **f32, **tuples)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def tokens(length: int = LENGTH, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB - 3, (batch, length), generator=torch.Generator().manual_seed(1))


def _checkpoint(model_type: str, kwargs: dict, folder: Path):
    hf = tiny_hf(model_type, vocab_size=VOCAB, **kwargs)
    with torch.no_grad():  # Gemma's norms are (1 + w): noise around 0, not tiny_hf's 1 + noise
        for name, p in hf.named_parameters():
            if model_type.startswith("gemma") and name.endswith("norm.weight"):
                p.copy_(0.2 * torch.randn_like(p))
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json of VOCAB ids (what the export writes as llama.cpp's 'gpt2' vocabulary)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(250)} | {"Ġt": 250, "he": 251, "Ġthe": 252}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e"), ("Ġt", "he")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "<bos>", "<eos>")])
    folder = tmp_path_factory.mktemp("byte_tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "bos_token": "<bos>", "pad_token": "<pad>", "add_bos_token": False}))
    return folder


def export_f32(hf, folder: Path, tokenizer: Path) -> tuple:
    """(transformers' model, its directory folder/hf, our model read from it, our f32 GGUF of that in folder/gguf)."""
    ours = from_pretrained(folder / "hf")
    path = save_gguf(ours.state_dict(), ours.config, folder / "gguf" / "model.gguf", outtype="f32", tokenizer=tokenizer)
    return hf, folder / "hf", ours, path


def export_cases(tmp_path_factory, cases: dict, checkpoint, tokenizer: Path) -> dict:
    """family -> `export_f32` of `checkpoint(model_type, kwargs, folder / "hf")` for each (model_type, _, kwargs) of `cases`."""
    out = {}
    for family, (model_type, _, kwargs) in cases.items():
        folder = tmp_path_factory.mktemp(family)
        out[family] = export_f32(checkpoint(model_type, kwargs, folder / "hf"), folder, tokenizer)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, byte_tokenizer) -> dict:
    """family -> (transformers' model, its directory, our model read from it, our f32 GGUF of that)."""
    return export_cases(tmp_path_factory, CASES, _checkpoint, byte_tokenizer)


@pytest.mark.parametrize("family", CASES)
def test_our_reader_gives_transformers_logits_from_our_export(family: str, exported) -> None:
    hf, folder, ours, path = exported[family]
    back = from_pretrained(path)
    assert back.config == as_stored(ours.config)  # every switch survives the file: windows, caps, bases, LongRoPE factors, partial rotary
    x = tokens()
    with torch.no_grad():
        assert rel_error(back(x), hf(x).logits) <= 1e-5


def _converter_metadata(arch: str, hf_config) -> dict:
    """What convert_hf_to_gguf's model class for `arch` writes for these keys, restated from its code
    (conversion/gemma.py Gemma2Model / Gemma3Model, phi.py Phi3MiniModel, olmo.py Olmo2Model on TextModel)."""
    c = hf_config
    meta = {
        f"{arch}.context_length": c.max_position_embeddings,
        f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.block_count": c.num_hidden_layers,
        f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads,
    }
    rope = c.rope_parameters
    if arch == "gemma2":
        meta |= {f"{arch}.attention.key_length": c.head_dim, f"{arch}.attention.value_length": c.head_dim}
        meta |= {f"{arch}.attn_logit_softcapping": c.attn_logit_softcapping, f"{arch}.final_logit_softcapping": c.final_logit_softcapping, f"{arch}.attention.sliding_window": c.sliding_window}
    if arch == "gemma3":
        meta |= {f"{arch}.attention.key_length": c.head_dim, f"{arch}.attention.value_length": c.head_dim, f"{arch}.attention.sliding_window": c.sliding_window}
        meta |= {f"{arch}.rope.freq_base": rope["full_attention"]["rope_theta"], f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": rope["full_attention"]["factor"]}
    if arch == "phi3":
        rot_pct = rope.get("partial_rotary_factor", 1.0)
        meta |= {f"{arch}.rope.dimension_count": int(rot_pct * c.hidden_size) // c.num_attention_heads, f"{arch}.attention.sliding_window": c.sliding_window or 0}
        meta |= {f"{arch}.rope.scaling.original_context_length": rope.get("original_max_position_embeddings", c.max_position_embeddings), f"{arch}.rope.freq_base": rope["rope_theta"]}
        if rope.get("long_factor"):
            scale = c.max_position_embeddings / rope["original_max_position_embeddings"]
            meta[f"{arch}.rope.scaling.attn_factor"] = math.sqrt(1 + math.log(scale) / math.log(rope["original_max_position_embeddings"]))
    if arch == "olmo2":
        meta |= {f"{arch}.rope.freq_base": rope["rope_theta"]}
    return meta


@pytest.mark.parametrize("family", CASES)
def test_the_file_holds_what_llama_cpps_converter_writes(family: str, exported) -> None:
    hf, folder, ours, path = exported[family]
    _, arch, _ = CASES[family]
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == arch
    for key, value in _converter_metadata(arch, hf.config).items():
        assert meta[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-7)), key
    if arch in ("gemma2", "olmo2") or family == "phi3_window":
        assert f"{arch}.rope.scaling.type" not in meta
    # Tensor names: gguf's TensorNameMap over transformers' own keys (the fused Phi-3 ones as stored), as the
    # converter's map_tensor_name; a tied head writes no output.weight.
    ids = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    names = gguf.get_tensor_name_map(ids[arch], hf.config.num_hidden_layers)
    hf_state = hf.state_dict()
    tied = hf.config.tie_word_embeddings
    expected = {names.get_name(k.removesuffix(".weight")) + ".weight": k for k in hf_state if not (tied and k == "lm_head.weight")}
    stored = {t.name: t for t in reader.tensors}
    extra = {"rope_factors_long.weight", "rope_factors_short.weight"} if family == "phi3" else set()
    assert set(stored) == set(expected) | extra
    for name, key in expected.items():
        w = hf_state[key]
        if arch.startswith("gemma") and key.endswith("norm.weight"):
            w = w + 1  # the converter: data_torch + 1 for every *norm.weight
        t = stored[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(reversed(t.shape.tolist())) == list(w.shape)
        assert np.array_equal(np.asarray(t.data).reshape(w.shape), w.numpy()), name
    if extra:
        rope = hf.config.rope_parameters
        assert np.asarray(stored["rope_factors_long.weight"].data).tolist() == rope["long_factor"]
        assert np.asarray(stored["rope_factors_short.weight"].data).tolist() == rope["short_factor"]


@pytest.mark.parametrize("family", TRANSFORMERS_CASES)
def test_transformers_gguf_loader_gives_our_logits(family: str, tmp_path, byte_tokenizer) -> None:
    model_type, kwargs = TRANSFORMERS_CASES[family]
    hf = _checkpoint(model_type, kwargs, tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    path = save_gguf(ours.state_dict(), ours.config, tmp_path / "gguf" / "model.gguf", outtype="f32", tokenizer=byte_tokenizer)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        expected = ours(x)
        assert rel_error(theirs(x).logits, expected) <= 1e-5
        assert rel_error(hf(x).logits, expected) <= 1e-5  # and the checkpoint they all came from


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_quantised_exports_read_back_as_gguf_dequantises_them(family: str, exported, tmp_path, byte_tokenizer) -> None:
    """q8_0 / bf16: each weight we read back is gguf's dequantisation of gguf's quantisation of ours (bf16: torch's
    rounding), Phi-3's fused rows sliced before dequantising (Q8_0 blocks lie within a row, so a part quantises
    as the whole does); Gemma's norms stay F32 and come back as w + 1 - 1."""
    hf, folder, ours, _ = exported[family]
    state = ours.state_dict()
    x = tokens()
    Q = gguf.GGMLQuantizationType
    with torch.no_grad():
        exact = hf(x).logits
        for outtype in ("q8_0", "bf16"):
            path = save_gguf(state, ours.config, tmp_path / outtype / "m.gguf", outtype=outtype, tokenizer=byte_tokenizer)
            back = from_pretrained(path)
            for key, value in back.state_dict().items():
                w = state[key]
                if w.dim() == 1:
                    shifted = w + 1 if family == "gemma3" else w
                    assert torch.equal(value, (shifted - 1) if family == "gemma3" else w), key
                elif outtype == "q8_0":
                    expected = gguf.dequantize(gguf.quantize(w.numpy(), Q.Q8_0), Q.Q8_0)
                    assert np.array_equal(value.numpy(), expected), key
                else:
                    assert torch.equal(value, w.to(torch.bfloat16).float()), key
            # Every weight is what it should be (above), so the logits are too; they differ from the fp32 model's
            # (measured at these shapes: bf16 0.7%, q8_0 up to 2.4% relative), which the rounding must show.
            assert rel_error(back(x), exact) > 1e-4, outtype


def test_what_an_architecture_cannot_hold_is_one_line(exported, tmp_path, byte_tokenizer) -> None:
    import dataclasses

    _, _, gemma2, _ = exported["gemma2"]
    _, _, gemma3, _ = exported["gemma3"]
    _, _, olmo2, _ = exported["olmo2"]
    cases = [
        (gemma2, {"query_pre_attn_scalar": 24}, r"llama\.cpp's 'gemma2' architecture, which has no query_pre_attn_scalar 24 \(at this shape it scales scores by 16 \*\* -0\.5\)"),
        (gemma2, {"final_logit_softcap": None}, "which has no final_logit_softcap None|without attention and final logit soft-capping"),
        (gemma3, {"rope_local_base": 20000.0}, r"'gemma3' architecture, which has no rope_local_base 20000\.0 \(its sliding layers turn with base 10000\)"),
        (gemma3, {"layer_types": ("sliding_attention", "full_attention")}, "'gemma3' architecture, which has no layer_types"),
        (olmo2, {"sliding_window": 4}, "'olmo2' architecture, which has no sliding_window 4"),
        (olmo2, {"model_type": "ministral3"}, "architectures, which have no model_type 'ministral3'"),
        (olmo2, {"attention_sinks": True}, "'olmo2' architecture, which has no attention_sinks"),
    ]
    for model, change, message in cases:
        config = dataclasses.replace(model.config, **change)
        with pytest.raises(GGUFError, match=message) as err:
            save_gguf(model.state_dict(), config, tmp_path / "x.gguf", tokenizer=byte_tokenizer)
        assert "\n" not in str(err.value)
    untied = {k: v.clone() for k, v in gemma2.state_dict().items()}
    untied["lm_head.weight"] += 1
    with pytest.raises(GGUFError, match="'gemma2' architecture, which has no output weight of its own"):
        save_gguf(untied, gemma2.config, tmp_path / "x.gguf", tokenizer=byte_tokenizer)
    assert not list(tmp_path.iterdir())


def _rewrite(source: Path, path: Path, fields: dict | None = None, cut: dict | None = None) -> None:
    """`source` written again with some metadata values replaced (`fields`) and some tensors' rows cut (`cut`: name -> rows)."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(path, arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = (fields or {}).get(key, field.contents())
        if key in (fields or {}) and isinstance(value, str):
            writer.add_string(key, value)
        elif field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, field.types[0])
    for t in reader.tensors:
        data = np.asarray(t.data).reshape(list(reversed(t.shape.tolist())))
        writer.add_tensor(t.name, data[: (cut or {}).get(t.name, len(data))])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def copy_gguf(source: Path, path: Path, *, add: dict | None = None, drop: tuple[str, ...] = (), replace: dict | None = None) -> None:
    """`source` written again under its own architecture with metadata `add`ed (key -> (value, GGUFValueType)),
    tensors in `drop` left out and tensors in `replace` (name -> (array, raw ggml type or None)) swapped in."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(path, arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for key, (value, kind) in (add or {}).items():
        writer.add_key_value(key, value, kind)
    for t in reader.tensors:
        if t.name in drop:
            continue
        if t.name in (replace or {}):
            data, raw = replace[t.name]
            writer.add_tensor(t.name, data, raw_dtype=raw)
        else:
            writer.add_tensor(t.name, np.asarray(t.data).reshape(list(reversed(t.shape.tolist()))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_greedy(path: Path, prompt: list[int], count: int, n_ctx: int = 32) -> list[int]:
    """llama.cpp's (llama-cpp-python's) first `count` greedy tokens after `prompt` from the file at `path`."""
    from llama_cpp import Llama as LlamaCpp

    llm = LlamaCpp(model_path=str(path), n_ctx=n_ctx, verbose=False)
    tokens = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        if len(tokens) == count:
            break
    return tokens


def test_bad_phi3_rope_factors_are_one_line(exported, tmp_path) -> None:
    """Sizes read from the file are checked against the file: a rope_factors tensor of the wrong length."""
    _, _, _, source = exported["phi3"]
    path = tmp_path / "bad.gguf"
    _rewrite(source, path, cut={"rope_factors_long.weight": 3})
    with pytest.raises(GGUFError, match=r"bad\.gguf: rope_factors_long\.weight must hold 4 F32 values \(half the rotary features\), it holds 3"):
        gguf_config(path)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed (it builds llama.cpp from source)")
@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3", "olmo2"])
def test_llama_cpp_loads_each_export_and_generates_our_tokens(family: str, exported) -> None:
    """Greedy tokens within the shortest window (8): llama.cpp disables Phi-3's window and picks LongRoPE's factors
    by its context size, not by the sequence's length as transformers does: its context (16 asked, padded to 32 by
    llama.cpp 0.3.16's build) exceeds the original 16, so it turns with the long factors, which ours must use too."""
    import dataclasses

    from llama_cpp import Llama as LlamaCpp

    from lightning_tune.generate import generate
    from lightning_tune.model import CausalLM

    _, _, ours, path = exported[family]
    prompt = [5, 17, 42]
    llm = LlamaCpp(model_path=str(path), n_ctx=16, verbose=False)
    if ours.config.rope_type == "longrope":
        assert llm.n_ctx() > ours.config.rope_original_max_seq_len  # else llama.cpp would turn with the short factors
        long = CausalLM(dataclasses.replace(ours.config, rope_short_factor=ours.config.rope_long_factor))
        long.load_state_dict(ours.state_dict())
        ours = long.eval()
    theirs = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 4:
            break
    assert generate(ours, [prompt], max_new_tokens=4, temperature=0.0)[0] == theirs


def test_load_config_of_an_export_names_the_family(exported) -> None:
    for family, (model_type, _, _) in CASES.items():
        _, _, ours, path = exported[family]
        assert load_config(path).model_type == model_type == ours.config.model_type


def _sentencepiece(add_dummy_prefix: bool) -> bytes:
    import io

    import sentencepiece as spm

    lines = ["hello world this is a test", "another line of text here", "abc def ghi"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=300, byte_fallback=True, unk_id=3, bos_id=2, eos_id=1, pad_id=0,
        add_dummy_prefix=add_dummy_prefix, normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2, num_threads=1,
    )  # fmt: skip
    return model.getvalue()


@pytest.mark.parametrize("dummy_prefix", [False, True])
def test_a_gemma_style_sentencepiece_tokenizer_keeps_its_missing_space_prefix(dummy_prefix: bool, exported, tmp_path) -> None:
    """Gemma's tokenizer.model has no dummy prefix (convert_hf_to_gguf writes add_space_prefix false for Gemma);
    the export says so and the tokenizer read back encodes as sentencepiece does, BOS first."""
    import dataclasses

    import sentencepiece as spm

    from lightning_tune.model import CausalLM
    from lightning_tune.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.model").write_bytes(_sentencepiece(dummy_prefix))
    _, _, gemma3, _ = exported["gemma3"]
    config = dataclasses.replace(gemma3.config, vocab_size=320)
    torch.manual_seed(0)
    model = CausalLM(config)
    model.init_weights()
    out = save_gguf(model.state_dict(), config, tmp_path / "out" / "m.gguf", outtype="f16", tokenizer=tmp_path / "tokenizer.model")
    meta = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items()}
    assert meta["tokenizer.ggml.add_space_prefix"] is dummy_prefix
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ours = load_tokenizer(out)
    for text in ["hello world", "a test here", "this is\nanother line", "abc  def"]:
        assert ours.encode(text) == [2, *sp.encode(text)], text
        assert ours.decode(ours.encode(text)[1:]) == text


def test_export_command_converts_a_phi3_directory(exported, tmp_path, byte_tokenizer) -> None:
    """`export --format gguf --checkpoint_dir` on a transformers directory (fused qkv_proj / gate_up_proj on disk)."""
    from lightning_tune.recipes.export import export_gguf

    hf, folder, _, _ = exported["phi3"]
    out = export_gguf(tmp_path / "phi3.gguf", outtype="f32", checkpoint_dir=str(folder), tokenizer_path=str(byte_tokenizer))
    x = tokens()
    with torch.no_grad():
        assert rel_error(from_pretrained(out)(x), hf(x).logits) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "phi3.gguf"]


def test_lazily_merged_weights_export_as_the_tensors_they_compute(exported, tmp_path, byte_tokenizer) -> None:
    """QLoRA's merged/ and GGUF exports hold `LazyWeight`s (merged when written): Phi-3's fused rows of lazy parts
    are the same file as of the computed tensors, and each is computed once."""
    from lightning_tune.layers.lora import LazyWeight

    _, _, ours, _ = exported["phi3"]
    state = ours.state_dict()
    calls = []

    def lazy(key: str) -> LazyWeight:
        return LazyWeight(state[key].shape, state[key].dtype, lambda: calls.append(key) or state[key].clone())

    lazy_state = {k: lazy(k) if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")) else v for k, v in state.items()}
    plain = save_gguf(state, ours.config, tmp_path / "plain" / "m.gguf", outtype="q8_0", tokenizer=byte_tokenizer)
    merged = save_gguf(lazy_state, ours.config, tmp_path / "lazy" / "m.gguf", outtype="q8_0", tokenizer=byte_tokenizer)
    assert sorted(calls) == sorted(k for k, v in lazy_state.items() if isinstance(v, LazyWeight))
    plain_tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(plain).tensors}
    merged_tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(merged).tensors}
    assert plain_tensors.keys() == merged_tensors.keys() and all(np.array_equal(plain_tensors[n], merged_tensors[n]) for n in plain_tensors)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("phi3.rope.scaling.original_context_length", 1, "original_context_length = 1; LongRoPE needs an original context of at least 2"),
        ("phi3.rope.dimension_count", 40, r"phi3\.rope\.dimension_count = 40, it must be in \(0, 16\]"),
        ("phi3.block_count", "two", "its metadata does not describe a model"),
    ],
)
def test_bad_phi3_metadata_is_one_line(key: str, value, message: str, exported, tmp_path) -> None:
    """Values read from a file that would divide by zero or are of the wrong type: one line naming the file."""
    _, _, _, source = exported["phi3"]
    path = tmp_path / "bad.gguf"
    _rewrite(source, path, fields={key: value})
    with pytest.raises(GGUFError, match=message) as err:
        gguf_config(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_every_named_size_of_these_families_is_exportable() -> None:
    """The released shapes pass what llama.cpp can hold, the 27Bs' score scale (embed // heads at 46 / 62 layers) included."""
    from lightning_tune.checkpoint.gguf import _unsupported, gguf_arch
    from lightning_tune.families import FAMILIES
    from lightning_tune.families.config import ModelConfig
    from lightning_tune.families.phi4 import MINI_FAMILY

    sizes = {name: size for family in (*FAMILIES.values(), MINI_FAMILY) for name, size in family.sizes.items()}
    checked = []
    for name, size in sizes.items():
        config = ModelConfig(**size.config)
        arch = gguf_arch(config)
        if arch in ("gemma2", "gemma3", "phi3", "olmo2"):
            assert _unsupported(config, arch) == [], name
            checked.append(name)
    assert {"gemma2_27b", "gemma3_27b", "gemma3_270m", "phi3_mini_4k", "phi4_14b", "phi4_mini", "olmo2_13b"} <= set(checked)


def test_the_modelfile_stops_at_the_familys_end_of_turn_where_the_vocabulary_has_it(exported) -> None:
    """Gemma 3 ends a turn with <end_of_turn> (106 in its vocabulary): Ollama must stop there as at <eos>;
    a vocabulary without the token at that id (our byte tokenizer) gets no such line."""
    import dataclasses

    from lightning_tune.checkpoint.gguf import family_stops, modelfile_text
    from lightning_tune.tokenizer.gguf import VocabMetadata

    _, _, gemma3, path = exported["gemma3"]
    config = dataclasses.replace(gemma3.config, vocab_size=262144)
    tokens = [f"t{i}" for i in range(200)]
    tokens[1], tokens[106] = "<eos>", "<end_of_turn>"
    vocab = VocabMetadata(model="llama", tokens=tokens, token_types=[1] * 200, special_ids={"eos": 1})
    assert family_stops(config, vocab) == ("<eos>", "<end_of_turn>")
    text = modelfile_text("m.gguf", vocab, family_stops(config, vocab))
    assert [line for line in text.splitlines() if line.startswith("PARAMETER")] == ['PARAMETER stop "<eos>"', 'PARAMETER stop "<end_of_turn>"']
    written = (path.parent / "Modelfile").read_text()  # the byte tokenizer: <eos> at 255, nothing at 106
    assert [line for line in written.splitlines() if line.startswith("PARAMETER")] == ['PARAMETER stop "<eos>"']
