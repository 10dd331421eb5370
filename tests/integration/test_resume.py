"""Exact resume: a `fit` killed with SIGKILL at a step boundary and resumed with `--ckpt_path last` equals an uninterrupted run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from kill_helpers import fit_args, run_fit, run_fits
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler

from lightning_tune.checkpoint import load_training_checkpoint
from lightning_tune.data.sampler import LengthGroupedSampler, ResumableDistributedSampler

# (batches per epoch, validate every n steps, kill points): each kill is a SIGKILL before the batch after that step's
# checkpoint, each resume is `--ckpt_path last`. The later-epoch case is issue 14's: with 5 batches an epoch
# (`limit_train_batches`, which ends the epoch before its DataLoader is exhausted) and validation at step 5, between
# the epochs, the first resume crosses into epoch 1, the second starts at the boundary (step 5's checkpoint) and the
# third inside epoch 1. At the boundary Lightning starts epoch 1 on the restored epoch-0 iterator (no new `iter`), which
# the sampler's iterator notices from `set_epoch`. Resuming inside epoch e >= 1 is the
# case that once broke: Lightning rebuilds the restored DataLoader iterator before it calls the sampler's set_epoch, so a
# sampler that read its epoch at iteration time replayed epoch 0's shuffle; InstructDataModule's sampler iterator now
# carries its epoch in the checkpointed state.
CASES = {
    "kill in epoch 0 after validation": (10, 4, [4]),
    "kill in epochs 0 and 1, validation between epochs": (5, 5, [3, 5, 7]),
}


def train_losses(root: Path, version: str) -> dict[int, str]:
    """step -> train_loss exactly as the CSV logger wrote it (the repr of the float: equal strings, equal bits)."""
    with (root / "logs" / version / "metrics.csv").open() as file:
        return {int(row["step"]): row["train_loss"] for row in csv.DictReader(file) if row.get("train_loss")}


@pytest.mark.parametrize("epoch_batches, val_every, kills", list(CASES.values()), ids=list(CASES))
def test_killed_and_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path: Path, epoch_batches: int, val_every: int, kills: list[int]) -> None:
    """8 steps, killed (SIGKILL, no teardown) at each of `kills` and resumed with --ckpt_path last: the same losses, adapter,
    optimiser and scheduler state as the uninterrupted run."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    shape = ["--trainer.limit_train_batches", str(epoch_batches), "--trainer.val_check_interval", str(val_every)]
    last = broken / "checkpoints" / "last.ckpt"
    losses: dict[int, str] = {}
    for i, step in enumerate(kills):
        resume = ["--ckpt_path", "last"] if i else []
        killed = (fit_args(broken, f"run{i}", extra=shape + resume + ["--trainer.callbacks+", "kill_helpers.KillAtStep", "--trainer.callbacks.step", str(step)]), True)
        run_fits(*([(fit_args(straight, "run", extra=shape), False)] if i == 0 else []), killed, cwd=tmp_path)  # the uninterrupted run beside the first
        assert load_training_checkpoint(last)["global_step"] == step
        assert not (broken / "adapter").exists()  # killed: fit never reached its export
        got = train_losses(broken, f"run{i}")
        assert sorted(got) == list(range(kills[i - 1] if i else 0, step)), got  # resumed after the last step, no replay
        losses |= got
    run_fit(fit_args(broken, "resumed", extra=shape + ["--ckpt_path", "last"]), cwd=tmp_path)
    assert sorted(tmp_path.iterdir()) == [broken, straight]  # nothing in the working directory: `last` had one candidate

    expected = train_losses(straight, "run")
    assert len(expected) == 8
    after = train_losses(broken, "resumed")
    assert sorted(after) == list(range(kills[-1], 8))  # resumed at step kills[-1] + 1, not from scratch and not replaying
    assert {**losses, **after} == expected

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


@pytest.mark.parametrize("grouped", [False, True])
def test_restored_sampler_iterator_continues_its_own_epoch(grouped: bool) -> None:
    """What Lightning does on resume, without a Trainer: a new sampler (epoch 0) gets a restored iterator before
    `set_epoch`; it continues the checkpointed epoch. Restored at an epoch's end (the DataLoader not exhausted), it
    starts the epoch `set_epoch` then names. The plain sampler's order is torch's `DistributedSampler`'s."""
    n, seen = 50, 12

    def make() -> DistributedSampler:
        if grouped:
            return LengthGroupedSampler([i % 7 for i in range(n)], batch_size=4, seed=3, group_batches=2)
        return ResumableDistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=3)

    def epoch_order(epoch: int) -> list[int]:
        reference = make() if grouped else DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=3)
        reference.set_epoch(epoch)
        return list(reference)

    assert epoch_order(1) != epoch_order(0)
    sampler = make()
    sampler.set_epoch(1)
    running = iter(sampler)
    assert [next(running) for _ in range(seen)] == epoch_order(1)[:seen]

    restored_sampler = make()
    restored = iter(restored_sampler)  # built while the new sampler is still at epoch 0
    restored.load_state_dict(running.state_dict())
    restored_sampler.set_epoch(1)
    assert list(restored) == epoch_order(1)[seen:]

    restored_sampler = make()
    restored = iter(restored_sampler)
    restored.load_state_dict(running.state_dict())
    restored_sampler.set_epoch(2)  # the checkpoint was the last batch of epoch 1 (limit_train_batches)
    assert list(restored) == epoch_order(2)


def test_killed_and_resumed_mixture_with_expert_adapters_equals_uninterrupted(tmp_path: Path) -> None:
    """The same on a mixture of experts (tiny Qwen3-MoE, LoRA on attention and every expert; the load-balancing loss in
    the loss): killed after step 3 and resumed, the losses, the expert adapters and the optimiser state are the
    uninterrupted run's, bit for bit."""
    moe = [
        "--model.model_name",
        "tiny_qwen3_moe",
        "--model.apply_lora_to_mlp",
        "false",
        "--model.apply_lora_to_output",
        "false",
        "--model.apply_lora_to_experts",
        "true",
        "--model.lora_dropout",
        "0.0",
    ]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    kill = ["--trainer.callbacks+", "kill_helpers.KillAtStep", "--trainer.callbacks.step", "3"]
    run_fits((fit_args(straight, "run", max_steps=6, extra=moe), False), (fit_args(broken, "run0", max_steps=6, extra=moe + kill), True), cwd=tmp_path)
    run_fit(fit_args(broken, "resumed", max_steps=6, extra=[*moe, "--ckpt_path", "last"]), cwd=tmp_path)
    expected = train_losses(straight, "run")
    assert len(expected) == 6 and {**train_losses(broken, "run0"), **train_losses(broken, "resumed")} == expected
    want = load_file(straight / "adapter" / "adapter_model.safetensors")
    got = load_file(broken / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and any(k.endswith("mlp.experts.base_layer.lora_A.weight") for k in want)
    assert all(torch.equal(want[key], got[key]) for key in want)
    a, b = load_training_checkpoint(straight / "checkpoints" / "last.ckpt"), load_training_checkpoint(broken / "checkpoints" / "last.ckpt")
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))
