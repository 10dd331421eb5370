"""Streaming (issue 34): `streaming: true` reads a multi-file local source as a `datasets` IterableDataset, tokenised as
it is read. The reference is the same module without streaming (`shuffle: false`: the file order), and the loader's
state resumes at the exact next batch, also when the trainer has fetched a batch ahead (Lightning does for a loader
without a length). The kill-and-resume fit is tests/integration/test_stream_resume.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_tune.data import DataError, InstructDataModule
from lightning_tune.data.base import DEMO_TOKENIZER
from lightning_tune.data.stream import STREAM_BATCH

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")

FILES, PER_FILE = 3, 9  # 27 records: batches of 4 leave a short last one


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "stream"
    root.mkdir()
    for f in range(FILES):
        lines = [json.dumps({"question": f"file {f} record {i}: repeat {i}", "answer": f"{f}-{i}"}) for i in range(PER_FILE)]
        (root / f"part-{f:05d}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def module(folder: Path, tmp_path: Path, **kwargs) -> InstructDataModule:
    settings = dict(source=str(folder), tokenizer_path=str(DEMO_TOKENIZER), cache_dir=str(tmp_path / "cache"), batch_size=4, column_map={"instruction": "question", "output": "answer"})
    dm = InstructDataModule(**{**settings, **kwargs})
    dm.setup("fit")
    return dm


def batches(loader, count: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        batch.pop(STREAM_BATCH, None)
        out.append(batch)
        if count is not None and len(out) == count:
            break
    return out


def same(a: list[dict], b: list[dict]) -> bool:
    """The batches are equal, tensor by tensor (and the other values of a packed batch, e.g. seq_lens)."""

    def equal(x, y) -> bool:
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y

    return len(a) == len(b) > 0 and all(x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_stream_gives_the_samples_of_the_loaded_data_in_file_order(folder, tmp_path) -> None:
    streamed = module(folder, tmp_path, streaming=True, val_size=5)
    loaded = module(folder, tmp_path, shuffle=False)
    ids = loaded.train_dataset["input_ids"]
    assert [s["input_ids"] for s in streamed.val_dataset] == ids[:5]
    assert [s["input_ids"] for s in streamed.train_dataset] == ids[5:]
    assert len(ids) == FILES * PER_FILE


def test_loader_resumes_at_the_next_batch_within_and_across_passes(folder, tmp_path) -> None:
    """A new loader given the state after k batches continues with batch k+1 of the same pass, here in pass 0 and pass 1."""
    passes = [batches(loader) for loader in [module(folder, tmp_path, streaming=True).train_dataloader()] for _ in range(3)]
    assert len(passes[0]) == 7 and same(passes[0], passes[1]) and not same(passes[0], passes[2])  # datasets orders the files by epoch from pass 2
    for pass_index, k in ((0, 3), (1, 5)):
        loader = module(folder, tmp_path, streaming=True).train_dataloader()
        for _ in range(pass_index):
            batches(loader)
        iterator = iter(loader)
        for _ in range(k):
            loader.consumed(next(iterator).pop(STREAM_BATCH))
        next(iterator)  # fetched ahead, as Lightning does, but not trained on
        state = loader.state_dict()
        restored = module(folder, tmp_path, streaming=True).train_dataloader()
        restored.load_state_dict(state)
        assert same(batches(restored), passes[pass_index][k:])
        assert same(batches(restored), passes[pass_index + 1])  # and the next pass is the uninterrupted run's next


def test_state_after_a_pass_s_last_batch_starts_the_next_pass(folder, tmp_path) -> None:
    """The state after pass 1's last batch trained names pass 2, which the restored loader then reads (not pass 0 again)."""
    reference = module(folder, tmp_path, streaming=True).train_dataloader()
    third = [batches(reference) for _ in range(3)][2]
    loader = module(folder, tmp_path, streaming=True).train_dataloader()
    batches(loader)
    for batch in loader:
        loader.consumed(batch.pop(STREAM_BATCH))
    assert loader.state_dict() == {"stream_next_pass": 2}
    restored = module(folder, tmp_path, streaming=True).train_dataloader()
    restored.load_state_dict(loader.state_dict())
    assert same(batches(restored), third)


def test_ranks_share_the_stream_no_sample_twice_none_lost(folder, tmp_path) -> None:
    """Two ranks (`split_dataset_by_node`; 3 files for 2 ranks, so each keeps every other record): together every training record once."""
    reference = [tuple(ids) for ids in module(folder, tmp_path, shuffle=False).train_dataset["input_ids"]]
    shares = []
    for rank in (0, 1):
        dm = InstructDataModule(source=str(folder), tokenizer_path=str(DEMO_TOKENIZER), cache_dir=str(tmp_path / "cache"), streaming=True, column_map={"instruction": "question", "output": "answer"})
        dm.data_parallel_rank = lambda rank=rank: (2, rank)
        dm.setup("fit")
        shares.append([tuple(s["input_ids"]) for s in dm.train_dataset])
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(reference)


def test_a_bad_column_map_fails_at_setup_in_one_line(folder, tmp_path) -> None:
    with pytest.raises(DataError) as error:
        module(folder, tmp_path, streaming=True, column_map={"instruction": "prompt"})
    assert str(error.value) == f"{folder}: no column 'prompt' for field 'instruction' (columns: question, answer); set column_map to name it"
