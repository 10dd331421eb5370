"""Training progress (#30 item 7): by optimiser step over the whole run with an ETA, the learning rate in
scientific form, no v_num; plain lines where the output is not a terminal; installed by the command line."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from tiny_helpers import TINY, batches
from torch.utils.data import DataLoader

from lightning_tune.recipes import LoRAFinetune
from lightning_tune.training.progress import PlainProgress, StepProgressBar, format_number


def test_numbers_keep_their_digits() -> None:
    assert format_number(3e-4) == "3.00e-04"  # Lightning's bar showed 0.000
    assert format_number(0.0) == "0"
    assert format_number(1.23456) == "1.23"
    assert format_number(3740.2) == "3740"
    assert format_number(-2e-5) == "-2.00e-05"


def fit(callback: pl.Callback, steps: int, epoch_batches: int, **trainer: object) -> pl.Trainer:
    torch.manual_seed(0)
    module = LoRAFinetune(model_name="tiny_llama2", model_args=TINY, lora_dropout=0.0, warmup_steps=2, export=False)
    run = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[callback], **trainer)
    run.fit(module, DataLoader(batches(epoch_batches), batch_size=None))
    return run


def test_plain_lines_count_steps_over_the_whole_run(capsys) -> None:
    """6 steps over 3 epochs of 2 batches, a line every 2 steps: the count goes on across epochs."""
    fit(PlainProgress(), steps=6, epoch_batches=2, log_every_n_steps=2)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all("loss " in line and " lr " in line and "tokens/s " in line and " eta " in line for line in lines)
    assert "v_num" not in "".join(lines)
    assert " lr 1.50e-04 " in lines[0]  # the second step's warmup learning rate (half of 3e-4), with its digits


def test_the_bar_counts_optimiser_steps_not_batches_per_epoch() -> None:
    bar = StepProgressBar()
    fit(bar, steps=6, epoch_batches=2, accumulate_grad_batches=2)  # 12 batches, 6 epochs of 1 step each
    assert bar.train_progress_bar.total == 6 and bar.train_progress_bar.n == 6
    postfix = bar.train_progress_bar.postfix or ""
    assert "loss=" in postfix and "lr=" in postfix and "v_num" not in postfix


def test_the_command_line_installs_it(tmp_path, capsys, monkeypatch) -> None:
    from lightning_tune.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", "tiny_dpo.yaml", "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", "run", "--trainer.logger", "false"]
    args += ["--trainer.callbacks=[]", "--trainer.enable_checkpointing", "false", "--model.export", "false", "--data.max_seq_len", "48"]
    args += ["--model.model_args", "{vocab_size: 512, num_layers: 1, embed_dim: 32, num_heads: 4, num_kv_heads: 2, intermediate_dim: 64}"]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert all("rewards/accuracies " in line for line in lines)  # DPO's key metric beside the loss
