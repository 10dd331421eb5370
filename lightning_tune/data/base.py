"""What every data module of ours shares: loading, the tokenised cache, the validation split, batching
(packing or padding) and the resumable seeded samplers. Subclasses say only how a record becomes a sample.

`InstructDataModule` (Alpaca-style records), `ChatDataModule` (conversations) and `PreferenceDataModule`
(prompt/chosen/rejected pairs) derive from `TokenizedDataModule`; a subclass sets `record_kind` /
`demo_data` and implements `_encoder` (the function `datasets.map` runs on each record) and
`_cache_fields` (what its encoding depends on). Its `__init__` declares only its own parameters (and a
shared one whose default differs: `source`; `PreferenceDataModule`'s `max_seq_len`) and passes the rest on
with `**kwargs`: the shared parameters are declared and documented once, here, and jsonargparse follows
the `**kwargs` to them for `--help` and `--print_config`.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import inspect
import json
import logging
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_tune.data.collate import IGNORE_INDEX, collate, collate_packed
from lightning_tune.data.errors import DataError
from lightning_tune.data.mixture import LOAD_KEYS, check_mixture, check_split, draw, mixture_counts, mixture_format, token_counts
from lightning_tune.data.sampler import LengthGroupedSampler, ResumableDistributedSampler
from lightning_tune.data.stream import STREAM_BATCH, StreamEpochs, StreamLoader
from lightning_tune.io.paths import PACKAGE_SCHEME, PackagePathError, resolve_path
from lightning_tune.tokenizer import TokenizerProtocol, load_tokenizer, tokenizer_files

log = logging.getLogger(__name__)

DEMO = "demo"
ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_TOKENIZER = ASSETS / "demo_tokenizer.model"
# File extension -> `datasets` packaged loader.
LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Extensions that are clearly files, so a missing "data.txt" is not mistaken for a hub dataset name.
OTHER_FILE_SUFFIXES = {".txt", ".tsv", ".xlsx", ".xls", ".arrow", ".zip", ".gz", ".yaml", ".yml", ".md"}
STREAM_HEAD = 8  # records of a stream read at setup to check its columns before training


def _cache_file(records: datasets.Dataset, fingerprint: str) -> Path | None:
    """Where `datasets.map` keeps the tokenised data of `fingerprint` (beside the loaded records' own cache), None
    for records held only in memory."""
    if not records.cache_files:
        return None
    return Path(records.cache_files[0]["filename"]).parent / f"cache-{fingerprint}.arrow"


def _offline(error: BaseException) -> bool:
    """Whether a failed Hub load failed for want of a network (HF_HUB_OFFLINE, no connection)."""
    text = " ".join(str(e) for e in (error, error.__cause__, error.__context__) if e is not None)
    return bool(re.search(r"offline|connection|couldn.t reach|LocalEntryNotFound|resolve|network|timed out|HF_HUB_OFFLINE", text, re.IGNORECASE))


def _recording_init(init: Callable) -> Callable:
    """`init` that first records the keyword arguments of the outermost call (a mixture builds its entries' modules from them)."""

    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        if "_given" not in self.__dict__:
            bound = inspect.signature(init).bind(self, *args, **kwargs).arguments
            bound.pop("self")
            self.__dict__["_given"] = {**{k: v for k, v in bound.items() if k != "kwargs"}, **bound.get("kwargs", {})}
        init(self, *args, **kwargs)

    return wrapper


def source_file(source: str) -> Path | None:
    """The local file a data `source` names, or None for a Hub name (and for "demo", whose file each module
    knows). `pkg://PACKAGE/FILE` is a file inside an installed package (`io/paths.py`), as for checkpoints."""
    if source == DEMO:
        return None
    if source.startswith(PACKAGE_SCHEME):
        try:
            return resolve_path(source)
        except PackagePathError as error:
            raise DataError(f"source: {error}") from None
    path = Path(source).expanduser()
    return path if path.suffix.lower() in LOADERS or path.exists() else None


class TokenizedDataModule(LightningDataModule):
    """Records (hub, local file or a bundled demo) -> cached tokenised samples -> packed or padded batches.

    The tokenised data set is cached by `datasets`, keyed by the data, the tokenizer's files and
    whatever the subclass's encoding depends on, so a second run does not re-tokenise; a record that
    fails raises inside `map`, whose temporary file `datasets` then deletes (nothing half-cached).
    Samples the encoder marks `keep: False` (cut to nothing trainable, or dropped) are left out and counted. The train
    loader is a `StatefulDataLoader` with a seeded resumable sampler, so Lightning resumes mid-epoch
    from a checkpoint without replaying batches.
    """

    record_kind = "records"  # for messages: "expected <record_kind>"
    # The Jinja chat template the samples were rendered with, known once set up (None: no chat template);
    # a fit exports it with the model so every consumer renders conversations as the run trained on them.
    chat_template_used: str | None = None
    demo_data: Path = ASSETS / "demo.jsonl"
    encoding_version = 1  # bump in a subclass when its encoding changes meaning (old caches unused)
    rows_per_sample = 1  # batch rows per sample (memory estimates count rows)
    mixture_stats: list[dict[str, Any]] | None = None  # per mixture source: available, drawn, tokens, trained (after setup)
    cache_file: Path | None = None  # the tokenised cache file (after setup; None for a stream or in-memory data)
    cache_reused = False  # whether setup found that file already built (by an earlier run or `data --prepare`)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_init(cls.__dict__["__init__"])

    def __init__(
        self,
        *,  # keywords only: a parameter inserted here can never shift a subclass's values into the wrong one
        source: str,
        name: str | None = None,
        revision: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        split: str = "train",
        streaming: bool = False,
        mixture: list[dict[str, Any]] | None = None,
        tokenizer_path: str | None = None,
        max_seq_len: int = 512,
        batch_size: int = 4,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 42,
        val_size: float = 0.0,
        cache_dir: str | None = None,
        group_by_length: bool = False,
        pack: bool = True,
    ) -> None:
        """
        Args:
            source: Hugging Face Hub data set name, a local folder laid out as one (its configs and splits), a local .json/.jsonl/.csv/.parquet file (pkg://PACKAGE/FILE: one inside an installed package), or "demo" for the bundled demo data (which takes a split's slice but ignores name, revision, data_files and other split names, so it can stand in for any data).
            name: The Hub data set's configuration (`load_dataset`'s `name`, e.g. "main" of openai/gsm8k); null: its default.
            revision: The Hub data set's revision: a commit hash (reproducible), tag or branch; null: the main branch.
            data_files: Which files of a Hub data set or folder to read (`load_dataset`'s `data_files`: a path or glob, a list, or {split: paths}).
            split: The split to train on, sliceable as `datasets` slices it: "train", "train[:10%]", "train[100:200]", "train+validation" (a single local file's split is "train").
            streaming: Read the data as a stream (`datasets` IterableDataset), tokenised as batches are drawn, for data too big to tokenise up front; in file order (no shuffle: a shuffle buffer would not resume exactly), one source, val_size a count; a resumed run continues at the next sample.
            mixture: Several sources mixed into one training set, each a dict with `source` and any loading key (name, revision, data_files, split), this module's own keys (column_map, template, ...), `format` (instruct or chat: another kind of SFT data), and `weight` (all entries: proportions, the largest mixture that keeps them without repeating a sample) or `count` (samples taken, repeated only if more than the source has; left out: all of them). Samples are drawn with `seed`; `source` is then not read.
            tokenizer_path: SentencePiece .model, tokenizer.json, or a directory holding either (a checkpoint's); left out, the CLI uses model.checkpoint_dir (its tokenizer); else only source "demo" may leave it out (the bundled demo tokenizer).
            max_seq_len: Longest sample in tokens; longer ones are cut as `truncation` says (a warning gives the count).
            batch_size: Samples per batch (a preference pair is one sample of two rows: 2 x batch_size rows).
            num_workers: DataLoader worker processes.
            shuffle: Shuffle the training samples (seeded by `seed`; the order is restored on resume).
            seed: Seed of the shuffle and of the validation split.
            val_size: Held out for validation: a fraction if below 1, a count of records (conversations, pairs) if 1 or more, none if 0.
            cache_dir: Where `datasets` caches loaded and tokenised data (default: its own cache, ~/.cache/huggingface/datasets).
            group_by_length: Batch training samples of similar length (shuffled groups, seeded, resumable) so less compute goes to padding; changes which samples share a batch, not what each contributes.
            pack: Concatenate each batch's samples into one unpadded row with per-sample positions; attention runs within each sample, so no compute goes to padding and each sample's loss is what it is padded (false: right-pad each batch to its longest sample).
        """
        super().__init__()
        file = source_file(source)
        if file is not None and file.suffix.lower() in LOADERS and not file.exists():
            raise DataError(f"{source}: no such file")  # before the tokenizer: the file is what is wrong
        all_demo = isinstance(mixture, list) and all(isinstance(entry, Mapping) and entry.get("source") == DEMO for entry in mixture)
        if tokenizer_path is None and mixture is not None and source != DEMO and not all_demo:  # source demo: the demo tokenizer
            raise DataError("tokenizer_path is required for a mixture: a tokenizer file or a checkpoint directory (the CLI takes model.checkpoint_dir's when one is set)")
        if tokenizer_path is None and mixture is None and source != DEMO:
            raise DataError(
                f"tokenizer_path is required for source {source!r}: a tokenizer file or a checkpoint directory (the CLI takes model.checkpoint_dir's when one is set; only source 'demo' has a bundled tokenizer)"
            )
        if max_seq_len < 2:
            raise DataError(f"max_seq_len must be at least 2 (room for BOS and EOS), got {max_seq_len}")
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise DataError(f"num_workers must be 0 or more, got {num_workers}")
        if val_size < 0 or (val_size >= 1 and val_size != int(val_size)):
            raise DataError(f"val_size must be 0, a fraction below 1, or a whole count of records, got {val_size}")
        suffix = Path(source).suffix.lower()
        if mixture is None and source != DEMO and (suffix in OTHER_FILE_SUFFIXES or (Path(source).is_file() and suffix not in LOADERS)):
            raise DataError(f"{source}: unsupported file type {suffix or '(no extension)'!r}; use .json, .jsonl, .csv or .parquet")
        splits = check_split(split, "split")
        if mixture is None and file is not None and file.is_file():  # "demo" stands in for any data (check-config): it ignores them
            if set(splits) != {"train"}:
                raise DataError(f"split: a single file has one split, train (sliceable: train[:10%]), got {split!r}")
            given = [key for key, value in (("name", name), ("revision", revision), ("data_files", data_files)) if value is not None]
            if given:
                raise DataError(f"{', '.join(given)}: only for a Hub data set or a folder laid out as one; source {source!r} is a single file")
        if streaming and mixture is not None:
            raise DataError("streaming: takes one source, not a mixture (mix the files of one source with data_files instead)")
        if streaming and group_by_length:
            raise DataError("group_by_length: needs every sample's length up front, which a stream does not have; leave it false with streaming")
        if streaming and 0 < val_size < 1:
            raise DataError(f"val_size: a stream has no known length, so hold out a count of records (e.g. 100), not the fraction {val_size}")
        self.source = source
        self.name = name
        self.revision = revision
        self.data_files = data_files
        self.split = split
        self.streaming = streaming
        self.mixture = None if mixture is None else check_mixture(mixture, type(self))
        self.tokenizer_path = str(DEMO_TOKENIZER) if tokenizer_path is None else tokenizer_path
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.val_size = val_size
        self.cache_dir = cache_dir
        self.group_by_length = group_by_length
        self.pack = pack
        self._tokenizer: TokenizerProtocol | None = None
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.num_truncated = 0
        self.num_left_out = 0

    # --- what a subclass provides ---------------------------------------------------------------------

    def _encoder(self, records: datasets.Dataset) -> Callable[..., dict]:
        """The function `datasets.map(..., with_indices=True)` runs: (record, index) -> a dict with
        `input_ids`, `labels` and `truncated` (and optionally `keep`: False leaves the sample out)."""
        raise NotImplementedError

    def _cache_fields(self, records: datasets.Dataset) -> dict[str, Any]:
        """JSON-able settings the encoding depends on (beyond the data, tokenizer and max_seq_len)."""
        raise NotImplementedError

    def _report_truncation(self, data: datasets.Dataset) -> str:
        """The one warning line about the truncated samples (`self.num_truncated` of `len(data)`)."""
        return f"{self.source}: {self.num_truncated} of {len(data)} records are longer than max_seq_len={self.max_seq_len} and were truncated"

    def _check(self, data: datasets.Dataset, records: datasets.Dataset) -> None:
        """Checks on the tokenised data at setup (subclasses may add some); raise `DataError` naming a record."""

    # --- shared -------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> TokenizerProtocol:
        """The tokenizer (`load_tokenizer`: a .model, a tokenizer.json or a directory), loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def prepare_data(self) -> None:
        """Download and tokenise once (rank 0 only under DDP); `setup` then reads the cache. A stream is
        tokenised as it is read: nothing to prepare. `data --prepare` runs this ahead of a multi-GPU run."""
        if not self.streaming:
            for module in self.mixture_modules() or [self]:
                module._tokenized()

    def cache_report(self) -> list[str]:
        """One line per tokenised cache file (each mixture source has its own), after `prepare_data` or `setup`."""
        if self.streaming:
            return [f"{self.source}: streamed, tokenised as read: no cache to build"]
        return [
            f"{module.source}: {'reused' if module.cache_reused else 'built'} {module.cache_file}" if module.cache_file is not None else f"{module.source}: held in memory, not cached"
            for module in self.mixture_modules() or [self]
        ]

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenised data (from the cache after `prepare_data`), report truncation once, leave
        out the samples marked so, mix the sources of a `mixture`, and split off validation."""
        if self.train_dataset is not None:
            return
        if self.streaming:
            self._setup_stream()
            return
        data = self._mixed() if self.mixture is not None else self._kept(self._tokenized())
        if self.val_size == 0:
            self.train_dataset = data
            return
        # A fraction becomes a count here so the split sizes are explicit (and the same on every rank).
        val_count = int(self.val_size) if self.val_size >= 1 else round(self.val_size * len(data))
        if not 1 <= val_count < len(data):
            raise DataError(f"{self.source}: val_size={self.val_size} leaves no training or no validation records out of {len(data)}")
        parts = data.train_test_split(test_size=val_count, shuffle=True, seed=self.seed)
        self.train_dataset, self.val_dataset = parts["train"], parts["test"]

    def _kept(self, data: datasets.Dataset) -> datasets.Dataset:
        """The tokenised samples less those marked `keep: False`, truncation reported once."""
        total = len(data)
        self.num_truncated = sum(data["truncated"])
        keep = data["keep"] if "keep" in data.column_names else [True] * total
        self.num_left_out = total - sum(keep)
        if self.num_truncated:
            log.warning(self._report_truncation(data))
        if self.num_left_out:
            if self.num_left_out == total:
                raise DataError(f"{self.source}: no sample has a trained token left within max_seq_len={self.max_seq_len}; raise max_seq_len")
            log.warning(f"{self.source}: {self.num_left_out} of {total} samples are left out: nothing to train on within max_seq_len={self.max_seq_len}")
            data = data.select([i for i, k in enumerate(keep) if k])
        return data

    # --- mixtures ---------------------------------------------------------------------------------------

    def mixture_modules(self) -> list[TokenizedDataModule]:
        """One data module per `mixture` entry ([] without a mixture): the entry's keys over this module's
        settings (its own keys only where the entry keeps this module's format), validation left to the mixture."""
        if self.mixture is None:
            return []
        if getattr(self, "_mixture_modules", None) is None:
            given = {key: value for key, value in getattr(self, "_given", {}).items() if key not in ("mixture", "val_size", "streaming", *LOAD_KEYS)}
            shared = set(inspect.signature(TokenizedDataModule.__init__).parameters) - {"self"}
            modules = []
            for entry in self.mixture:
                cls = mixture_format(entry["format"]) if "format" in entry else type(self)
                settings = given if cls is type(self) else {key: value for key, value in given.items() if key in shared}
                own = {key: value for key, value in entry.items() if key not in ("weight", "count", "format")}
                # One tokenizer for all: the one given, else the demo's (a "demo" entry finds it, and its chat template, itself).
                tokenizer = given.get("tokenizer_path") or (None if own["source"] == DEMO else self.tokenizer_path)
                modules.append(cls(**{**settings, "tokenizer_path": tokenizer, **own}))
            self._mixture_modules = modules
        return self._mixture_modules

    def _mixed(self) -> datasets.Dataset:
        """The `mixture`'s sources tokenised (each through its own cache), their kept samples drawn as the
        entries say (`mixture_counts`, `draw`: seeded by `seed`), concatenated. `mixture_stats` records per
        source the samples available and drawn, their tokens and trained tokens."""
        modules = self.mixture_modules()
        kept = [module._kept(module._tokenized()) for module in modules]
        self.num_truncated = sum(module.num_truncated for module in modules)
        self.num_left_out = sum(module.num_left_out for module in modules)
        if not isinstance(getattr(type(self), "chat_template_used", None), property):  # ChatDataModule's is its own template
            self.chat_template_used = next((module.chat_template_used for module in modules if module.chat_template_used is not None), None)
        counts = mixture_counts([len(data) for data in kept], self.mixture)
        generator = torch.Generator().manual_seed(self.seed)
        parts, self.mixture_stats = [], []
        for i, (entry, data, count) in enumerate(zip(self.mixture, kept, counts)):
            if count and not len(data):
                raise DataError(f"mixture[{i}]: {entry['source']} has no samples to draw {count} from (an empty file, a split sliced to nothing, or every sample left out)")
            part = data.select(draw(len(data), count, generator))
            part = part.remove_columns([name for name in ("keep",) if name in part.column_names])
            tokens, trained = token_counts(part)
            self.mixture_stats.append({"source": entry["source"], "available": len(data), "drawn": count, "tokens": tokens, "trained": trained})
            parts.append(part)
        columns = [sorted(part.column_names) for part in parts]
        if any(names != columns[0] for names in columns):
            which = next(i for i, names in enumerate(columns) if names != columns[0])
            raise DataError(f"mixture[{which}]: its samples have columns {columns[which]} where mixture[0]'s have {columns[0]}; mix sources of one kind of sample")
        try:
            data = datasets.concatenate_datasets(parts)
        except ValueError as error:
            raise DataError(f"mixture: the sources' samples do not have the same types ({_first_line(error)})") from error
        for name in ("pair_index", "prompt_index"):  # one index per sample of the mixture (the reference table is indexed by it)
            if name in data.column_names:
                data = data.remove_columns(name).add_column(name, list(range(len(data))))
        return data

    # --- streaming --------------------------------------------------------------------------------------

    def _setup_stream(self) -> None:
        """A `datasets` IterableDataset tokenised as it is read, this rank's share (`split_dataset_by_node`),
        the first `val_size` records held out; its `state_dict` travels in the loader's for exact resume."""
        records = self._load_records()
        head = datasets.Dataset.from_list(list(records.take(STREAM_HEAD)), features=records.features)
        if len(head) == 0:
            raise DataError(f"{self.source}: has no records (expected {self.record_kind})")
        self._check_stream_head(head)
        names = records.column_names or head.column_names
        encoder = self._encoder(head)
        replicas, rank = self.data_parallel_rank()
        count = int(self.val_size)

        def samples(stream: datasets.IterableDataset) -> datasets.IterableDataset:
            return stream.map(encoder, with_indices=True, remove_columns=names).filter(lambda sample: sample.get("keep", True))

        def train() -> datasets.IterableDataset:  # a new pipeline per pass (see StreamEpochs)
            stream = samples(self._load_records())
            stream = stream.skip(count) if count else stream
            return split_dataset_by_node(stream, rank=rank, world_size=replicas) if replicas > 1 else stream

        if count:
            self.val_dataset = samples(records).take(count)
        self.train_dataset = StreamEpochs(train)

    def _check_stream_head(self, head: datasets.Dataset) -> None:
        """The first records of a stream through the usual column checks (a bad column map fails at setup)."""
        self._cache_fields(head)

    def data_parallel_rank(self) -> tuple[int, int]:
        """(number of data-parallel processes, this one's index): from the Trainer's strategy under
        DDP/FSDP, else (1, 0) (no Trainer, e.g. in a notebook or the `data` command)."""
        trainer = self.trainer  # None until a Trainer attaches this data module
        if trainer is None or trainer.world_size == 1:
            return 1, 0
        kwargs = trainer.strategy.distributed_sampler_kwargs or {}
        return kwargs.get("num_replicas", trainer.world_size), kwargs.get("rank", trainer.global_rank)

    def train_dataloader(self) -> StatefulDataLoader:
        """Shuffled (seeded) training batches, this rank's share under DDP/FSDP; its `state_dict`
        records the position for mid-epoch resume.

        The samplers are `DistributedSampler`s built here with our `seed`, so Lightning keeps them
        (rather than substituting its own, seeded by the global seed): epoch e's order is a function
        of (seed, e) only, and rank r of n takes every n-th index from r, so n processes with
        `batch_size` b see the same global batches as one process with batch size n * b. Their
        iterators checkpoint their epoch (see `ResumableDistributedSampler`), so a run resumed in a
        later epoch continues that epoch's order, not epoch 0's.
        """
        if self.train_dataset is None:
            self.setup("fit")
        if self.streaming:  # the stream's own state (file, record) is the position; no sampler
            self._stream_loader = StreamLoader(self.train_dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.collate_fn())
            return self._stream_loader
        replicas, rank = self.data_parallel_rank()
        if self.group_by_length:
            # Buckets of similar length in shuffled order; its iterator is Stateful for mid-epoch resume.
            lengths = [len(ids) for ids in self.train_dataset["input_ids"]]
            sampler: DistributedSampler = LengthGroupedSampler(lengths, self.batch_size, seed=self.seed, num_replicas=replicas, rank=rank)
        else:
            sampler = ResumableDistributedSampler(self.train_dataset, num_replicas=replicas, rank=rank, shuffle=self.shuffle, seed=self.seed)
        return StatefulDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn(),
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning's hook on the batch it is about to train on: a stream's batch number tells its loader which
        state a checkpoint now takes (see `StreamLoader`); every other batch passes unchanged."""
        if isinstance(batch, dict) and STREAM_BATCH in batch:
            self._stream_loader.consumed(batch.pop(STREAM_BATCH))
        return batch

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in a fixed order; an empty list (no validation) when `val_size` is 0."""
        if self.train_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            return []
        return DataLoader(
            self.val_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn(),
        )

    def test_dataloader(self) -> DataLoader | list:
        """`test` evaluates on the held-out split (`val_size`): fine-tuning data sets ship no test split."""
        if self.train_dataset is None:
            self.setup("test")
        if self.val_dataset is None:
            raise DataError("test: no held-out data; set data.val_size (a fraction or a count of records) to hold some out")
        return self.val_dataloader()

    def collate_fn(self):
        """Right padding to the batch's longest sample, or packing into one row (`pack`)."""
        return collate_packed if self.pack else partial(collate, pad_id=self.tokenizer.pad_id)

    def _tokenized(self) -> datasets.Dataset:
        """Records encoded into `input_ids` / `labels` / `truncated` (/ `keep`), through the `datasets` cache."""
        records = self._load_records()
        tokenizer = self.tokenizer  # a missing or broken tokenizer fails here, in its own words
        key = {
            "data": records._fingerprint,
            "tokenizer_sha256": _files_sha256(tokenizer_files(tokenizer.path)),
            "max_seq_len": self.max_seq_len,
            "version": [type(self).__name__, self.encoding_version],
            **self._cache_fields(records),
        }
        fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        cached = _cache_file(records, fingerprint)
        if cached is not None:
            state = "reused" if cached.exists() else "building"
            rank_zero_info(f"{self.source}: tokenised cache {state}: {cached}" + ("" if state == "reused" else " (keyed by the data, tokenizer, max_seq_len and encoding settings)"))
        # A failing record raises inside `map`; `datasets` then deletes its temporary file, so no partial cache remains.
        data = records.map(
            self._encoder(records),
            with_indices=True,
            remove_columns=records.column_names,
            new_fingerprint=fingerprint,
            desc=f"Tokenizing {self.source}",
        )
        self.cache_file, self.cache_reused = cached, cached is not None and state == "reused"
        self._check(data, records)
        untrained = [name for name in data.column_names if name.endswith("labels") and not _has_trained_token(data, name)]
        if untrained:  # every sample cut to its prompt (e.g. instructions longer than max_seq_len): a run would train on nothing
            raise DataError(f"{self.source}: no sample has a trained token left within max_seq_len={self.max_seq_len}; raise max_seq_len")
        return data

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments `datasets.load_dataset` gets beside the source, as given (None left out)."""
        options = {"name": self.name, "revision": self.revision, "data_files": self.data_files, "split": self.split, "cache_dir": self.cache_dir}
        return {key: value for key, value in options.items() if value is not None} | ({"streaming": True} if self.streaming else {})

    def _load_records(self) -> datasets.Dataset | datasets.IterableDataset:
        """The raw records through `datasets`, any failure turned into one `DataError` line."""
        path = self.demo_data if self.source == DEMO else source_file(self.source)
        if path is None or path.is_dir():
            where = "this folder" if path is not None else "this data set from the Hugging Face Hub"
            options = self.load_options()
            try:
                records = datasets.load_dataset(str(path or self.source), **options)
            except Exception as error:
                hint = ""
                if path is None and _offline(error):
                    hint = "; you are offline: point source at a local copy (a folder laid out as on the Hub, with name/split/data_files, or a .json/.jsonl/.csv/.parquet file)"
                elif path is None:
                    hint = "; if you are offline, point source at a local folder or a .json/.jsonl/.csv/.parquet file"
                named = "".join(f", {key} {options[key]!r}" for key in ("name", "revision", "data_files", "split") if key in options and options[key] != "train")
                raise DataError(f"{self.source}{named}: cannot load {where} ({_first_line(error)}){hint}") from error
        else:
            records = self._load_file(path)
        if self.streaming:
            if not isinstance(records, datasets.IterableDataset):
                raise DataError(f"{self.source}: expected one split of records, got {type(records).__name__}")
            return records
        if not isinstance(records, datasets.Dataset):
            raise DataError(f"{self.source}: expected one split of records, got {type(records).__name__}; name one with split")
        if len(records) == 0:
            raise DataError(f"{self.source}: has no records (expected {self.record_kind})")
        return records

    def _load_file(self, path: Path) -> datasets.Dataset:
        """A local file through the `datasets` loader for its extension."""
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        loader = LOADERS.get(path.suffix.lower())
        if loader is None:
            raise DataError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; use .json, .jsonl, .csv or .parquet")
        data = path.read_bytes()
        if not data.strip():
            raise DataError(f"{path}: empty file (expected {self.record_kind})")
        if loader != "parquet":
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as error:
                line = data.count(b"\n", 0, error.start) + 1
                raise DataError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8") from None
        options: dict = {}
        if loader == "csv":
            # CSV has no types: read every cell as text (pandas would turn an output "12" into a number) and
            # empty cells as "" rather than missing.
            with path.open(newline="", encoding="utf-8") as file:
                header = next(csv.reader(file), [])
            options = {"features": datasets.Features({name: datasets.Value("string") for name in header}), "na_filter": False}
        try:
            split = self.split if self.source != DEMO or set(check_split(self.split, "split")) == {"train"} else "train"
            return datasets.load_dataset(loader, data_files=str(path), split=split, cache_dir=self.cache_dir, streaming=self.streaming, **options)
        except Exception as error:
            # `datasets`' own messages name no line (pyarrow counts "rows" within a block) or say
            # 'Instruction "train" corresponds to no data!' for a file without records: look ourselves.
            problem = (_json_problem(data.decode("utf-8"), jsonl=path.suffix.lower() == ".jsonl") or self._record_problem(data.decode("utf-8"))) if loader == "json" else None
            if problem is not None:
                raise DataError(f"{path}: {problem}") from error
            reason = error.__cause__ if isinstance(error, datasets.exceptions.DatasetGenerationError) and error.__cause__ else error
            if "corresponds to no data" in str(reason):
                raise DataError(f"{path}: has no records (expected {self.record_kind})") from error
            raise DataError(f"{path}: cannot read as {path.suffix} ({_first_line(reason)})") from error

    def _record_problem(self, text: str) -> str | None:
        """For a JSON file `datasets` cannot type (e.g. a number where other records have text): the
        first record the subclass finds wrong, as "record N ...: problem"; None if it finds none."""
        return None


def _has_trained_token(data: datasets.Dataset, column: str) -> bool:
    """Whether any label of `column` (a list per sample) is trained, i.e. not IGNORE_INDEX; counted in Arrow, not Python."""
    import pyarrow.compute as pc

    labels = pc.list_flatten(data.with_format("arrow")[column])
    return len(labels) > 0 and pc.any(pc.not_equal(labels, IGNORE_INDEX)).as_py() is True


def _files_sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false", type(None): "null"}


def json_records(text: str) -> list | None:
    """The records of a .json (an array, or JSON lines) or .jsonl text; None if it is neither."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    if isinstance(document, list):
        return document
    try:
        return [json.loads(line) for line in text.split("\n") if line.strip()]
    except json.JSONDecodeError:
        return None


def _json_problem(text: str, *, jsonl: bool) -> str | None:
    """Where a .json/.jsonl file stops being records: "line N, column C: ..." (None: no syntax or shape problem).

    A .json file may hold one array of records or JSON lines, as `datasets` accepts both.
    """
    if not jsonl:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            if text.lstrip().startswith("["):
                return f"line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})"
        else:
            if isinstance(document, dict):
                return None  # one object: `datasets` reads its fields as columns
            if not isinstance(document, list):
                return f"expected an array of records (or one record per line), got {JSON_TYPES.get(type(document), 'a value')}"
            bad = next((i for i, record in enumerate(document) if not isinstance(record, dict)), None)
            if bad is not None:
                return f"record {bad} (counting from 0): expected a JSON object, got {JSON_TYPES.get(type(document[bad]), 'a value')}"
            return None
    for number, line in enumerate(text.split("\n"), 1):  # JSON lines end at "\n" only
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            return f"line {number}, column {error.colno}: not valid JSON ({error.msg})"
        if not isinstance(record, dict):
            return f"line {number}: expected a JSON object (one record per line), got {JSON_TYPES.get(type(record), 'a value')}"
    return None


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
