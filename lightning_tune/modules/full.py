"""Full fine-tuning: every parameter of the model trains."""

from __future__ import annotations

from typing import Any

from lightning_tune.modules.base import FinetuneModule


class FullFinetune(FinetuneModule):
    """Fine-tune all weights of the model; exports a Hugging Face directory to `merged/`.

    Every parameter of `FinetuneModule` applies; only two defaults differ, the usual ones for
    updating all weights of a pretrained model.

    Args:
        lr: Peak learning rate; small, since every pretrained weight moves.
        betas: Adam betas; beta2 0.95 damps the loss spikes of full fine-tuning.
        **kwargs: The other parameters of `FinetuneModule`.
    """

    def __init__(self, lr: float = 2e-5, betas: tuple[float, float] = (0.9, 0.95), **kwargs: Any) -> None:
        super().__init__(lr=lr, betas=betas, **kwargs)
