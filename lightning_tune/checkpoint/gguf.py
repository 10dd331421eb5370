"""GGUF weights in and out (llama.cpp's single-file format; its llama (Mixtral's experts too), gemma2, gemma3, phi3,
olmo2, qwen2, qwen3, qwen3moe and gpt-oss architectures): config and tensors read (dequantised by the gguf package), a model written as
llama.cpp's converter names, lays out and types it (gguf's own architecture names, tensor names and keys), with its
Modelfile."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_tune.checkpoint.meta import meta_to_hf_rotary
from lightning_tune.checkpoint.tensors import Entry
from lightning_tune.families import family_for
from lightning_tune.families.config import ModelConfig
from lightning_tune.io.files import atomic_file, atomic_write_text, check_disk_space, existing_parent
from lightning_tune.io.gguf import GGUFError, check_architecture, import_gguf, is_gguf, metadata_value, open_gguf, read_metadata
from lightning_tune.io.paths import resolve_path
from lightning_tune.model.decoder import CausalLM
from lightning_tune.tokenizer.chat_template import CHATML, ChatTemplateError, render
from lightning_tune.tokenizer.gguf import VocabMetadata, vocab_metadata, write_vocab

log = logging.getLogger(__name__)

# Tensor types read (dequantised by the gguf package). Issue 17 asks for F32 F16 BF16 Q8_0 Q4_0 Q4_1
# Q4_K Q5_K Q6_K; the other classic and K quants go through the same call and are tested the same way. MXFP4: the
# experts of gpt-oss GGUFs converted from OpenAI's MXFP4 checkpoints.
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4")
# mxfp4: llama-quantize's MXFP4_MOE for a mixture of experts: the experts' 3-D weights in MXFP4 (the format
# gpt-oss ships in), every other matrix in Q8_0, norms, biases and the router in F32.
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "mxfp4")
OutType = Literal["f32", "f16", "bf16", "q8_0", "mxfp4"]

# Our model_type (transformers') -> the llama.cpp architecture a GGUF of it is written as (gguf's MODEL_ARCH_NAMES).
GGUF_ARCHES = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",  # llama.cpp's llama with expert_count: Mixtral's experts (convert_hf_to_gguf's LlamaModel)
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "olmo2": "olmo2",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "gpt_oss": "gpt-oss",
}
MODEL_TYPES = {"llama": "llama", "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3", "olmo2": "olmo2", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss"}
# llama.cpp's Qwen architectures: NEOX rotary (q/k rows as transformers stores them), no window; qwen2 with q/k/v
# biases, qwen3 / qwen3moe with q/k RMSNorm. convert_hf_to_gguf writes the head size of a config.json that has
# head_dim (every Qwen 3), and for Qwen3-MoE expert_count, expert_used_count and expert_feed_forward_length.
QWEN_ARCHES = ("qwen2", "qwen3", "qwen3moe")
QK_NORM_ARCHES = ("gemma3", "olmo2", "qwen3", "qwen3moe")
# Architectures whose layers may hold experts: llama.cpp's build_moe_ffn with softmax gating over every expert, the top
# k renormalised (qwen3moe.cpp; llama.cpp for Mixtral), in every layer. A llama file with llama.expert_count is Mixtral.
MOE_ARCHES = ("llama", "qwen3moe")
# Our stacked experts (model/moe.py): gate_up_proj [X, 2I, E] ([gate; up] rows per expert), down_proj [X, E, I]. The
# converter (Qwen2MoeModel.modify_tensors; for Mixtral LlamaModel.modify_tensors stacks the Hub's per-expert w1 / w3 /
# w2 into the same three tensors) splits gate_up_proj into mlp.experts.gate_proj / up_proj [X, I, E], names
# each (and down_proj) with `.weight` through TensorNameMap: ffn_gate_exps, ffn_up_exps, ffn_down_exps (ggml ne
# {E, I, X} and {I, E, X}: the same row-major bytes); the router mlp.gate [X, E] is ffn_gate_inp, always F32.
MOE_GATE_UP, MOE_DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"
MOE_HALVES = (("mlp.experts.gate_proj.weight", 0), ("mlp.experts.up_proj.weight", 1))
# gpt-oss's experts as transformers (and we) hold them: gate_up_proj [X, E, 2I] with gate and up interleaved on the
# last axis, gate_up_proj_bias [X, 2I] likewise, down_proj [X, I, E], down_proj_bias [X, E]; the sinks [heads]. The
# converter's GptOssModel (for experts not in MXFP4) transposes the weights to [X, out, in], takes the gate as the even
# rows and the up as the odd ones (of the biases: the even and odd entries), names them with `.weight` / `.bias`
# through TensorNameMap (ffn_gate_exps, ffn_up_exps, ffn_down_exps) and the sinks as `attn_sinks.weight`.
OSS_PARTS = {  # the exported name's suffix -> (our key's suffix, 0 / 1 for the gate / up half or None, transposed)
    "mlp.experts.gate_proj.weight": ("mlp.experts.gate_up_proj", 0, True),
    "mlp.experts.up_proj.weight": ("mlp.experts.gate_up_proj", 1, True),
    "mlp.experts.gate_proj.bias": ("mlp.experts.gate_up_proj_bias", 0, False),
    "mlp.experts.up_proj.bias": ("mlp.experts.gate_up_proj_bias", 1, False),
    "mlp.experts.down_proj.weight": ("mlp.experts.down_proj", None, True),
    "mlp.experts.down_proj.bias": ("mlp.experts.down_proj_bias", None, False),
    "self_attn.sinks.weight": ("self_attn.sinks", None, False),
}
# llama.cpp's gpt-oss (llama-model.cpp): layers slide, full, slide, ... (set_swa_pattern(2)); YaRN with its context
# defaults beta_fast 32 / beta_slow 1 (the file has no key for them) and the correction range rounded outwards.
OSS_LAYER_TYPES = ("sliding_attention", "full_attention")
YARN_BETAS = (32.0, 1.0)
# llama.cpp's sliding / full layers (llama-model.cpp, set_swa_pattern(n)): layer i slides unless (i + 1) % n == 0.
SWA_PERIOD = {"gemma2": 2, "gemma3": 6}
# llama.cpp takes a Gemma with this many layers for its 27B and scales scores by (embed // heads) ** -0.5, any
# other by head_dim ** -0.5 (llama-model.cpp: f_attention_scale); query_pre_attn_scalar itself is not in the file.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
GEMMA3_SWA_BASE = 10000.0  # llama.cpp's rotary base of Gemma 3's sliding layers (rope_freq_base_train_swa), fixed
# The tensors whose GGUF copy is ours + 1 (convert_hf_to_gguf's Gemma2Model / Gemma3Model: every *norm.weight).
GEMMA_NORM_SHIFT = 1.0


def gemma_score_scalar(arch: str, num_layers: int, embed_dim: int, num_heads: int, head_dim: int) -> int:
    """The query_pre_attn_scalar llama.cpp's `arch` (gemma2 / gemma3) uses for a model of this shape."""
    return embed_dim // num_heads if num_layers == GEMMA_27B_LAYERS[arch] else head_dim


def gguf_arch(config: ModelConfig) -> str | None:
    """The llama.cpp architecture a model of `config` is exported as (None: none of ours)."""
    return GGUF_ARCHES.get(config.model_type)


def gguf_config(path: str | Path) -> tuple[ModelConfig, bool]:
    """(ModelConfig, tied embeddings) from a GGUF file's metadata; tied when it has no output.weight (as transformers decides)."""
    path, reader = open_gguf(path)
    metadata = read_metadata(reader)
    factors = {t.name: t for t in reader.tensors if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")}
    try:
        return _config_from_metadata(path, metadata, [t.name for t in reader.tensors], factors)
    except GGUFError:
        raise
    except (ValueError, TypeError, ArithmeticError) as err:  # a value of the wrong type or range in the metadata
        raise GGUFError(f"{path}: its metadata does not describe a model ({type(err).__name__}: {err})") from None


def _rope_factors(path: Path, tensor: Any, count: int) -> tuple[float, ...]:
    """A Phi-3 rope_factors_* tensor: `count` F32 values (the size is checked before anything is read)."""
    if tensor.tensor_type.name != "F32" or int(tensor.n_elements) != count:
        raise GGUFError(f"{path}: {tensor.name} must hold {count} F32 values (half the rotary features), it holds {int(tensor.n_elements)} of type {tensor.tensor_type.name}")
    return tuple(float(f) for f in tensor.data.tolist())


def _config_from_metadata(path: Path, metadata: dict[str, Any], tensor_names: list[str], factors: dict[str, Any] | None = None) -> tuple[ModelConfig, bool]:
    arch = check_architecture(path, metadata)
    rope_scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    linear = arch == "gemma3" and rope_scaling == "linear"  # Gemma 3 4B and up: the full layers' positions divided by the factor
    yarn = arch == "gpt-oss" and rope_scaling == "yarn"
    if (rope_scaling not in ("none", None) and not linear and not yarn) or "rope_freqs.weight" in tensor_names:
        what = f"rope scaling {rope_scaling!r}" if rope_scaling not in ("none", None) else "a rope_freqs tensor (Llama 3.1 rotary scaling)"
        raise GGUFError(f"{path}: {what} is not supported; only the default rotary embedding is (and Gemma 3's linear scaling, Phi-3's LongRoPE factors, gpt-oss's YaRN)")
    experts = int(metadata.get(f"{arch}.expert_count") or 0)
    if experts and arch not in (*MOE_ARCHES, "gpt-oss"):
        raise GGUFError(f"{path}: {arch}.expert_count = {experts}: mixture-of-experts GGUF files are supported for {', '.join((*MOE_ARCHES, 'gpt-oss'))}, not {arch!r}")
    heads = int(metadata_value(path, metadata, f"{arch}.attention.head_count"))
    embed_dim = int(metadata_value(path, metadata, f"{arch}.embedding_length"))
    if heads <= 0 or embed_dim <= 0:
        raise GGUFError(f"{path}: {arch}.attention.head_count ({heads}) and {arch}.embedding_length ({embed_dim}) must be positive")
    # The head size: key_length where the file gives it, else (llama) rope.dimension_count, as transformers
    # reads it, else embedding_length / head_count. Phi-3's rotary may turn part of the head (Phi-4-mini).
    fallback = metadata.get(f"{arch}.rope.dimension_count", embed_dim // heads) if arch == "llama" else embed_dim // heads
    head_dim = int(metadata.get(f"{arch}.attention.key_length", fallback))
    rope_dims = int(metadata.get(f"{arch}.rope.dimension_count", head_dim))
    if arch != "phi3" and rope_dims != head_dim:
        raise GGUFError(f"{path}: {arch}.rope.dimension_count = {rope_dims}, but the head size is {head_dim}; only a rotary over the whole head is supported for {arch!r}")
    if f"{arch}.attention.value_length" in metadata and int(metadata[f"{arch}.attention.value_length"]) != head_dim:
        raise GGUFError(f"{path}: {arch}.attention.value_length = {metadata[f'{arch}.attention.value_length']}, but the head size is {head_dim}; only values of the keys' size are supported")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab_size = metadata.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
    if vocab_size is None:
        raise GGUFError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens tells the vocabulary size")
    tied = "output.weight" not in tensor_names
    num_layers = int(metadata_value(path, metadata, f"{arch}.block_count"))
    values: dict[str, Any] = {
        "vocab_size": int(vocab_size),
        "num_layers": num_layers,
        "num_heads": heads,
        "num_kv_heads": int(metadata.get(f"{arch}.attention.head_count_kv", heads)),
        "embed_dim": embed_dim,
        "intermediate_dim": int(metadata_value(path, metadata, f"{arch}.feed_forward_length")),
        "max_seq_len": int(metadata.get(f"{arch}.context_length", 4096)),
        "norm_eps": float(metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_base": float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        "head_dim": head_dim,
        "tie_word_embeddings": tied,
        "model_type": "mixtral" if arch == "llama" and experts else MODEL_TYPES[arch],
    }
    window = metadata.get(f"{arch}.attention.sliding_window")
    if arch in SWA_PERIOD:  # Gemma: GeGLU, (1 + w) norms, llama.cpp's score scale and layer pattern
        values |= {"block": "gemma", "hidden_act": "gelu_pytorch_tanh"}
        if arch == "gemma2":  # llama.cpp's defaults where the file leaves them out: window 4096, caps 50 and 30
            window = int(metadata.get(f"{arch}.attention.sliding_window", 4096))
            values |= {"attn_logit_softcap": float(metadata.get(f"{arch}.attn_logit_softcapping", 50.0)), "final_logit_softcap": float(metadata.get(f"{arch}.final_logit_softcapping", 30.0))}
        else:
            values |= {"qk_norm": True}
            if metadata.get(f"{arch}.final_logit_softcapping"):
                values["final_logit_softcap"] = float(metadata[f"{arch}.final_logit_softcapping"])
            if linear:
                values |= {"rope_type": "linear", "rope_factor": float(metadata_value(path, metadata, f"{arch}.rope.scaling.factor"))}
        if window:
            period = SWA_PERIOD[arch]
            values |= {"sliding_window": int(window), "layer_types": tuple("sliding_attention" if (i + 1) % period else "full_attention" for i in range(min(num_layers, period)))}
            if arch == "gemma3":
                values["rope_local_base"] = GEMMA3_SWA_BASE
        values["query_pre_attn_scalar"] = gemma_score_scalar(arch, num_layers, embed_dim, heads, head_dim)
    elif arch == "olmo2":
        values |= {"block": "olmo2", "qk_norm": True}
    elif arch == "phi3":
        if window:  # 0 (the converter's "none", Phi-4) or absent: full attention
            values["sliding_window"] = int(window)
        if rope_dims != head_dim:
            if not 0 < rope_dims < head_dim:
                raise GGUFError(f"{path}: phi3.rope.dimension_count = {rope_dims}, it must be in (0, {head_dim}] (the head size)")
            values["rope_partial_factor"] = rope_dims / head_dim
        long, short = (factors or {}).get("rope_factors_long.weight"), (factors or {}).get("rope_factors_short.weight")
        if (long is None) != (short is None):
            raise GGUFError(f"{path}: has only one of rope_factors_long.weight and rope_factors_short.weight; LongRoPE needs both")
        if long is not None:
            original = int(metadata_value(path, metadata, f"{arch}.rope.scaling.original_context_length"))
            if original < 2:
                raise GGUFError(f"{path}: {arch}.rope.scaling.original_context_length = {original}; LongRoPE needs an original context of at least 2")
            scale = values["max_seq_len"] / original
            # the converter's factor where the file has none: transformers' default for longrope
            default = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
            values |= {
                "rope_type": "longrope",
                "rope_original_max_seq_len": original,
                "rope_attention_factor": float(metadata.get(f"{arch}.rope.scaling.attn_factor", default)),
                "rope_long_factor": _rope_factors(path, long, rope_dims // 2),
                "rope_short_factor": _rope_factors(path, short, rope_dims // 2),
            }
    elif arch in QWEN_ARCHES and not window:
        values |= {"attention_bias": "qkv"} if arch == "qwen2" else {"qk_norm": True}
    elif arch == "gpt-oss":  # llama.cpp's openai-moe: biases, sinks, sliding and full layers alternating, top k then softmax
        if experts <= 0:
            raise GGUFError(f"{path}: gpt-oss.expert_count = {experts}; a gpt-oss model has experts in every layer")
        values |= {
            "attention_bias": "all",
            "attention_sinks": True,
            "num_experts": experts,
            "num_experts_per_tok": int(metadata_value(path, metadata, f"{arch}.expert_used_count")),
            "moe_intermediate_dim": int(metadata_value(path, metadata, f"{arch}.expert_feed_forward_length")),
            "router": "topk_softmax",
            "sliding_window": int(metadata_value(path, metadata, f"{arch}.attention.sliding_window")),
            "layer_types": OSS_LAYER_TYPES,
        }
        if yarn:  # as llama.cpp turns it: its default betas, the correction range rounded (truncate), ggml's magnitude scale
            factor = float(metadata_value(path, metadata, f"{arch}.rope.scaling.factor"))
            values |= {
                "rope_type": "yarn",
                "rope_factor": factor,
                "rope_original_max_seq_len": int(metadata_value(path, metadata, f"{arch}.rope.scaling.original_context_length")),
                "rope_beta_fast": YARN_BETAS[0],
                "rope_beta_slow": YARN_BETAS[1],
                "rope_truncate": True,
                "rope_attention_factor": yarn_attention_factor(factor) * float(metadata.get(f"{arch}.rope.scaling.attn_factor", 1.0)),
            }
    elif window:
        raise GGUFError(f"{path}: {arch}.attention.sliding_window = {window} is not supported for {arch!r} files")
    if arch in MOE_ARCHES and (experts or arch == "qwen3moe"):  # llama.cpp: every layer sparse, softmax over the experts, top k renormalised
        used = int(metadata_value(path, metadata, f"{arch}.expert_used_count"))
        # llama.cpp's expert size where the file has none: qwen3moe feed_forward_length / expert_used_count, llama (Mixtral)
        # feed_forward_length itself (its experts are intermediate_size wide; it writes no expert_feed_forward_length)
        fallback = values["intermediate_dim"] if arch == "llama" else values["intermediate_dim"] // used if used > 0 else 0
        values |= {
            "num_experts": int(metadata_value(path, metadata, f"{arch}.expert_count")),
            "num_experts_per_tok": used,
            "moe_intermediate_dim": int(metadata.get(f"{arch}.expert_feed_forward_length", 0)) or fallback,
            "router": "softmax_topk",
            "norm_topk_prob": True,
        }
    try:
        config = ModelConfig(**values)
    except (ValueError, TypeError) as err:
        raise GGUFError(f"{path}: {err}") from None
    if arch == "phi3" and config.rotary_dim != rope_dims:
        raise GGUFError(f"{path}: phi3.rope.dimension_count = {rope_dims} is not a fraction of the head size {head_dim} that turns exactly that many features")
    return config, tied


def _hf_names(config: ModelConfig) -> list[str]:
    """Our tensor names for `config` (transformers'), with Phi-3's fused projections in place of their parts."""
    with torch.device("meta"):
        keys = list(CausalLM(config).state_dict())
    if config.model_type == "gpt_oss":  # the converter's split experts and named sinks (OSS_PARTS)
        out = []
        for key in keys:
            exported = [(key.removesuffix(source) + name) for name, (source, _, _) in OSS_PARTS.items() if key.endswith(f".{source}")]
            out += exported or [key]
        return out
    if config.num_experts:  # the converter's split and named experts (MOE_HALVES, down_proj.weight)
        out = []
        for key in keys:
            if key.endswith(MOE_GATE_UP):
                out += [key.removesuffix(MOE_GATE_UP) + half for half, _ in MOE_HALVES]
            else:
                out.append(f"{key}.weight" if key.endswith(MOE_DOWN) else key)
        return out
    if GGUF_ARCHES.get(config.model_type) != "phi3":
        return keys
    out = []
    for key in keys:
        for parts, fused in ((PHI3_QKV, "self_attn.qkv_proj"), (PHI3_GATE_UP, "mlp.gate_up_proj")):
            if any(key.endswith(f".{p}.weight") for p in parts):
                key = key.rsplit(".", 3)[0] + f".{fused}.weight"
        if key not in out:
            out.append(key)
    return out


PHI3_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
PHI3_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def gguf_name_map(config: ModelConfig) -> dict[str, str]:
    """Our tensor name -> its llama.cpp name, by gguf's `TensorNameMap` for the architecture (as convert_hf_to_gguf
    maps it); Phi-3's q/k/v and gate/up under their fused names (`attn_qkv`, `ffn_up`), Qwen3-MoE's and Mixtral's experts under
    the converter's split names (`MOE_HALVES`, `mlp.experts.down_proj.weight`), biases as `.bias`."""
    gguf = import_gguf()
    arch = GGUF_ARCHES[config.model_type]
    ids = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    names = gguf.get_tensor_name_map(ids[arch], config.num_layers)
    out = {}
    for key in _hf_names(config):
        suffix = ".bias" if key.endswith(".bias") else ".weight"
        base = key.removesuffix(suffix)
        name = names.get_name(base) or ("output" if key == "lm_head.weight" else None)  # gemma2: always tied, never written
        if name is None:  # gguf's map holds only the architecture's own tensors (MODEL_TENSORS)
            raise GGUFError(f"{key}: llama.cpp's {arch!r} architecture has no tensor for it")
        out[key] = f"{name}{suffix}"
    return out


def _llama_names(name: str) -> dict[str, str]:
    """Llama's name map, for as many layers as `name` (ours or llama.cpp's) needs."""
    match = re.search(r"(?:blk|layers)\.(\d+)\.", name)
    layers = int(match.group(1)) + 1 if match else 1
    return gguf_name_map(ModelConfig(vocab_size=8, num_layers=layers, num_heads=1, num_kv_heads=1, embed_dim=2, intermediate_dim=2))


def gguf_to_hf_key(name: str, config: ModelConfig | None = None) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (Llama's names without a config); KeyError if not one."""
    names = gguf_name_map(config) if config is not None else _llama_names(name)
    return {v: k for k, v in names.items()}[name]


def hf_to_gguf_key(key: str, config: ModelConfig | None = None) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (Llama's names without a config); KeyError if not one."""
    return (gguf_name_map(config) if config is not None else _llama_names(key))[key]


def hf_to_meta_rotary(w: Tensor, n_heads: int) -> Tensor:
    """Hugging Face's rotate-half rows -> Meta's interleaved ones (what llama.cpp expects); inverse of `meta_to_hf_rotary`.

    llama.cpp's `LlamaModel.permute`: w [n_heads * D, E] viewed [n_heads, 2, D/2, E], the two middle axes swapped.
    """
    dim1, dim2 = w.shape
    return w.reshape(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _parts(config: ModelConfig, key: str) -> list[tuple[str, int, int]]:
    """(our key, first row, rows) of each part of a tensor stored fused (Phi-3), or the tensor itself."""
    prefix = key.rsplit(".", 2)[0]
    if key.endswith("self_attn.qkv_proj.weight"):
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        prefix = prefix.removesuffix(".qkv_proj")
        return [(f"{prefix}.q_proj.weight", 0, q), (f"{prefix}.k_proj.weight", q, kv), (f"{prefix}.v_proj.weight", q + kv, kv)]
    if key.endswith("mlp.gate_up_proj.weight"):
        prefix = prefix.removesuffix(".gate_up_proj")
        return [(f"{prefix}.gate_proj.weight", 0, config.intermediate_dim), (f"{prefix}.up_proj.weight", config.intermediate_dim, config.intermediate_dim)]
    return [(key, 0, -1)]


def _moe_part(key: str, gpt_oss: bool = False) -> tuple[str, int | None]:
    """The source of an exported tensor (a name of `_hf_names`): (our key, 0 / 1 for the gate / up rows of a stacked
    gate_up_proj, None for the whole tensor); gpt-oss's by `OSS_PARTS`."""
    if gpt_oss:
        for name, (source, half, _) in OSS_PARTS.items():
            if key.endswith(f".{name}"):
                return key.removesuffix(name) + source, half
        return key, None
    for part, half in MOE_HALVES:
        if key.endswith(part):
            return key.removesuffix(part) + MOE_GATE_UP, half
    if key.endswith(f"{MOE_DOWN}.weight"):
        return key.removesuffix(".weight"), None
    return key, None


def _dequantized(tensor: Any, shape: tuple[int, ...], first: int = 0, rows: int = -1) -> Tensor:
    """A GGUF tensor (or `rows` of its first axis from `first`: whole rows, whole quant blocks) as fp32 of `shape`;
    gguf.dequantize gives float32 for every type, np.array copies out of the read-only memory map."""
    import numpy as np

    gguf = import_gguf()
    data = tensor.data if rows < 0 else tensor.data[first : first + rows]
    return torch.from_numpy(np.array(gguf.dequantize(data, tensor.tensor_type), dtype=np.float32)).reshape(shape)


def gguf_entries(path: str | Path, config: ModelConfig) -> list[Entry]:
    """The tensors of a GGUF file as checkpoint entries (our names, shapes), each dequantised to fp32 when read.

    Every tensor's type is checked here, before anything is read, so an unsupported one fails in one
    line and leaves the model untouched. Per architecture, as llama.cpp's converter wrote them: Llama's
    q/k rows back from Meta's rotary layout, Gemma's norms minus the 1 the converter added, Phi-3's
    fused `attn_qkv` / `ffn_up` split into q/k/v and gate/up (rows sliced before dequantising), Qwen3-MoE's and
    Mixtral's `ffn_gate_exps` and `ffn_up_exps` of a layer stacked into its gate_up_proj, gpt-oss's interleaved
    into it and transposed back (`OSS_PARTS`).
    """
    path, reader = open_gguf(path)
    arch = GGUF_ARCHES[config.model_type]
    name_map = gguf_name_map(config)
    inverse = {v: k for k, v in name_map.items()}
    oss = arch == "gpt-oss"
    entries = []
    halves: dict[str, dict[int, tuple[Any, tuple[int, ...]]]] = {}  # our gate_up_proj -> its gate (0) and up (1) tensors
    for tensor in reader.tensors:
        if arch == "phi3" and tensor.name in ("rope_factors_long.weight", "rope_factors_short.weight"):
            continue  # read into the config (gguf_config)
        if tensor.name not in inverse:
            raise GGUFError(f"{path}: unexpected tensor {tensor.name!r} (not part of a {arch!r} model of this config)")
        type_name = tensor.tensor_type.name
        if type_name not in READ_TYPES:
            raise GGUFError(f"{path}: tensor {tensor.name} has type {type_name}, which is not supported; supported: {', '.join(READ_TYPES)}")
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ggml lists the fastest axis first
        key, half = _moe_part(inverse[tensor.name], oss) if config.num_experts else (inverse[tensor.name], None)
        if half is not None:
            halves.setdefault(key, {})[half] = (tensor, shape)
            continue
        if oss and key.endswith(".mlp.experts.down_proj"):  # the converter's [X, out, in], ours [X, in, out]
            entries.append(Entry(key, (shape[0], shape[2], shape[1]), path, lambda tensor=tensor, shape=shape: _dequantized(tensor, shape).transpose(1, 2).contiguous()))
            continue
        parts = _parts(config, key)
        if len(parts) > 1 and shape[0] != sum(rows for _, _, rows in parts):
            raise GGUFError(f"{path}: tensor {tensor.name} has {shape[0]} rows, the config's fused parts need {sum(rows for _, _, rows in parts)}")
        for key, first, rows in parts:
            heads = None
            if arch == "llama":
                heads = config.num_heads if ".attn_q." in tensor.name else config.num_kv_heads if ".attn_k." in tensor.name else None
            shift = GEMMA_NORM_SHIFT if arch in SWA_PERIOD and key.endswith("norm.weight") else 0.0
            part_shape = shape if rows < 0 else (rows, *shape[1:])

            def read(tensor=tensor, shape=part_shape, heads=heads, first=first, rows=rows, shift=shift) -> Tensor:
                w = _dequantized(tensor, shape, first, rows)
                if shift:
                    w = w - shift
                return meta_to_hf_rotary(w, heads) if heads else w

            entries.append(Entry(key, part_shape, path, read))
    for key, pair in halves.items():
        if oss:
            source = next(source for source, _, _ in OSS_PARTS.values() if key.endswith(f".{source}"))
            parts = [name for name, (src, half, _) in OSS_PARTS.items() if src == source and half is not None]
            names = " and ".join(name_map[key.removesuffix(source) + part] for part in parts)
        else:
            names = " and ".join(name_map[key.removesuffix(MOE_GATE_UP) + part] for part, _ in MOE_HALVES)
        if len(pair) != 2:
            raise GGUFError(f"{path}: has only one of {names}; a layer's experts need both")
        (gate, shape), (up, up_shape) = pair[0], pair[1]
        rank = 2 if oss and key.endswith("_bias") else 3
        if shape != up_shape or len(shape) != rank:
            raise GGUFError(f"{path}: {names} must be {rank}-D tensors of one shape, they have {list(shape)} and {list(up_shape)}")
        if oss:  # gate and up interleaved on the last axis again: [X, I, E] each -> [X, E, 2I]; biases [X, I] -> [X, 2I]

            def read_interleaved(gate=gate, up=up, shape=shape) -> Tensor:
                g, u = _dequantized(gate, shape), _dequantized(up, shape)
                if len(shape) == 3:
                    g, u = g.transpose(1, 2), u.transpose(1, 2)
                return torch.stack([g, u], dim=-1).reshape(*g.shape[:-1], 2 * g.shape[-1])

            stacked = (shape[0], shape[2], 2 * shape[1]) if rank == 3 else (shape[0], 2 * shape[1])
            entries.append(Entry(key, stacked, path, read_interleaved))
            continue

        def read_stack(gate=gate, up=up, shape=shape) -> Tensor:
            return torch.cat([_dequantized(gate, shape), _dequantized(up, shape)], dim=1)

        entries.append(Entry(key, (shape[0], 2 * shape[1], shape[2]), path, read_stack))
    return entries


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise GGUFError(f"--outtype {outtype!r} is not supported; supported: {', '.join(OUTTYPES)}")


def _unsupported(config: ModelConfig, arch: str) -> list[str]:
    """What llama.cpp's `arch` cannot express of `config` (each as the switch and its value)."""
    gemma = arch in SWA_PERIOD
    rope_types = {"gemma3": ("default", "linear"), "phi3": ("default", "longrope"), "gpt-oss": ("default", "yarn")}.get(arch, ("default",))
    block = {"gemma2": "gemma", "gemma3": "gemma", "olmo2": "olmo2"}.get(arch, "llama")
    qk_norm = arch in QK_NORM_ARCHES
    no_window = ("llama", "olmo2", *QWEN_ARCHES)
    experts = getattr(config, "num_experts", 0)
    checks = [
        (
            f"attention_bias {config.attention_bias!r}" if config.attention_bias != "none" else "model without q/k/v biases",
            config.attention_bias != {"qwen2": "qkv", "gpt-oss": "all"}.get(arch, "none"),
        ),
        ("mlp_bias", config.mlp_bias),
        (f"block {config.block!r}", config.block != block),
        (f"hidden_act {config.hidden_act!r}", config.hidden_act != ("gelu_pytorch_tanh" if gemma else "silu")),
        ("qk_norm" if config.qk_norm else "model without qk_norm", config.qk_norm != qk_norm),
        (f"rope_type {config.rope_type!r}", config.rope_type not in rope_types),
        (f"rope_partial_factor {config.rope_partial_factor}", arch != "phi3" and config.rope_partial_factor != 1.0),
        (f"query_scale_beta {config.query_scale_beta}", config.query_scale_beta is not None),
        (f"attn_logit_softcap {config.attn_logit_softcap}", arch != "gemma2" and config.attn_logit_softcap is not None),
        (f"final_logit_softcap {config.final_logit_softcap}", not gemma and config.final_logit_softcap is not None),
        (f"query_pre_attn_scalar {config.query_pre_attn_scalar}", not gemma and config.query_pre_attn_scalar is not None),
        (f"rope_local_base {config.rope_local_base}", arch != "gemma3" and config.rope_local_base is not None),
        (f"sliding_window {config.sliding_window}", arch in no_window and config.sliding_window is not None),
        (f"layer_types {config.layer_types and list(config.layer_types)}", arch in (*no_window, "phi3") and config.layer_types is not None),
        (f"num_experts {experts} (mixture of experts)", arch not in (*MOE_ARCHES, "gpt-oss") and experts > 0),
        ("attention_sinks" if config.attention_sinks else "model without attention sinks", config.attention_sinks != (arch == "gpt-oss")),
    ]
    if gemma:
        period = SWA_PERIOD[arch]
        pattern = tuple("sliding_attention" if (i + 1) % period else "full_attention" for i in range(config.num_layers))
        scalar = gemma_score_scalar(arch, config.num_layers, config.embed_dim, config.num_heads, config.head_dim)
        slides = config.sliding_window is not None
        checks += [
            (f"query_pre_attn_scalar {config.query_pre_attn_scalar} (at this shape it scales scores by {scalar} ** -0.5)", (config.query_pre_attn_scalar or config.head_dim) != scalar),
            (f"layer_types {config.layer_types and list(config.layer_types)} (its layers slide unless (i + 1) % {period} == 0)", slides and config.layer_types != pattern),
        ]
    if arch == "gemma2":
        checks += [
            ("model without a sliding window (every other layer slides)", config.sliding_window is None),
            ("model without attention and final logit soft-capping", config.attn_logit_softcap is None or config.final_logit_softcap is None),
            ("untied output weight", not config.tie_word_embeddings),
        ]
    if arch == "gemma3":
        checks.append(
            (f"rope_local_base {config.rope_local_base} (its sliding layers turn with base {GEMMA3_SWA_BASE:g})", config.sliding_window is not None and config.rope_local_base != GEMMA3_SWA_BASE)
        )
    if arch in MOE_ARCHES:  # llama.cpp's qwen3moe.cpp and llama.cpp: experts in every layer, softmax then top k, always renormalised
        dense = [i for i in range(config.num_layers) if not config.is_moe_layer(i)] if experts else []
        if arch == "llama" and experts:  # it has one feed-forward size: the experts' (no expert_feed_forward_length)
            checks.append((f"moe_intermediate_dim {config.moe_intermediate_dim} other than intermediate_dim {config.intermediate_dim}", config.moe_intermediate_dim != config.intermediate_dim))
        checks += [
            ("model without experts", not experts and (arch == "qwen3moe" or config.model_type == "mixtral")),
            (f"router {config.router!r}", experts > 0 and config.router != "softmax_topk"),
            ("norm_topk_prob False (it always renormalises the chosen experts' weights to sum 1)", experts > 0 and not config.norm_topk_prob),
            (f"dense layers {dense} (mlp_only_layers {list(config.mlp_only_layers)}, decoder_sparse_step {config.decoder_sparse_step}: every layer of it has experts)", bool(dense)),
        ]
    if arch == "gpt-oss":  # llama.cpp's openai-moe: experts in every layer, top k of the router's logits then a softmax
        pattern = tuple(OSS_LAYER_TYPES[i % 2] for i in range(config.num_layers))
        yarn = config.rope_type == "yarn"
        checks += [
            ("model without experts", not experts),
            (f"router {config.router!r}", experts > 0 and config.router != "topk_softmax"),
            (f"dense layers {[i for i in range(config.num_layers) if not config.is_moe_layer(i)]}", experts > 0 and not all(config.is_moe_layer(i) for i in range(config.num_layers))),
            (f"layer_types {config.layer_types and list(config.layer_types)} (its layers slide, then attend fully, alternately)", config.layer_types != pattern),
            (
                f"rope_beta_fast / rope_beta_slow {config.rope_beta_fast} / {config.rope_beta_slow} (it uses {YARN_BETAS[0]:g} / {YARN_BETAS[1]:g})",
                yarn and (config.rope_beta_fast, config.rope_beta_slow) != YARN_BETAS,
            ),
            (
                f"rope_attention_factor {config.rope_attention_factor} (it scales by 0.1 * ln(factor) + 1)",
                yarn and not math.isclose(config.rope_attention_factor or 1.0, yarn_attention_factor(config.rope_factor), rel_tol=1e-6),
            ),
        ]
    return [what for what, present in checks if present]


def yarn_attention_factor(factor: float) -> float:
    """YaRN's magnitude scale as llama.cpp's rotary computes it (ggml rope_yarn: 1 + 0.1 * ln(factor)), and transformers' default."""
    return 1.0 + 0.1 * math.log(factor) if factor > 1.0 else 1.0


def _tensor_plan(state: dict[str, Tensor], config: ModelConfig, outtype: str, path: Path) -> list[tuple[str, tuple[int, ...], Any, Callable[[], Tensor]]]:
    """(GGUF name, shape, ggml type, the tensor as llama.cpp stores it) in llama.cpp's order; output.weight left
    out when it equals the embedding (tied). As convert_hf_to_gguf writes each architecture: Llama's q/k in
    Meta's rotary layout, Gemma's norms plus 1, Phi-3's q/k/v and gate/up fused, its LongRoPE factors, Qwen3-MoE's
    stacked gate_up_proj split into its gate and up rows (Qwen's q/k as stored: llama.cpp turns them NEOX-style)."""
    gguf = import_gguf()
    arch = gguf_arch(config)
    if arch is None:
        names = ", ".join(repr(a) for a in dict.fromkeys(GGUF_ARCHES.values()))
        raise GGUFError(f"{path}: GGUF export writes llama.cpp's {names} architectures, which have no model_type {config.model_type!r}")
    unsupported = _unsupported(config, arch)
    if unsupported:
        raise GGUFError(f"{path}: GGUF export writes llama.cpp's {arch!r} architecture, which has no {', '.join(unsupported)}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in CausalLM(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise GGUFError(f"{path}: the weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]}); LoRA weights must be merged first")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise GGUFError(f"{path}: {key} has shape {list(state[key].shape)}, the config expects {list(shape)}")
    q = gguf.GGMLQuantizationType
    experts = config.num_experts
    if outtype == "mxfp4" and not experts:
        raise GGUFError(f"{path}: --outtype mxfp4 writes a mixture's experts in MXFP4 (llama.cpp's MXFP4_MOE); this model has no experts: use q8_0")
    wanted = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "mxfp4": q.Q8_0}[outtype]
    block = gguf.GGML_QUANT_SIZES[q.Q8_0][0]  # 32 values, as MXFP4's block
    exps = q.MXFP4 if outtype == "mxfp4" else wanted  # the experts' 3-D weights
    head, embedding = state["lm_head.weight"], state["model.embed_tokens.weight"]
    tied = isinstance(head, Tensor) and isinstance(embedding, Tensor) and torch.equal(head, embedding)  # a lazily merged (QLoRA) head is its own
    if arch == "gemma2" and not tied:
        raise GGUFError(f"{path}: GGUF export writes llama.cpp's 'gemma2' architecture, which has no output weight of its own; lm_head.weight differs from the embedding")
    plan = []
    stack: dict[str, Any] = {}  # the last stacked gate_up_proj read (a lazily merged one is computed once for both halves)

    def stacked(key: str) -> Tensor:
        if stack.get("key") != key:
            stack.clear()
            stack.update(key=key, value=state[key].detach().to("cpu"))
        return stack["value"]

    for key, name in gguf_name_map(config).items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        source, half = _moe_part(key, arch == "gpt-oss") if experts else (key, None)
        if source != key and arch == "gpt-oss":  # its experts' halves (even / odd), transposed; its sinks (OSS_PARTS)
            transposed = next(t for part, (_, _, t) in OSS_PARTS.items() if key.endswith(f".{part}"))
            shape = expected[source]
            if half is not None:
                shape = (*shape[:-1], shape[-1] // 2)
            if transposed:
                shape = (*shape[:-2], shape[-1], shape[-2])

            def take_oss(source=source, half=half, transposed=transposed) -> Tensor:
                t = state[source].detach().to("cpu")
                t = t if half is None else t[..., half::2]
                return t.transpose(-1, -2) if transposed else t

            # biases and the sinks F32 (the converter: every non-.weight and 1-D tensor), Q8_0 / MXFP4 along whole-block rows
            kind = q.F32 if len(shape) < 2 or not name.endswith(".weight") else q.F16 if exps in (q.Q8_0, q.MXFP4) and shape[-1] % block else exps
            plan.append((name, shape, kind, take_oss))
            continue
        if source != key:  # Qwen3-MoE's and Mixtral's experts: gate and up rows of our stack, or our down_proj
            size = config.moe_intermediate_dim
            shape = expected[source] if half is None else (config.num_experts, size, config.embed_dim)

            def take(source=source, half=half, size=size) -> Tensor:
                return state[source].detach().to("cpu") if half is None else stacked(source)[:, half * size : (half + 1) * size]

            plan.append((name, shape, q.F16 if exps in (q.Q8_0, q.MXFP4) and shape[-1] % block else exps, take))  # Q8_0 / MXFP4 blocks along a row
            continue
        parts = [part for part, _, _ in _parts(config, key)] if arch == "phi3" else [key]
        shape = (sum(expected[k][0] for k in parts), *expected[parts[0]][1:])
        heads = None
        if arch == "llama":
            heads = config.num_heads if key.endswith("q_proj.weight") else config.num_kv_heads if key.endswith("k_proj.weight") else None
        shift = GEMMA_NORM_SHIFT if arch in SWA_PERIOD and key.endswith("norm.weight") else 0.0

        def make(parts=parts, heads=heads, shift=shift) -> Tensor:
            t = torch.cat([state[k].detach().to("cpu") for k in parts]) if len(parts) > 1 else state[parts[0]].detach().to("cpu")
            if shift:
                t = t.float() + shift  # the converter adds in the checkpoint's dtype; ours is fp32 first, then cast once
            return hf_to_meta_rotary(t, heads) if heads else t

        # llama.cpp keeps 1-D norms and biases, and the router (ffn_gate_inp), in F32 for every file type
        kind = wanted if len(shape) == 2 and not name.endswith("ffn_gate_inp.weight") else q.F32
        if kind == q.Q8_0 and shape[-1] % block:
            kind = q.F16  # as convert_hf_to_gguf: a row that is not whole blocks cannot be Q8_0
        plan.append((name, shape, kind, make))
    if arch == "phi3" and config.rope_type == "longrope":  # convert_hf_to_gguf's Phi3MiniModel.generate_extra_tensors
        for name, factors in (("rope_factors_long", config.rope_long_factor), ("rope_factors_short", config.rope_short_factor)):
            plan.append((f"{name}.weight", (len(factors),), q.F32, lambda f=factors: torch.tensor(f, dtype=torch.float32)))
    return plan


def _gguf_array(t: Tensor, kind: Any) -> Any:
    """One tensor (already in llama.cpp's layout) as the bytes GGUF stores: cast or quantised."""
    import numpy as np

    gguf = import_gguf()
    q = gguf.GGMLQuantizationType
    if kind == q.BF16:  # torch's own rounding to bf16, then its 16-bit patterns as bytes
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    if kind == q.F16:
        return t.to(torch.float16).contiguous().numpy()
    x = t.to(torch.float32).contiguous().numpy()
    return gguf.quants.quantize(x, kind) if kind in (q.Q8_0, q.MXFP4) else x


def _write_hparams(writer: Any, config: ModelConfig, arch: str) -> None:
    """The architecture's hyper-parameters under gguf's keys, as convert_hf_to_gguf writes them for `arch`."""
    gguf = import_gguf()
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.embed_dim)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    if arch in ("llama", "phi3"):
        writer.add_rope_dimension_count(config.rotary_dim)  # Phi-3: int(partial_rotary_factor * n_embd) // n_head
    # Gemma's converter always writes the head size, and Qwen 3's (its config.json has head_dim); elsewhere llama.cpp
    # assumes embed / heads unless told
    if arch in (*SWA_PERIOD, "qwen3", "qwen3moe", "gpt-oss") or config.head_dim * config.num_heads != config.embed_dim:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if config.num_experts:  # TextModel's expert counts; Qwen2MoeModel's expert size (Mixtral's is feed_forward_length)
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if arch in ("qwen3moe", "gpt-oss"):
            writer.add_expert_feed_forward_length(config.moe_intermediate_dim)
    writer.add_rope_freq_base(config.rope_base)  # Gemma 3: the full layers' base (its sliding layers' is llama.cpp's fixed 10000)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcap)
        writer.add_final_logit_softcapping(config.final_logit_softcap)
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma3":
        if config.final_logit_softcap:
            writer.add_final_logit_softcapping(config.final_logit_softcap)
        if config.sliding_window is not None:
            writer.add_sliding_window(config.sliding_window)
        if config.rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(config.rope_factor)
    if arch == "gpt-oss":  # GptOssModel.set_gguf_parameters
        writer.add_sliding_window(config.sliding_window)
        if config.rope_type == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(config.rope_factor)
            writer.add_rope_scaling_orig_ctx_len(config.rope_original_max_seq_len)
    if arch == "phi3":
        longrope = config.rope_type == "longrope"
        writer.add_rope_scaling_orig_ctx_len(config.rope_original_max_seq_len if longrope else config.max_seq_len)
        writer.add_sliding_window(config.sliding_window or 0)  # the converter's 0: none (Phi-4)
        if longrope:
            writer.add_rope_scaling_attn_factors(config.rope_attention_factor)


# Written into every GGUF we export: the mark that lets a later export replace the file (llama.cpp ignores it).
EXPORT_KEY = "lightning_tune.export"
MODELFILE_HEADER = "# Ollama: ollama create NAME -f Modelfile && ollama run NAME"


CHATML_OLLAMA_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


# Conversations a chat template must render exactly as ChatML does for the Modelfile to say TEMPLATE ChatML.
CHATML_PROBES = (
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
)


def renders_as_chatml(template: str | None) -> bool:
    """Whether `template` renders the probe conversations (system message given) exactly as ChatML, so
    Ollama's ChatML TEMPLATE reproduces it; a template that only uses ChatML's tokens in another layout does not."""
    if not template or "<|im_start|>" not in template:
        return False
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    try:
        return all(render(template, probe, special, add_generation_prompt=True).text == render(CHATML, probe, special, add_generation_prompt=True).text for probe in CHATML_PROBES)
    except ChatTemplateError:
        return False


def modelfile_text(gguf_name: str, vocab: VocabMetadata, stops: tuple[str, ...] = ()) -> str:
    """An Ollama Modelfile for the export: FROM the file beside it, a ChatML TEMPLATE when the chat template renders as ChatML, stop at EOS
    and at `stops` (the family's end-of-turn tokens: Gemma's <end_of_turn>, Phi's <|end|>).

    Ollama's TEMPLATE is a Go template, not Jinja. For a ChatML model (SmolLM2, Qwen) it is written
    out; for any other, Ollama matches the Jinja `tokenizer.chat_template` in the GGUF (the one the
    run trained with, for a fit's export) to its own templates when the model is created.
    """
    lines = [MODELFILE_HEADER, f"FROM ./{gguf_name}"]
    if renders_as_chatml(vocab.chat_template):
        lines.append(f'TEMPLATE """{CHATML_OLLAMA_TEMPLATE}"""')
        lines.append('PARAMETER stop "<|im_end|>"')
    else:
        if vocab.chat_template:
            lines.append("# TEMPLATE: Ollama derives it from the chat template in the .gguf; check it with: ollama show NAME --template")
        for token in dict.fromkeys(([vocab.eos_token] if vocab.eos_token else []) + list(stops)):
            lines.append(f"PARAMETER stop {json.dumps(token)}")
    return "\n".join(lines) + "\n"


def family_stops(config: ModelConfig, vocab: VocabMetadata) -> tuple[str, ...]:
    """The family's stop tokens (`Family.stop_tokens`) that the written vocabulary holds at the family's ids."""
    family = family_for(config)
    if family is None:
        return ()
    tokens = [family.special_tokens[role] for role in family.stop_tokens if role in family.special_tokens]
    return tuple(token for token, i in tokens if i < len(vocab.tokens) and vocab.tokens[i] == token)


def check_gguf_target(output: Path, modelfile: bool) -> None:
    """One line unless `output` (and, with `modelfile`, the Modelfile beside it) may be written: absent, or
    an export of ours (a GGUF carrying `EXPORT_KEY`, a Modelfile starting with our header). An export
    never replaces a file it did not write. A directory that is a file, or one we may not write in, is
    one line too."""
    where = existing_parent(output.parent)
    if not where.is_dir():
        raise GGUFError(f"{output}: {where} is a file, not a directory; name a .gguf in a directory")
    if not os.access(where, os.W_OK):
        raise GGUFError(f"{output}: cannot write in {where} (permission denied); name a .gguf in a directory you can write")
    if output.exists():
        try:
            ours = is_gguf(output) and EXPORT_KEY in read_metadata(open_gguf(output)[1])
        except GGUFError:
            ours = False
        if not ours:
            raise GGUFError(f"{output}: exists and is not a GGUF export of lightning_tune; name a new file (an export replaces only a file it wrote)")
    target = output.parent / "Modelfile"
    if modelfile and target.exists():
        try:
            ours = target.is_file() and target.read_text(encoding="utf-8").splitlines()[:1] == [MODELFILE_HEADER]
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise GGUFError(f"{target}: exists and was not written by lightning_tune; move it, or export into another directory (the export writes a Modelfile beside the .gguf)")


def save_gguf(
    state_dict: dict[str, Tensor],
    config: ModelConfig,
    output: str | Path,
    *,
    outtype: OutType = "f32",
    tokenizer: str | Path | None = None,
    name: str | None = None,
    modelfile: bool = True,
    chat_template: str | None = None,
) -> Path:
    """Write a llama.cpp-loadable GGUF of a (merged) Llama state dict; returns its path.

    `tokenizer` is a .gguf, a SentencePiece .model, a tokenizer.json or a directory with one; its
    special token ids and chat template go into the file too (`chat_template`, when given, replaces
    the tokenizer's: the one a run's chat data used). The file is written to a temporary
    sibling, fsynced and renamed into place, then the Ollama `Modelfile` beside it the same way:
    a reader sees the previous export or the complete new one.
    """
    check_outtype(outtype)
    gguf = import_gguf()
    import numpy as np

    output = resolve_path(output).absolute()
    if output.suffix.lower() != ".gguf":
        raise GGUFError(f"{output}: the output must be a .gguf file name")
    if output.is_dir():
        raise GGUFError(f"{output}: exists and is a directory")
    check_gguf_target(output, modelfile)
    if tokenizer is None:
        raise GGUFError(f"{output}: a GGUF needs its tokenizer: give the tokenizer (a .gguf, tokenizer.model or tokenizer.json)")
    vocab = vocab_metadata(tokenizer)
    if chat_template is not None:
        vocab = dataclasses.replace(vocab, chat_template=chat_template)
    plan = _tensor_plan(state_dict, config, outtype, output)
    arch = gguf_arch(config)
    if arch == "gpt-oss" and config.rope_type == "yarn" and not config.rope_truncate:
        log.warning(
            "%s: llama.cpp's gpt-oss rounds YaRN's correction range outwards (rope_truncate true), this model does not (as "
            "transformers' gpt-oss): under llama.cpp a few rotary frequencies differ slightly from training's, as for every gpt-oss GGUF",
            output.name,
        )
    sizes = {name: math.prod(shape) * {"F32": 4, "F16": 2, "BF16": 2}.get(kind.name, 34 / 32) for name, shape, kind, _ in plan}
    output.parent.mkdir(parents=True, exist_ok=True)
    check_disk_space(existing_parent(output.parent), int(sum(sizes.values())) + 2**24)

    with atomic_file(output) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or output.stem)
        writer.add_string(EXPORT_KEY, "1")  # ours: a later export may replace this file (check_gguf_target)
        _write_hparams(writer, config, arch)
        file_type = {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "mxfp4": gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
        }[outtype]
        writer.add_file_type(file_type)
        if outtype in ("q8_0", "mxfp4"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, vocab, config.vocab_size, output)
        # Tensor infos first (shapes and types), then the data one tensor at a time: memory stays
        # at one converted tensor, not a second copy of the model.
        for gguf_name, rows_cols, kind, _ in plan:
            if kind.name in ("F32", "F16"):
                dtype = np.dtype(np.float32 if kind.name == "F32" else np.float16)
                writer.add_tensor_info(gguf_name, rows_cols, dtype, math.prod(rows_cols) * dtype.itemsize)
            else:  # BF16 and Q8_0 are written as bytes: [rows, bytes per row]
                byte_shape = gguf.quants.quant_shape_to_byte_shape(rows_cols, kind)
                writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, _, kind, make in plan:
            writer.write_tensor_data(_gguf_array(make(), kind))
        writer.close()
    if modelfile:
        atomic_write_text(output.parent / "Modelfile", modelfile_text(output.name, vocab, family_stops(config, vocab)))
    return output


# The format interface (`tensors.Format`), for `load.FORMATS`.

detect = is_gguf  # a *.gguf path (a missing one then says "GGUF file not found") or a file with GGUF's magic
read_config = gguf_config


def read_entries(path: Path, config: ModelConfig, stack: ExitStack) -> list[Entry]:
    return gguf_entries(path, config)  # the reader is memory-mapped and cached: nothing to close
