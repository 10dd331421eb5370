"""NF4 storage of frozen linear weights (QLoRA's base), through bitsandbytes.

`NF4Weight` holds one [out, in] weight exactly as bitsandbytes' `quantize_4bit(w, blocksize=64,
quant_type="nf4", compress_statistics=True)` leaves it, i.e. what `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` gives transformers and PEFT:

    packed        [ceil(n / 2), 1] uint8   two 4-bit codes per byte (index of the nearest NF4 level of
                                           w / absmax of its block of 64)
    absmax        [ceil(n / 64)] uint8     each block's absmax, itself quantised (double quantisation):
                                           8-bit dynamic-map codes of (absmax - offset) in blocks of 256
    absmax_scale  [ceil(n / 64 / 256)]     float32 absmax of each block of 256 absmax values
    absmax_offset []                       float32 mean of the absmax values
    code, absmax_code                      the 16 NF4 levels and the 256-entry dynamic map

so 0.5 byte per element + 1/64 byte (absmax) + 4/16384 byte (absmax_scale): 0.5159 byte/element. The
float32 tensors are stored as their int32 bit patterns: `model.to(torch.bfloat16)` (Lightning's
bf16-true) casts floating tensors and would round them; integer tensors are left alone. They are plain
tensor attributes moved with the module (`_apply`), not buffers: not in state dicts (the base is never
saved in our checkpoints; it is reloaded from checkpoint_dir), and not broadcast by DDP every step,
and the exports merge into the original high-precision weights, not these.

The forward is bitsandbytes' own `matmul_4bit` (dequantise, matmul; backward dequantises again for
the input gradient and saves no weight), so a QLoRA step computes what PEFT + `Linear4bit` computes.
On the meta device (memory estimates) shapes only, bitsandbytes is not called: it caches its code
tables on the device of the first tensor it sees.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

BLOCK_SIZE = 64  # bitsandbytes' default for 4-bit, and QLoRA's
ABSMAX_BLOCK_SIZE = 256  # double quantisation of the absmax values (bitsandbytes' fixed choice)
QUANT_TYPE = "nf4"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what bitsandbytes quantises
TENSORS = ("packed", "absmax", "absmax_scale", "absmax_offset", "code", "absmax_code")  # NF4Weight's storage


class QuantizationError(ValueError):
    """One-line, user-facing: what cannot be quantised and what to do."""


def require_bitsandbytes():
    """bitsandbytes.functional, or one line saying which extra installs it."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        raise QuantizationError("quantize_base: nf4 needs bitsandbytes, which is not installed: pip install bitsandbytes (in a checkout: pip install -e '.[qlora]')") from None
    return bnb_functional


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise QuantizationError(
            f"quantize_base: nf4 quantises float32, bfloat16 or float16 weights, but the compute dtype is {dtype}; use trainer.precision 32, bf16-mixed, bf16-true, 16-mixed or 16-true"
        )


def nf4_nbytes(numel: int) -> int:
    """Bytes `NF4Weight` stores for `numel` elements: codes, quantised absmax, their scales and offset, code tables."""
    blocks = math.ceil(numel / BLOCK_SIZE)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / ABSMAX_BLOCK_SIZE) + 4 + 4 * (16 + 256)


def _as_bits(t: Tensor) -> Tensor:
    return t.float().contiguous().view(torch.int32)


def _as_float(t: Tensor) -> Tensor:
    return t.view(torch.float32)


class NF4Weight(nn.Module):
    """A frozen [out_features, in_features] weight in bitsandbytes' NF4 layout (see the module docstring).

    Built empty (on `device`, meta by default: a placeholder with the right sizes), then filled by
    `quantize_` from a high-precision tensor.
    """

    def __init__(self, out_features: int, in_features: int, device: torch.device | str | None = "meta") -> None:
        super().__init__()
        self.shape = torch.Size([out_features, in_features])
        numel = out_features * in_features
        blocks = math.ceil(numel / BLOCK_SIZE)
        empty = lambda size, dtype: torch.empty(size, dtype=dtype, device=device)
        self.packed = empty((math.ceil(numel / 2), 1), torch.uint8)
        self.absmax = empty(blocks, torch.uint8)
        self.absmax_scale = empty(math.ceil(blocks / ABSMAX_BLOCK_SIZE), torch.int32)
        self.absmax_offset = empty((), torch.int32)
        self.code = empty(16, torch.int32)
        self.absmax_code = empty(256, torch.int32)

    def _apply(self, fn, recurse: bool = True):
        """Move the NF4 tensors with the module (`.to`, `.cuda`, `to_empty`); integer tensors, so
        dtype casts (`.to(torch.bfloat16)`, `.half()`) leave them unchanged."""
        for name in TENSORS:
            setattr(self, name, fn(getattr(self, name)))
        return super()._apply(fn, recurse)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in TENSORS)

    @property
    def is_meta(self) -> bool:
        return self.packed.is_meta

    @torch.no_grad()
    def quantize_(self, weight: Tensor) -> NF4Weight:
        """Fill from `weight` ([out, in], float32/bfloat16/float16) on its device: bitsandbytes'
        `quantize_4bit`, the codes computed against each block's exact float32 absmax."""
        if tuple(weight.shape) != tuple(self.shape):
            raise QuantizationError(f"NF4 weight: expected shape {list(self.shape)}, got {list(weight.shape)}")
        check_dtype(weight.dtype)
        bnb_functional = require_bitsandbytes()
        packed, state = bnb_functional.quantize_4bit(weight.contiguous(), blocksize=BLOCK_SIZE, compress_statistics=True, quant_type=QUANT_TYPE)
        self.packed = packed
        self.absmax = state.absmax
        self.absmax_scale = _as_bits(state.state2.absmax)
        self.absmax_offset = _as_bits(state.offset.reshape(()))
        self.code = _as_bits(state.code)
        self.absmax_code = _as_bits(state.state2.code)
        return self

    def quant_state(self, dtype: torch.dtype):
        """bitsandbytes' QuantState for these tensors, dequantising to `dtype`."""
        bnb_functional = require_bitsandbytes()
        state2 = bnb_functional.QuantState(absmax=_as_float(self.absmax_scale), code=_as_float(self.absmax_code), blocksize=ABSMAX_BLOCK_SIZE, dtype=torch.float32)
        return bnb_functional.QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=_as_float(self.code),
            blocksize=BLOCK_SIZE,
            quant_type=QUANT_TYPE,
            dtype=dtype,
            offset=_as_float(self.absmax_offset),
            state2=state2,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The [out, in] weight in `dtype` (bitsandbytes' `dequantize_4bit`); an empty tensor on meta."""
        if self.is_meta:
            return torch.empty(self.shape, dtype=dtype, device="meta")
        return require_bitsandbytes().dequantize_4bit(self.packed, self.quant_state(dtype))

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, quant_type={QUANT_TYPE}, blocksize={BLOCK_SIZE}, double_quant=True"


class _MetaNF4Linear(torch.autograd.Function):
    """Shapes of `nf4_linear` on the meta device, saving nothing for backward (as bitsandbytes'
    `MatMul4Bit`, which keeps only the packed weight it already holds)."""

    @staticmethod
    def forward(ctx, x: Tensor, out_features: int) -> Tensor:
        ctx.in_shape = x.shape
        return x.new_empty((*x.shape[:-1], out_features))

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.new_empty(ctx.in_shape), None


def nf4_linear(x: Tensor, weight: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """x @ dequantise(weight).T + bias, in x's dtype: bitsandbytes' `matmul_4bit`, as `Linear4bit` runs it.

    No gradient reaches the weight (it is frozen); backward dequantises again for the input gradient
    instead of keeping a dequantised copy per layer alive until backward.
    """
    if weight.is_meta:
        out = _MetaNF4Linear.apply(x, weight.shape[0])
        return out if bias is None else out + bias.to(out.dtype)
    import bitsandbytes

    return bitsandbytes.matmul_4bit(x, weight.packed.t(), weight.quant_state(x.dtype), bias=None if bias is None else bias.to(x.dtype))
