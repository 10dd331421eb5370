"""Meta's consolidated.*.pth + params.json (Llama 2, and Llama 3.x's original/ folders): keys, model-parallel
shards merged, the rotary permutation undone, Llama 3.1's scaled rotary read from `use_scaled_rope`."""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor

from lightning_tune.checkpoint.tensors import Entry, load_state_dict_file
from lightning_tune.families.config import ModelConfig
from lightning_tune.families.hf_config import make_config
from lightning_tune.families.llama2 import META_KEYS
from lightning_tune.io.files import CheckpointError, read_json, require

# --------------------------------------------------------------------------------------------------
# Key maps

# Meta name -> (our / Hugging Face name, model-parallel shard dim): `META_KEYS`, in families/llama2.py.
META_IGNORED = ("rope.freqs",)  # Meta's precomputed rotary table; we compute it per call


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


# torchtune's FullModelMetaCheckpointer writes Meta's key names in one file under its own name, beside a
# copy of params.json (its SHARD_FNAME "model-{cpt_idx}-of-{num_shards}" with .bin; always one shard).
TORCHTUNE_META_FILE = "model-00001-of-00001.bin"


def _meta_shards(path: Path) -> list[Path]:
    """consolidated.00.pth ... consolidated.NN.pth in shard order (or torchtune's one Meta-format file), or
    [] if there are none."""
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards and (path / TORCHTUNE_META_FILE).is_file() and not (path / "config.json").is_file():
        return [path / TORCHTUNE_META_FILE]
    expected = [path / f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if shards != expected:
        raise CheckpointError(f"{path}: Meta shards must be consolidated.00.pth ... consolidated.{len(shards) - 1:02d}.pth, found {[s.name for s in shards]}")
    return shards


# Llama 3.1's rotary scaling (`use_scaled_rope`), as Meta's `apply_scaling` (llama-models) and torchtune's
# `Llama3ScaledRoPE` apply it: factor 8 (32 for Llama 3.2 1B / 3B, torchtune's llama3_2 builders, unless
# params.json says `rope_scaling_factor`), low / high frequency factors 1 and 4, original context 8192.
META_ROPE = {"rope_type": "llama3", "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_seq_len": 8192}
LLAMA3_2_SHAPES = {(2048, 16), (3072, 28)}  # (dim, n_layers) of Llama 3.2 1B and 3B


def _meta_rope(params: dict, file: Path) -> dict:
    """The rotary fields and context of a params.json: Llama 3.1+ (`use_scaled_rope`): llama3 scaling and
    131072 positions; Llama 3.0 (rope_theta 500000): 8192; else Llama 2's 4096 (Meta's files leave it out)."""
    if not params.get("use_scaled_rope"):
        return {"max_seq_len": params.get("max_seq_len", 8192 if params.get("rope_theta") == 500000.0 else 4096)}
    factor = params.get("rope_scaling_factor") or (32.0 if (params.get("dim"), params.get("n_layers")) in LLAMA3_2_SHAPES else 8.0)
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise CheckpointError(f"{file}: rope_scaling_factor must be a positive number, got {factor!r}")
    return {**META_ROPE, "rope_factor": float(factor), "max_seq_len": params.get("max_seq_len", 131072)}


def _first_shard(path: Path, file: Path, why: str) -> dict[str, Tensor]:
    shards = _meta_shards(path)
    if not shards:
        raise CheckpointError(f"{file}: no consolidated.00.pth to read {why} from")
    return load_state_dict_file(shards[0])


def load_meta_config(path: Path) -> ModelConfig:
    """params.json (+ the embedding's shape when vocab_size is -1, and whether an output weight exists) -> ModelConfig."""
    file = path / "params.json"
    params = read_json(file)
    dim = require(params, "dim", file)
    vocab_size = params.get("vocab_size", -1)
    shard = _first_shard(path, file, "the weights") if _meta_shards(path) else {}
    if vocab_size <= 0:  # Meta's files say -1: the tokenizer decides; the embedding's rows tell us
        embed = (shard or _first_shard(path, file, f"vocab_size ({vocab_size})")).get("tok_embeddings.weight")
        if embed is None:
            raise CheckpointError(f"{_meta_shards(path)[0]}: missing 'tok_embeddings.weight' (needed for vocab_size)")
        vocab_size = embed.shape[0]  # ParallelEmbedding splits dim 1, so every shard has all rows
    return make_config(
        file,
        vocab_size=vocab_size,
        num_layers=require(params, "n_layers", file),
        num_heads=require(params, "n_heads", file),
        num_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        embed_dim=dim,
        intermediate_dim=meta_intermediate_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_base=float(params.get("rope_theta", 10000.0)),
        # Llama 3.2 1B / 3B share the embedding with the output: their files may hold no output weight
        tie_word_embeddings=bool(shard) and "output.weight" not in shard,
        **_meta_rope(params, file),
    )


def meta_entries(path: Path, config: ModelConfig) -> list[Entry]:
    """Merge Meta's model-parallel shards tensor by tensor, renamed and with wq/wk un-interleaved."""
    files = _meta_shards(path)
    if not files:
        raise CheckpointError(f"{path}: no weight files (expected consolidated.00.pth ..., or torchtune's {TORCHTUNE_META_FILE})")
    shards = [load_state_dict_file(f) for f in files]
    entries = []
    for meta_key in shards[0]:
        if meta_key in META_IGNORED:
            continue
        try:
            key, dim = meta_to_hf_key(meta_key)
        except KeyError:
            raise CheckpointError(f"{files[0]}: unexpected key {meta_key!r} (not a Llama parameter)") from None
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

        entries.append(Entry(key, tuple(shape), files[0] if dim is None else path / "consolidated.*.pth", read))
    return entries


# The format interface (`tensors.Format`), for `load.FORMATS`.


def detect(path: Path) -> bool:
    """A Meta directory: params.json, and consolidated.*.pth when a config.json is there too (some
    downloads carry both configs: the weight files decide)."""
    if not (path.is_dir() and (path / "params.json").is_file()):
        return False
    return not (path / "config.json").is_file() or bool(list(path.glob("consolidated.*.pth")))


def read_config(path: Path) -> tuple[ModelConfig, bool]:
    config = load_meta_config(path)
    return config, config.tie_word_embeddings


def read_entries(path: Path, config: ModelConfig, stack: ExitStack) -> list[Entry]:
    return meta_entries(path, config)
