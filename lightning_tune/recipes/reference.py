"""The reference model's log-probabilities for recipes that compare against one (DPO now, GRPO next), by one of
three routes: the model with its adapters off, a frozen copy of the starting model, or a table precomputed
by the starting model before the first step."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_tune.model import CausalLM
from lightning_tune.recipes.base import CheckpointMismatchError
from lightning_tune.recipes.tuning import Tuning

REFERENCE_KEY = "dpo_reference_logprobs"  # the checkpoint's [pairs, 2] precomputed reference (precompute_reference)

# The recipe's log-prob function: (model, batch) -> float32 [rows], each row's summed completion log-probability.
LogProbs = Callable[[CausalLM, dict[str, Tensor]], Tensor]


class Reference:
    """The reference's summed completion log-probabilities of a batch of [chosen; rejected] rows.

    Routes: with `precompute`, the table every pair was scored into before training (`score`, looked
    up by `pair_index`; it travels in the checkpoints); else, with a frozen base (LoRA), the
    model itself with its adapters off (no second copy); else a frozen copy of the starting model
    (`keep_copy`: one more model's weights in memory, no gradients or optimiser state for it).

    Args:
        logprobs: The recipe's log-prob function, applied to the reference model.
        tuning: The recipe's tuning: its `reference` context gives the starting model back.
        precompute: Score every pair once, before the first step, instead of per batch.
    """

    def __init__(self, logprobs: LogProbs, tuning: Tuning, precompute: bool) -> None:
        self.logprobs_of = logprobs
        self.tuning = tuning
        self.precompute = precompute
        self.copy: CausalLM | None = None  # the frozen copy; a plain attribute of a plain object: no submodule, not saved, not trained
        self.table: Tensor | None = None  # precompute: [pairs, 2] (chosen, rejected) by pair_index, NaN where none

    @property
    def keeps_copy(self) -> bool:
        """Whether the reference is a frozen copy of the model (memory estimates count it)."""
        return not self.precompute and not self.tuning.frozen_base

    def keep_copy(self, model: CausalLM) -> None:
        """Keep a frozen copy of `model` as it is now (the starting model) as the reference."""
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
        self.copy = reference

    def logprobs(self, model: CausalLM, batch: dict[str, Tensor]) -> Tensor:
        """The reference's log-probabilities of `batch` (`model` is the policy being trained)."""
        if not self.precompute:
            return self.forward(model, batch)
        if self.table is None:
            raise ValueError("precompute_reference: the reference is scored when fit, validate or test starts (the Trainer's hooks); none is computed yet")
        return self.lookup(batch)

    def forward(self, model: CausalLM, batch: dict[str, Tensor]) -> Tensor:
        """The reference's forward: the frozen copy, else `model` in the tuning's reference context
        (adapters off; before training with `precompute`, the model itself); no graph (and so no
        activation checkpointing)."""
        with torch.no_grad():
            if self.copy is not None:
                return self.logprobs_of(self.copy, batch)
            with self.tuning.reference(model):
                return self.logprobs_of(model, batch)

    def lookup(self, batch: dict[str, Tensor]) -> Tensor:
        """[chosen rows; rejected rows] reference log-probabilities of the batch's pairs, looked up by pair_index."""
        index = batch.get("pair_index")
        if index is None:
            raise ValueError("precompute_reference: the batches carry no pair_index (PreferenceDataModule's collate adds it)")
        table = self.table
        if table.device != index.device:
            table = self.table = table.to(index.device)
        known = (index < table.shape[0]).all()
        rows = table[index.clamp(max=table.shape[0] - 1)]  # [pairs, 2]
        if not bool(known & ~rows.isnan().any()):  # one host sync per step; a wrong reference would train silently
            raise ValueError(
                "precompute_reference: a pair of this batch has no precomputed reference log-probability "
                "(the data changed since the checkpoint's reference was computed); resume with the same data, or start a new run"
            )
        return torch.cat([rows[:, 0], rows[:, 1]])

    def score(self, model: CausalLM, pairs: Sequence[tuple[Dataset, int]], collate: Callable[[list[Any]], dict[str, Tensor]], batch_size: int, trainer: pl.Trainer, device: torch.device) -> None:
        """Fill the table: score `pairs` (dataset, index) with `model` as it is now (the starting model),
        in the reference context, in eval mode and the Trainer's precision, `batch_size` pairs batched by
        `collate` at a time, each rank a share of the pairs; the shares are gathered on every rank."""
        world, rank = trainer.world_size, trainer.global_rank
        # Every rank the same count, padded with a repeat of the first pair (scored, then dropped):
        # the same number of forwards everywhere (FSDP2's gathers are collective) and of rows to gather.
        share = -(-len(pairs) // world)
        mine = list(pairs[rank * share : (rank + 1) * share])
        real_count = len(mine)
        mine += [pairs[0]] * (share - real_count)
        keys = torch.full((share,), -1, dtype=torch.long, device=device)
        values = torch.full((share, 2), float("nan"), dtype=torch.float32, device=device)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(mine), batch_size):
                batch = collate([d[i] for d, i in mine[start : start + batch_size]])
                if "pair_index" not in batch:
                    raise ValueError("precompute_reference: the pairs carry no pair_index (PreferenceDataModule's collate adds it)")
                batch = {k: v.to(device) for k, v in batch.items()}
                with trainer.precision_plugin.forward_context():
                    scores = self.forward(model, batch).float()
                count = scores.shape[0] // 2
                keys[start : start + count] = batch["pair_index"]
                values[start : start + count] = torch.stack([scores[:count], scores[count:]], dim=1)
        finally:
            model.train(was_training)
        keys[real_count:] = -1  # the padding
        if world > 1:
            keys = trainer.strategy.all_gather(keys).reshape(-1)
            values = trainer.strategy.all_gather(values).reshape(-1, 2)
        real = keys >= 0
        table = torch.full((int(keys.max()) + 1, 2), float("nan"), dtype=torch.float32, device=device)
        table[keys[real]] = values[real]
        self.table = table

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.table is not None:  # the starting model's scores: a resumed run cannot recompute them
            checkpoint[REFERENCE_KEY] = self.table.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With `precompute`, take the table from the checkpoint: the model it resumes is no longer the starting one."""
        if not self.precompute:
            return
        table = checkpoint.get(REFERENCE_KEY)
        if not isinstance(table, Tensor) or table.ndim != 2 or table.shape[1] != 2:
            raise CheckpointMismatchError(
                "precompute_reference: the checkpoint holds no precomputed reference (it was written with precompute_reference: false), "
                "and the model it resumes is no longer the starting one; resume with precompute_reference: false"
            )
        self.table = table.float()
