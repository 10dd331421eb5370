"""The recipes: one LightningModule per fine-tuning method."""

from lightning_tune.modules.base import FinetuneModule
from lightning_tune.modules.dpo import DPOFinetune
from lightning_tune.modules.full import FullFinetune
from lightning_tune.modules.lora import LoRAFinetune
from lightning_tune.sharding import FSDP2Strategy  # registers --trainer.strategy fsdp2 with Lightning

__all__ = ["DPOFinetune", "FSDP2Strategy", "FinetuneModule", "FullFinetune", "LoRAFinetune"]
