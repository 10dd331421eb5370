"""config.json <-> ModelConfig, in the transformers 4 and 5 forms, interpreting each family's HFMapping."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_tune.families import family_for, hf_mapping
from lightning_tune.families.base import HFMapping
from lightning_tune.families.config import ModelConfig
from lightning_tune.io.files import CheckpointError, require

CONFIG_KEYS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias", "qk_norm")
ROPE_TYPES = ("default", "llama3", "linear")


def make_config(path: Path, **values) -> ModelConfig:
    try:
        return ModelConfig(**values)
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
        values["rope_factor"] = float(require(rope, "factor", file))
    if rope_type == "llama3":
        values["rope_low_freq_factor"] = float(require(rope, "low_freq_factor", file))
        values["rope_high_freq_factor"] = float(require(rope, "high_freq_factor", file))
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


def config_from_hf(cfg: dict, file: str | Path = "config.json") -> ModelConfig:
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
    heads = require(cfg, "num_attention_heads", file)
    hidden = require(cfg, "hidden_size", file)
    num_layers = require(cfg, "num_hidden_layers", file)
    max_seq_len = cfg.get("max_position_embeddings", defaults["max_position_embeddings"])
    if mapping.attention_bias != "flag":
        attention_bias = "qkv" if mapping.attention_bias == "qkv" else "none"
    else:
        attention_bias = "all" if cfg.get("attention_bias", defaults.get("attention_bias", False)) else "none"
    return make_config(
        file,
        vocab_size=require(cfg, "vocab_size", file),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or defaults.get("num_key_value_heads") or heads,
        embed_dim=hidden,
        intermediate_dim=require(cfg, "intermediate_size", file),
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


def config_to_hf(config: ModelConfig, torch_dtype: torch.dtype = torch.float32, token_ids: dict[str, int | list[int] | None] | None = None) -> dict:
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
