"""Test-only Lightning callbacks and plugins that kill their own training process, for the resume and failure tests.

Importable by the `python -m lightning_tune fit` subprocesses (the tests put this directory on PYTHONPATH).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import lightning.pytorch as pl

from lightning_tune.training.callbacks import AtomicCheckpointIO


def die() -> None:
    """SIGKILL: no exception handler, no finally block, no Lightning teardown runs; like a pre-empted node."""
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(pl.Callback):
    """Kill the process when `step` optimiser steps are done (their checkpoint already written), before the next batch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            die()


class KillDuringSave(AtomicCheckpointIO):
    """AtomicCheckpointIO that dies while writing the checkpoint of `step`: its bytes are in the temporary
    file, not yet fsynced or renamed into place."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if checkpoint["global_step"] != self.step:
            return super().save_checkpoint(checkpoint, path, storage_options)
        with mock.patch("lightning_tune.io.files.os.fsync", side_effect=lambda fd: die()):
            super().save_checkpoint(checkpoint, path, storage_options)


# --------------------------------------------------------------------------------------------------
# Running a real, shrunk `fit` in a subprocess

TESTS = Path(__file__).resolve().parent
TINY_MODEL = "{vocab_size: 512, num_layers: 2, embed_dim: 64, num_heads: 4, num_kv_heads: 2, intermediate_dim: 128}"


def fit_args(root: Path, version: str, *, max_steps: int = 8, plugin: str | None = None, extra: list[str] = ()) -> list[str]:
    """`fit --config tiny_lora.yaml` shrunk to seconds: 2 layers, batches of 4, validation every 4 steps, dropout on (so the RNG matters), a checkpoint and
    last.ckpt after every step in root/checkpoints, per-step CSV metrics flushed at once in root/logs/<version>."""
    args = [
        "fit",
        "--config",
        "tiny_lora.yaml",
        "--trainer.max_steps",
        str(max_steps),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.val_check_interval",
        "4",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger",
        "CSVLogger",
        "--trainer.logger.save_dir",
        str(root),
        "--trainer.logger.name",
        "logs",
        "--trainer.logger.version",
        version,
        "--trainer.logger.flush_logs_every_n_steps",
        "1",
        "--data.batch_size",
        "4",
        "--data.max_seq_len",
        "64",
        "--data.val_size",
        "16",
        "--model.model_args",
        TINY_MODEL,
        "--model.lora_rank",
        "4",
        "--model.lora_dropout",
        "0.1",
        # `callbacks` (not `callbacks+`) replaces the config's ModelCheckpoint, whose relative dirpath would put
        # last*.ckpt files in the working directory, where `--ckpt_path last` (the newest last*.ckpt of any
        # ModelCheckpoint) could pick another run's.
        "--trainer.callbacks",
        "ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        str(root / "checkpoints"),
        "--trainer.callbacks.every_n_train_steps",
        "1",
        "--trainer.callbacks.save_last",
        "true",
    ]
    if plugin is not None:
        args += ["--trainer.plugins", plugin]
    return args + list(extra)


def run_fits(*runs: tuple[list[str], bool], timeout: float = 1800, cwd: Path | None = None) -> None:
    """Independent `run_fit`s (ARGS, killed) at the same time: each is single-threaded, so on 2 cores two
    fits take about the time of one (a kill-and-resume test runs its uninterrupted run beside the first
    interrupted one). Outputs go to files, not pipes, so no process blocks on a full pipe."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    with contextlib.ExitStack() as stack:
        started = []
        for args, killed in runs:
            err = stack.enter_context(tempfile.TemporaryFile(mode="w+"))
            started.append((subprocess.Popen([sys.executable, "-m", "lightning_tune", *args], env=env, stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=cwd), err, killed))
        for proc, err, killed in started:
            code = proc.wait(timeout=timeout)
            err.seek(0)
            expected = -signal.SIGKILL if killed else 0
            assert code == expected, f"exit {code}, expected {expected}\n{err.read()[-3000:]}"


def run_fit(args: list[str], *, killed: bool = False, timeout: float = 1800, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m lightning_tune ARGS` single-threaded (CPU float sums are then reproducible), in `cwd`, and check how it ended.

    `timeout` only catches a hang: a fit here takes ~10 s alone, but under a load of 8 on 2 cores minutes.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "lightning_tune", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    expected = -signal.SIGKILL if killed else 0
    assert proc.returncode == expected, f"exit {proc.returncode}, expected {expected}\n{proc.stderr[-3000:]}"
    return proc
