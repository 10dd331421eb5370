"""Checkpoint formats in one place: Hugging Face safetensors / .bin, Meta's consolidated.*.pth, PEFT adapters.

Every key map lives here. Our module tree uses Hugging Face's names, so a Hugging Face checkpoint loads
with the identity map; Meta's checkpoints go through `META_KEYS` (names, model-parallel shard dims) and
the rotary permutation of wq/wk. Loading builds the model on the meta device and materialises it one
tensor at a time, so it never needs twice the model's memory. Writing goes through `atomic_directory`:
an export is either complete or absent, never half-written.

Bad input raises `CheckpointError`: one line naming the path and what was expected.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_tune.families import family_for, hf_mapping
from lightning_tune.families.base import HFMapping
from lightning_tune.families.llama2 import META_KEYS
from lightning_tune.lora import (
    QLinear,
    apply_lora,
    is_lora_key,
    lora_modules,
    quantized_base_shapes,
)
from lightning_tune.model import Llama, LlamaConfig


class CheckpointError(ValueError):
    """One-line, user-facing: names the path and what is missing or mismatched."""


# --------------------------------------------------------------------------------------------------
# Key maps

# Meta name -> (our / Hugging Face name, model-parallel shard dim): `META_KEYS`, in families/llama2.py.
META_IGNORED = ("rope.freqs",)  # Meta's precomputed rotary table; we compute it per call
HF_IGNORED_SUFFIX = "rotary_emb.inv_freq"  # a buffer old transformers versions saved
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (ours)

# PEFT options that change an adapter's math or layout; each must be absent or at its plain-LoRA
# value (`use_dora` is read: DoRA adapters load).
PEFT_PLAIN_LORA: dict[str, object] = {
    "bias": "none",
    "use_rslora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layers_to_transform": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "exclude_modules": None,
    "use_bdlora": None,
    "arrow_config": None,
}
# init_lora_weights values that leave the base weights untouched (PiSSA, OLoRA, LoftQ, CorDA rewrite them).
PEFT_PLAIN_INITS = (True, False, None, "gaussian")

CONFIG_KEYS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias", "qk_norm")
ROPE_TYPES = ("default", "llama3", "linear")


def meta_to_hf_key(meta_key: str) -> tuple[str, int | None]:
    """`layers.3.attention.wq.weight` -> (`model.layers.3.self_attn.q_proj.weight`, shard dim 0); KeyError if unknown."""
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", meta_key)
    name = match.group(2) if match else meta_key
    hf_name, dim = META_KEYS[name]
    is_top_level = hf_name.startswith(("model.", "lm_head."))  # whole-model tensors, not per layer
    if is_top_level == bool(match):
        raise KeyError(meta_key)
    return (f"model.layers.{match.group(1)}.{hf_name}" if match else hf_name), dim


def meta_to_hf_rotary(w: Tensor, n_heads: int) -> Tensor:
    """Meta's interleaved rotary rows (pairs 2i, 2i+1) -> Hugging Face's rotate-half rows (i, i + D/2).

    The permutation of transformers' convert_llama_weights_to_hf.py; w is [n_heads * D, E].
    """
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_intermediate_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden size exactly as Meta's FeedForward computes it (7B: 4096 -> 11008, 70B: 8192 -> 28672)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# --------------------------------------------------------------------------------------------------
# Formats and configs


def _checkpoint_dir(checkpoint_dir: str | Path) -> Path:
    from lightning_tune.paths import resolve_path

    path = resolve_path(checkpoint_dir)  # pkg://PACKAGE/PATH: a directory shipped in a package
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    return path


def _meta_shards(path: Path) -> list[Path]:
    """consolidated.00.pth ... consolidated.NN.pth in shard order, or [] if there are none."""
    shards = sorted(path.glob("consolidated.*.pth"))
    expected = [path / f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if shards != expected:
        raise CheckpointError(f"{path}: Meta shards must be consolidated.00.pth ... consolidated.{len(shards) - 1:02d}.pth, found {[s.name for s in shards]}")
    return shards


def detect_format(checkpoint_dir: str | Path) -> Literal["hf", "meta"]:
    """'hf' for a config.json directory, 'meta' for params.json + consolidated.*.pth."""
    path = _checkpoint_dir(checkpoint_dir)
    has_hf, has_meta = (path / "config.json").is_file(), (path / "params.json").is_file()
    if has_hf and has_meta:  # some downloads carry both configs: the weight files decide
        return "meta" if list(path.glob("consolidated.*.pth")) else "hf"
    if has_hf:
        return "hf"
    if has_meta:
        return "meta"
    raise CheckpointError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _require(data: dict, key: str, path: Path):
    if key not in data:
        raise CheckpointError(f"{path}: missing required key {key!r}")
    return data[key]


def _make_config(path: Path, **values) -> LlamaConfig:
    try:
        return LlamaConfig(**values)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def _hf_rope(cfg: dict, mapping: HFMapping, max_seq_len: int, file: Path) -> dict:
    """The rotary fields of a config.json in either form: transformers 4 (`rope_theta` + `rope_scaling`)
    or 5 (`rope_parameters`, `rope_theta` inside). Unsupported types are refused in one line."""
    params, scaling = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{file}: {key} must be an object or null, got {value!r}")
    rope = {**(scaling or {}), **(params or {})}
    if any(isinstance(v, dict) for v in rope.values()):  # per-layer-type tables (Gemma 3)
        raise CheckpointError(f"{file}: per-layer rotary parameters are not supported; supported rotary types: {', '.join(ROPE_TYPES)}")
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"{file}: rotary type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{file}: partial_rotary_factor is not supported (the rotary embedding covers the whole head)")
    values = {"rope_type": rope_type, "rope_base": float(rope.get("rope_theta", cfg.get("rope_theta", mapping.defaults["rope_theta"])))}
    if rope_type in ("linear", "llama3"):
        values["rope_factor"] = float(_require(rope, "factor", file))
    if rope_type == "llama3":
        values["rope_low_freq_factor"] = float(_require(rope, "low_freq_factor", file))
        values["rope_high_freq_factor"] = float(_require(rope, "high_freq_factor", file))
        values["rope_original_max_seq_len"] = int(rope.get("original_max_position_embeddings") or max_seq_len)
    return values


def _hf_sliding_window(cfg: dict, mapping: HFMapping, num_layers: int, file: Path) -> int | None:
    if mapping.sliding_window == "all":  # Mistral: every layer, unless config.json says null
        return cfg.get("sliding_window", mapping.defaults.get("sliding_window"))
    layer_types = cfg.get("layer_types") or []
    per_layer = mapping.sliding_window == "per_layer" and cfg.get("use_sliding_window", False) and cfg.get("sliding_window") is not None
    if "sliding_attention" in layer_types or (per_layer and cfg.get("max_window_layers", mapping.defaults.get("max_window_layers", 0)) < num_layers):
        raise CheckpointError(f"{file}: sliding-window attention on some layers only (use_sliding_window / layer_types) is not supported; set use_sliding_window false")
    return None


def config_from_hf(cfg: dict, file: str | Path = "config.json") -> LlamaConfig:
    """A Hugging Face config.json (as a dict) -> ModelConfig, for every model_type in `families.HF_MAPPINGS`.

    Keys a config.json leaves out take the value transformers' config class assumes for that
    model_type (`HFMapping.defaults`), so a terse file reads as transformers reads it.
    """
    file = Path(file)
    try:
        mapping = hf_mapping(cfg.get("model_type", "llama"), file)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    defaults = mapping.defaults
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{file}: hidden_act is {cfg['hidden_act']!r}, expected 'silu'")
    heads = _require(cfg, "num_attention_heads", file)
    hidden = _require(cfg, "hidden_size", file)
    num_layers = _require(cfg, "num_hidden_layers", file)
    max_seq_len = cfg.get("max_position_embeddings", defaults["max_position_embeddings"])
    if mapping.attention_bias != "flag":
        attention_bias = "qkv" if mapping.attention_bias == "qkv" else "none"
    else:
        attention_bias = "all" if cfg.get("attention_bias", defaults.get("attention_bias", False)) else "none"
    return _make_config(
        file,
        vocab_size=_require(cfg, "vocab_size", file),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or defaults.get("num_key_value_heads") or heads,
        embed_dim=hidden,
        intermediate_dim=_require(cfg, "intermediate_size", file),
        max_seq_len=max_seq_len,
        norm_eps=cfg.get("rms_norm_eps", defaults["rms_norm_eps"]),
        head_dim=cfg.get("head_dim") or defaults.get("head_dim") or 0,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
        attention_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if mapping.mlp_bias else False,
        qk_norm=mapping.qk_norm,
        sliding_window=_hf_sliding_window(cfg, mapping, num_layers, file),
        model_type=mapping.model_type,
        **_hf_rope(cfg, mapping, max_seq_len, file),
    )


def _load_hf_config(path: Path) -> tuple[LlamaConfig, bool]:
    """config.json -> (ModelConfig, tie_word_embeddings)."""
    config = config_from_hf(_read_json(path / "config.json"), path / "config.json")
    return config, config.tie_word_embeddings


def _load_meta_config(path: Path) -> LlamaConfig:
    """params.json (+ the embedding's shape when vocab_size is -1) -> LlamaConfig."""
    file = path / "params.json"
    params = _read_json(file)
    if params.get("use_scaled_rope") or params.get("vocab_size") == 128256 or params.get("rope_theta") == 500000.0:
        from lightning_tune.families import FAMILIES

        raise CheckpointError(f"{file}: {FAMILIES['llama3'].meta_note}")
    dim = _require(params, "dim", file)
    vocab_size = params.get("vocab_size", -1)
    if vocab_size <= 0:  # Meta's files say -1: the tokenizer decides; the embedding's rows tell us
        shards = _meta_shards(path)
        if not shards:
            raise CheckpointError(f"{file}: vocab_size is {vocab_size} and no consolidated.00.pth to read it from")
        embed = _torch_load(shards[0]).get("tok_embeddings.weight")
        if embed is None:
            raise CheckpointError(f"{shards[0]}: missing 'tok_embeddings.weight' (needed for vocab_size)")
        vocab_size = embed.shape[0]  # ParallelEmbedding splits dim 1, so every shard has all rows
    return _make_config(
        file,
        vocab_size=vocab_size,
        num_layers=_require(params, "n_layers", file),
        num_heads=_require(params, "n_heads", file),
        num_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        embed_dim=dim,
        intermediate_dim=meta_intermediate_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        max_seq_len=params.get("max_seq_len", 4096),  # Llama 2's context; Meta's files leave it out
        norm_eps=params.get("norm_eps", 1e-5),
        rope_base=float(params.get("rope_theta", 10000.0)),
    )


def _gguf_file(checkpoint_dir: str | Path) -> bool:
    """A llama.cpp .gguf file in place of a directory (read by lightning_tune.gguf)."""
    from lightning_tune.gguf import is_gguf

    return is_gguf(checkpoint_dir)


def load_config(checkpoint_dir: str | Path) -> LlamaConfig:
    """The model config of a Hugging Face (config.json) or Meta (params.json) checkpoint directory, or a .gguf file."""
    if _gguf_file(checkpoint_dir):
        from lightning_tune.gguf import gguf_config

        return gguf_config(checkpoint_dir)[0]
    path = _checkpoint_dir(checkpoint_dir)
    if detect_format(path) == "hf":
        return _load_hf_config(path)[0]
    return _load_meta_config(path)


def config_to_hf(config: LlamaConfig, torch_dtype: torch.dtype = torch.float32, token_ids: dict[str, int | list[int] | None] | None = None) -> dict:
    """config.json contents for transformers' `*ForCausalLM` of `config.model_type`.

    Written in transformers 4's form (`rope_theta`, `rope_scaling`), which transformers 5 also reads
    (it folds them into `rope_parameters`), and llama.cpp's converter too. `token_ids` gives
    `bos_token_id` / `eos_token_id` (an int or a list) / `pad_token_id`; default: the family's.
    A switch that the model_type cannot express is refused rather than silently dropped.
    """
    try:
        mapping = hf_mapping(config.model_type, "config")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    problems = []
    if config.qk_norm != mapping.qk_norm:
        problems.append(f"qk_norm={config.qk_norm}")
    if (config.attention_bias == "qkv") != (mapping.attention_bias == "qkv") or (config.attention_bias == "all" and mapping.attention_bias == "never"):
        problems.append(f"attention_bias={config.attention_bias!r}")
    if config.mlp_bias and not mapping.mlp_bias:
        problems.append("mlp_bias=True")
    if config.sliding_window is not None and mapping.sliding_window != "all":
        problems.append(f"sliding_window={config.sliding_window}")
    if problems:
        raise CheckpointError(f"model_type {config.model_type!r} cannot express {', '.join(problems)}; choose the model_type of a family that has them")
    rope_scaling = None
    if config.rope_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": config.rope_factor}
    elif config.rope_type == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": config.rope_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_seq_len,
        }
    if token_ids is None:  # the family's released ids, where they fit the vocabulary (not a toy's)
        family = family_for(config)
        defaults = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "pad"}
        token_ids = {key: family.token_id(role) for key, role in defaults.items()} if family else {}
        token_ids = {key: i for key, i in token_ids.items() if i is not None and i < config.vocab_size}
    out = {
        "architectures": [mapping.architecture],
        "model_type": mapping.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "intermediate_size": config.intermediate_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": token_ids.get("bos_token_id"),
        "eos_token_id": token_ids.get("eos_token_id"),
        "torch_dtype": str(torch_dtype).removeprefix("torch."),
    }
    if token_ids.get("pad_token_id") is not None:
        out["pad_token_id"] = token_ids["pad_token_id"]
    if mapping.attention_bias == "flag":
        out["attention_bias"] = config.attention_bias == "all"
    if mapping.mlp_bias:
        out["mlp_bias"] = config.mlp_bias
        out["pretraining_tp"] = 1
    if mapping.sliding_window == "all":
        out["sliding_window"] = config.sliding_window  # null written out: Mistral's reader assumes 4096 when absent
    elif mapping.sliding_window == "per_layer":
        out |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.num_layers}
    return out


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class _Entry:
    """One tensor of a checkpoint, not yet read: our key, its shape, where it lives, how to read it."""

    key: str
    shape: tuple[int, ...]
    file: Path
    read: Callable[[], Tensor] | None = None  # None when only the key and shape are being checked


def torch_load_weights_only(path: Path, map_location: object = "cpu", *, mmap: bool = False) -> object:
    """`torch.load(path, weights_only=True)` with every failure one `CheckpointError` line.

    torch's own message for a refused file advises loading it with `weights_only=False`, which runs
    whatever code the file holds; it is never repeated. A file that is not torch's format at all (a zip
    archive, or a legacy protocol-2 pickle) is said to be so, not "Python objects".
    """
    import pickle
    import zipfile

    try:
        with path.open("rb") as file:
            head = file.read(2)
        is_zip = zipfile.is_zipfile(path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    if not is_zip and head != b"\x80\x02":
        raise CheckpointError(f"{path}: not a torch checkpoint (torch.save writes a zip archive; this file is not one)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # a class or function the file would import and call
            raise CheckpointError(
                f"{path}: refused: the file holds Python objects other than tensors and plain containers, which could run code when loaded (only weights-only files are read)"
            ) from None
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint (corrupt, or not written by torch.save)") from None
    except Exception as err:  # noqa: BLE001 - every unreadable file gets one line
        lines = [line for line in str(err).strip().splitlines() if line.strip() and "weights_only" not in line]
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({lines[0] if lines else type(err).__name__})") from None


def _torch_load(file: Path) -> dict[str, Tensor]:
    """A .bin/.pth state dict, memory-mapped (tensors are read from disk only when touched)."""
    state = torch_load_weights_only(file, mmap=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a flat state dict of tensors, got {type(state).__name__}")
    return state


def _hf_weight_files(path: Path) -> list[Path]:
    """The weight files of a Hugging Face directory, safetensors preferred over .bin."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            weight_map = _require(_read_json(path / index), "weight_map", path / index)
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            for file in files:
                if not file.is_file():
                    raise CheckpointError(f"{path / index}: lists shard {file.name}, which is missing")
            return files
    raise CheckpointError(f"{path}: no weight files (expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)")


def _hf_entries(path: Path, stack: ExitStack) -> list[_Entry]:
    entries = []
    for file in _hf_weight_files(path):
        if file.suffix == ".safetensors":
            try:
                handle = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"{file}: cannot read as safetensors ({err})") from None
            for key in handle.keys():
                if not key.endswith(HF_IGNORED_SUFFIX):
                    shape = tuple(handle.get_slice(key).get_shape())
                    entries.append(_Entry(key, shape, file, lambda h=handle, k=key: h.get_tensor(k)))
        else:
            for key, tensor in _torch_load(file).items():
                if not key.endswith(HF_IGNORED_SUFFIX):
                    entries.append(_Entry(key, tuple(tensor.shape), file, lambda t=tensor: t))
    return entries


def _meta_entries(path: Path, config: LlamaConfig) -> list[_Entry]:
    """Merge Meta's model-parallel shards tensor by tensor, renamed and with wq/wk un-interleaved."""
    files = _meta_shards(path)
    if not files:
        raise CheckpointError(f"{path}: no weight files (expected consolidated.00.pth ...)")
    shards = [_torch_load(f) for f in files]
    entries = []
    for meta_key in shards[0]:
        if meta_key in META_IGNORED:
            continue
        try:
            key, dim = meta_to_hf_key(meta_key)
        except KeyError:
            raise CheckpointError(f"{files[0]}: unexpected key {meta_key!r} (not a Llama 2 parameter)") from None
        for file, shard in zip(files, shards):
            if meta_key not in shard:
                raise CheckpointError(f"{file}: missing key {meta_key!r} present in {files[0].name}")
        parts = [shard[meta_key] for shard in shards]
        shape = list(parts[0].shape)
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in parts)
        heads = {"wq": config.num_heads, "wk": config.num_kv_heads}.get(meta_key.split(".")[-2])

        def read(parts: list[Tensor] = parts, dim: int | None = dim, heads: int | None = heads) -> Tensor:
            w = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
            return meta_to_hf_rotary(w, heads) if heads else w

        entries.append(_Entry(key, tuple(shape), files[0] if dim is None else path / "consolidated.*.pth", read))
    return entries


def _first(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else f" ({len(names)})")


def _check_entries(path: Path, entries: list[_Entry], expected: dict[str, torch.Size], skip: set[str]) -> None:
    """Every expected key present once with the expected shape, nothing else (before touching the model)."""
    found = {e.key for e in entries} - skip
    unexpected = sorted(found - expected.keys())
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys {_first(unexpected)}")
    missing = sorted(expected.keys() - found)
    if missing:
        raise CheckpointError(f"{path}: missing keys {_first(missing)}")
    for e in entries:
        if e.key not in skip and e.shape != tuple(expected[e.key]):
            raise CheckpointError(f"{e.file}: {e.key} has shape {list(e.shape)}, the config expects {list(expected[e.key])}")


def _assign(model: nn.Module, key: str, tensor: Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> None:
    """Put one tensor into the model: materialise a meta parameter (assign), else copy in place.

    A parameter still on the meta device takes the tensor's dtype (or `dtype`) and device (CPU, or
    `device`). A real parameter keeps its dtype and device unless `dtype`/`device` ask otherwise.
    Either way requires_grad is kept, so a frozen base stays frozen. A parameter sharded by FSDP2
    (a DTensor) keeps its dtype and placement and receives only this rank's rows.
    """
    from torch.distributed.tensor import DTensor

    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr == "weight" and isinstance(module, QLinear) and module.quantized:
        # QLoRA: quantised to NF4 as it arrives, so only one layer's high-precision weight ever exists
        module.quantize_base_(tensor.to(device if device is not None else tensor.device, dtype or tensor.dtype))
        return
    old = module._parameters[attr]
    if isinstance(old, DTensor):
        from lightning_tune.sharding import load_shard_

        load_shard_(old, tensor)
        return
    target_dtype = dtype or (tensor.dtype if old.is_meta else old.dtype)
    target_device = torch.device(device) if device is not None else (tensor.device if old.is_meta else old.device)
    if old.is_meta or old.dtype != target_dtype or old.device != target_device:
        module._parameters[attr] = nn.Parameter(tensor.to(target_device, target_dtype), requires_grad=old.requires_grad)
    else:
        with torch.no_grad():
            old.copy_(tensor)


def _check_config(path: Path, model: nn.Module, config: LlamaConfig) -> None:
    ours = getattr(model, "config", None)
    if isinstance(ours, LlamaConfig):
        diff = [f"{k} {getattr(config, k)} vs model's {getattr(ours, k)}" for k in CONFIG_KEYS if getattr(config, k) != getattr(ours, k)]
        if diff:
            raise CheckpointError(f"{path}: checkpoint config does not match the model: {'; '.join(diff)}")


def load_weights(model: nn.Module, checkpoint_dir: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
    """Load a Hugging Face or Meta checkpoint into `model` (built on the meta device or real) one tensor at a time.

    Keys and shapes are all checked before the first tensor is read, so a mismatched checkpoint
    leaves the model untouched. LoRA's lora_A/lora_B are not in a base checkpoint and are left as
    they are. With a tied-embedding Hugging Face config, lm_head shares embed_tokens' weight.
    """
    if _gguf_file(checkpoint_dir):
        from lightning_tune.gguf import gguf_config, gguf_entries, resolve_path

        path, fmt = resolve_path(checkpoint_dir), "gguf"
        config, tied = gguf_config(path)
    else:
        path = _checkpoint_dir(checkpoint_dir)
        fmt = detect_format(path)
        config, tied = _load_hf_config(path) if fmt == "hf" else (_load_meta_config(path), False)
    _check_config(path, model, config)
    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items() if not is_lora_key(k)}
    expected |= quantized_base_shapes(model)  # NF4 bases: the checkpoint's [out, in] tensors, quantised on assignment
    skip = set()
    if tied:  # transformers ties lm_head to embed_tokens and ignores any saved lm_head
        expected.pop("lm_head.weight", None)
        skip.add("lm_head.weight")
        # One tensor before loading too: a sharded (FSDP2) embedding is filled in place, and the
        # head, which FSDP2 gathers as the same parameter, must be that one (to_empty untied them).
        _tie(model)
    with ExitStack() as stack:
        entries = _hf_entries(path, stack) if fmt == "hf" else gguf_entries(path, config) if fmt == "gguf" else _meta_entries(path, config)
        _check_entries(path, entries, expected, skip)
        for entry in entries:
            if entry.key not in skip:
                _assign(model, entry.key, entry.read(), dtype, device)
    if tied:
        _tie(model)


def _tie(model: nn.Module) -> None:
    """lm_head's weight becomes the embedding's (the parameter object itself, as transformers ties)."""
    model.get_submodule("lm_head").weight = model.get_submodule("model.embed_tokens").weight


def weight_reader(checkpoint_dir: str | Path) -> Callable[[str], Tensor]:
    """`read(key)`: one tensor of a Hugging Face or Meta checkpoint (or a .gguf file, dequantised to
    fp32) by our key, read when asked.

    For merging adapters into the original high-precision base of a QLoRA run, one layer at a time,
    without loading the base whole. The files are opened at the first read and stay open while the
    reader lives.
    """
    gguf = _gguf_file(checkpoint_dir)
    if gguf:
        from lightning_tune.gguf import gguf_config, gguf_entries, resolve_path

        path = resolve_path(checkpoint_dir)
    else:
        path = _checkpoint_dir(checkpoint_dir)
    stack = ExitStack()  # closed with the reader (the safetensors handles close when collected)
    entries: dict[str, _Entry] = {}

    def read(key: str) -> Tensor:
        if not entries:
            if gguf:
                found = gguf_entries(path, gguf_config(path)[0])
            else:
                found = _hf_entries(path, stack) if detect_format(path) == "hf" else _meta_entries(path, _load_meta_config(path))
            entries.update({e.key: e for e in found})
        if key not in entries:
            raise CheckpointError(f"{path}: missing key {key} (needed to merge the adapters into the original weights)")
        return entries[key].read()

    return read


def from_pretrained(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Llama:
    """A `Llama` from a Hugging Face or Meta directory or a .gguf file, in eval mode; dtype None keeps the checkpoint's (fp32 for GGUF)."""
    config = load_config(path)
    with torch.device("meta"):  # no memory until each tensor is loaded
        model = Llama(config)
    load_weights(model, path, dtype=dtype, device=device)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Writing


# Written into every export directory: its kind and the files the export wrote. An export replaces
# only an empty directory or a previous export of its kind holding nothing else (`check_export_target`).
EXPORT_MANIFEST = ".lightning_tune_export.json"


def check_export_target(path: str | Path, kind: str) -> Path:
    """`path` as an absolute path if an export of `kind` ("peft", "hf") may be written there, else one
    `CheckpointError` line.

    An export replaces its directory whole, so it may replace only what the project wrote: nothing
    (a new or empty directory) or a previous export of the same kind, whose manifest lists every
    file in it. Anything else (a file, a directory holding other files, another kind's export, the
    current directory or one above it) is refused, so no file the user put there is ever deleted.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory; name a new directory for the {kind} export")
    cwd = Path.cwd().resolve()
    if path.resolve() in (cwd, *cwd.parents):
        raise CheckpointError(f"{path}: is the current directory (or holds it); an export replaces its output directory whole, so name a new one, e.g. ./{kind}")
    try:
        names = sorted(entry.name for entry in path.iterdir())
        manifest = json.loads((path / EXPORT_MANIFEST).read_text()) if EXPORT_MANIFEST in names else None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read this directory ({err}); name a new directory for the {kind} export") from None
    if not names:
        return path
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise CheckpointError(f"{path}: not empty ({listed}) and not a previous export; an export replaces its output directory whole, so name a new or empty one")
    if manifest.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a previous {manifest.get('kind')!r} export, not a {kind!r} one; name another directory")
    others = [name for name in names if name != EXPORT_MANIFEST and name not in manifest["files"]]
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise CheckpointError(f"{path}: holds files the previous export did not write ({listed}); move them out or name another directory")
    return path


@contextmanager
def atomic_directory(path: str | Path, kind: str = "export") -> Iterator[Path]:
    """Yield an empty temporary sibling directory; on success it replaces `path`, on error it is removed.

    Readers see the old directory or the complete new one, never a half-written export. The old
    one is moved aside and deleted only after the new one is in place, and only if it is empty or a
    previous export of the same `kind` (`check_export_target`, checked before and again at the end).
    The new directory gets a manifest (`EXPORT_MANIFEST`) of its kind and files.
    """
    path = check_export_target(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0o700
        yield tmp
        files = sorted(entry.name for entry in tmp.iterdir())
        (tmp / EXPORT_MANIFEST).write_text(json.dumps({"kind": kind, "files": files}, indent=2) + "\n")
        check_export_target(path, kind)  # the export took a while: is the target still ours to replace?
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)  # put the previous export back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _existing_parent(path: Path) -> Path:
    """The nearest existing ancestor of `path` (where the disk space will come from)."""
    while not path.exists():
        path = path.parent
    return path


def format_bytes(n: int) -> str:
    """A byte count in the unit that shows it: "512 bytes", "3.4 MiB", "12.50 GiB" (never "0.00 GiB")."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _check_disk_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise CheckpointError(f"{directory}: not enough free disk space: need {format_bytes(needed)}, have {format_bytes(free)}")


def _shard(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Split keys in order, starting a new shard when the next tensor would pass max_shard_size bytes (as transformers)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save_hf_checkpoint(
    model_or_state_dict: nn.Module | dict[str, Tensor],
    config: LlamaConfig,
    output_dir: str | Path,
    *,
    max_shard_size: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    tokenizer_path: str | Path | None = None,
) -> Path:
    """Write a transformers-loadable directory of the config's family atomically; returns its path.

    Writes config.json, generation_config.json, model.safetensors (or model-0000i-of-0000n shards
    plus model.safetensors.index.json above `max_shard_size` bytes) and, if given, the tokenizer:
    a SentencePiece `.model` (copied as tokenizer.model) or a `tokenizer.json` / directory (its
    files, `tokenizer.tokenizer_files`). Special token ids come from that tokenizer when it is a
    tokenizer.json (its config and generation_config), else from the family (`families/`).
    Tied embeddings write no `lm_head.weight`, as transformers does. A LoRA model must be merged
    first (`lora.merge_lora`) or saved with `save_peft_adapter`.
    """
    output_dir = Path(output_dir).expanduser().absolute()
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else dict(model_or_state_dict)
    lora_keys = [k for k in state if is_lora_key(k)]
    if lora_keys:
        raise CheckpointError(f"{output_dir}: the model has LoRA weights ({lora_keys[0]}, ...): merge them (lora.merge_lora) or use save_peft_adapter")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Llama(config).state_dict().items()}
    skip = set()
    if config.tie_word_embeddings:  # the head is the embedding: one tensor in the file
        expected.pop("lm_head.weight")
        skip.add("lm_head.weight")
        head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
        if isinstance(head, Tensor) and isinstance(embed, Tensor) and head is not embed and not head.is_meta and not torch.equal(head.to(embed.dtype), embed):
            raise CheckpointError(f"{output_dir}: tie_word_embeddings is true but lm_head differs from the embedding (LoRA on lm_head?); a tied export would drop it: adapt other layers")
    entries = [_Entry(k, tuple(v.shape), output_dir) for k, v in state.items()]
    _check_entries(output_dir, entries, expected, skip=skip)
    tokenizer_copies, token_ids = _export_tokenizer(tokenizer_path, config)
    config_json = config_to_hf(config, token_ids=token_ids)  # torch_dtype set below, once known
    generation = {k: config_json[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config_json.get(k) is not None}

    tensors = {key: state[key].detach() for key in expected}  # our canonical order: shards hold layers in sequence
    meta = [k for k, t in tensors.items() if t.is_meta]
    if meta:
        raise CheckpointError(f"{output_dir}: {_first(meta)} are on the meta device (never loaded); nothing to save")
    out_dtype = dtype or tensors["model.embed_tokens.weight"].dtype
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    sizes = {k: t.numel() * itemsize for k, t in tensors.items()}
    total = sum(sizes.values())
    extra = sum(source.stat().st_size for source, _ in tokenizer_copies) + 2**20  # tokenizer, JSON files, headers
    check_export_target(output_dir, "hf")
    _check_disk_space(_existing_parent(output_dir), total + extra)

    shards = _shard(sizes, max_shard_size)
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with atomic_directory(output_dir, kind="hf") as tmp:
        for name, keys in zip(names, shards):
            # Cast and copy to CPU one shard at a time: at most one shard's worth of extra memory.
            written: dict[str, Tensor] = {}
            storages: set[int] = set()
            for key in keys:
                t = tensors[key].to("cpu", out_dtype).contiguous()
                if t.untyped_storage().data_ptr() in storages:  # tied weights: safetensors refuses shared storage
                    t = t.clone()
                storages.add(t.untyped_storage().data_ptr())
                written[key] = t
            save_file(written, tmp / name, metadata={"format": "pt"})
            del written
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for source, name in tokenizer_copies:
            shutil.copyfile(source, tmp / name)
        (tmp / "config.json").write_text(json.dumps(config_json | {"torch_dtype": str(out_dtype).removeprefix("torch.")}, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")  # after the copies: ours wins
    return output_dir


def _export_tokenizer(tokenizer_path: str | Path | None, config: LlamaConfig) -> tuple[list[tuple[Path, str]], dict | None]:
    """(files to copy as (source, name in the export), special token ids or None for the family's).

    A SentencePiece `.model` is copied unread (its ids are the family's: Llama 2, Mistral); a
    tokenizer.json, or a directory holding one, is read for its bos / eos (all end tokens) / pad ids.
    """
    if tokenizer_path is None:
        return [], None
    path = Path(tokenizer_path).expanduser()
    if _gguf_file(path):  # a GGUF's tokenizer lives in its metadata: export it as tokenizer.json + tokenizer_config.json
        from lightning_tune.gguf import hf_tokenizer_dir, resolve_path

        path = hf_tokenizer_dir(resolve_path(path).absolute())
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        path = path / "tokenizer.model"
    if not path.exists():
        raise CheckpointError(f"{path}: tokenizer file not found")
    if path.is_file() and path.suffix != ".json":
        return [(path, "tokenizer.model")], None
    from lightning_tune.tokenizer import load_tokenizer, tokenizer_files

    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}")
    eos = list(tokenizer.eos_ids)
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": tokenizer.pad_id}
    return [(file, file.name) for file in tokenizer_files(path)], ids


# --------------------------------------------------------------------------------------------------
# PEFT adapters


def save_peft_adapter(model: nn.Module, output_dir: str | Path, *, base_model_name_or_path: str | None = None, state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write the model's LoRA layers as a PEFT adapter directory (loadable by `PeftModel.from_pretrained`).

    `state_dict` supplies the tensors when the model's own are sharded (the gathered full state
    dict, see `sharding.gather_state_dict`); the model still gives the layers' rank, alpha and names.
    """
    output_dir = Path(output_dir).expanduser().absolute()
    loras = lora_modules(model)
    if not loras:
        raise CheckpointError(f"{output_dir}: the model has no LoRA layers to save")
    settings = {(m.rank, m.alpha, m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0, m.use_dora) for m in loras.values()}
    if len(settings) > 1:
        raise CheckpointError(f"{output_dir}: PEFT needs one rank/alpha/dropout/use_dora for all LoRA layers, found (rank, alpha, dropout, use_dora) {sorted(settings)}")
    rank, alpha, dropout, use_dora = settings.pop()
    targets = sorted({name.rpartition(".")[2] for name in loras})
    # PEFT wraps every linear named like a target; an adapter on only some of them would not round-trip.
    same_named = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets]
    if sorted(same_named) != sorted(loras):
        raise CheckpointError(f"{output_dir}: LoRA covers only some of the layers named {targets}; PEFT's target_modules cannot express that")
    lora_state = {k: v for k, v in (model.state_dict() if state_dict is None else state_dict).items() if is_lora_key(k)}
    meta = [k for k, v in lora_state.items() if v.is_meta]
    if meta:
        raise CheckpointError(f"{output_dir}: {_first(meta)} are on the meta device (never initialised); nothing to save")
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora_state.items()}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": use_dora,  # then the tensors include PEFT's `<layer>.lora_magnitude_vector`
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
    }
    check_export_target(output_dir, "peft")
    _check_disk_space(_existing_parent(output_dir), sum(t.numel() * t.element_size() for t in tensors.values()) + 2**20)
    with atomic_directory(output_dir, kind="peft") as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return output_dir


def _read_adapter_weights(path: Path) -> tuple[Path, dict[str, Tensor]]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        file = path / name
        if file.is_file():
            if file.suffix == ".bin":
                return file, _torch_load(file)
            try:
                with safe_open(file, framework="pt", device="cpu") as handle:
                    return file, {k: handle.get_tensor(k) for k in handle.keys()}  # adapters are small
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"{file}: cannot read as safetensors ({err})") from None
    raise CheckpointError(f"{path}: no adapter weights (expected adapter_model.safetensors or adapter_model.bin)")


def load_peft_adapter(model: Llama, adapter_dir: str | Path) -> list[str]:
    """Wrap `model`'s target layers with LoRA (or DoRA, `use_dora`) as a PEFT adapter directory says,
    and load its A/B weights (and DoRA's `lora_magnitude_vector`).

    Everything is checked before the model is touched: unsupported options, target modules absent
    from the model, keys and shapes. Returns the names of the wrapped layers.
    """
    path = _checkpoint_dir(adapter_dir)
    file = path / "adapter_config.json"
    cfg = _read_json(file)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    for option, plain in PEFT_PLAIN_LORA.items():
        value = cfg.get(option)
        if value not in (None, plain) and (bool(value) or bool(plain)):
            raise CheckpointError(f"{file}: {option}={value!r} is not supported (plain LoRA needs {plain!r})")
    if cfg.get("init_lora_weights", True) not in PEFT_PLAIN_INITS:
        raise CheckpointError(f"{file}: init_lora_weights={cfg['init_lora_weights']!r} rewrites the base weights; not supported")
    use_dora = cfg.get("use_dora") or False
    if not isinstance(use_dora, bool):
        raise CheckpointError(f"{file}: use_dora must be true or false, got {use_dora!r}")
    rank, alpha = _require(cfg, "r", file), _require(cfg, "lora_alpha", file)
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{file}: r must be a positive integer and lora_alpha a number, got r={rank!r}, lora_alpha={alpha!r}")
    targets = _require(cfg, "target_modules", file)
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and "." not in t for t in targets):
        raise CheckpointError(f"{file}: target_modules must be a list of layer names like ['q_proj', 'v_proj'], got {targets!r}")
    if lora_modules(model):
        raise CheckpointError(f"{path}: the model already has LoRA layers; load the adapter into the base model")
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n.rpartition(".")[2] in targets}
    absent = sorted(set(targets) - {n.rpartition(".")[2] for n in linears})
    if absent:
        raise CheckpointError(f"{file}: target_modules {absent} are not linear layers of the model")

    weights_file, tensors = _read_adapter_weights(path)
    expected = {}
    for name, m in linears.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.Size([rank, m.in_features])
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.Size([m.out_features, rank])
        if use_dora:
            expected[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = torch.Size([m.out_features])
    entries = [_Entry(k, tuple(v.shape), weights_file) for k, v in tensors.items()]
    _check_entries(weights_file, entries, expected, skip=set())

    wrapped = apply_lora(model, targets, rank=rank, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0), use_dora=use_dora)
    for key, tensor in tensors.items():
        _assign(model, key.removeprefix(PEFT_PREFIX), tensor, None, None)
    return wrapped


# --------------------------------------------------------------------------------------------------
# Training checkpoints (Lightning's .ckpt): atomic writes, disk check, safe reads


def checkpoint_nbytes(obj: object) -> int:
    """Bytes of all tensors in a nested checkpoint (dicts, lists, tuples): what `torch.save` will write, less the pickle."""
    if isinstance(obj, Tensor):
        return obj.untyped_storage().nbytes() if not obj.is_meta else 0
    if isinstance(obj, dict):
        return sum(checkpoint_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(checkpoint_nbytes(v) for v in obj)
    return 0


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk (POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: object, path: str | Path, *, margin: int = 2**20) -> Path:
    """`torch.save` to `path` so that readers see the previous file or the complete new one, never a torn one.

    Checks the free disk space first (tensor bytes + `margin`), writes `.<name>.tmp-XXXX` in the same
    directory (so the rename cannot cross file systems; a killed writer's leftover for this name is removed
    first), fsyncs it, `os.replace`s it into place and
    fsyncs the directory. On any error or interruption the temporary file is removed.
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_disk_space(path.parent, checkpoint_nbytes(obj) + margin)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):  # left by a writer killed mid-save; one writer per path
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0o600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def load_training_checkpoint(path: str | Path, map_location: object = "cpu") -> dict:
    """A Lightning checkpoint read with `weights_only=True`: tensors, numbers, strings and containers only.

    `path` is a .ckpt file, or the directory a sharded (FSDP2) run writes, read here in one process
    without its optimiser states. A file that needs arbitrary Python objects (a pickle that could
    run code) is refused with one line.
    """
    path = Path(path).expanduser()
    if path.is_dir() and (path / ".metadata").is_file():
        return _load_sharded_training_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return _safe_torch_load(path, map_location)


def _safe_torch_load(path: Path, map_location: object = "cpu") -> dict:
    checkpoint = torch_load_weights_only(path, map_location)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(checkpoint).__name__}")
    return checkpoint


def _load_sharded_training_checkpoint(path: Path) -> dict:
    """Lightning's `meta.pt` (step, hyper-parameters, loops) plus the full model weights, gathered
    from the per-rank shards of a torch.distributed.checkpoint directory in this one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (path / "meta.pt").is_file():
        raise CheckpointError(f"{path}: sharded checkpoint without Lightning's meta.pt; expected a directory written by a lightning_tune fit")
    checkpoint = _safe_torch_load(path / "meta.pt")
    reader = dcp.FileSystemReader(path)
    prefix = "state_dict."
    weights = {
        key[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # one process on purpose: not worth a warning to the user
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"state_dict": weights}, storage_reader=reader, no_dist=True)
    checkpoint["state_dict"] = weights
    return checkpoint
