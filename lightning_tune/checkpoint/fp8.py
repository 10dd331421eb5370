"""FP8 checkpoints (transformers' `quant_method: "fp8"`, FineGrainedFP8): E4M3 weights dequantised to a float
dtype as they are read, since training needs bf16 or fp32 weights (transformers' `dequantize=True`, which it
also picks by itself on a CPU).

Each quantised linear stores `weight` as float8_e4m3fn [out, in] and `weight_scale_inv` (float32), the
factor that multiplies it back: one scalar per tensor (`weight_block_size: null`: Ministral 3 Instruct,
Devstral 2) or one per [b0, b1] block, a [ceil(out / b0), ceil(in / b1)] grid (`[128, 128]`: DeepSeek-V3,
Qwen3-FP8), the last row and column of blocks cut short. A static activation scheme adds `activation_scale`
(`input_scale` in vLLM's naming), the input's scale for an FP8 matmul: nothing a float model uses.

The value is float32(weight) * float32(scale) rounded once to the load dtype, as transformers' `Fp8Dequantize`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

SCALE_SUFFIX = "weight_scale_inv"
ACTIVATION_SCALES = ("activation_scale", "input_scale")  # dropped: a float matmul has no use for them
FP8_DTYPES = (torch.float8_e4m3fn,)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_PATTERNS = 4096  # modules_to_not_convert entries; more is not a config.json
MAX_PATTERN_CHARS = 512


class FP8Error(ValueError):
    """A quantization_config or tensor this reader cannot interpret (the caller names the file)."""


@dataclass(frozen=True)
class FP8Config:
    """The parts of an "fp8" quantization_config that change how weights read."""

    block: tuple[int, int] | None  # None: one scale per tensor
    not_converted: tuple[str, ...]  # modules stored unquantised (transformers' patterns, as the checkpoint names them)
    dtype: torch.dtype  # the checkpoint's own dtype (config.json's): what a model loads in when the caller names none


def fp8_config(quant: dict, cfg: dict) -> FP8Config:
    """An "fp8" quantization_config (and the config.json holding it, for its dtype) -> FP8Config; any field
    this reader does not interpret the way transformers does is refused (FP8Error, one line)."""
    if quant.get("quant_method") != "fp8":
        raise FP8Error(f"quant_method {quant.get('quant_method')!r} is not FP8")
    scheme = quant.get("activation_scheme", "dynamic")
    if not isinstance(scheme, str) or scheme.lower() not in ("dynamic", "static"):
        raise FP8Error(f"activation_scheme {scheme!r} is not supported (expected 'dynamic' or 'static')")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":  # Qwen3-FP8 writes fmt: e4m3; e5m2 weights would need their own dtype
        raise FP8Error(f"fmt {fmt!r} is not supported (expected 'e4m3')")
    for key, expected in (("scale_fmt", "float"), ("expert_dtype", "fp8")):
        if quant.get(key, expected) != expected:
            raise FP8Error(f"{key} {quant[key]!r} is not supported (expected {expected!r})")
    if quant.get("modules_to_convert"):
        raise FP8Error("modules_to_convert (FP8 embeddings) is not supported")
    # transformers' FineGrainedFP8Config defaults weight_block_size to [128, 128] when the key is absent
    block = quant.get("weight_block_size", [128, 128])
    if block is not None:
        if not isinstance(block, list) or len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
            raise FP8Error(f"weight_block_size must be null or two positive integers, got {block!r}")
        block = (block[0], block[1])
    patterns = quant.get("modules_to_not_convert", quant.get("ignored_layers")) or []
    if not isinstance(patterns, list) or len(patterns) > MAX_PATTERNS or not all(isinstance(p, str) and len(p) <= MAX_PATTERN_CHARS for p in patterns):
        raise FP8Error(f"modules_to_not_convert must be a list of module names, got {str(patterns)[:200]}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise FP8Error(f"modules_to_not_convert entry {pattern!r} is not a valid pattern ({err})") from None
    return FP8Config(block, tuple(dict.fromkeys(patterns)), checkpoint_dtype(cfg))


def checkpoint_dtype(cfg: dict) -> torch.dtype:
    """config.json's dtype (`dtype` in transformers 5, `torch_dtype` before; a multimodal wrapper's, else its
    text_config's): what transformers loads the model in by default. bfloat16 when none is given, as
    transformers' `Fp8Dequantize` falls back to."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for source in (cfg, text):
        for key in ("dtype", "torch_dtype"):
            if isinstance(source.get(key), str) and source[key] in DTYPES:
                return DTYPES[source[key]]
    return torch.bfloat16


def not_converted(module: str, patterns: tuple[str, ...]) -> bool:
    """Whether `module` is one transformers leaves unquantised (its `should_convert_module`): a pattern
    matching from the start up to a module boundary, as a regex with the same boundary, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p) for p in patterns)


def scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[tuple[int, ...], ...]:
    """The scale shapes a weight of `weight_shape` may carry: a scalar (stored as [], [1] or [1, 1]) per tensor,
    else the [ceil(out / b0), ceil(in / b1)] grid."""
    if block is None:
        return ((), (1,), (1, 1))
    out, inp = weight_shape[-2:]
    return ((*weight_shape[:-2], math.ceil(out / block[0]), math.ceil(inp / block[1])),)


def dequantize_fp8(weight: Tensor, scale: Tensor, block: tuple[int, int] | None, dtype: torch.dtype) -> Tensor:
    """float8 weight [..., out, in] times its scale (a scalar, or one per block of the [ceil(out / b0),
    ceil(in / b1)] grid), in float32, rounded once to `dtype`."""
    if weight.dtype not in FP8_DTYPES or weight.dim() < 2:
        raise FP8Error(f"expected a float8_e4m3fn weight of at least 2 dimensions, got {weight.dtype} {list(weight.shape)}")
    if not scale.dtype.is_floating_point or scale.element_size() < 2:
        raise FP8Error(f"expected a float32/bfloat16/float16 scale, got {scale.dtype}")
    if tuple(scale.shape) not in scale_shape(tuple(weight.shape), block):
        raise FP8Error(f"scale of shape {list(scale.shape)} does not fit a weight of shape {list(weight.shape)} (block {list(block) if block else None})")
    values = weight.to(torch.float32)
    scale = scale.to(torch.float32)
    if block is None:
        return values.mul_(scale.reshape(())).to(dtype)
    out, inp = values.shape[-2:]
    # Rows: each scale over its b0 rows, the last block cut at `out` -> [..., out, G1]. Columns: broadcast over
    # b1-wide views of the weight, then the short last block, so no weight-sized copy of the scales is made.
    rows = scale.repeat_interleave(block[0], dim=-2)[..., :out, :]
    whole, rest = divmod(inp, block[1])
    values[..., : whole * block[1]].unflatten(-1, (whole, block[1])).mul_(rows[..., :whole, None])
    if rest:
        values[..., whole * block[1] :].mul_(rows[..., whole:])
    return values.to(dtype)
