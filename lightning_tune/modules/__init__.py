"""The recipes: one LightningModule per fine-tuning method."""

from lightning_tune.modules.base import FinetuneModule
from lightning_tune.modules.full import FullFinetune
from lightning_tune.modules.lora import LoRAFinetune

__all__ = ["FinetuneModule", "FullFinetune", "LoRAFinetune"]
