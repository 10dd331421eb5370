"""config.json <-> ModelConfig, in the transformers 4 and 5 forms, interpreting each family's HFMapping."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lightning_tune.families import family_for, hf_mapping
from lightning_tune.families.base import HFMapping
from lightning_tune.families.config import ACTIVATIONS, ModelConfig
from lightning_tune.io.files import CheckpointError, require

CONFIG_KEYS = (
    "vocab_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "embed_dim",
    "intermediate_dim",
    "head_dim",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "qk_norm",
    "block",
    "hidden_act",
    "query_pre_attn_scalar",
    "attn_logit_softcap",
    "final_logit_softcap",
    "layer_types",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_dim",
    "router",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "attention_sinks",
)
ROPE_TYPES = ("default", "llama3", "linear", "longrope", "yarn")


def make_config(path: Path, **values) -> ModelConfig:
    try:
        return ModelConfig(**values)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def _hf_rope(cfg: dict, mapping: HFMapping, max_seq_len: int, file: Path) -> dict:
    """The rotary fields of a config.json in either form: transformers 4 (`rope_theta` + `rope_scaling`)
    or 5 (`rope_parameters`, `rope_theta` inside). Unsupported types are refused in one line."""
    params, scaling = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    if params is None and scaling is None:  # what the config class assumes (Ministral 3: YaRN)
        params = mapping.defaults.get("rope_parameters")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{file}: {key} must be an object or null, got {value!r}")
    if mapping.rope_per_layer_type:  # Gemma 3: the full layers' rotary (scaled), the sliding layers' base
        per_type = params if params is not None and any(isinstance(v, dict) for v in params.values()) else {}
        full = {**(scaling or {}), **(per_type.get("full_attention") or {})}
        full.setdefault("rope_theta", cfg.get("rope_theta", mapping.defaults["rope_theta"]))
        local = dict(per_type.get("sliding_attention") or {})
        local.setdefault("rope_theta", cfg.get("rope_local_base_freq", mapping.defaults["rope_local_base_freq"]))
        if (local.get("rope_type") or local.get("type") or "default") != "default":
            raise CheckpointError(f"{file}: the sliding layers' rotary type must be 'default', got {local.get('rope_type') or local.get('type')!r}")
        return _rope_values(full, cfg, mapping, max_seq_len, file) | {"rope_local_base": float(local["rope_theta"])}
    rope = {**(scaling or {}), **(params or {})}
    if any(isinstance(v, dict) for v in rope.values()):  # per-layer-type tables of a model_type that has none
        raise CheckpointError(f"{file}: per-layer rotary parameters are not supported; supported rotary types: {', '.join(mapping.rope_types)}")
    return _rope_values(rope, cfg, mapping, max_seq_len, file)


def _rope_values(rope: dict, cfg: dict, mapping: HFMapping, max_seq_len: int, file: Path) -> dict:
    """ModelConfig's rotary fields of one rotary parameter set (`rope_type`, `rope_theta`, its scaling)."""
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in mapping.rope_types:
        raise CheckpointError(f"{file}: rotary type {rope_type!r} is not supported; supported: {', '.join(mapping.rope_types)}")
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0 and not mapping.partial_rotary:
        raise CheckpointError(f"{file}: partial_rotary_factor is not supported (the rotary embedding covers the whole head)")
    values = {"rope_type": rope_type, "rope_base": float(rope.get("rope_theta", cfg.get("rope_theta", mapping.defaults["rope_theta"])))}
    if mapping.partial_rotary:
        values["rope_partial_factor"] = float(partial)
    if mapping.query_scale:
        values["query_scale_beta"] = rope.get("llama_4_scaling_beta")
    if rope_type == "yarn":  # as transformers' _compute_yarn_parameters resolves it
        original = int(require(rope, "original_max_position_embeddings", file))
        factor = float(rope.get("factor") or max_seq_len / original)
        attention, mscale, mscale_all_dim = rope.get("attention_factor"), rope.get("mscale"), rope.get("mscale_all_dim")
        if attention is None:
            attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim else yarn_mscale(factor)
        values |= {
            "rope_factor": factor,
            "rope_original_max_seq_len": original,
            "rope_attention_factor": float(attention),
            "rope_beta_fast": float(rope.get("beta_fast") or 32),
            "rope_beta_slow": float(rope.get("beta_slow") or 1),
            "rope_truncate": bool(rope.get("truncate", True)),
        }
    if rope_type == "longrope":  # as transformers' _compute_longrope_parameters resolves it
        original = int(rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or max_seq_len)
        factor = rope.get("factor") or max_seq_len / original
        attention = rope.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        values |= {
            "rope_short_factor": require(rope, "short_factor", file),
            "rope_long_factor": require(rope, "long_factor", file),
            "rope_original_max_seq_len": original,
            "rope_attention_factor": float(attention),
        }
    if rope_type in ("linear", "llama3"):
        values["rope_factor"] = float(require(rope, "factor", file))
    if rope_type == "llama3":
        values["rope_low_freq_factor"] = float(require(rope, "low_freq_factor", file))
        values["rope_high_freq_factor"] = float(require(rope, "high_freq_factor", file))
        values["rope_original_max_seq_len"] = int(rope.get("original_max_position_embeddings") or max_seq_len)
    return values


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention scale (transformers' `yarn_get_mscale`): 0.1 * mscale * log(scale) + 1, 1 for scale <= 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _hf_layer_types(cfg: dict, mapping: HFMapping, num_layers: int, file: Path) -> dict:
    """`sliding_window` and `layer_types` of a model_type whose layers alternate (Gemma 2 / 3)."""
    if cfg.get("use_bidirectional_attention"):
        raise CheckpointError(f"{file}: use_bidirectional_attention is not supported (a causal language model attends to earlier tokens only)")
    layer_types = cfg.get("layer_types")
    if layer_types is None:  # transformers' derivation: every pattern-th layer full
        pattern = cfg.get("sliding_window_pattern", mapping.defaults["sliding_window_pattern"])
        if not isinstance(pattern, int) or pattern <= 0:
            raise CheckpointError(f"{file}: sliding_window_pattern must be a positive integer, got {pattern!r}")
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers or any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        raise CheckpointError(f"{file}: layer_types must list {num_layers} of 'full_attention', 'sliding_attention', got {layer_types!r}")
    return {"sliding_window": cfg.get("sliding_window", mapping.defaults["sliding_window"]), "layer_types": tuple(layer_types)}


def _hf_sliding_window(cfg: dict, mapping: HFMapping, num_layers: int, file: Path) -> int | None:
    if mapping.sliding_window == "all":  # Mistral: every layer, unless config.json says null
        return cfg.get("sliding_window", mapping.defaults.get("sliding_window"))
    layer_types = cfg.get("layer_types") or []
    per_layer = mapping.sliding_window == "per_layer" and cfg.get("use_sliding_window", False) and cfg.get("sliding_window") is not None
    if "sliding_attention" in layer_types or (per_layer and cfg.get("max_window_layers", mapping.defaults.get("max_window_layers", 0)) < num_layers):
        raise CheckpointError(f"{file}: sliding-window attention on some layers only (use_sliding_window / layer_types) is not supported; set use_sliding_window false")
    return None


# Multimodal wrappers whose text decoder is a family here: their model_type -> the text_config's.
MULTIMODAL_WRAPPERS = {"gemma3": "gemma3_text", "mistral3": "ministral3"}


def text_config(cfg: dict, file: Path) -> dict:
    """A multimodal wrapper's config.json (Gemma 3 4B+, Mistral 3) -> its text decoder's config (the vision
    tower is not loaded); any other config as it is. The wrapper's `tie_word_embeddings`, where it gives
    one, wins over the text part's: transformers ties the wrapper's head by it."""
    wrapper = cfg.get("model_type")
    if wrapper not in MULTIMODAL_WRAPPERS:
        return cfg
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{file}: model_type {wrapper!r} needs a text_config object (the text decoder's config)")
    inherited = {k: cfg[k] for k in ("tie_word_embeddings",) if k in cfg}
    return {"model_type": MULTIMODAL_WRAPPERS[wrapper], **text, **inherited}


def config_from_hf(cfg: dict, file: str | Path = "config.json") -> ModelConfig:
    """A Hugging Face config.json (as a dict) -> ModelConfig, for every model_type in `families.HF_MAPPINGS`.

    Keys a config.json leaves out take the value transformers' config class assumes for that
    model_type (`HFMapping.defaults`), so a terse file reads as transformers reads it.
    """
    file = Path(file)
    cfg = text_config(cfg, file)
    try:
        mapping = hf_mapping(cfg.get("model_type", "llama"), file)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    defaults = mapping.defaults
    activation = cfg.get(mapping.activation_key, defaults.get(mapping.activation_key, "silu"))
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"{file}: {mapping.activation_key} is {activation!r}, expected one of {', '.join(map(repr, ACTIVATIONS))}")
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
        model_type=mapping.model_type,
        block=mapping.block,
        hidden_act=activation,
        **(_hf_layer_types(cfg, mapping, num_layers, file) if mapping.sliding_window == "layer_types" else {"sliding_window": _hf_sliding_window(cfg, mapping, num_layers, file)}),
        **(_gemma_scores(cfg, mapping) if mapping.gemma_scores else {}),
        **_hf_rope(cfg, mapping, max_seq_len, file),
        **_hf_experts(cfg, mapping, file),
        attention_sinks=mapping.attention_sinks,
    )


def _hf_experts(cfg: dict, mapping: HFMapping, file: Path) -> dict:
    """The mixture-of-experts fields (`HFMapping.experts`); transformers 4 names Qwen3-MoE's count
    `num_experts`, 5 writes `num_local_experts` (Mixtral's name in both)."""
    if mapping.experts == "none":
        return {}
    d = mapping.defaults
    count = cfg.get("num_local_experts", cfg.get("num_experts", d.get("num_experts", d.get("num_local_experts"))))
    values = {
        "num_experts": count,
        "num_experts_per_tok": cfg.get("num_experts_per_tok", d["num_experts_per_tok"]),
        "router_aux_loss_coef": float(cfg.get("router_aux_loss_coef", d["router_aux_loss_coef"])),
    }
    if mapping.experts == "gpt_oss":  # the clamped SwiGLU's constants are the model's (`model/moe.py`)
        for key, value in (("swiglu_limit", 7.0), ("swiglu_alpha", 1.702)):
            if cfg.get(key, value) != value:
                raise CheckpointError(f"{file}: {key} {cfg[key]} is not supported (gpt-oss uses {value})")
        return values | {"router": "topk_softmax", "moe_intermediate_dim": require(cfg, "intermediate_size", file)}
    if mapping.experts == "mixtral":
        if cfg.get("router_jitter_noise"):
            raise CheckpointError(f"{file}: router_jitter_noise {cfg['router_jitter_noise']} is not supported (it multiplies training inputs by noise); set it to 0")
        return values | {"norm_topk_prob": True}
    only = cfg.get("mlp_only_layers", d["mlp_only_layers"])
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        raise CheckpointError(f"{file}: mlp_only_layers must be a list of layer indices, got {only!r}")
    return values | {
        "moe_intermediate_dim": cfg.get("moe_intermediate_size", d["moe_intermediate_size"]),
        "norm_topk_prob": bool(cfg.get("norm_topk_prob", d["norm_topk_prob"])),
        "decoder_sparse_step": cfg.get("decoder_sparse_step", d["decoder_sparse_step"]),
        "mlp_only_layers": tuple(only),
    }


def _gemma_scores(cfg: dict, mapping: HFMapping) -> dict:
    """Gemma's score scale and soft-caps (null: none)."""
    keys = {"query_pre_attn_scalar": "query_pre_attn_scalar", "attn_logit_softcap": "attn_logit_softcapping", "final_logit_softcap": "final_logit_softcapping"}
    return {ours: cfg.get(theirs, mapping.defaults[theirs]) for ours, theirs in keys.items()}


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
    if config.sliding_window is not None and mapping.sliding_window not in ("all", "layer_types"):
        problems.append(f"sliding_window={config.sliding_window}")
    if config.layer_types is not None and mapping.sliding_window != "layer_types":
        problems.append("layer_types")
    if config.block != mapping.block:
        problems.append(f"block={config.block!r}")
    if config.rope_local_base is not None and not mapping.rope_per_layer_type:
        problems.append(f"rope_local_base={config.rope_local_base}")
    if config.rope_type not in mapping.rope_types:
        problems.append(f"rope_type={config.rope_type!r}")
    if config.query_scale_beta is not None and not mapping.query_scale:
        problems.append(f"query_scale_beta={config.query_scale_beta}")
    if config.rope_partial_factor != 1.0 and not mapping.partial_rotary:
        problems.append(f"rope_partial_factor={config.rope_partial_factor}")
    for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
        if getattr(config, name) is not None and not mapping.gemma_scores:
            problems.append(f"{name}={getattr(config, name)}")
    if config.num_experts and mapping.experts == "none":
        problems.append(f"num_experts={config.num_experts}")
    if config.num_experts and (config.router == "topk_softmax") != (mapping.experts == "gpt_oss"):
        problems.append(f"router={config.router!r}")
    if config.attention_sinks != mapping.attention_sinks:
        problems.append(f"attention_sinks={config.attention_sinks}")
    if mapping.experts == "mixtral" and (not config.norm_topk_prob or config.moe_intermediate_dim != config.intermediate_dim or config.mlp_only_layers or config.decoder_sparse_step != 1):
        problems.append("experts other than Mixtral's (renormalised, every layer sparse, intermediate_dim)")
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
    elif config.rope_type == "yarn":
        rope_scaling = {
            "rope_type": "yarn",
            "factor": config.rope_factor,
            "original_max_position_embeddings": config.rope_original_max_seq_len,
            "attention_factor": config.rope_attention_factor,
            "beta_fast": config.rope_beta_fast,
            "beta_slow": config.rope_beta_slow,
            "truncate": config.rope_truncate,
        }
    elif config.rope_type == "longrope":
        rope_scaling = {
            "rope_type": "longrope",
            "short_factor": list(config.rope_short_factor),
            "long_factor": list(config.rope_long_factor),
            "original_max_position_embeddings": config.rope_original_max_seq_len,
            "attention_factor": config.rope_attention_factor,
        }
    if mapping.query_scale and config.query_scale_beta is not None:  # Ministral 3 keeps it with the rotary parameters
        rope_scaling = {**(rope_scaling or {"rope_type": "default"}), "llama_4_scaling_beta": config.query_scale_beta}
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
        mapping.activation_key: config.hidden_act,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": token_ids.get("bos_token_id"),
        "eos_token_id": token_ids.get("eos_token_id"),
        "torch_dtype": str(torch_dtype).removeprefix("torch."),
    }
    if token_ids.get("pad_token_id") is not None or mapping.defaults.get("pad_token_id") is not None:  # null over a default outside a toy vocabulary
        out["pad_token_id"] = token_ids.get("pad_token_id")
    if mapping.attention_bias == "flag":
        out["attention_bias"] = config.attention_bias == "all"
    if mapping.mlp_bias:
        out["mlp_bias"] = config.mlp_bias
        out["pretraining_tp"] = 1
    if mapping.sliding_window == "all":
        out["sliding_window"] = config.sliding_window  # null written out: Mistral's reader assumes 4096 when absent
    elif mapping.sliding_window == "per_layer":
        out |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.num_layers}
    elif mapping.sliding_window == "layer_types":  # written out: the readers' derived patterns differ by model_type
        every = "sliding_attention" if config.sliding_window is not None else "full_attention"  # no layer_types: one kind
        out |= {"sliding_window": config.sliding_window, "layer_types": list(config.layer_types or [every] * config.num_layers)}
    if mapping.rope_per_layer_type:  # transformers 4's names (5 folds them into rope_parameters per layer type)
        out["rope_local_base_freq"] = config.rope_local_base if config.rope_local_base is not None else config.rope_base
    if mapping.partial_rotary:  # Phi-3: transformers 4 reads these two at the top level
        out["partial_rotary_factor"] = config.rope_partial_factor
        out["original_max_position_embeddings"] = config.rope_original_max_seq_len if config.rope_type == "longrope" else config.max_seq_len
    if mapping.experts == "qwen3_moe":  # transformers 4's names (5 reads them too)
        out |= {
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_dim,
            "norm_topk_prob": config.norm_topk_prob,
            "decoder_sparse_step": config.decoder_sparse_step,
            "mlp_only_layers": list(config.mlp_only_layers),
            "router_aux_loss_coef": config.router_aux_loss_coef,
            "output_router_logits": False,
        }
    elif mapping.experts == "gpt_oss":
        out |= {
            "num_local_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "experts_per_token": config.num_experts_per_tok,
            "router_aux_loss_coef": config.router_aux_loss_coef,
            "swiglu_limit": 7.0,
            "output_router_logits": False,
        }
    elif mapping.experts == "mixtral":
        out |= {
            "num_local_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "router_aux_loss_coef": config.router_aux_loss_coef,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
        }
    if mapping.gemma_scores:
        out |= {
            "query_pre_attn_scalar": config.query_pre_attn_scalar if config.query_pre_attn_scalar is not None else config.head_dim,
            "attn_logit_softcapping": config.attn_logit_softcap,
            "final_logit_softcapping": config.final_logit_softcap,
        }
    return out
