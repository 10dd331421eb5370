"""lm-evaluation-harness on our model: the LM adapter, the in-training callback and the bundled offline tasks.
The harness's names load on first use, so the callback (a config's class_path) imports without lm-eval."""

from __future__ import annotations

import importlib
from typing import Any

from lightning_tune.evaluation.callback import LMEvalCallback

# Names of `harness.py`, which needs lm-eval (optional): imported when one is first asked for; without
# lm-eval that import raises EvalError with the install line.
_HARNESS = (
    "BUNDLED_GROUP",
    "EvalError",
    "EvalTokenizer",
    "INSTALL_HINT",
    "LightningTuneLM",
    "TASKS_DIR",
    "flat_metrics",
    "hub_offline",
    "results_table",
    "run_tasks",
    "task_manager",
)

__all__ = ["LMEvalCallback", *_HARNESS]


def __getattr__(name: str) -> Any:
    if name not in _HARNESS:
        raise AttributeError(f"module 'lightning_tune.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module("lightning_tune.evaluation.harness"), name)
