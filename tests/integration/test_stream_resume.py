"""Streaming exact resume (issue 34): a `fit` on a streamed multi-file local source (`data.streaming: true`), killed
with SIGKILL at a step boundary and resumed with `--ckpt_path last`, equals the uninterrupted run bit for bit: the
stream's own state (`datasets`' IterableDataset.state_dict: epoch, file, record) travels in the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kill_helpers import fit_args, run_fit, run_fits
from safetensors.torch import load_file
from test_resume import train_losses

from lightning_tune.checkpoint import load_training_checkpoint
from lightning_tune.data.base import ASSETS

FILES, PER_FILE, HELD_OUT = 3, 8, 4  # 24 records, the first 4 for validation: 20 train, 5 batches of 4 an epoch


def stream_source(root: Path) -> Path:
    """Three JSON-lines files of the demo's instructions: a folder `datasets` streams file by file."""
    records = [json.loads(line) for line in (ASSETS / "demo.jsonl").read_text().splitlines()[: FILES * PER_FILE]]
    root.mkdir()
    for f in range(FILES):
        (root / f"part-{f:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[f * PER_FILE : (f + 1) * PER_FILE]))
    return root


# Kill points (SIGKILL before the batch after that step's checkpoint). A pass is 5 batches: 3 and 7 are inside the first
# and second pass. 5 is the checkpoint of the first pass's last batch: the data resumes right (the next pass, from its
# start: tests/data/test_streaming.py), but Lightning, which knows no length for a stream, resumes into the next epoch
# counting its batches on from the old epoch's (batch_idx 5, not 0), and StepSeed seeds dropout from batch_idx, so the
# losses differ from step 5 on. Strict: it fails once that is no longer so (then drop the mark).
CASES = {
    "kill inside the first and the second pass": [3, 7],
    "kill at a pass's last batch": pytest.param([5], marks=pytest.mark.xfail(strict=True, reason="Lightning's batch_idx after resuming at the end of a length-less epoch; StepSeed seeds from it")),
}


@pytest.mark.parametrize("kills", list(CASES.values()), ids=list(CASES))
def test_streamed_run_killed_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path: Path, kills: list[int]) -> None:
    """8 steps over a 5-batch stream (so the run reads it twice), killed at each of `kills` and resumed with
    --ckpt_path last: the same losses, adapter and optimiser state as the uninterrupted run."""
    source = stream_source(tmp_path / "stream")
    data = [
        "--data.source",
        str(source),
        "--data.tokenizer_path",
        str(ASSETS / "demo_tokenizer.model"),
        "--data.streaming",
        "true",
        "--data.val_size",
        str(HELD_OUT),
        "--data.cache_dir",
        str(tmp_path / "cache"),
    ]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    last = broken / "checkpoints" / "last.ckpt"
    losses: dict[int, str] = {}
    for i, step in enumerate(kills):
        resume = ["--ckpt_path", str(last)] if i else []
        killed = (fit_args(broken, f"run{i}", extra=data + resume + ["--trainer.callbacks+", "kill_helpers.KillAtStep", "--trainer.callbacks.step", str(step)]), True)
        run_fits(*([(fit_args(straight, "run", extra=data), False)] if i == 0 else []), killed, cwd=tmp_path)
        assert load_training_checkpoint(last)["global_step"] == step
        got = train_losses(broken, f"run{i}")
        assert sorted(got) == list(range(kills[i - 1] if i else 0, step)), got  # no step replayed or skipped
        losses |= got
    run_fit(fit_args(broken, "resumed", extra=data + ["--ckpt_path", str(last)]), cwd=tmp_path)

    expected = train_losses(straight, "run")
    assert len(expected) == 8
    after = train_losses(broken, "resumed")
    assert sorted(after) == list(range(kills[-1], 8))
    assert {**losses, **after} == expected  # equal strings of the float reprs: equal bits

    want = load_file(straight / "adapter" / "adapter_model.safetensors")
    got = load_file(broken / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and want
    for key in want:
        assert torch.equal(want[key], got[key]), key
    a, b = load_training_checkpoint(straight / "checkpoints" / "last.ckpt"), load_training_checkpoint(last)
    assert a["global_step"] == b["global_step"] == 8
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))
