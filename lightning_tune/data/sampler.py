"""Length-grouped sampling: batches of samples of similar length, so right padding wastes little compute."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Sample indices so that each run of `batch_size` consecutive indices has similar lengths.

    Per epoch (as Hugging Face's `LengthGroupedSampler`): shuffle all indices, cut the permutation
    into groups of `group_batches * batch_size`, sort each group by length (longest first), cut it
    into batches, then shuffle the order of the full batches (a short last batch stays last so the
    DataLoader's own `batch_size` chunking lines up). Every sample is still seen once per epoch,
    batches still come in random order, and the order is a function of (seed, epoch) only.

    Mid-epoch resume: the iterator is `Stateful` (epoch and samples yielded), so torchdata's
    `StatefulDataLoader` and Lightning's checkpoints restore its position without replaying batches.
    Lightning calls `set_epoch` at the start of each epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_batches: int = 50) -> None:
        """
        Args:
            lengths: Length of each sample, in dataset order.
            batch_size: The DataLoader's batch size (batches are formed from consecutive indices).
            seed: Seed of the shuffles; epoch e uses seed + e.
            group_batches: Batches per sorted group: larger groups pad less but mix lengths less.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if group_batches < 1:
            raise ValueError(f"group_batches must be at least 1, got {group_batches}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_batches = group_batches
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The epoch's index order (deterministic in seed and epoch)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.lengths), generator=generator).tolist()
        group = self.group_batches * self.batch_size
        batches = []
        for start in range(0, len(perm), group):
            chunk = sorted(perm[start : start + group], key=lambda i: -self.lengths[i])  # stable: ties keep shuffled order
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        last = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + last
        return [index for batch in shuffled for index in batch]

    def __iter__(self) -> Iterator[int]:
        return _GroupedIterator(self, self.epoch)


class _GroupedIterator(Iterator[int]):
    """One epoch of a `LengthGroupedSampler`; `state_dict` records (epoch, yielded) for resume."""

    def __init__(self, sampler: LengthGroupedSampler, epoch: int) -> None:
        self.sampler = sampler
        self.epoch = epoch
        self.indices = sampler.order(epoch)
        self.yielded = 0

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if self.yielded >= len(self.indices):
            raise StopIteration
        self.yielded += 1
        return self.indices[self.yielded - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.indices = self.sampler.order(self.epoch)
        self.yielded = int(state["yielded"])
