"""Resumable epoch-seeded samplers: a shuffled `DistributedSampler` and length-grouped batching.

Both iterate through a `Stateful` iterator that records (epoch, samples yielded). Lightning restores a
checkpointed DataLoader, and so builds its sampler iterator, *before* it calls `set_epoch` for the
resumed epoch; a sampler that read `self.epoch` when iterated (torch's `DistributedSampler`, whose
position torchdata's `StatefulDataLoader` restores by skipping samples) would then replay epoch 0's
order in a run resumed in epoch 1 or later. The epoch in the iterator's own state cannot go stale.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """`DistributedSampler` (same order for the same seed, epoch, replicas and rank) whose iterator is
    `Stateful`: its state holds the epoch it is in, so a restored iterator shuffles as that epoch did.

    Subclasses change the order by overriding `order(epoch)`.
    """

    def order(self, epoch: int) -> list[int]:
        """This rank's index order for the epoch: `DistributedSampler`'s, computed for `epoch`."""
        current = self.epoch
        self.epoch = epoch
        try:
            return list(super().__iter__())
        finally:
            self.epoch = current

    def __iter__(self) -> Iterator[int]:
        return _EpochIterator(self, self.epoch)


class LengthGroupedSampler(ResumableDistributedSampler):
    """Sample indices so that each run of `batch_size` consecutive indices has similar lengths.

    Per epoch (as Hugging Face's `LengthGroupedSampler`): shuffle all indices, cut the permutation
    into groups of `group_batches * batch_size`, sort each group by length (longest first), cut it
    into batches, then shuffle the order of the full batches (a short last batch stays last so the
    DataLoader's own `batch_size` chunking lines up). Every sample is still seen once per epoch,
    batches still come in random order, and the order is a function of (seed, epoch) only.

    Distributed (`num_replicas` > 1): the groups are cut for the global batch
    (`batch_size * num_replicas`) and rank r takes every `num_replicas`-th index from r, so the
    ranks' batches of one step have similar lengths and together hold one global batch. The epoch is
    padded by repeating its first indices to a multiple of `num_replicas`, as `DistributedSampler`
    does, so every rank runs the same number of steps. It subclasses `DistributedSampler` so that
    Lightning keeps it instead of wrapping it in a sampler that would reshuffle the groups away.

    Mid-epoch resume: the iterator is `Stateful` (epoch and samples yielded), so torchdata's
    `StatefulDataLoader` and Lightning's checkpoints restore its position without replaying batches.
    Lightning calls `set_epoch` at the start of each epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_batches: int = 50, num_replicas: int = 1, rank: int = 0) -> None:
        """
        Args:
            lengths: Length of each sample, in dataset order.
            batch_size: The DataLoader's batch size (batches are formed from consecutive indices).
            seed: Seed of the shuffles; epoch e uses seed + e.
            group_batches: Batches per sorted group: larger groups pad less but mix lengths less.
            num_replicas: Data-parallel processes (Lightning's world size under DDP/FSDP).
            rank: This process's index among them.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if group_batches < 1:
            raise ValueError(f"group_batches must be at least 1, got {group_batches}")
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # sets num_samples, epoch
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group_batches = group_batches

    def order(self, epoch: int) -> list[int]:
        """This rank's index order for the epoch (deterministic in seed, epoch, num_replicas and rank)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.lengths), generator=generator).tolist()
        global_batch = self.batch_size * self.num_replicas
        group = self.group_batches * global_batch
        batches = []
        for start in range(0, len(perm), group):
            chunk = sorted(perm[start : start + group], key=lambda i: -self.lengths[i])  # stable: ties keep shuffled order
            batches += [chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch)]
        last = [batches.pop()] if batches and len(batches[-1]) < global_batch else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + last
        indices = [index for batch in shuffled for index in batch]
        indices += indices[: self.total_size - len(indices)]  # pad to a multiple of num_replicas
        return indices[self.rank :: self.num_replicas]


class _EpochIterator(Iterator[int]):
    """One epoch of a `ResumableDistributedSampler`; `state_dict` records (epoch, yielded) for resume."""

    def __init__(self, sampler: ResumableDistributedSampler, epoch: int) -> None:
        self.sampler = sampler
        self._start(epoch, 0)

    def _start(self, epoch: int, yielded: int) -> None:
        self.epoch = epoch
        self.indices = self.sampler.order(epoch)
        self.yielded = yielded

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if self.sampler.epoch > self.epoch:
            # `set_epoch` moved on after this iterator was made: Lightning builds the (restored) iterator
            # before it calls `set_epoch`, and resuming from the checkpoint of an epoch's last batch
            # whose DataLoader was not exhausted (`limit_train_batches`) it starts the next epoch on
            # that same iterator. Either way the sampler's epoch begins here, from its first index.
            self._start(self.sampler.epoch, 0)
        if self.yielded >= len(self.indices):
            raise StopIteration
        self.yielded += 1
        return self.indices[self.yielded - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start(int(state["epoch"]), int(state["yielded"]))
