"""Streaming (`streaming: true`): the loader of a `datasets` IterableDataset whose checkpointed state is the one after
the batch trained on (Lightning fetches one ahead of a loader without a length), and the stream read pass after
pass, each a new `datasets` pipeline at the next epoch. `TokenizedDataModule` builds both."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import datasets
from torch.utils.data import IterableDataset as TorchIterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

NEXT_PASS = "stream_next_pass"  # a stream loader's state after a pass's last batch: the pass to start
STREAM_BATCH = "stream_batch"  # the key of a streamed batch's number (see `StreamLoader`), removed before training


class StreamLoader(StatefulDataLoader):
    """The `StatefulDataLoader` of a stream, whose `state_dict` is the state after the last batch *trained on*.

    Lightning fetches one batch ahead of training when a loader has no length (a stream), so the loader's own
    state at a checkpoint already counts the next batch and a resumed run would skip it. Each batch therefore
    carries its number (`STREAM_BATCH`), the loader keeps its state as of each batch not yet trained on, and the data
    module's `on_before_batch_transfer` (called for the batch Lightning trains on, not the one it fetched ahead)
    marks it consumed: `state_dict` is then that batch's state. After the last batch of a pass (Lightning then
    already knows the epoch is over) it names the next pass, which a resumed run starts from its beginning.
    """

    def __iter__(self) -> Iterator[Any]:
        self._states: dict[int, dict[str, Any]] = {}
        self._consumed: int | None = None
        self._last: int | None = None  # the number of the pass's last batch, once the stream has ended
        return self._numbered(super().__iter__())

    def _numbered(self, inner: Iterator[Any]) -> Iterator[Any]:
        number = -1
        for number, batch in enumerate(inner):
            self._states[number] = copy.deepcopy(super().state_dict())  # the state just after this batch
            if isinstance(batch, dict):
                batch[STREAM_BATCH] = number
            yield batch
        self._last = number

    def consumed(self, number: int) -> None:
        """Batch `number` is being trained on: a checkpoint from now on resumes after it."""
        self._consumed = number
        for older in [n for n in self._states if n < number]:
            del self._states[older]

    def state_dict(self) -> dict[str, Any]:
        consumed = getattr(self, "_consumed", None)
        if consumed is not None and consumed == self._last:  # the pass is over: a resumed run starts the next
            return {NEXT_PASS: self.dataset.stream.epoch + 1}
        if consumed is not None and consumed in self._states:
            return self._states[consumed]
        return super().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if NEXT_PASS in state:
            super().load_state_dict({})
            self.dataset.start(int(state[NEXT_PASS]))
        else:
            super().load_state_dict(state)


class StreamEpochs(TorchIterableDataset):
    """A stream read pass after pass, each pass a new `datasets` pipeline from `make` with the next epoch: Lightning
    sets the epoch of samplers only (a stream has none), and a `datasets` IterableDataset once restored from a state
    does not read its next pass as a new one would (datasets 5.2), so none is reused. `state_dict` is the
    stream's (its epoch, file and record), which `StatefulDataLoader` saves beside its own; `load_state_dict` makes
    the pass it names, which the next iteration continues."""

    def __init__(self, make: Callable[[], datasets.IterableDataset]) -> None:
        self.make = make
        self.stream = make()
        self.fresh = True  # the next iteration is the first of this pass (not a new pass)

    def __iter__(self) -> Iterator[dict]:
        if not self.fresh:
            epoch = self.stream.epoch + 1
            self.stream = self.make()
            self.stream.set_epoch(epoch)
        self.fresh = False
        return iter(self.stream)

    def start(self, epoch: int) -> None:
        """The next iteration starts pass `epoch` from its beginning (`datasets` orders the files by the epoch)."""
        self.stream = self.make()
        self.stream.set_epoch(epoch)
        self.fresh = True

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start(int(state["epoch"]))
        self.stream.load_state_dict(state)
