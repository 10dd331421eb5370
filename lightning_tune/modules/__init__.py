"""Old path of `lightning_tune.recipes`: bundled configs before the re-layout and the `_class_path` saved
in every checkpoint name `lightning_tune.modules.LoRAFinetune` (and Full, DPO)."""

from lightning_tune.recipes import DPOFinetune, FinetuneModule, FSDP2Strategy, FullFinetune, LoRAFinetune

__all__ = ["DPOFinetune", "FSDP2Strategy", "FinetuneModule", "FullFinetune", "LoRAFinetune"]
