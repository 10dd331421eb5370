"""A custom recipe, outside the package: full fine-tuning with the lowest decoder layers frozen.

Freezing the embedding and the first layers keeps what they learned in pre-training and saves
their gradients and optimiser state (memory), a common middle ground between LoRA and full
fine-tuning. The README's "Your own recipe" section walks through this file.
"""

from __future__ import annotations

from typing import Any

from lightning_tune.recipes import FullFinetune


class PartialFreezeFinetune(FullFinetune):
    """Full fine-tuning with the embedding and the first `freeze_layers` decoder layers frozen.

    Every parameter of `FullFinetune` applies; this is the recipe's own.

    Args:
        freeze_layers: How many decoder layers, counted from the input, stay frozen (with the embedding).
        **kwargs: The parameters of `FullFinetune` (model_name, checkpoint_dir, lr, ...).
    """

    def __init__(self, freeze_layers: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if freeze_layers < 0:  # checked at construction: `validate` and `fit` fail before any work
            raise ValueError(f"freeze_layers: must be >= 0, got {freeze_layers}")
        self.freeze_layers = freeze_layers

    def adapt_model(self, model) -> None:
        """Called once the model exists (configure_model), before the optimiser is built."""
        super().adapt_model(model)
        decoder = model.model  # the CausalLM's decoder: embed_tokens, layers, norm (lm_head beside it)
        if self.freeze_layers > len(decoder.layers):
            raise ValueError(f"freeze_layers: {self.freeze_layers} exceeds the model's {len(decoder.layers)} decoder layers")
        for module in [decoder.embed_tokens, *decoder.layers[: self.freeze_layers]]:
            module.requires_grad_(False)
