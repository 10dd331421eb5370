"""Lightning training checkpoints (.ckpt): atomic saves after a disk check, weights-only reads, and the
sharded (torch.distributed.checkpoint) directories of FSDP2 runs read in one process."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from lightning_tune.io.files import CheckpointError, atomic_file, check_disk_space, torch_load_weights_only

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


def atomic_torch_save(obj: object, path: str | Path, *, margin: int = 2**20) -> Path:
    """`torch.save` to `path` so that readers see the previous file or the complete new one, never a torn one.

    Checks the free disk space first (tensor bytes + `margin`), then writes through `io.files.atomic_file`
    (a temporary file beside `path`, fsynced and renamed into place; removed on any error or interruption).
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    check_disk_space(path.parent, checkpoint_nbytes(obj) + margin)
    with atomic_file(path) as tmp, tmp.open("wb") as file:
        torch.save(obj, file)
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
