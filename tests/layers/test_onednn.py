"""fp32 linear layers through oneDNN for inference: F.linear's result within fp32 summation error,
gradients and other dtypes left to F.linear, the layer swap, generation's tokens eager and compiled."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tune.checkpoint import save_hf_checkpoint
from lightning_tune.generate import generate
from lightning_tune.hardware import cpu_vendor
from lightning_tune.layers.onednn import OneDNNLinear, onednn_linear, onednn_works, use_onednn_linears_
from lightning_tune.model import CausalLM, model_config

pytestmark = pytest.mark.skipif(not onednn_works(), reason="this torch build has no working oneDNN")
DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "lightning_tune" / "data" / "assets" / "demo_tokenizer.model"
PROMPTS = [[1, 17, 93, 200, 45, 8, 130], [1, 77], [1, 3, 250, 61]]


def summation_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Two fp32 evaluations of the same K-term dot products (+ bias) in any order differ by at most
    2 * gamma_K * sum_k |x_k w_k| (+ |b|), gamma_K = K u / (1 - K u), u = 2^-24 (Higham, ch. 3)."""
    K, u = x.shape[-1] + 1, 2.0**-24
    gamma = K * u / (1 - K * u)
    magnitude = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    return 2 * gamma * magnitude


@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 3, 64), (2, 1, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_f_linear_within_fp32_summation_error(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(*shape), torch.randn(48, 64)
    b = torch.randn(48) if bias else None
    out, ref = onednn_linear(x, w, b), F.linear(x, w, b)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert bool(((out.double() - ref.double()).abs() <= summation_bound(x, w, b)).all())


def test_onednn_layer_trains_through_f_linear_and_keeps_its_state_dict() -> None:
    torch.manual_seed(0)
    plain = nn.Linear(32, 16)
    layer = copy.deepcopy(plain)
    assert use_onednn_linears_(layer, "onednn") == 1 and type(layer) is OneDNNLinear
    assert layer.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).square().sum().backward()  # no backward in the op: with autograd on, F.linear computes
    x_ref = x.detach().clone().requires_grad_()
    plain(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=0, atol=0)
    with torch.no_grad():  # bf16 is left to torch's own (oneDNN) bf16 kernel
        assert layer.to(torch.bfloat16)(x.detach().bfloat16()).dtype == torch.bfloat16


def test_the_swap_changes_plain_fp32_linears_only_and_auto_follows_the_cpu(monkeypatch) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4)), nn.Linear(4, 4).to(torch.bfloat16), nn.LayerNorm(4))
    assert use_onednn_linears_(copy.deepcopy(model), "default") == 0
    monkeypatch.setattr("lightning_tune.hardware.cpu_vendor", lambda: "GenuineIntel")
    assert use_onednn_linears_(copy.deepcopy(model), "auto") == 0
    monkeypatch.setattr("lightning_tune.hardware.cpu_vendor", lambda: "AuthenticAMD")
    swapped = copy.deepcopy(model)
    assert use_onednn_linears_(swapped, "auto") == 2
    assert [type(m).__name__ for m in swapped.modules()].count("OneDNNLinear") == 2 and type(swapped[2]) is nn.Linear
    with pytest.raises(ValueError, match="linear_kernel: expected auto, onednn or default"):
        use_onednn_linears_(model, "mkl")  # type: ignore[arg-type]


def test_cpu_vendor_is_what_proc_cpuinfo_says() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or "vendor_id" not in cpuinfo.read_text():
        assert cpu_vendor() is None
        return
    line = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("vendor_id"))
    assert cpu_vendor() == line.split(":", 1)[1].strip()


def tiny() -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(model_config("tiny_llama2", vocab_size=256, num_layers=2, tie_word_embeddings=True, max_seq_len=600))
    model.init_weights()
    return model.eval()


def test_generation_through_onednn_gives_the_same_tokens_eager_and_compiled() -> None:
    from torch._inductor import config

    model = tiny()
    reference = generate(model, PROMPTS, 12)
    fast = copy.deepcopy(model)
    assert use_onednn_linears_(fast, "onednn") == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert generate(fast, PROMPTS, 12) == reference
    cxx = next((c for c in config.cpp.cxx if c), None) or "g++"
    if shutil.which(cxx) is None:
        pytest.skip(f"torch inductor needs a C++ compiler ({cxx}) on PATH")
    torch._dynamo.reset()  # other tests' decode steps share the step's code object: start under its recompile limit
    assert generate(fast, PROMPTS, 12, compile=True) == reference


def test_generate_cli_linear_kernel(tmp_path: Path, capsys) -> None:
    from lightning_tune.cli import main
    from lightning_tune.cli.loading import load_model

    checkpoint = save_hf_checkpoint(tiny(), tiny().config, tmp_path / "ckpt", tokenizer_path=DEMO_TOKENIZER)
    assert any(type(m) is OneDNNLinear for m in load_model(str(checkpoint), None, "cpu", "float32", linear_kernel="onednn").modules())
    assert not any(type(m) is OneDNNLinear for m in load_model(str(checkpoint), None, "cpu", "float32", linear_kernel="default").modules())
    for verb in (["generate", "--prompt", "Hi", "--template", "none", "--max_new_tokens", "2"], ["eval"]):
        code = main([*verb, "--checkpoint_dir", str(checkpoint), "--linear_kernel", "fast"])
        err = capsys.readouterr().err
        assert code != 0 and "linear_kernel" in err and "Traceback" not in err
