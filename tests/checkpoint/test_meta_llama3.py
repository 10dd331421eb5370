"""Meta's original Llama 3.x folders: consolidated.*.pth + params.json (use_scaled_rope, rope_theta 500000)
and the tiktoken tokenizer.model, against transformers and tiktoken.

The checkpoint is a tiny random transformers Llama written out in Meta's layout (the inverse of
transformers' `convert_llama_weights_to_hf.py`: wq/wk rows interleaved, Meta's names), so loading it
must give transformers' logits (fp32, relative 1e-5 as in test_families.py) and greedy tokens. The
tokenizer.model is Llama 3.1's ranks written from the shipped tokenizer.json (its byte-level tokens
decoded to bytes): ids must equal the Hugging Face tokenizer's and tiktoken's.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_helpers import tiny_hf  # noqa: E402

from lightning_tune.checkpoint import from_pretrained, load_config  # noqa: E402
from lightning_tune.families.llama2 import META_KEYS  # noqa: E402
from lightning_tune.generate.loop import generate  # noqa: E402

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets" / "llama3_1_tokenizer"
# Llama 3.1's rotary (Meta's apply_scaling: factor 8, 1, 4, 8192) at rope_theta 500000: with head_dim 16 the
# slowest frequencies' wavelengths exceed 8192, so the scaling changes the logits even at 24 positions.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def to_meta(hf: transformers.PreTrainedModel, out: Path, **params) -> Path:
    """Write `hf` as Meta's consolidated.00.pth + params.json (one model-parallel shard)."""
    config = hf.config
    ours = {hf_name: meta for meta, (hf_name, _) in META_KEYS.items()}
    state = {}
    for key, tensor in hf.state_dict().items():
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        name = ours[key.split(".", 3)[3]] if layer is not None else ours[key]
        heads = {"attention.wq.weight": config.num_attention_heads, "attention.wk.weight": config.num_key_value_heads}.get(name)
        if heads:  # rotate-half rows -> Meta's interleaved pairs
            rows, cols = tensor.shape
            tensor = tensor.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
        state[f"layers.{layer}.{name}" if layer is not None else name] = tensor.clone()
    if config.tie_word_embeddings:
        state.pop("output.weight")
    out.mkdir(parents=True)
    torch.save(state, out / "consolidated.00.pth")
    base = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads, "n_kv_heads": config.num_key_value_heads}
    (out / "params.json").write_text(json.dumps(base | {"vocab_size": config.vocab_size, "multiple_of": 32, "norm_eps": config.rms_norm_eps, "rope_theta": 500000.0} | params))
    return out


@pytest.fixture(scope="module")
def llama31(tmp_path_factory) -> tuple[transformers.PreTrainedModel, Path]:
    # dim 64 -> Meta's FFN: int(2 * 256 / 3) = 170, rounded up to a multiple of 32 = 192
    hf = tiny_hf("llama", intermediate_size=192, rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072)
    return hf, to_meta(hf, tmp_path_factory.mktemp("meta") / "original", use_scaled_rope=True)


def test_llama3_1_folder_loads_with_transformers_logits_and_greedy_tokens(llama31) -> None:
    hf, path = llama31
    config = load_config(path)
    assert (config.rope_type, config.rope_factor, config.rope_base, config.max_seq_len, config.tie_word_embeddings) == ("llama3", 8.0, 500000.0, 131072, False)
    ours = from_pretrained(path)
    x = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_error(ours(x), hf(x).logits) <= 1e-5
        expected = hf.generate(x[:1, :5], max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    assert generate(ours, [x[0, :5].tolist()], max_new_tokens=10) == [expected]


def test_the_scaled_rotary_acts_at_these_lengths(llama31) -> None:
    """Guards the test above: the same folder read without use_scaled_rope gives other logits."""
    hf, path = llama31
    params = json.loads((path / "params.json").read_text())
    (path / "params.json").write_text(json.dumps(params | {"use_scaled_rope": False}))
    try:
        plain = from_pretrained(path)
        assert plain.config.rope_type == "default" and plain.config.max_seq_len == 8192  # Llama 3.0: rope_theta 500000 loads, unscaled
        x = torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert rel_error(plain(x), hf(x).logits) > 1e-4
    finally:
        (path / "params.json").write_text(json.dumps(params))


def test_llama3_2_folder_without_output_weight_ties_the_head(tmp_path: Path) -> None:
    """Llama 3.2 1B / 3B: factor 32 (torchtune's llama3_2 builders) where params.json says rope_scaling_factor; no output weight: tied."""
    rope = LLAMA3_ROPE | {"factor": 32.0}
    hf = tiny_hf("llama", intermediate_size=192, rope_parameters=rope, tie_word_embeddings=True, max_position_embeddings=131072)
    path = to_meta(hf, tmp_path / "original", use_scaled_rope=True, rope_scaling_factor=32.0)
    ours = from_pretrained(path)
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight and ours.config.rope_factor == 32.0
    x = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_error(ours(x), hf(x).logits) <= 1e-5


def byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (what tokenizer.json's vocabulary spells bytes with) -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


@pytest.fixture(scope="module")
def tiktoken_model(tmp_path_factory) -> Path:
    """Llama 3.1's tiktoken tokenizer.model, written from the shipped tokenizer.json's 128000 BPE tokens."""
    if not (ASSETS / "tokenizer.json").is_file():
        pytest.skip(f"{ASSETS} is not here")
    vocab = json.loads((ASSETS / "tokenizer.json").read_text())["model"]["vocab"]
    decoder = byte_level_decoder()
    by_id = sorted((i, token) for token, i in vocab.items() if i < 128000)
    lines = [base64.b64encode(bytes(decoder[c] for c in token)).decode() + f" {i}" for i, token in by_id]
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    return path


TEXTS = [
    "Hello, world! It's 2026: the 12345th run's loss was 3.14159.",
    "  leading spaces\n\nand\ttabs\r\nand CRLF   ",
    "Ünïcödé, 日本語のテキスト, emoji 🦙🔥 and Ελληνικά.",
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "def f(x):\n    return x ** 2  # I'm sure they'll\n",
]


def test_meta_tokenizer_ids_equal_the_hf_tokenizer_and_tiktoken(tiktoken_model: Path) -> None:
    import tokenizers

    from lightning_tune.tokenizer.load import load_tokenizer
    from lightning_tune.tokenizer.tiktoken import PATTERN, TiktokenTokenizer

    ours = load_tokenizer(tiktoken_model.parent)  # the directory, as a checkpoint's
    assert isinstance(ours, TiktokenTokenizer) and ours.vocab_size == 128256
    hf = tokenizers.Tokenizer.from_file(str(ASSETS / "tokenizer.json"))
    try:  # the library itself, where installed
        import tiktoken

        plain = tiktoken.Encoding("llama3", pat_str=PATTERN, mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(tiktoken_model)), special_tokens=ours.specials)
    except (ImportError, AttributeError):  # not installed (or only a namespace of that name)
        plain = None
    for text in TEXTS:
        ids = ours.encode(text, add_bos=False)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert plain is None or ids == plain.encode(text, allowed_special="all"), text
        assert ours.decode(ids) == text
        ids, offsets = ours.encode_with_offsets(text)
        assert offsets == [tuple(span) for span in hf.encode(text, add_special_tokens=False).offsets], text
    for token in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_0|>"):
        assert ours.token_to_id(token) == hf.token_to_id(token), token
    # The shipped tokenizer.json keeps Llama 3.0's names for the ids that 3.1 named (Meta's tokenizer.py lists 3.1's)
    assert [ours.token_to_id(t) for t in ("<|finetune_right_pad_id|>", "<|step_id|>", "<|eom_id|>", "<|python_tag|>", "<|reserved_special_token_2|>", "<|reserved_special_token_246|>")] == [
        128004,
        128005,
        128008,
        128010,
        128011,
        128256 - 1,
    ]
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.eos_ids) == (128000, 128001, 128004, (128001, 128008, 128009))
    assert ours.encode("Hi", add_bos=True, add_eos=True) == [128000, hf.token_to_id("Hi"), 128001]


def test_a_broken_ranks_file_is_one_line(tmp_path: Path) -> None:
    from lightning_tune.tokenizer.base import TokenizerError
    from lightning_tune.tokenizer.tiktoken import TiktokenTokenizer

    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(TokenizerError, match=r"tokenizer .*tokenizer\.model: line 2 is not '<base64 token> 1'"):
        TiktokenTokenizer(path)


def test_the_meta_tokenizer_converts_to_a_tokenizer_json_transformers_reads(tiktoken_model: Path, tmp_path: Path) -> None:
    """For exports: `hf_tokenizer()` written as tokenizer.json gives our ids in `tokenizers` (transformers' fast backend)."""
    import tokenizers

    from lightning_tune.tokenizer.tiktoken import TiktokenTokenizer

    ours = TiktokenTokenizer(tiktoken_model)
    ours.hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False).ids == ours.encode(text, add_bos=False), text
    assert theirs.token_to_id("<|eot_id|>") == 128009 and theirs.get_vocab_size() == 128256
