"""lightning_tune: LLM fine-tuning recipes on PyTorch Lightning (Llama 2 / 3.x, Qwen 2.5 / 3, Mistral, SmolLM2).

Exports resolve lazily, so `python -m lightning_tune --help` answers without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CausalLM": "lightning_tune.model",
    "ModelConfig": "lightning_tune.model",
    "model_config": "lightning_tune.model",
    "Llama": "lightning_tune.model",  # old names (model/builders.py)
    "LlamaConfig": "lightning_tune.model",
    "llama2": "lightning_tune.model",
    "llama2_7b": "lightning_tune.model",
    "llama2_13b": "lightning_tune.model",
    "llama2_70b": "lightning_tune.model",
    "use_onednn_linears_": "lightning_tune.layers.onednn",
    "Tokenizer": "lightning_tune.tokenizer",
    "HFTokenizer": "lightning_tune.tokenizer",
    "load_tokenizer": "lightning_tune.tokenizer",
    "from_pretrained": "lightning_tune.checkpoint",
    "check_config": "lightning_tune.cli.check",
    "FullFinetune": "lightning_tune.recipes",
    "LoRAFinetune": "lightning_tune.recipes",
    "DPOFinetune": "lightning_tune.recipes",
    "GRPOFinetune": "lightning_tune.recipes",
    "grpo_loss": "lightning_tune.training.grpo",
    "ORPOFinetune": "lightning_tune.recipes",
    "SimPOFinetune": "lightning_tune.recipes",
    "RewardModel": "lightning_tune.recipes",
    "KTOFinetune": "lightning_tune.recipes",
    "UnpairedDataModule": "lightning_tune.data",
    "PreferenceDataModule": "lightning_tune.data",
    "PromptDataModule": "lightning_tune.data",
    "InstructDataModule": "lightning_tune.data",
    "ChatDataModule": "lightning_tune.data",
    "LMEvalCallback": "lightning_tune.evaluation.callback",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from lightning_tune.checkpoint import from_pretrained
    from lightning_tune.cli.check import check_config
    from lightning_tune.data import ChatDataModule, InstructDataModule, PreferenceDataModule, PromptDataModule, UnpairedDataModule
    from lightning_tune.evaluation.callback import LMEvalCallback
    from lightning_tune.layers.onednn import use_onednn_linears_
    from lightning_tune.model import CausalLM, Llama, LlamaConfig, ModelConfig, llama2, llama2_7b, llama2_13b, llama2_70b, model_config
    from lightning_tune.recipes import DPOFinetune, FullFinetune, GRPOFinetune, KTOFinetune, LoRAFinetune, ORPOFinetune, RewardModel, SimPOFinetune
    from lightning_tune.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
    from lightning_tune.training.grpo import grpo_loss


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_tune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
