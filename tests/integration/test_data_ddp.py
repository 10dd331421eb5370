"""Data under real DDP (issue 34): `fit` on 2 CPU processes (gloo), each rank recording the samples it trains on. A
weighted mixture and a streamed multi-file source are each split across the ranks with no sample on both and none
lost; the reference is the mixture the data module builds in this process with the same seed, and the source's
records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl

from lightning_tune.data import InstructDataModule
from lightning_tune.data.base import ASSETS, DEMO_TOKENIZER

TESTS = Path(__file__).resolve().parents[1]
TINY_MODEL = "{vocab_size: 512, num_layers: 1, embed_dim: 32, num_heads: 4, num_kv_heads: 2, intermediate_dim: 64}"


class RecordSamples(pl.Callback):
    """Append each training batch's samples (a packed row cut at its seq_lens) to FOLDER/rank<r>.jsonl."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict, batch_idx: int) -> None:
        row, start, samples = batch["input_ids"][0].tolist(), 0, []
        for length in batch["seq_lens"][0]:
            samples.append(row[start : start + length])
            start += length
        with (self.folder / f"rank{trainer.global_rank}.jsonl").open("a") as file:
            file.write("".join(json.dumps(sample) + "\n" for sample in samples))


def fit_on_two_ranks(root: Path, steps: int, data: list[str]) -> list[list[tuple[int, ...]]]:
    """`fit` of a one-layer model under DDP on 2 processes; each rank's samples in the order it trained on them."""
    record = root / "samples"
    record.mkdir(parents=True)
    args = [
        *("fit", "--config", "tiny_lora.yaml", "--model.model_args", TINY_MODEL, "--trainer.max_steps", str(steps), "--trainer.max_epochs", "1"),
        *("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.default_root_dir", str(root), "--trainer.logger", "false"),
        *("--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "test_data_ddp.RecordSamples"),
        *("--trainer.callbacks.folder", str(record), "--data.batch_size", "4", "--data.max_seq_len", "64", "--data.val_size", "0"),
        *("--data.tokenizer_path", str(DEMO_TOKENIZER), "--data.cache_dir", str(root / "cache"), *data),
    ]
    path = os.pathsep.join([str(TESTS), str(TESTS / "integration"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-m", "lightning_tune", *args], capture_output=True, text=True, timeout=1800, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return [[tuple(json.loads(line)) for line in (record / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


def records(path: Path, prefix: str, count: int) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"{prefix} {i}: repeat {i}", "output": f"{prefix}{i}"}) + "\n" for i in range(count)))
    return path


def test_mixture_is_split_across_two_ranks_none_twice_none_lost(tmp_path: Path) -> None:
    """Weights 0.5 / 0.5 over 40 / 25 samples: 25 + 25 = 50 (even: no DistributedSampler padding), 25 a rank, 7 steps of 4."""
    a, b = records(tmp_path / "a.jsonl", "alpha", 40), records(tmp_path / "b.jsonl", "beta", 25)
    mixture = [{"source": str(a), "weight": 0.5}, {"source": str(b), "weight": 0.5}]
    shares = fit_on_two_ranks(tmp_path / "run", 7, ["--data.mixture", json.dumps(mixture)])
    reference = InstructDataModule(mixture=mixture, tokenizer_path=str(DEMO_TOKENIZER), max_seq_len=64, cache_dir=str(tmp_path / "cache"))
    reference.setup("fit")
    expected = sorted(tuple(ids) for ids in reference.train_dataset["input_ids"])
    assert len(expected) == 50 and len(shares[0]) == len(shares[1]) == 25
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == expected


def test_stream_is_split_across_two_ranks_none_twice_none_lost(tmp_path: Path) -> None:
    """4 files of 8 records streamed: `split_dataset_by_node` gives each rank 2 files, 16 records, 4 steps of 4."""
    folder = tmp_path / "stream"
    folder.mkdir()
    demo = [json.loads(line) for line in (ASSETS / "demo.jsonl").read_text().splitlines()[:32]]
    for f in range(4):
        (folder / f"part-{f:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo[f * 8 : (f + 1) * 8]))
    shares = fit_on_two_ranks(tmp_path / "run", 4, ["--data.source", str(folder), "--data.streaming", "true"])
    loaded = InstructDataModule(source=str(folder), tokenizer_path=str(DEMO_TOKENIZER), max_seq_len=64, shuffle=False, cache_dir=str(tmp_path / "cache"))
    loaded.setup("fit")
    assert len(shares[0]) == len(shares[1]) == 16
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(tuple(ids) for ids in loaded.train_dataset["input_ids"])
