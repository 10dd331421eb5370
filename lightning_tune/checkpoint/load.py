"""Open any model file: which format a path is (the format table), its config, its weights into a model one
tensor at a time, a reader of single tensors, and `from_pretrained`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_tune.checkpoint import gguf, hf, meta
from lightning_tune.checkpoint.tensors import Entry, Format, assign_tensor, check_config_matches, check_entries, tie_embeddings
from lightning_tune.families.config import ModelConfig
from lightning_tune.io.files import CheckpointError
from lightning_tune.io.paths import resolve_path
from lightning_tune.layers.lora import is_lora_key, quantized_base_shapes
from lightning_tune.model.decoder import CausalLM
from lightning_tune.model.moe import quantized_expert_shapes

# The formats a model loads from, in the order they are tried: a .gguf file, then a directory (Meta before
# Hugging Face, since a directory holding both configs is Meta's when it holds Meta's weight files).
FORMATS: dict[str, Format] = {"gguf": gguf, "meta": meta, "hf": hf}


def checkpoint_directory(checkpoint_dir: str | Path) -> Path:
    """`checkpoint_dir` resolved (`pkg://PACKAGE/PATH`: a directory shipped in a package); it must be a directory."""
    path = resolve_path(checkpoint_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    return path


def open_checkpoint(checkpoint_dir: str | Path) -> tuple[Path, Format]:
    """The resolved path and its format; one line naming the path when it is none of them."""
    path = resolve_path(checkpoint_dir)
    if FORMATS["gguf"].detect(path):
        return path, FORMATS["gguf"]
    path = checkpoint_directory(path)
    for name, fmt in FORMATS.items():
        if name != "gguf" and fmt.detect(path):
            return path, fmt
    raise CheckpointError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")


def detect_format(checkpoint_dir: str | Path) -> str:
    """'hf' for a config.json directory, 'meta' for params.json + consolidated.*.pth, 'gguf' for a .gguf file."""
    _, fmt = open_checkpoint(checkpoint_dir)
    return next(name for name, known in FORMATS.items() if known is fmt)


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    """The model config of a Hugging Face (config.json) or Meta (params.json) checkpoint directory, or a .gguf file."""
    path, fmt = open_checkpoint(checkpoint_dir)
    return fmt.read_config(path)[0]


def load_weights(model: nn.Module, checkpoint_dir: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
    """Load a checkpoint of any format into `model` (built on the meta device or real) one tensor at a time.

    Keys and shapes are all checked before the first tensor is read, so a mismatched checkpoint
    leaves the model untouched. LoRA's lora_A/lora_B are not in a base checkpoint and are left as
    they are. With a tied-embedding config, lm_head shares embed_tokens' weight.
    """
    path, fmt = open_checkpoint(checkpoint_dir)
    config, tied = fmt.read_config(path)
    check_config_matches(path, model, config)
    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items() if not is_lora_key(k)}
    expected |= quantized_base_shapes(model) | quantized_expert_shapes(model)  # NF4 bases: the checkpoint's tensors, quantised on assignment
    skip = set()
    if tied:  # transformers ties lm_head to embed_tokens and ignores any saved lm_head
        expected.pop("lm_head.weight", None)
        skip.add("lm_head.weight")
        # One tensor before loading too: a sharded (FSDP2) embedding is filled in place, and the
        # head, which FSDP2 gathers as the same parameter, must be that one (to_empty untied them).
        tie_embeddings(model)
    with ExitStack() as stack:
        entries = fmt.read_entries(path, config, stack)
        check_entries(path, entries, expected, skip)
        for entry in entries:
            if entry.key not in skip:
                assign_tensor(model, entry.key, entry.read(), dtype or entry.dtype, device)
    if tied:
        tie_embeddings(model)


def weight_reader(checkpoint_dir: str | Path) -> Callable[[str], Tensor]:
    """`read(key)`: one tensor of a checkpoint of any format (a .gguf file's dequantised to fp32) by our
    key, read when asked.

    For merging adapters into the original high-precision base of a QLoRA run, one layer at a time,
    without loading the base whole. The files are opened at the first read and stay open while the
    reader lives.
    """
    path, fmt = open_checkpoint(checkpoint_dir)
    stack = ExitStack()  # closed with the reader (the safetensors handles close when collected)
    entries: dict[str, Entry] = {}

    def read(key: str) -> Tensor:
        if not entries:
            entries.update({e.key: e for e in fmt.read_entries(path, fmt.read_config(path)[0], stack)})
        if key not in entries:
            raise CheckpointError(f"{path}: missing key {key} (needed to merge the adapters into the original weights)")
        return entries[key].read()

    return read


def from_pretrained(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CausalLM:
    """A `CausalLM` from a Hugging Face or Meta directory or a .gguf file, in eval mode; dtype None keeps the checkpoint's (fp32 for GGUF)."""
    config = load_config(path)
    with torch.device("meta"):  # no memory until each tensor is loaded
        model = CausalLM(config)
    load_weights(model, path, dtype=dtype, device=device)
    return model.eval()
