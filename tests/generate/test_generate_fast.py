"""Fast decoding: the static-shape step compiled once gives eager's tokens; int8 weight-only
quantisation against bitsandbytes' row-wise int8 and the dequantised fp32 arithmetic; CLI flags."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from lightning_tune.checkpoint import save_hf_checkpoint
from lightning_tune.generate import generate
from lightning_tune.generate.chat import ChatSession
from lightning_tune.generate.decode import cache_length
from lightning_tune.layers.int8 import Int8Linear, int8_mm_works, native_bf16, quantize_int8_, quantize_per_channel
from lightning_tune.model import CausalLM, model_config
from lightning_tune.tokenizer import load_tokenizer

DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "lightning_tune" / "data" / "assets" / "demo_tokenizer.model"
PROMPTS = [[1, 17, 93, 200, 45, 8, 130], [1, 77], [1, 3, 250, 61]]  # different lengths: real left padding
INT8_MM = native_bf16(torch.device("cpu")) and int8_mm_works(torch.device("cpu"))


def tiny(tied: bool = True, vocab: int = 512, bias: bool = True) -> CausalLM:
    """A seeded tiny model (GQA 4/2, tied head by default: the SmolLM2 layout; q/k/v biases as Qwen's)."""
    torch.manual_seed(0)
    config = model_config("tiny_llama2", vocab_size=vocab, num_layers=2, tie_word_embeddings=tied, attention_bias="qkv" if bias else "none", max_seq_len=600)
    model = CausalLM(config)
    model.init_weights()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.normal_(p, std=0.02)
    return model.eval()


def test_cache_length_rounds_up_within_the_context() -> None:
    assert [cache_length(n, 600) for n in (1, 256, 257, 512, 599, 600)] == [256, 256, 512, 512, 600, 600]


def test_static_step_compiles_once_and_gives_eager_tokens() -> None:
    torch._dynamo.reset()
    model = tiny()
    counter = CompileCounter()  # dynamo traces the step; the graph runs as traced (no inductor: cheap)
    eager = generate(model, PROMPTS, 24)
    assert generate(model, PROMPTS, 24, compile=True, compile_backend=counter) == eager
    # other prompt lengths, an end token, more steps: the same cache length (256), the same graph
    other = [[1, 5], [1, 9, 9, 9, 9, 9, 9, 9, 4, 31], [1, 2, 3]]
    reference = generate(model, other, 40)
    eos = reference[0][20]
    assert generate(model, other, 40, eos_id=eos, compile=True, compile_backend=counter) == generate(model, other, 40, eos_id=eos)
    assert generate(model, other, 40, compile=True, compile_backend=counter) == reference
    assert counter.frame_count == 1, "the decode step was compiled more than once for one (model, batch, cache length)"
    generate(model, PROMPTS[:1], 5, compile=True, compile_backend=counter)  # batch 1: its own step
    assert counter.frame_count == 2
    assert all(layer.self_attn.kv_cache is None for layer in model.model.layers)
    clone = copy.deepcopy(model)  # a copy builds its own step (a copied one would run the original model)
    assert generate(clone, PROMPTS, 24, compile=True, compile_backend=counter) == eager
    assert [step.model for step in clone.__dict__["_decode_steps"].values()] == [clone]


def test_chat_session_compiled_step_equals_eager() -> None:
    model = tiny()
    tokenizer = load_tokenizer(DEMO_TOKENIZER)
    from lightning_tune.tokenizer.chat_template import LLAMA2

    counter = CompileCounter()
    replies = []
    for options in ({}, {"compile": True, "compile_backend": counter}):
        session = ChatSession(model, tokenizer, LLAMA2, max_new_tokens=6, max_context=256, **options)
        try:
            replies.append([(session.respond(user), session.reply_ids)[1] for user in ["Remember frog.", "Which word?"]])
        finally:
            session.close()
    assert replies[0] == replies[1] and counter.frame_count == 1


def test_inductor_compiled_tokens_equal_eager() -> None:
    from torch._inductor import config

    cxx = next((c for c in config.cpp.cxx if c), None) or "g++"
    if shutil.which(cxx) is None:
        pytest.skip(f"torch inductor needs a C++ compiler ({cxx}) on PATH to compile the CPU decode step")
    torch._dynamo.reset()  # earlier tests' steps share the step's code object: start under its recompile limit
    model = tiny(vocab=256)
    assert generate(model, PROMPTS, 12, compile=True) == generate(model, PROMPTS, 12)


def test_quantize_per_channel_equals_bitsandbytes_rowwise_int8() -> None:
    bnb = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.rand(64, 1)  # rows of different ranges
    w[3] = 0.0  # an all-zero row: codes 0, no division by zero
    codes, scales = quantize_per_channel(w)
    ref_codes, absmax, _ = bnb.int8_vectorwise_quant(w.clone())
    # scales are bnb's row absmax / 127 (one fp32 division: 2^-24 relative)
    assert torch.allclose(scales[absmax > 0] * 127, absmax[absmax > 0], rtol=2**-22, atol=0)
    # codes equal bnb's round(w * 127 / absmax) except where w / s sits within fp32 rounding of a .5 tie
    differ = codes != ref_codes
    ratio = (w / scales[:, None]).abs()
    assert ((ratio - ratio.floor() - 0.5).abs()[differ] < 1e-4).all() and (codes.int() - ref_codes.int()).abs().max() <= 1
    assert (codes[3] == 0).all() and codes.abs().max() == 127
    # round trip: |q s - w| <= s / 2, plus fp32 rounding of w / s and of q * s (each 2^-24 relative)
    error = (codes.float() * scales[:, None] - w).abs()
    assert (error <= scales[:, None] / 2 + 2**-22 * w.abs()).all()


@pytest.mark.parametrize("use_int8_mm", [False, pytest.param(True, marks=pytest.mark.skipif(not INT8_MM, reason="no native bf16 on this CPU or aten._weight_int8pack_mm missing"))])
def test_int8_linear_against_dequantized_fp32(use_int8_mm: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 80, bias=True)
    layer = Int8Linear.from_linear(linear, use_int8_mm)
    x = torch.randn(3, 5, 256)
    w = layer.dequantized().double()
    ref = (x.double() @ w.T + linear.bias.double()).float()
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (3, 5, 80)
    magnitude = (x.double().abs() @ w.abs().T).float()  # sum_k |x_k| |w_nk|: what rounding errors scale with
    if use_int8_mm:
        # x, the scales and the output are rounded to bf16 (2^-9 relative each; the kernel sums in fp32):
        # |err| <= 2^-9 sum|x||w| + 2 * 2^-9 |y| (+ second order), within 2^-8 (sum|x||w| + |y|) since |y| <= sum.
        bound = 2**-8 * (magnitude + ref.abs())
    else:
        # fp32 matmul (K = 256 terms: <= K * 2^-24 sum|x||w|) then one fp32 scale and bias add
        bound = 256 * 2**-24 * magnitude + 2**-22 * ref.abs() + 1e-7
    assert ((y - ref).abs() <= bound).all()


def test_quantize_int8_model_equals_dequantized_weights_and_keeps_the_embedding() -> None:
    model = tiny(tied=True)
    embed = model.model.embed_tokens.weight.detach().clone()
    q = quantize_int8_(copy.deepcopy(model), use_int8_mm=False)
    assert not any(type(m) is nn.Linear for m in q.modules())
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == n_linear == 2 * 7 + 1
    assert torch.equal(q.model.embed_tokens.weight, embed)  # the tied table stays fp32; the head is an int8 copy
    # the same model with each weight replaced by its dequantised value (the tie undone for the head)
    ref = copy.deepcopy(model)
    ref.lm_head.weight = nn.Parameter(embed.clone())
    for name, m in q.named_modules():
        if isinstance(m, Int8Linear):
            ref.get_submodule(name).weight.data = m.dequantized()
    tokens = torch.tensor([PROMPTS[0]])
    expected = ref(tokens)
    # fp32 everywhere; the int8 layer scales after the sum instead of before: fp32 rounding only
    assert ((q(tokens) - expected).norm() / expected.norm()).item() <= 1e-5
    counter = CompileCounter()
    assert generate(q, PROMPTS, 10, compile=True, compile_backend=counter) == generate(q, PROMPTS, 10)
    assert counter.frame_count == 1


def test_generate_cli_quantize_and_bf16_warning(tmp_path: Path, capsys, monkeypatch) -> None:
    from lightning_tune.cli.generate import generate_command
    from lightning_tune.cli.loading import load_model

    model = tiny(tied=True, bias=False)  # a plain Llama checkpoint
    checkpoint = save_hf_checkpoint(model, model.config, tmp_path / "ckpt", tokenizer_path=DEMO_TOKENIZER)
    tokenizer = load_tokenizer(checkpoint)
    quantized = quantize_int8_(copy.deepcopy(model))
    prompt = tokenizer.encode("Count to three.")
    expected = tokenizer.decode([t for t in generate(quantized, [prompt], 6, eos_id=tokenizer.eos_ids)[0] if t not in tokenizer.eos_ids])
    capsys.readouterr()
    generate_command(str(checkpoint), prompt=["Count to three."], template="none", max_new_tokens=6, device="cpu", quantize="int8")
    assert capsys.readouterr().out == expected + "\n"
    monkeypatch.setattr("lightning_tune.hardware.cpu_has_native_bf16", lambda: False)
    assert load_model(str(checkpoint), None, "cpu", "bfloat16").model.embed_tokens.weight.dtype == torch.bfloat16
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: --dtype bfloat16 on a CPU without native bf16")
