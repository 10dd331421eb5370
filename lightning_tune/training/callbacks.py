"""Lightning plugins and callbacks that make a run safe to kill: atomic checkpoints, exact resume, divergence stop.

- `AtomicCheckpointIO`: every .ckpt is written under a temporary name in its own directory, fsynced and
  renamed into place after a free-space check; reads use `weights_only=True`.
- `StepSeed`: seeds the RNGs at every training batch from (run seed, step, batch), so dropout draws the
  same masks in a resumed run as in an uninterrupted one.
- `DivergenceGuard`: a NaN or infinite loss stops the run before its backward pass, with one line
  naming the step and whether the batch or the weights were already non-finite.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor

from lightning_tune.checkpoint import atomic_torch_save, load_training_checkpoint


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss; the message is one line naming the step."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local writes are atomic and durable, and whose reads are weights-only.

    Lightning's own `_atomic_save` serialises into memory and commits through fsspec, whose local
    transaction writes the temporary file in the system temp dir: when that is another file system the
    final "move" is a copy into place (a kill mid-copy leaves a torn .ckpt), and nothing is fsynced.
    Here the temporary file sits beside the target, so `os.replace` is a real rename.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: str | Path, map_location: Any | None = lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_training_checkpoint(path, map_location=map_location)


class StepSeed(pl.Callback):
    """Seed torch (CPU and CUDA), numpy and Python's `random` at every training batch from (run seed, step, batch).

    Dropout then draws the same masks for a given step whether the run was resumed or not. Saving and
    restoring the RNG *state* would not be enough: validation advances the global RNG (its DataLoader
    draws a worker seed), and a resumed run does not replay the validation that followed its checkpoint.
    The run seed (seed_everything's, else torch's initial seed) is stored in the checkpoint.
    """

    def __init__(self) -> None:
        self.seed: int | None = None

    @property
    def state_key(self) -> str:
        return "StepSeed"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.seed is None:  # not restored from a checkpoint
            self.seed = torch.initial_seed()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        entropy = [self.seed % 2**64, trainer.global_step, trainer.current_epoch, batch_idx]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)  # a well-mixed 63-bit seed
        torch.manual_seed(seed)  # also seeds every CUDA device
        np.random.seed(seed % 2**32)
        random.seed(seed)


def _describe_nonfinite(batch: Any, pl_module: pl.LightningModule) -> str:
    """Why the first bad step went bad: the input batch, the weights, or neither (the step itself)."""
    tensors = list(batch.values()) if isinstance(batch, dict) else list(batch) if isinstance(batch, (list, tuple)) else [batch]
    bad_inputs = [t for t in tensors if isinstance(t, Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]
    vocab = getattr(getattr(getattr(pl_module, "model", None), "config", None), "vocab_size", None)
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    if bad_inputs:
        return "the input batch already held NaN/inf"
    if vocab is not None and isinstance(ids, Tensor) and ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        return f"the input batch holds token ids outside [0, {vocab})"
    bad_params = [name for name, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
    if bad_params:
        return f"the weights were already non-finite ({len(bad_params)} tensors, e.g. {bad_params[0]})"
    return "inputs and weights were finite: the forward pass overflowed (try a lower lr, gradient clipping or fp32)"


class DivergenceGuard(pl.Callback):
    """Stop on a NaN or infinite training loss before backward, so no optimiser step and no checkpoint
    sees it; the last checkpoint on disk stays the last good one.

    Costs one device sync per micro-batch (reading whether the loss is finite).
    """

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch = batch  # on_before_backward does not receive it

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        step = trainer.global_step + 1  # the optimiser step being computed, counting from 1
        value = "NaN" if torch.isnan(loss.detach()).any() else "inf"
        cause = _describe_nonfinite(getattr(self, "_batch", None), pl_module)
        raise DivergenceError(
            f"training diverged: loss is {value} at step {step} (batch {trainer.fit_loop.epoch_loop.batch_idx} of epoch {trainer.current_epoch}); {cause}; no checkpoint was written for this step"
        )
