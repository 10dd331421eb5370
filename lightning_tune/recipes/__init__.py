"""The recipes: one LightningModule per objective (SFT, DPO), built on `FinetuneModule`, with a tuning (full or
LoRA, `tuning.py`) and for DPO a reference (`reference.py`). Importing it registers `--trainer.strategy fsdp2`."""

from lightning_tune.recipes.base import FinetuneModule
from lightning_tune.recipes.dpo import DPOFinetune
from lightning_tune.recipes.grpo import GRPOFinetune
from lightning_tune.recipes.kto import KTOFinetune
from lightning_tune.recipes.orpo import ORPOFinetune
from lightning_tune.recipes.reward_model import RewardModel
from lightning_tune.recipes.sft import FullFinetune, LoRAFinetune
from lightning_tune.recipes.simpo import SimPOFinetune
from lightning_tune.training.sharding import FSDP2Strategy  # registers --trainer.strategy fsdp2 with Lightning

__all__ = ["DPOFinetune", "FSDP2Strategy", "FinetuneModule", "FullFinetune", "GRPOFinetune", "KTOFinetune", "LoRAFinetune", "ORPOFinetune", "RewardModel", "SimPOFinetune"]
