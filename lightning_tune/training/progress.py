"""Training progress a person can read: by optimiser step over the whole run, with an ETA and the numbers that matter.

Lightning's default bar counts batches per epoch (`Epoch 6/-2` when only max_steps is set, restarting
each epoch), shows `v_num` and rounds a learning rate of 3e-4 to `0.000`. Here:

- `StepProgressBar` (a terminal): one bar over the run, `step/max_steps` with elapsed and remaining
  time, and `loss`, `lr` (scientific), `tokens/s` and the recipe's key metric (`KEY_METRICS`: DPO's
  and ORPO's `rewards/accuracies`, GRPO's `reward`, a reward model's `accuracy`), no `v_num`;
- `PlainProgress` (output to a file or a pipe: CI, nohup, a notebook's log): the same numbers as one
  plain line every `log_every_n_steps` optimiser steps and after each validation, instead of bar
  frames a file cannot show.

`progress_bar()` picks one for this process's stderr; the command line installs it unless the
config turns the progress bar off or names its own.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

# The recipe's key metric: the first of these it logs is shown beside the loss.
KEY_METRICS = ("rewards/accuracies", "reward", "accuracy", "rewards/margins")


def format_number(value: float) -> str:
    """3 significant digits, scientific below 1e-3 (a learning rate of 3e-5 is not 0.000); whole numbers from 1000 (tokens/s)."""
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.3g}"


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def step_metrics(trainer: pl.Trainer) -> dict[str, str]:
    """loss, lr, tokens/s and the key metric of the latest optimiser step, formatted (those logged so far)."""
    logged = trainer.callback_metrics
    shown = {"loss": "train_loss", "lr": "lr", "tokens/s": "tokens_per_s"}
    key = next((name for name in KEY_METRICS if name in logged), None)
    if key is not None:
        shown[key] = key
    out = {label: format_number(float(logged[name])) for label, name in shown.items() if name in logged}
    if "val_loss" in logged:
        out["val_loss"] = format_number(float(logged["val_loss"]))
    return out


def total_steps(trainer: pl.Trainer) -> int | None:
    """The run's optimiser steps: max_steps, else what Lightning estimates from epochs and batches (None if unknown)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    try:
        estimate = trainer.estimated_stepping_batches
    except Exception:  # an iterable without a length
        return None
    return int(estimate) if estimate != float("inf") else None


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimiser steps over the whole run (see the module docstring)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total_steps(trainer))
        self.train_progress_bar.n = trainer.global_step  # a resumed run starts where it stopped
        self.train_progress_bar.set_description("step")
        self.train_progress_bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run: not reset per epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if trainer.global_step != bar.n:
            bar.n = trainer.global_step
            bar.set_postfix(step_metrics(trainer), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_progress_bar.set_postfix(step_metrics(trainer))

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return step_metrics(trainer)  # the validation bar's postfix too: no v_num


class PlainProgress(ProgressBar):
    """One plain line per `log_every_n_steps` optimiser steps and per validation, for output that is not a terminal."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._started = 0.0
        self._first_step = 0
        self._printed_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self._first_step = trainer.global_step

    def print_line(self, trainer: pl.Trainer, prefix: str) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        step, total = trainer.global_step, total_steps(trainer)
        elapsed = time.perf_counter() - self._started
        done = step - self._first_step
        where = f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"
        eta = f" eta {format_duration(elapsed / done * (total - step))}" if total and done > 0 else ""
        numbers = " ".join(f"{name} {value}" for name, value in step_metrics(trainer).items())
        print(f"{prefix}{where} {numbers} elapsed {format_duration(elapsed)}{eta}".rstrip(), file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step != self._printed_step and (step % max(trainer.log_every_n_steps, 1) == 0 or step == total_steps(trainer)):
            self._printed_step = step
            self.print_line(trainer, "")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.print_line(trainer, "validated at ")


def progress_bar() -> ProgressBar:
    """The progress display for this process: a bar on a terminal, plain lines otherwise."""
    return StepProgressBar() if sys.stderr.isatty() else PlainProgress()
