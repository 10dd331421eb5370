"""Int8 weight-only quantisation for generation: per-output-channel symmetric int8 weights.

At batch 1 a decode step reads every weight once per token, so it is bound by memory bandwidth:
int8 weights are a quarter of the bytes of fp32. Each output channel n keeps codes
q[n, k] = round(w[n, k] / s[n]) in [-127, 127] with s[n] = max_k |w[n, k]| / 127, and
y = s * (x @ q.T) (+ bias). Activations, norms, the embedding table and the KV cache keep their dtype.

The fast kernel is `torch.ops.aten._weight_int8pack_mm(x_bf16, q, s_bf16)`: it reads int8 and
computes in bf16 with fp32 accumulation. On a CPU it is only fast with native bf16 (AVX512-BF16 or
AMX; measured on an AMD EPYC with avx512_bf16: 0.53 ms for a 4096x4096 GEMV against 3.39 ms for the
fp32 matmul, while fp32 or fp16 inputs made the same op slower than fp32). Elsewhere, or where the
op is missing, the layer falls back to converting the codes to the activation dtype and scaling
after the matmul (correct everywhere, not faster than fp32 on a CPU). On CUDA the op has a bf16
kernel; `quantize_int8_` runs it once on the model's device before choosing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tune import hardware  # a module: tests stand in for its CPU probes
from lightning_tune.layers.lora import lora_modules, merge_lora


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [N, K] -> (int8 codes [N, K], fp32 scales [N]) with weight ~= codes * scales[:, None].

    Symmetric absmax: s = max|w| / 127 per row, codes = round(w / s), so |codes * s - w| <= s / 2.
    An all-zero row gets a tiny positive scale (codes 0) instead of a division by zero.
    """
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def native_bf16(device: torch.device) -> bool:
    """Whether int8 x bf16 matmuls run fast here: CUDA, or a CPU with native bf16 (AVX512-BF16, AMX, Arm BF16)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and hardware.cpu_has_native_bf16()


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-output-channel scales (weight-only quantisation).

    Buffers (not parameters: nothing here trains): `qweight` int8 [N, K], `scales` fp32 [N], and for
    the bf16 kernel `scales_bf16` [N]; `bias` keeps the original layer's values and dtype.
    """

    def __init__(self, in_features: int, out_features: int, qweight: Tensor, scales: Tensor, bias: Tensor | None = None, use_int8_mm: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16))
        self.register_buffer("bias", bias)
        self.use_int8_mm = use_int8_mm  # aten._weight_int8pack_mm in bf16, else codes converted to x's dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_int8_mm: bool = False) -> Int8Linear:
        """Quantise `linear`'s weight (a copy: a tied embedding that shares it is left as it is)."""
        codes, scales = quantize_per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.in_features, linear.out_features, codes, scales, bias, use_int8_mm)

    def dequantized(self) -> Tensor:
        """The fp32 weight [N, K] the codes stand for."""
        return self.qweight.float() * self.scales[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if self.use_int8_mm:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales_bf16)
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:  # scale after the matmul: s[n] * sum_k x[k] q[n, k], the same sum as with the dequantised weight
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        kernel = "int8pack_mm bf16" if self.use_int8_mm else "dequantize"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, kernel={kernel}"


def int8_mm_works(device: torch.device) -> bool:
    """Run `aten._weight_int8pack_mm` once on `device`: False where the op is missing or refuses."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    try:
        x = torch.ones(1, 64, dtype=torch.bfloat16, device=device)
        w = torch.ones(8, 64, dtype=torch.int8, device=device)
        s = torch.ones(8, dtype=torch.bfloat16, device=device)
        return bool(torch.allclose(op(x, w, s).float(), torch.full((1, 8), 64.0, device=device)))
    except (RuntimeError, NotImplementedError):
        return False


@torch.no_grad()
def quantize_int8_(model: nn.Module, use_int8_mm: bool | None = None) -> nn.Module:
    """Replace every nn.Linear of the decoder and the output head by an `Int8Linear`, in place.

    With tied embeddings the head gets its own int8 copy; the embedding table stays as it is (a
    lookup reads one row per token, so it costs no bandwidth). `use_int8_mm=None` picks the bf16
    int8 kernel where the hardware has native bf16 and the op runs, the dequantising path elsewhere.
    A LoRA adapter is merged into its base weights first. Returns the model.
    """
    if lora_modules(model):  # an adapter is folded into its base weight first: quantise what generation computes
        merge_lora(model)
    device = model.model.embed_tokens.weight.device
    if use_int8_mm is None:
        use_int8_mm = native_bf16(device) and int8_mm_works(device)
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear) and (name == "lm_head" or name.startswith("model."))]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(linear, use_int8_mm).to(device))
    return model
