"""fp32 linear layers through oneDNN for inference on CPUs where torch's BLAS (MKL) is slow.

torch computes fp32 `F.linear` on x86 with MKL, and MKL runs its generic AVX2 code on AMD CPUs.
oneDNN (also inside torch, as `mkldnn._linear_pointwise`) uses the CPU's own AVX-512 kernels. On
an AMD EPYC (Zen 4, 2 cores; issue 21) at SmolLM2-135M's shapes, for one row (a decode step) it
measured 1.4-2.4x faster on the MLP and head matrices (the head: 11 vs 18-26 GB/s of weights read)
and about equal on the small attention ones, 1.3x over all 211 layers of a step; 1.0-2.5x for
8-40 rows (a batch, a prompt), 1.1-1.4x at 2048. The result is the same dot products summed in
another order: fp32 rounding apart, identical.

Only for inference: the op has no backward, so `OneDNNLinear` computes through it only when no
gradient is wanted (`torch.no_grad()` or nothing requiring one) and through `F.linear` otherwise.
`torch.compile` sees the op as one call (inductor lowers `mkldnn._linear_pointwise` only for frozen
weights), so compiled decode steps use it too.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tune import hardware  # a module: tests stand in for its CPU probes

LinearKernel = Literal["auto", "onednn", "default"]

# On rows [M, K] only: reshaping outside the op keeps its Python body to one call (each call into
# oneDNN already costs ~15 us of primitive setup, a decode step makes 200 of them).
torch.library.define("lightning_tune::onednn_linear", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


@torch.library.impl("lightning_tune::onednn_linear", "CPU")
def _onednn_linear_cpu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.register_fake("lightning_tune::onednn_linear")
def _onednn_linear_fake(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` for fp32 CPU tensors (any leading dims), computed by oneDNN; no backward."""
    out = torch.ops.lightning_tune.onednn_linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


@cache
def onednn_works() -> bool:
    """Whether this torch has oneDNN and the op gives F.linear's result (checked once, on a small case)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
        return bool(torch.allclose(onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except (RuntimeError, NotImplementedError):
        return False


def onednn_is_faster() -> bool:
    """Where `linear_kernel="auto"` picks oneDNN: an AMD CPU (where MKL runs its AVX2 code) with a working op."""
    return hardware.cpu_vendor() == "AuthenticAMD" and onednn_works()


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose inference forward runs through oneDNN (same parameters, same state dict).

    fp32 CPU inputs without autograd only; anything else (training, bf16, CUDA) runs `F.linear`."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return onednn_linear(x, w, self.bias)
        return F.linear(x, w, self.bias)


def use_onednn_linears_(model: nn.Module, kernel: LinearKernel = "auto") -> int:
    """Make every plain fp32 CPU `nn.Linear` of `model` a `OneDNNLinear`, in place (no copy: the class
    changes, the parameters stay). `kernel`: "onednn" always (where oneDNN works), "default" never,
    "auto" where `onednn_is_faster()`. Returns how many layers changed."""
    if kernel not in ("auto", "onednn", "default"):
        raise ValueError(f"linear_kernel: expected auto, onednn or default, got {kernel!r}")
    if kernel == "onednn" and not onednn_works():
        raise ValueError("linear_kernel onednn: this torch build has no working oneDNN (torch.backends.mkldnn); use auto or default")
    if kernel == "default" or (kernel == "auto" and not onednn_is_faster()):
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
            module.__class__ = OneDNNLinear
            changed += 1
    return changed
