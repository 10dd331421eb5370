"""MXFP4, the 4-bit format gpt-oss's experts ship in on the Hub: dequantised to a float dtype as they are read,
since training needs the weights in bf16 or fp32 (transformers' `Mxfp4Config(dequantize=True)`).

Each `<name>_blocks` uint8 tensor [..., G, 16] holds 32 E2M1 values per block of 16 bytes, two per byte
(low nibble first); `<name>_scales` uint8 [..., G] holds one E8M0 exponent per block (biased by 127). The
value is FP4_VALUES[nibble] * 2**(scale - 127), as transformers' `convert_moe_packed_tensors`, which also
swaps the last two axes: the Hub stores [X, out, in] blocks, the model [X, in, out].
"""

from __future__ import annotations

import torch
from torch import Tensor

# E2M1: sign, two exponent bits, one mantissa bit.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantized_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """[X, out, G, 16] blocks -> the [X, G * 32, out] tensor they dequantise to."""
    X, out, groups, size = blocks_shape
    return (X, groups * size * 2, out)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """blocks uint8 [X, out, G, 16], scales uint8 [X, out, G] -> [X, G * 32, out] in `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 4 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4: expected uint8 blocks [X, out, G, 16] and uint8 scales [X, out, G], got {blocks.dtype} {list(blocks.shape)} and {scales.dtype} {list(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    X, out, groups, size = blocks.shape
    values = torch.empty(X, out, groups, size * 2, dtype=dtype, device=blocks.device)
    values[..., 0::2] = lut[(blocks & 0x0F).long()]
    values[..., 1::2] = lut[(blocks >> 4).long()]
    values = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None])
    return values.reshape(X, out, groups * size * 2).transpose(1, 2).contiguous()
