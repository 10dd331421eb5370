"""Tensors into a model: Entry (key, shape, how to read it), every key and shape checked before the first read,
one tensor assigned (a meta parameter materialised, an FSDP2 shard filled, NF4 quantised on arrival)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_tune.families.config import ModelConfig
from lightning_tune.families.hf_config import CONFIG_KEYS
from lightning_tune.io.files import CheckpointError, torch_load_weights_only
from lightning_tune.layers.lora import (
    QLinear,
)

# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Entry:
    """One tensor of a checkpoint, not yet read: our key, its shape, where it lives, how to read it."""

    key: str
    shape: tuple[int, ...]
    file: Path
    read: Callable[[], Tensor] | None = None  # None when only the key and shape are being checked


class Format(Protocol):
    """What one checkpoint format provides (each is a module of this package: `hf`, `meta`, `gguf`), so
    `load.py` opens any of them through one table (`FORMATS`). A new format is one more such module."""

    def detect(self, path: Path) -> bool:
        """Whether `path` (resolved; maybe missing) is in this format."""

    def read_config(self, path: Path) -> tuple[ModelConfig, bool]:
        """(the model's config, whether its output head is tied to the embedding)."""

    def read_entries(self, path: Path, config: ModelConfig, stack: ExitStack) -> list[Entry]:
        """Every tensor as an `Entry` (read lazily); files opened for them are kept open by `stack`."""


def load_state_dict_file(file: Path) -> dict[str, Tensor]:
    """A .bin/.pth state dict, memory-mapped (tensors are read from disk only when touched)."""
    state = torch_load_weights_only(file, mmap=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a flat state dict of tensors, got {type(state).__name__}")
    return state


def first_names(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else f" ({len(names)})")


def check_entries(path: Path, entries: list[Entry], expected: dict[str, torch.Size], skip: set[str]) -> None:
    """Every expected key present once with the expected shape, nothing else (before touching the model)."""
    found = {e.key for e in entries} - skip
    unexpected = sorted(found - expected.keys())
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys {first_names(unexpected)}")
    missing = sorted(expected.keys() - found)
    if missing:
        raise CheckpointError(f"{path}: missing keys {first_names(missing)}")
    for e in entries:
        if e.key not in skip and e.shape != tuple(expected[e.key]):
            raise CheckpointError(f"{e.file}: {e.key} has shape {list(e.shape)}, the config expects {list(expected[e.key])}")


def load_shard_(param: Tensor, full: Tensor) -> None:
    """Copy this rank's rows of the full tensor `full` into the sharded parameter `param` in place.

    `distribute_tensor(..., src_data_rank=None)` slices locally (no communication): every rank reads
    the same full tensor from the checkpoint and keeps only its own shard.
    """
    shard = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    with torch.no_grad():
        param.to_local().copy_(shard.to_local())


def assign_tensor(model: nn.Module, key: str, tensor: Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> None:
    """Put one tensor into the model: materialise a meta parameter (assign), else copy in place.

    A parameter still on the meta device takes the tensor's dtype (or `dtype`) and device (CPU, or
    `device`). A real parameter keeps its dtype and device unless `dtype`/`device` ask otherwise.
    Either way requires_grad is kept, so a frozen base stays frozen. A parameter sharded by FSDP2
    (a DTensor) keeps its dtype and placement and receives only this rank's rows.
    """
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr == "weight" and isinstance(module, QLinear) and module.quantized:
        # QLoRA: quantised to NF4 as it arrives, so only one layer's high-precision weight ever exists
        module.quantize_base_(tensor.to(device if device is not None else tensor.device, dtype or tensor.dtype))
        return
    old = module._parameters[attr]
    if isinstance(old, DTensor):
        load_shard_(old, tensor)
        return
    target_dtype = dtype or (tensor.dtype if old.is_meta else old.dtype)
    target_device = torch.device(device) if device is not None else (tensor.device if old.is_meta else old.device)
    if old.is_meta or old.dtype != target_dtype or old.device != target_device:
        module._parameters[attr] = nn.Parameter(tensor.to(target_device, target_dtype), requires_grad=old.requires_grad)
    else:
        with torch.no_grad():
            old.copy_(tensor)


def check_config_matches(path: Path, model: nn.Module, config: ModelConfig) -> None:
    ours = getattr(model, "config", None)
    if isinstance(ours, ModelConfig):
        diff = [f"{k} {getattr(config, k)} vs model's {getattr(ours, k)}" for k in CONFIG_KEYS if getattr(config, k) != getattr(ours, k)]
        if diff:
            raise CheckpointError(f"{path}: checkpoint config does not match the model: {'; '.join(diff)}")


def tie_embeddings(model: nn.Module) -> None:
    """lm_head's weight becomes the embedding's (the parameter object itself, as transformers ties)."""
    model.get_submodule("lm_head").weight = model.get_submodule("model.embed_tokens").weight
