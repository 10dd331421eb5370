"""Hugging Face directories: config.json, safetensors / .bin weights (sharded or not) in and out, the tokenizer
and generation_config.json written beside them."""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_tune.checkpoint.fp8 import ACTIVATION_SCALES, SCALE_SUFFIX, FP8Config, FP8Error, dequantize_fp8, fp8_config, not_converted, scale_shape
from lightning_tune.checkpoint.mxfp4 import dequantize_mxfp4, dequantized_shape
from lightning_tune.checkpoint.tensors import EXPERT_NAMES, Entry, check_entries, first_names, fuse_split, load_state_dict_file, split_fused, stack_experts, unstack_experts
from lightning_tune.families import hf_mapping
from lightning_tune.families.config import ModelConfig
from lightning_tune.families.hf_config import config_from_hf, config_to_hf
from lightning_tune.io.files import CheckpointError, atomic_directory, check_disk_space, check_export_target, existing_parent, read_json, require
from lightning_tune.io.gguf import is_gguf
from lightning_tune.io.paths import resolve_path
from lightning_tune.layers.lora import (
    is_lora_key,
)
from lightning_tune.model.decoder import CausalLM
from lightning_tune.tokenizer.gguf import hf_tokenizer_dir
from lightning_tune.tokenizer.load import load_tokenizer, tokenizer_files

HF_IGNORED_SUFFIX = "rotary_emb.inv_freq"  # a buffer old transformers versions saved
# Multimodal checkpoints (Gemma 3 4B+, Mistral 3): their text decoder's names -> ours; the vision parts are not loaded.
MULTIMODAL_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.", "language_model.lm_head.": "lm_head."}
MULTIMODAL_SKIPPED = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def text_decoder_key(key: str) -> str | None:
    """A checkpoint key as our model names it: a multimodal wrapper's text weights renamed, its vision
    weights None (skipped); any other key as it is."""
    if key.startswith(MULTIMODAL_SKIPPED):
        return None
    for prefix, ours in MULTIMODAL_PREFIXES.items():
        if key.startswith(prefix):
            return ours + key[len(prefix) :]
    return key


def load_hf_config(path: Path) -> tuple[ModelConfig, bool]:
    """config.json -> (ModelConfig, tie_word_embeddings); a quantization_config this reader cannot
    dequantise is refused here, before any weight file is opened."""
    cfg = read_json(path / "config.json")
    config = config_from_hf(cfg, path / "config.json")
    hf_quantization(cfg, path / "config.json", config)
    return config, config.tie_word_embeddings


def hf_quantization(cfg: dict, file: Path, config: ModelConfig) -> FP8Config | None:
    """config.json's quantization_config: FP8 (`checkpoint/fp8.py`) read as an FP8Config, gpt-oss's MXFP4
    (dequantised by `mxfp4_entries`) and none as None; any other method refused in one line."""
    quant = cfg.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise CheckpointError(f"{file}: quantization_config must be an object, got {str(quant)[:100]}")
    method = quant.get("quant_method")
    if method == "mxfp4" and hf_mapping(config.model_type).experts == "gpt_oss":
        return None
    if method != "fp8":
        raise CheckpointError(f"{file}: quantization_config quant_method {str(method)[:50]!r} is not supported (supported: fp8, and mxfp4 for gpt-oss); use a bf16/fp32 copy of the model")
    try:
        return fp8_config(quant, cfg)
    except FP8Error as err:
        raise CheckpointError(f"{file}: quantization_config: {err}") from None


def _hf_weight_files(path: Path) -> list[Path]:
    """The weight files of a Hugging Face directory, safetensors preferred over .bin."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            weight_map = require(read_json(path / index), "weight_map", path / index)
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            for file in files:
                if not file.is_file():
                    raise CheckpointError(f"{path / index}: lists shard {file.name}, which is missing")
            return files
    raise CheckpointError(f"{path}: no weight files (expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)")


def hf_entries(path: Path, stack: ExitStack) -> list[Entry]:
    entries = []
    for file in _hf_weight_files(path):
        if file.suffix == ".safetensors":
            try:
                handle = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"{file}: cannot read as safetensors ({err})") from None
            for key in handle.keys():
                if not key.endswith(HF_IGNORED_SUFFIX) and text_decoder_key(key) is not None:
                    shape = tuple(handle.get_slice(key).get_shape())
                    entries.append(Entry(text_decoder_key(key), shape, file, lambda h=handle, k=key: h.get_tensor(k)))
        else:
            for key, tensor in load_state_dict_file(file).items():
                if not key.endswith(HF_IGNORED_SUFFIX) and text_decoder_key(key) is not None:
                    entries.append(Entry(text_decoder_key(key), tuple(tensor.shape), file, lambda t=tensor: t))
    return entries


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
    config: ModelConfig,
    output_dir: str | Path,
    *,
    max_shard_size: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    tokenizer_path: str | Path | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a transformers-loadable directory of the config's family atomically; returns its path.

    Writes config.json, generation_config.json, model.safetensors (or model-0000i-of-0000n shards
    plus model.safetensors.index.json above `max_shard_size` bytes) and, if given, the tokenizer:
    a SentencePiece `.model` (copied as tokenizer.model) or a `tokenizer.json` / directory (its
    files, `tokenizer.tokenizer_files`). Special token ids come from that tokenizer when it is a
    tokenizer.json (its config and generation_config), else from the family (`families/`).
    Tied embeddings write no `lm_head.weight`, as transformers does. A LoRA model must be merged
    first (`lora.merge_lora`) or saved with `save_peft_adapter`. `chat_template` (the Jinja source a
    run's chat data was rendered with) is written as transformers 5 saves one, `chat_template.jinja`,
    over the tokenizer's own (taken out of a copied tokenizer_config.json), so `chat`, `generate
    --template chat` and transformers' `apply_chat_template` render conversations as the run trained.
    """
    output_dir = Path(output_dir).expanduser().absolute()
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else dict(model_or_state_dict)
    lora_keys = [k for k in state if is_lora_key(k)]
    if lora_keys:
        raise CheckpointError(f"{output_dir}: the model has LoRA weights ({lora_keys[0]}, ...): merge them (lora.merge_lora) or use save_peft_adapter")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in CausalLM(config).state_dict().items()}
    skip = set()
    if config.tie_word_embeddings:  # the head is the embedding: one tensor in the file
        expected.pop("lm_head.weight")
        skip.add("lm_head.weight")
        head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
        if isinstance(head, Tensor) and isinstance(embed, Tensor) and head is not embed and not head.is_meta and not torch.equal(head.to(embed.dtype), embed):
            raise CheckpointError(f"{output_dir}: tie_word_embeddings is true but lm_head differs from the embedding (LoRA on lm_head?); a tied export would drop it: adapt other layers")
    entries = [Entry(k, tuple(v.shape), output_dir) for k, v in state.items()]
    check_entries(output_dir, entries, expected, skip=skip)
    tokenizer_copies, token_ids = _export_tokenizer(tokenizer_path, config)
    config_json = config_to_hf(config, token_ids=token_ids)  # torch_dtype set below, once known
    generation = {k: config_json[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config_json.get(k) is not None}

    tensors = {key: state[key].detach() for key in expected}  # our canonical order: shards hold layers in sequence
    if hf_mapping(config.model_type).fused_projections:  # Phi-3: q/k/v and gate/up joined as transformers holds them
        tensors = fuse_split(tensors, config)
    if hf_mapping(config.model_type).experts in EXPERT_NAMES:  # each expert's projections as their own tensors, as the Hub has them
        tensors = unstack_experts(tensors, hf_mapping(config.model_type).experts)
    meta = [k for k, t in tensors.items() if t.is_meta]
    if meta:
        raise CheckpointError(f"{output_dir}: {first_names(meta)} are on the meta device (never loaded); nothing to save")
    out_dtype = dtype or tensors["model.embed_tokens.weight"].dtype
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    sizes = {k: t.numel() * itemsize for k, t in tensors.items()}
    total = sum(sizes.values())
    extra = sum(source.stat().st_size for source, _ in tokenizer_copies) + 2**20  # tokenizer, JSON files, headers
    check_export_target(output_dir, "hf")
    check_disk_space(existing_parent(output_dir), total + extra)

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
        if chat_template is not None:
            write_chat_template(tmp, chat_template)
        (tmp / "config.json").write_text(json.dumps(config_json | {"torch_dtype": str(out_dtype).removeprefix("torch.")}, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")  # after the copies: ours wins
    return output_dir


def write_chat_template(folder: Path, template: str) -> None:
    """`template` as the folder's chat template, as transformers 5's `save_pretrained` writes one:
    `chat_template.jinja`, and no `chat_template` left in tokenizer_config.json to disagree with it."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = read_json(config_file)
        if "chat_template" in config:
            del config["chat_template"]
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _export_tokenizer(tokenizer_path: str | Path | None, config: ModelConfig) -> tuple[list[tuple[Path, str]], dict | None]:
    """(files to copy as (source, name in the export), special token ids or None for the family's).

    A SentencePiece `.model` is copied unread (its ids are the family's: Llama 2, Mistral); a
    tokenizer.json, or a directory holding one, is read for its bos / eos (all end tokens) / pad ids.
    """
    if tokenizer_path is None:
        return [], None
    path = Path(tokenizer_path).expanduser()
    if is_gguf(path):  # a GGUF's tokenizer lives in its metadata: export it as tokenizer.json + tokenizer_config.json
        path = hf_tokenizer_dir(resolve_path(path).absolute())
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        path = path / "tokenizer.model"
    if not path.exists():
        raise CheckpointError(f"{path}: tokenizer file not found")
    if path.is_file() and path.suffix != ".json":
        return [(path, "tokenizer.model")], None
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}")
    eos = list(tokenizer.eos_ids)
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": tokenizer.pad_id}
    return [(file, file.name) for file in tokenizer_files(path)], ids


# The format interface (`tensors.Format`), for `load.FORMATS`.


def mxfp4_entries(entries: list[Entry]) -> list[Entry]:
    """Each MXFP4 pair `<name>_blocks` + `<name>_scales` (gpt-oss's experts on the Hub) becomes `<name>`,
    dequantised to bf16 when read (exact: every MXFP4 value is a bf16 value); other entries pass."""
    by_key = {e.key: e for e in entries}
    out = []
    for entry in entries:
        if entry.key.endswith("_scales") and entry.key.removesuffix("_scales") + "_blocks" in by_key:
            continue
        name = entry.key.removesuffix("_blocks")
        scales = by_key.get(f"{name}_scales")
        if not entry.key.endswith("_blocks") or scales is None or len(entry.shape) != 4 or tuple(scales.shape) != tuple(entry.shape[:-1]):
            out.append(entry)
            continue
        read = None if entry.read is None else (lambda b=entry.read, s=scales.read: dequantize_mxfp4(b(), s()))
        out.append(Entry(name, dequantized_shape(entry.shape), entry.file, read))
    return out


SAFETENSORS_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _weight_dtypes(path: Path) -> dict[str, str]:
    """Our key -> its dtype as safetensors names it ("F8_E4M3", "F32", ...): from the safetensors headers, or
    from a memory-mapped .bin (no tensor data read either way)."""
    dtypes = {}
    for file in _hf_weight_files(path):
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt", device="cpu") as handle:
                found = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
        else:
            found = {key: SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)) for key, t in load_state_dict_file(file).items()}
        dtypes |= {text_decoder_key(key): dtype for key, dtype in found.items() if text_decoder_key(key) is not None}
    return dtypes


def _fp8_read(entry: Entry, scale: Entry, quant: FP8Config):
    def read() -> Tensor:
        try:
            return dequantize_fp8(entry.read(), scale.read(), quant.block, torch.float32)
        except FP8Error as err:
            raise CheckpointError(f"{entry.file}: {entry.key}: {err}") from None

    return read


def fp8_entries(entries: list[Entry], quant: FP8Config, dtypes: dict[str, str]) -> list[Entry]:
    """Each FP8 `<module>.weight` with its `<module>.weight_scale_inv` becomes the weight, dequantised when read
    (`checkpoint/fp8.py`) to the float32 product, rounded once to whatever dtype the model loads in (the
    checkpoint's, `quant.dtype`, where none is named, as transformers' dtype="auto"); activation scales are
    dropped; other entries pass.
    Every scale's shape and dtype is checked against its weight before any tensor is read (`dtypes`: each
    key's dtype, `_weight_dtypes`), and a float8 weight without a scale, a scale without a weight or a scale
    on a module the config leaves unquantised (`modules_to_not_convert`) is refused in one line."""
    by_key = {e.key: e for e in entries}
    out = []
    for entry in entries:
        module, _, name = entry.key.rpartition(".")
        if name in ACTIVATION_SCALES:
            continue
        if name == SCALE_SUFFIX:
            if f"{module}.weight" not in by_key:
                raise CheckpointError(f"{entry.file}: {entry.key} has no weight {module}.weight to scale")
            continue
        scale = by_key.get(f"{module}.{SCALE_SUFFIX}") if name == "weight" else None
        if scale is None:
            if dtypes.get(entry.key, "").startswith("F8"):
                raise CheckpointError(f"{entry.file}: {entry.key} is {dtypes[entry.key]} but has no {module}.{SCALE_SUFFIX} to dequantise it with")
            out.append(entry)
            continue
        if not_converted(module, quant.not_converted):
            raise CheckpointError(f"{scale.file}: {scale.key}: {module} is in quantization_config.modules_to_not_convert but has an FP8 scale")
        if dtypes.get(entry.key) != "F8_E4M3":
            raise CheckpointError(f"{entry.file}: {entry.key} is {dtypes.get(entry.key)}, expected F8_E4M3 beside its {SCALE_SUFFIX}")
        if dtypes.get(scale.key) not in ("F32", "BF16", "F16"):
            raise CheckpointError(f"{scale.file}: {scale.key} is {dtypes.get(scale.key)}, expected an F32, BF16 or F16 scale")
        if len(entry.shape) != 2 or scale.shape not in scale_shape(entry.shape, quant.block):
            layout = f"weight_block_size {list(quant.block)}" if quant.block else "one scale per tensor (weight_block_size null)"
            expected = " or ".join(str(list(s)) for s in scale_shape(entry.shape, quant.block)) if len(entry.shape) == 2 else "a 2-D weight"
            raise CheckpointError(f"{scale.file}: {scale.key} has shape {list(scale.shape)} for a weight of shape {list(entry.shape)}; {layout} needs {expected}")
        out.append(Entry(entry.key, entry.shape, entry.file, None if entry.read is None else _fp8_read(entry, scale, quant), quant.dtype))
    return out


def detect(path: Path) -> bool:
    """A Hugging Face directory: config.json (after `meta.detect`: some downloads carry both configs)."""
    return path.is_dir() and (path / "config.json").is_file()


def read_config(path: Path) -> tuple[ModelConfig, bool]:
    return load_hf_config(path)


def read_entries(path: Path, config: ModelConfig, stack: ExitStack) -> list[Entry]:
    entries = hf_entries(path, stack)
    quant = hf_quantization(read_json(path / "config.json"), path / "config.json", config)
    if quant is not None:  # before experts are stacked or projections split: those see plain weights
        entries = fp8_entries(entries, quant, _weight_dtypes(path))
    mapping = hf_mapping(config.model_type)
    if mapping.experts in EXPERT_NAMES:
        entries = stack_experts(entries, mapping.experts, config.num_experts)
    elif mapping.experts == "gpt_oss":
        entries = mxfp4_entries(entries)
    return split_fused(entries, config) if mapping.fused_projections else entries
