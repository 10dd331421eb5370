"""`LMEvalCallback`: benchmark scores during fine-tuning, logged beside the loss.

Runs lm-evaluation-harness tasks on the model being trained (no export, no conversion, no download)
every `every_n_steps` optimiser steps and once at the end of fit, and writes each metric to the
run's loggers as `eval/TASK/METRIC` at the current step (metrics.csv for the CSVLogger). In a config:

    trainer:
      callbacks:
        - class_path: lightning_tune.LMEvalCallback
          init_args: {tasks: [lightning_tune], every_n_steps: 100, limit: 50}

Only rank 0 evaluates (the others wait at a barrier); a model sharded with FSDP2 cannot run on one
rank, so it is refused before training starts. The evaluation leaves training as it found it: every
module's train/eval mode and the random number generators (lm-eval reseeds them) are restored, and no
gradient is computed.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_tune.tokenizer import load_tokenizer


class LMEvalCallback(pl.Callback):
    """Evaluate lm-eval tasks every N steps and at the end of fit; log the metrics.

    Args:
        tasks: lm-eval task or group names; lightning_tune is the bundled offline demo.
        every_n_steps: Evaluate after every this many optimiser steps (None: only at the end of fit).
        at_fit_end: Evaluate once more when fit ends (skipped if that step was just evaluated).
        num_fewshot: Few-shot examples per prompt; default each task's own.
        limit: At most this many items per task (a fraction below 1: that share of each task).
        batch_size: Requests per forward pass.
        max_gen_toks: New tokens per generation when a task does not say.
        include_path: Directories of extra lm-eval task YAML files.
        tokenizer_path: Tokenizer; default the recipe's tokenizer_path.
        prefix: Prefix of the logged metric names.
        offline: Forbid Hugging Face Hub access (tasks must have local data, as the bundled ones do).
        apply_chat_template: Render prompts with the tokenizer's chat template (few-shot examples as turns).
    """

    def __init__(
        self,
        tasks: list[str] | None = None,
        every_n_steps: int | None = None,
        at_fit_end: bool = True,
        num_fewshot: int | None = None,
        limit: float | None = None,
        batch_size: int = 8,
        max_gen_toks: int = 256,
        include_path: list[str] | None = None,
        tokenizer_path: str | None = None,
        prefix: str = "eval/",
        offline: bool = True,
        apply_chat_template: bool = False,
    ) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"LMEvalCallback.every_n_steps: must be >= 1 or null, got {every_n_steps}")
        if batch_size < 1:
            raise ValueError(f"LMEvalCallback.batch_size: must be >= 1, got {batch_size}")
        if limit is not None and limit <= 0:
            raise ValueError(f"LMEvalCallback.limit: must be > 0 or null, got {limit}")
        self.tasks = list(tasks or ["lightning_tune"])
        self.every_n_steps = every_n_steps
        self.at_fit_end = at_fit_end
        self.num_fewshot = num_fewshot
        self.limit = limit
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.include_path = list(include_path or [])
        self.tokenizer_path = tokenizer_path
        self.prefix = prefix
        self.offline = offline
        self.apply_chat_template = apply_chat_template
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, metrics) of every evaluation on rank 0
        self._manager: Any = None
        self._tokenizer: Any = None
        self._last_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail before training, in one line, on a missing lm-eval, unknown task or missing tokenizer."""
        if stage != "fit":
            return
        from lightning_tune.evaluation.harness import EvalError, hub_offline, task_manager  # optional: needs lm-eval (else the install line)

        path = self.tokenizer_path or getattr(pl_module, "tokenizer_path", None)
        if path is None:
            raise EvalError("LMEvalCallback: the recipe has no tokenizer_path; set the callback's tokenizer_path")
        if trainer.is_global_zero:
            self._tokenizer = load_tokenizer(path)
            with hub_offline(self.offline):
                self._manager = task_manager(self.tasks, self.include_path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in pl_module.parameters()):
            from lightning_tune.evaluation.harness import EvalError  # optional: needs lm-eval

            raise EvalError("LMEvalCallback: the model is sharded (FSDP2), so no single process can run it; evaluate the exported merged/ with `python -m lightning_tune eval` instead")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation this hook runs once per micro-batch: evaluate once per step.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end and trainer.global_step != self._last_step and not trainer.interrupted:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Run the tasks now (rank 0), log their metrics at the current step; returns them ({} elsewhere)."""
        self._last_step = step = trainer.global_step
        metrics: dict[str, float] = {}
        if trainer.is_global_zero:
            metrics = self._run(trainer, pl_module.model)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
                logger.save()
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
            self.history.append((step, metrics))
            rank_zero_info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        trainer.strategy.barrier("lm_eval")
        return metrics

    def _run(self, trainer: pl.Trainer, model: torch.nn.Module) -> dict[str, float]:
        from lightning_tune.evaluation.harness import LightningTuneLM, flat_metrics, run_tasks  # optional: needs lm-eval

        modes = [(m, m.training) for m in model.modules()]
        rng = _rng_state()
        model.eval()
        try:
            lm = LightningTuneLM(model, self._tokenizer, batch_size=self.batch_size, max_gen_toks=self.max_gen_toks, autocast=trainer.precision_plugin.forward_context)
            results = run_tasks(
                lm,
                self.tasks,
                num_fewshot=self.num_fewshot,
                limit=self.limit,
                manager=self._manager,
                offline=self.offline,
                bootstrap_iters=0,
                apply_chat_template=self.apply_chat_template,
            )
        finally:
            for module, training in modes:
                module.training = training
            _set_rng_state(rng)
        return flat_metrics(results, self.prefix)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
