"""Exact resume: a `fit` killed with SIGKILL at a step boundary and resumed with `--ckpt_path last` equals an uninterrupted run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from kill_helpers import fit_args, run_fit
from safetensors.torch import load_file

from lightning_tune.checkpoint import load_training_checkpoint

KILL_AT = 4  # after the step-4 checkpoint, where validation also ran

# The resumed run's next epoch must shuffle as the uninterrupted one's did: InstructDataModule's sampler draws
# epoch e's order from (seed, e) alone (a DistributedSampler, set_epoch called by Lightning), not from a
# generator chained across epochs that a restored StatefulDataLoader could not continue exactly.
CROSSES_EPOCH = 5  # the resumed run crosses into epoch 1: its shuffle must equal the uninterrupted run's


def train_losses(root: Path, version: str) -> dict[int, str]:
    """step -> train_loss exactly as the CSV logger wrote it (the repr of the float: equal strings, equal bits)."""
    with (root / "logs" / version / "metrics.csv").open() as file:
        return {int(row["step"]): row["train_loss"] for row in csv.DictReader(file) if row.get("train_loss")}


@pytest.mark.parametrize("epoch_batches", [10, CROSSES_EPOCH])
def test_killed_and_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path: Path, epoch_batches: int) -> None:
    """8 steps; killed after step 4 (SIGKILL, no teardown), resumed with --ckpt_path last. With 10 batches an
    epoch the resumed run stays in epoch 0; with 5 it crosses into epoch 1."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    epoch = ["--trainer.limit_train_batches", str(epoch_batches)]
    run_fit(fit_args(straight, "run", extra=epoch))
    run_fit(fit_args(broken, "run", extra=epoch + ["--trainer.callbacks+", "kill_helpers.KillAtStep", "--trainer.callbacks.step", str(KILL_AT)]), killed=True)

    last = broken / "checkpoints" / "last.ckpt"
    assert load_training_checkpoint(last)["global_step"] == KILL_AT
    assert not (broken / "adapter").exists()  # killed: fit never reached its export
    run_fit(fit_args(broken, "resumed", extra=epoch + ["--ckpt_path", "last"]))

    expected = train_losses(straight, "run")
    assert len(expected) == 8
    before, after = train_losses(broken, "run"), train_losses(broken, "resumed")
    assert len(after) == 8 - KILL_AT  # resumed at step KILL_AT + 1, not from scratch and not replaying
    assert {**before, **after} == expected

    want = load_file(straight / "adapter" / "adapter_model.safetensors")
    got = load_file(broken / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and want
    for key in want:
        assert torch.equal(want[key], got[key]), key
    # The optimiser and scheduler came back too: the final training checkpoints are identical.
    a, b = load_training_checkpoint(straight / "checkpoints" / "last.ckpt"), load_training_checkpoint(last)
    assert a["global_step"] == b["global_step"] == 8
    assert a["lr_schedulers"] == b["lr_schedulers"]
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))
